#include "server/metrics.h"

#include "core/log.h"

#include <algorithm>
#include <chrono>
#include <iterator>

namespace sluice::server {
namespace {

void Add(std::atomic<uint64_t>& c, uint64_t n = 1) {
  // Only the owning thread writes a block: a load and a store, no locked instruction.
  c.store(c.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
}

constexpr const char* kOutcomeNames[] = {"allowed", "limited", "shadow_limited", "delayed",
                                         "peeked"};
static_assert(std::size(kOutcomeNames) == Metrics::kOutcomes);
constexpr unsigned kRefusedStatuses[] = {400, 413, 414, 431, 501, 505};

}  // namespace

std::vector<std::pair<uint64_t, Metrics::Block*>>& Metrics::ThreadBlocks() {
  thread_local std::vector<std::pair<uint64_t, Block*>> mine;
  return mine;
}

// Other threads' entries for this Metrics stay behind, unused: no id is given twice.
Metrics::~Metrics() {
  std::erase_if(ThreadBlocks(), [this](const auto& e) { return e.first == id_; });
}

Metrics::Block& Metrics::Mine() {
  auto& mine = ThreadBlocks();
  for (const auto& [owner, block] : mine) {
    if (owner == id_) return *block;
  }
  std::lock_guard lock(mu_);
  blocks_.push_back(std::make_unique<Block>());
  mine.emplace_back(id_, blocks_.back().get());
  return *blocks_.back();
}

size_t Metrics::SlotFor(const std::string& rule_name) {
  std::lock_guard lock(mu_);
  auto it = std::find(names_.begin(), names_.end(), rule_name);
  if (it != names_.end()) return static_cast<size_t>(it - names_.begin());
  if (names_.size() + 1 >= kMaxRules) {
    if (!full_said_) {
      full_said_ = true;
      Log("WARN", "metrics: " + std::to_string(kMaxRules - 1) +
                      " rule names have been counted since start (reloads keep every name "
                      "they met, so that counters stay monotonic); '" +
                      rule_name +
                      "' and later new names are counted as \"(other)\" until a restart");
    }
    other_used_ = true;
    return kMaxRules - 1;
  }
  names_.push_back(rule_name);
  return names_.size() - 1;
}

size_t Metrics::SlotForRequestValue(const std::string& name) {
  std::lock_guard lock(mu_);
  auto it = std::find(names_.begin(), names_.end(), name);
  if (it != names_.end()) return static_cast<size_t>(it - names_.begin());
  if (names_.size() + 1 >= kMaxRules || request_names_ >= kMaxRequestNames) {
    if (!other_used_ && !request_full_said_) {
      request_full_said_ = true;
      Log("WARN", "metrics: " + std::to_string(kMaxRequestNames) +
                      " names built from request values (detailed_metric) have been counted "
                      "since start; '" +
                      name + "' and later new ones are counted as \"(other)\" until a restart");
    }
    other_used_ = true;
    return kMaxRules - 1;
  }
  names_.push_back(name);
  ++request_names_;
  return names_.size() - 1;
}

void Metrics::Count(size_t slot, Outcome outcome) {
  Add(Mine().rules[std::min(slot, kMaxRules - 1)][static_cast<size_t>(outcome)]);
}

int64_t Metrics::LatencyNowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Metrics::ObserveLatency(int64_t micros) {
  Block& b = Mine();
  size_t i = 0;
  while (i < kLatencyBucketsUs.size() && micros > kLatencyBucketsUs[i]) ++i;
  Add(b.latency[i]);
  Add(b.latency_sum_us, static_cast<uint64_t>(std::max<int64_t>(micros, 0)));
}

void Metrics::CountBadRequest() { Add(Mine().bad_requests); }
void Metrics::CountAbandoned() { Add(Mine().abandoned); }
void Metrics::CountQueueShed() { Add(Mine().queue_shed); }
void Metrics::CountClientGone() { Add(Mine().client_gone); }
void Metrics::CountDegraded(size_t mode) { Add(Mine().degraded[std::min<size_t>(mode, 2)]); }
void Metrics::CountStoreError(size_t kind) { Add(Mine().store_errors[std::min<size_t>(kind, 2)]); }
void Metrics::CountUpstreamFailure(size_t kind) {
  Add(Mine().upstream_failures[std::min<size_t>(kind, 4)]);
}
void Metrics::CountConnectionRefused() { Add(Mine().connections_refused); }
void Metrics::CountBodyRefused() { Add(Mine().bodies_refused); }
void Metrics::CountAcceptFailure() { Add(Mine().accept_failures); }
void Metrics::CountRequestRefused(unsigned status) {
  for (size_t i = 0; i < std::size(kRefusedStatuses); ++i) {
    if (kRefusedStatuses[i] == status) return Add(Mine().requests_refused[i]);
  }
}

void AppendMetric(std::string& out, std::string_view name, std::string_view help,
                  std::string_view type, std::string_view value) {
  out.append("# HELP ").append(name).append(" ").append(help).append("\n# TYPE ");
  out.append(name).append(" ").append(type).append("\n").append(name).append(" ");
  out.append(value).append("\n");
}

std::string PromLabel(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f || c == '%') {
      // The text format has no escape for them, and a raw CR or NUL breaks some scrapers:
      // written as %XX (only a request's values can hold them; config names cannot). A '%'
      // is written %25 too: two values must never make one series ("a\rb" and "a%0Db").
      constexpr char kHex[] = "0123456789ABCDEF";
      out += '%';
      out += kHex[static_cast<unsigned char>(c) >> 4];
      out += kHex[c & 0xf];
    } else {
      out += c;
    }
  }
  return out;
}

std::string Metrics::Render(const std::function<void(std::string&)>& extra) const {
  std::lock_guard lock(mu_);
  std::string out;
  out += "# HELP sluice_decisions_total Decisions by rule and outcome.\n";
  out += "# TYPE sluice_decisions_total counter\n";
  // The names given slots, then "(other)": the last slot, which every name past a bound
  // shares (SlotFor, SlotForRequestValue), shown once one has been given it.
  const auto emit = [&](size_t slot, const std::string& name) {
    for (size_t o = 0; o < kOutcomes; ++o) {
      uint64_t sum = 0;
      for (const auto& b : blocks_) sum += b->rules[slot][o].load(std::memory_order_relaxed);
      out += "sluice_decisions_total{rule=\"" + name + "\",outcome=\"" + kOutcomeNames[o] + "\"} " +
             std::to_string(sum) + "\n";
    }
  };
  for (size_t slot = 0; slot < names_.size(); ++slot) emit(slot, PromLabel(names_[slot]));
  if (other_used_) emit(kMaxRules - 1, "(other)");
  out +=
      "# HELP sluice_decision_latency_seconds Time to decide a request (a gateway request, a "
      "decision API call or batch, an RLS call).\n";
  out += "# TYPE sluice_decision_latency_seconds histogram\n";
  uint64_t cumulative = 0, sum_us = 0;
  for (size_t i = 0; i <= kLatencyBucketsUs.size(); ++i) {
    for (const auto& b : blocks_) cumulative += b->latency[i].load(std::memory_order_relaxed);
    std::string le = i < kLatencyBucketsUs.size()
                         ? std::to_string(static_cast<double>(kLatencyBucketsUs[i]) / 1e6)
                         : "+Inf";
    out += "sluice_decision_latency_seconds_bucket{le=\"" + le + "\"} " +
           std::to_string(cumulative) + "\n";
  }
  for (const auto& b : blocks_) sum_us += b->latency_sum_us.load(std::memory_order_relaxed);
  out += "sluice_decision_latency_seconds_sum " +
         std::to_string(static_cast<double>(sum_us) / 1e6) + "\n";
  out += "sluice_decision_latency_seconds_count " + std::to_string(cumulative) + "\n";
  // A counter summed over the threads' blocks.
  auto counter = [&](std::string_view name, std::string_view help, auto member) {
    uint64_t n = 0;
    for (const auto& b : blocks_) n += ((*b).*member).load(std::memory_order_relaxed);
    AppendMetric(out, name, help, "counter", std::to_string(n));
  };
  counter("sluice_bad_requests_total",
          "Requests the gateway or the decision API answered 400 for what they asked (a "
          "malformed check, a TRACE with a body, a path it refuses).",
          &Block::bad_requests);
  counter("sluice_queue_abandoned_total",
          "Queued (leaky_queue) requests whose client left before their turn; not forwarded.",
          &Block::abandoned);
  counter("sluice_queue_shed_total",
          "Queued (leaky_queue) requests answered 503 at shutdown: their turn came after the "
          "drain deadline. Not forwarded.",
          &Block::queue_shed);
  counter("sluice_upstream_client_gone_total",
          "Forwarded requests whose client left before the upstream answered; their upstream "
          "connection was closed.",
          &Block::client_gone);
  auto sum_at = [&](auto member, size_t i) {
    uint64_t n = 0;
    for (const auto& b : blocks_) n += ((*b).*member)[i].load(std::memory_order_relaxed);
    return std::to_string(n);
  };
  out +=
      "# HELP sluice_degraded_decisions_total Decisions made without the shared store, by "
      "fail mode.\n# TYPE sluice_degraded_decisions_total counter\n";
  constexpr const char* kModes[] = {"open", "closed", "local"};
  for (size_t i = 0; i < 3; ++i) {
    out += std::string("sluice_degraded_decisions_total{fail_mode=\"") + kModes[i] + "\"} " +
           sum_at(&Block::degraded, i) + "\n";
  }
  out +=
      "# HELP sluice_store_errors_total Failed calls to the shared store, by kind.\n"
      "# TYPE sluice_store_errors_total counter\n";
  constexpr const char* kKinds[] = {"timeout", "connection", "server"};
  for (size_t i = 0; i < 3; ++i) {
    out += std::string("sluice_store_errors_total{kind=\"") + kKinds[i] + "\"} " +
           sum_at(&Block::store_errors, i) + "\n";
  }
  out +=
      "# HELP sluice_upstream_failures_total Requests answered 502 or 504 for the upstream, "
      "by kind, and streamed answers it cut short after their head (body_cut).\n"
      "# TYPE sluice_upstream_failures_total counter\n";
  constexpr const char* kUpstream[] = {"connect", "timeout", "broken", "bad_answer", "body_cut"};
  for (size_t i = 0; i < 5; ++i) {
    out += std::string("sluice_upstream_failures_total{kind=\"") + kUpstream[i] + "\"} " +
           sum_at(&Block::upstream_failures, i) + "\n";
  }
  counter("sluice_connections_refused_total",
          "Connections closed at accept, over --max-connections or --max-connections-per-ip.",
          &Block::connections_refused);
  counter("sluice_bodies_refused_total",
          "Requests answered 503 unread: their bodies would take the bodies in flight past "
          "--max-buffered-mib.",
          &Block::bodies_refused);
  out +=
      "# HELP sluice_requests_refused_total Requests the HTTP server answered without reading "
      "them on, by status: 400 malformed, 413, 414 and 431 over a size bound, 501 a transfer "
      "coding it does not take, 505 an HTTP version it does not speak. No rule saw them.\n"
      "# TYPE sluice_requests_refused_total counter\n";
  for (size_t i = 0; i < std::size(kRefusedStatuses); ++i) {
    out += "sluice_requests_refused_total{status=\"" + std::to_string(kRefusedStatuses[i]) +
           "\"} " + sum_at(&Block::requests_refused, i) + "\n";
  }
  counter("sluice_accept_failures_total",
          "Times a listener could not accept (out of file descriptors, mostly; the "
          "connection waits in the kernel's queue and accepting resumes after 100 ms).",
          &Block::accept_failures);
  if (extra) extra(out);
  return out;
}

}  // namespace sluice::server
