#include "server/rls.h"

#include "server/json_keys.h"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <limits>
#include <map>
#include <mutex>
#include <optional>

#include <google/protobuf/stubs/logging.h>
#include <google/protobuf/util/json_util.h>
#include <boost/asio/post.hpp>

#include "core/log.h"
#include "grpc/health/v1/health.pb.h"
#include "server/grpc_server.h"

namespace sluice::server {
namespace envoy = rules::envoy;

namespace {

uint32_t ToU32(int64_t v) {
  return static_cast<uint32_t>(std::clamp<int64_t>(v, 0, std::numeric_limits<uint32_t>::max()));
}

// libprotobuf logs from inside a parse that a client's bytes drive (a string field that is
// not UTF-8, which the parse then refuses): left to itself it would write a line to stderr
// per call. Its lines go through Sluice's log instead, at most one a second.
LogLimiter g_protobuf_log;
void ProtobufLog(google::protobuf::LogLevel level, const char* /*file*/, int /*line*/,
                 const std::string& message) {
  if (level < google::protobuf::LOGLEVEL_WARNING) return;
  if (level < google::protobuf::LOGLEVEL_FATAL && !g_protobuf_log.Allow()) return;
  uint64_t dropped = g_protobuf_log.TakeSuppressed();
  Log("WARN", "protobuf: " + message +
                  (dropped ? " (" + std::to_string(dropped) + " more lines suppressed)" : ""));
}

}  // namespace

// The config with a store limit for each of its RateLimitSpecs, and the limits requests
// bring themselves (descriptor.limit), made on first use.
struct Rls::Compiled {
  envoy::EnvoyConfig config;
  boost::unordered_flat_map<const envoy::RateLimitSpec*, StoreLimits> limits;
};

Rls::Rls(Service& service, RlsOptions options) : service_(service), options_(std::move(options)) {
  static std::once_flag once;
  std::call_once(once, [] { google::protobuf::SetLogHandler(ProtobufLog); });
}

Rls::~Rls() = default;

void Rls::ForEachLimit(
    const std::function<void(std::string_view name, const Limit&)>& visit) const {
  if (auto c = Current()) {
    for (const auto& [spec, l] : c->limits) {
      if (l.local) visit("envoy:" + spec->id, *l.local);
    }
  }
  std::vector<const Limit*> own;  // visited with no lock of this Rls held
  {
    std::lock_guard lock(overrides_mu_);
    for (const auto& [id, l] : overrides_) {
      if (l.local) own.push_back(l.local);
    }
  }
  for (const Limit* l : own) visit("envoy:(request limit)", *l);
}

Status Rls::Load(const std::string& dir) {
  std::lock_guard lock(load_mu_);
  auto c = std::make_shared<Compiled>();
  envoy::EnvoyLoadOptions load_options;
  load_options.merge_domains = options_.merge_domains;
  if (Status st = envoy::LoadEnvoyConfigDir(dir, &c->config, load_options); !st.ok()) return st;
  std::string unsyncable;  // the first limit store mode local_sync cannot decide
  std::function<void(const envoy::Descriptor&)> add = [&](const envoy::Descriptor& d) {
    for (const envoy::RateLimitSpec& spec : d.limits) {
      if (spec.unlimited) continue;
      StoreLimits l;
      std::string name = "envoy:" + spec.id;
      l.metrics_slot = service_.metrics().SlotFor(name);
      l.local = service_.store().AddLimitOrVariant(name, spec.policy);
      if (service_.remote()) {
        // As the rules file's limits: Redis' script computes in doubles, so a policy whose
        // numbers pass 2^53 would be decided with rounding.
        if (!redis::ScriptExact(spec.policy) && unsyncable.empty()) {
          unsyncable = "envoy config: limit " + spec.id + " (" + spec.policy.ToString() +
                       ") is too large for the redis store, whose script computes in doubles "
                       "(a count times the unit in microseconds must stay below 2^53): use a "
                       "smaller requests_per_unit or burst, a shorter unit, or the memory store";
        }
        l.remote = std::make_unique<redis::RemoteLimit>(redis::MakeRemoteLimit(name, spec.policy));
      }
      if (service_.local_sync()) {
        std::string error;
        l.synced = service_.AddSyncLimit(name, spec.policy, &error);
        if (l.synced && spec.policy.period <= service_.sync_interval() && unsyncable.empty()) {
          unsyncable = "envoy config: limit " + spec.id + ": " +
                       rules::SyncIntervalTooLong(spec.policy.period, service_.sync_interval());
        }
        if (!error.empty() && unsyncable.empty()) {
          unsyncable = "envoy config: limit " + spec.id + ": " + error;
        } else if (!l.synced && unsyncable.empty()) {
          unsyncable = "envoy config: limit " + spec.id + " (" + spec.policy.ToString() +
                       ") cannot run with store mode local_sync, which adds up counts per "
                       "window: it takes fixed_window and sliding_window_counter limits up "
                       "to " +
                       std::to_string(sync::kMaxLimit) + " (or use mode remote)";
        }
      }
      c->limits.emplace(&spec, std::move(l));
    }
    for (const envoy::Descriptor& child : d.descriptors) add(child);
  };
  for (const auto& [name, domain] : c->config.domains) {
    for (const envoy::Descriptor& d : domain.descriptors) add(d);
  }
  if (!unsyncable.empty()) return Status::Invalid(unsyncable);
  // At each load: a config that loads with a warning would otherwise say nothing.
  for (const std::string& w : c->config.warnings) Log("WARN", "envoy config: " + w);
  {
    std::lock_guard current_lock(current_mu_);
    current_ = std::move(c);
  }
  generation_.fetch_add(1, std::memory_order_release);
  return Status::Ok();
}

namespace {
struct RlsThreadView {
  uint64_t owner = 0;  // Rls::id_
  uint64_t generation = 0;
  std::shared_ptr<const Rls::Compiled> config;
};
thread_local RlsThreadView t_rls_view;

// The metrics slot of a name built from a request's values (detailed_metric,
// value_to_metric). Each thread remembers the names it has met, so the shared registry's
// lock is taken once per name and thread; past kMaxRemembered names a thread asks the
// registry each time (its slots are bounded anyway: Metrics::kMaxRequestNames, then "(other)").
size_t DetailedSlot(Metrics& metrics, std::string name) {
  constexpr size_t kMaxRemembered = 4 * Metrics::kMaxRules;
  thread_local boost::unordered_flat_map<std::string, size_t> remembered;
  thread_local const Metrics* owner = nullptr;
  if (owner != &metrics) {  // another service (tests run several in one process)
    remembered.clear();
    owner = &metrics;
  }
  if (auto it = remembered.find(name); it != remembered.end()) return it->second;
  size_t slot = metrics.SlotForRequestValue(name);
  if (remembered.size() < kMaxRemembered) remembered.emplace(std::move(name), slot);
  return slot;
}
}  // namespace

std::shared_ptr<const Rls::Compiled> Rls::Current() const {
  RlsThreadView& v = t_rls_view;
  uint64_t g = generation_.load(std::memory_order_acquire);
  if (v.owner != id_ || v.generation != g) {
    std::lock_guard lock(current_mu_);
    v.owner = id_;
    v.generation = generation_.load(std::memory_order_relaxed);
    v.config = current_;
  }
  return v.config;
}

size_t Rls::domains() const {
  auto c = Current();
  return c ? c->config.domains.size() : 0;
}

namespace {
// A call of more descriptors than this is not pooled: its memory goes back to the allocator
// (Envoy's calls carry a few; any client may send thousands once). Nor are more spare calls
// than kPooledJoins kept: a burst of calls waiting on a slow Redis leaves no lasting pool.
constexpr size_t kPooledDescriptors = 64;
constexpr size_t kPooledJoins = 1024;
}  // namespace

std::vector<std::unique_ptr<Rls::Join>>& Rls::JoinPool() {
  thread_local std::vector<std::unique_ptr<Join>> pool;
  return pool;
}

Rls::Join* Rls::TakeJoin(size_t descriptors) {
  auto& pool = JoinPool();
  Join* j;
  if (descriptors > kPooledDescriptors || pool.empty()) {
    j = new Join;  // NOLINT: GiveBackJoin pools or deletes it
  } else {
    j = pool.back().release();
    pool.pop_back();
  }
  if (j->items.size() < descriptors) j->items.resize(descriptors);
  j->matches.resize(descriptors);
  j->n = descriptors;
  for (Item& item : j->Items()) {
    item.used = 0;
    item.specs.clear();
    item.metrics_slots.clear();
    item.override_policy = Policy();
    item.override_unit = envoy::Unit::kUnknown;
    item.shadow = false;
    item.unlimited = false;
    item.result.decisions.clear();
    item.result.degraded = Degraded::kNo;
    item.decided = false;
  }
  return j;
}

void Rls::GiveBackJoin(Join* j) {
  j->config.reset();
  j->done = nullptr;
  j->resp = nullptr;
  auto& pool = JoinPool();
  if (j->n > kPooledDescriptors || pool.size() >= kPooledJoins) {
    delete j;  // NOLINT: taken by TakeJoin
    return;
  }
  pool.emplace_back(j);
}

void Rls::Decide(const rlspb::RateLimitRequest& req, rlspb::RateLimitResponse* resp,
                 boost::asio::io_context& io, Done done) {
  if (req.domain().empty()) {
    return done(RlsFailure::kInvalidArgument, "rate limit domain must not be empty");
  }
  if (req.descriptors_size() == 0) {
    return done(RlsFailure::kInvalidArgument, "rate limit descriptor list must not be empty");
  }
  auto c = Current();
  if (!c) return done(RlsFailure::kUnavailable, "no envoy rate limit config loaded");
  const int n = req.descriptors_size();
  Join* join = TakeJoin(static_cast<size_t>(n));
  join->start = Metrics::LatencyNowUs();
  join->rls = this;
  join->config = c;
  join->resp = resp;
  join->done = std::move(done);
  // Match every descriptor, then drop replaced limits across all of them.
  auto& matches = join->matches;
  auto& entries = join->entries;
  auto entries_of = [&entries](const auto& d) -> const auto& {
    entries.clear();
    for (const auto& e : d.entries()) entries.emplace_back(e.key(), e.value());
    return entries;
  };
  for (int i = 0; i < n; ++i) {
    const auto& d = req.descriptors(i);
    auto& m = matches[static_cast<size_t>(i)];
    if (d.has_limit()) {
      m.reset();
      continue;
    }
    if (!m) m.emplace();
    if (!envoy::MatchDescriptor(c->config, req.domain(), entries_of(d), &*m)) m.reset();
  }
  envoy::ApplyReplaces(matches);
  uint32_t request_hits = req.hits_addend() == 0 ? 1 : req.hits_addend();
  // A request's own limit applies only in a domain the config has, as in envoyproxy/ratelimit:
  // any client could otherwise make counters in domains nobody configured.
  // (Looked up only for a request that brings a limit: the others never need it.)
  std::optional<bool> known_domain;
  auto in_config = [&] {
    if (!known_domain) known_domain = c->config.domains.contains(req.domain());
    return *known_domain;
  };
  for (int i = 0; i < n; ++i) {
    const auto& d = req.descriptors(i);
    Item& item = join->items[static_cast<size_t>(i)];
    // 64 bits on the wire (a count of bytes or tokens may pass 2^32); past int64, as many
    // as a cost can be, which no limit admits.
    int64_t hits = d.has_hits_addend()
                       ? static_cast<int64_t>(std::min<uint64_t>(
                             d.hits_addend().value(),
                             static_cast<uint64_t>(std::numeric_limits<int64_t>::max())))
                       : request_hits;
    if (d.has_limit() && in_config()) {
      // An open enum on the wire: a number past the units (or negative) is no unit, not
      // one the cast to 8 bits would make of it.
      const int raw_unit = d.limit().unit();
      auto unit = raw_unit >= 0 && raw_unit <= std::numeric_limits<uint8_t>::max()
                      ? static_cast<envoy::Unit>(raw_unit)
                      : envoy::Unit{};
      DurationUs period = envoy::UnitDuration(unit);
      if (period <= 0) continue;  // an unknown unit: no limit
      Policy p = Policy::FixedWindow(d.limit().requests_per_unit(), period);
      const StoreLimits* limit = nullptr;
      // Named before overrides_mu_ is taken: a scrape takes the metrics' lock, then (for
      // the key series) this one; the other order would be a deadlock.
      std::call_once(overrides_slot_once_, [this] {
        overrides_metrics_slot_ = service_.metrics().SlotFor("envoy:(request limit)");
      });
      {
        std::lock_guard lock(overrides_mu_);
        auto id = std::make_pair(d.limit().requests_per_unit(), static_cast<int>(unit));
        auto it = overrides_.find(id);
        if (it == overrides_.end() && overrides_.size() < kMaxOverrides) {
          std::string name = "envoy-override:" + p.ToString();
          auto& slot = overrides_[id];
          slot.metrics_slot = overrides_metrics_slot_;
          slot.local = service_.store().AddLimit(name, p);
          if (service_.remote()) {
            slot.remote = std::make_unique<redis::RemoteLimit>(redis::MakeRemoteLimit(name, p));
          }
          slot.synced = service_.AddSyncLimit(name, p);  // a fixed window: always syncable
          it = overrides_.find(id);
        }
        if (it != overrides_.end()) limit = &it->second;
      }
      item.override_policy = p;
      item.override_unit = unit;
      if (!limit || !limit->local) {
        OverrideBeyondBound(item);
        continue;
      }
      StoreCheck& check = item.NextCheck();
      check = {limit->local, limit->remote.get(), std::move(check.key), hits, limit->synced.get()};
      check.key.assign("override|");
      envoy::AppendEscaped(check.key, req.domain());
      for (const auto& e : d.entries()) {
        check.key += '|';
        envoy::AppendEscaped(check.key, e.key());
        check.key += '=';
        envoy::AppendEscaped(check.key, e.value());
      }
      item.specs.push_back(nullptr);
      item.metrics_slots.push_back(limit->metrics_slot);
      continue;
    }
    const auto& m = matches[static_cast<size_t>(i)];
    if (!m) continue;
    item.shadow = m->descriptor->shadow_mode;
    for (const envoy::RateLimitSpec* spec : m->limits) {
      if (spec->unlimited) {
        item.unlimited = true;
        continue;
      }
      const auto& l = c->limits.find(spec)->second;
      StoreCheck& check = item.NextCheck();
      check = {l.local, l.remote.get(), std::move(check.key), hits, l.synced.get()};
      // The match's name alone: each limit has tables of its own, and every limit of the
      // descriptor must share the key's hash tag (one Redis Cluster slot, one script).
      check.key.assign(m->cache_key);
      item.specs.push_back(spec);
      // Named by the request's values where the config asks (the descriptor's id
      // otherwise); a list's limits keep their "[i]".
      bool detailed = m->metric_key != m->descriptor->id;
      item.metrics_slots.push_back(
          detailed ? DetailedSlot(service_.metrics(), "envoy:" + m->metric_key +
                                                          spec->id.substr(m->descriptor->id.size()))
                   : l.metrics_slot);
    }
  }

  // Each descriptor is its own all-or-nothing group; with Redis they go out together.
  join->left = 1;  // held until every call is issued
  for (Item& item : join->Items()) {
    if (item.used == 0 || item.decided) continue;
    ++join->left;
    // Two pointers: the callback fits in std::function's own storage.
    Item* it = &item;
    bool now = service_.CheckStore(item.Checks(), service_.DefaultFailMode(), io, &item.result,
                                   [join, it](StoreResult r) {
                                     it->result = std::move(r);
                                     if (--join->left == 0) join->rls->Answer(*join);
                                   });
    if (now) --join->left;
  }
  if (--join->left == 0) Answer(*join);
}

// Ignored, such a limit would let through all it was meant to hold (and the config's
// limits, which a request's own limit replaces, may hold nothing for its descriptor).
// Without counters, it is decided as an unreachable store's calls are: open admits, closed
// (and local, having nothing to count on either) refuses. Counted as degraded and logged.
void Rls::OverrideBeyondBound(Item& item) {
  const Policy& policy = item.override_policy;
  rules::FailMode mode = service_.DefaultFailMode() == rules::FailMode::kOpen
                             ? rules::FailMode::kOpen
                             : rules::FailMode::kClosed;
  service_.metrics().CountDegraded(static_cast<size_t>(mode));
  static LogLimiter log;
  if (log.Allow()) {
    Log("WARN", "envoy: a request's own limit (" + policy.ToString() + ") is beyond the " +
                    std::to_string(kMaxOverrides) +
                    " distinct ones that get counters; decided by fail_mode " +
                    std::string(rules::FailModeName(mode)));
  }
  item.decided = true;
  item.specs.assign(1, nullptr);
  item.metrics_slots.assign(1, overrides_metrics_slot_);
  item.result.decisions.assign(1, service_.FailDecision(policy, mode));
  item.result.degraded = mode == rules::FailMode::kOpen ? Degraded::kOpen : Degraded::kClosed;
}

void Rls::Answer(Join& j) {
  rlspb::RateLimitResponse& r = *j.resp;
  r.set_overall_code(rlspb::RateLimitResponse::OK);
  // The headers describe the descriptor with least left or, once one is over its limit,
  // the last one over (a shadow one excepted), as envoyproxy/ratelimit picks it.
  const rlspb::RateLimitResponse::DescriptorStatus* tightest = nullptr;
  uint32_t least = std::numeric_limits<uint32_t>::max();
  TimeUs now = 0;  // read once, only when a refused window needs it
  for (Item& item : j.Items()) {
    auto* status = r.add_statuses();
    status->set_code(rlspb::RateLimitResponse::OK);
    if (item.used == 0 && !item.decided) {
      if (item.unlimited) status->set_limit_remaining(std::numeric_limits<uint32_t>::max());
      continue;
    }
    const auto& ds = item.result.decisions;
    size_t k = DecidingIndex(ds);
    const Decision& d = ds[k];
    const envoy::RateLimitSpec* spec = item.specs[k];
    auto* limit = status->mutable_current_limit();
    const Policy& p = spec ? spec->policy : item.override_policy;
    limit->set_requests_per_unit(ToU32(p.limit));
    limit->set_unit(static_cast<rlspb::RateLimitResponse::RateLimit::Unit>(
        spec ? spec->unit : item.override_unit));
    if (spec && !spec->name.empty()) limit->set_name(spec->name);
    bool over = !d.allowed;
    // Over the limit, nothing is left for this request, whatever a smaller one could
    // still spend (Sluice does not count refused hits): envoyproxy/ratelimit answers 0.
    status->set_limit_remaining(over ? 0 : ToU32(d.remaining));
    auto* reset = status->mutable_duration_until_reset();
    // When the window (or bucket) resets; a request that can never pass is told the
    // window's reset too, as envoyproxy/ratelimit does.
    DurationUs until = d.allowed || d.retry_after == kNever
                           ? d.reset_after
                           : std::max(d.reset_after, d.retry_after);
    if (until == kNever) until = 0;
    if (until == 0 && p.algorithm == Algorithm::kFixedWindow && p.period > 0) {
      // A window nothing was spent in (a peek at a fresh key, a limit of 0, more hits than
      // the limit): its end is still when it resets, as envoyproxy/ratelimit answers.
      if (now == 0) now = SystemClock::Instance().Now();
      until = p.period - now % p.period;
    } else if (until == 0 && over && p.period > 0) {
      // A refusal with nothing to wait for (more hits than the bucket holds, a limit of
      // 0): "0 s" would have Envoy's clients retry at once, forever. One period, as a
      // window's reset would say.
      until = p.period;
    }
    // Whole seconds, rounded up, as envoyproxy/ratelimit answers: Envoy's own
    // X-RateLimit-Reset header reads only the seconds, and a fraction dropped there would
    // tell a client to come back before the reset (0 on every per-second limit).
    reset->set_seconds(until / kSecond + (until % kSecond > 0 ? 1 : 0));
    Metrics::Outcome outcome = Metrics::Outcome::kAllowed;
    if (item.used > 0 && item.checks[0].cost == 0) {  // hits_addend 0: a look, no hit
      outcome = Metrics::Outcome::kPeeked;
    } else if (over) {
      outcome = item.shadow || options_.shadow ? Metrics::Outcome::kShadowLimited
                                               : Metrics::Outcome::kLimited;
    }
    service_.metrics().Count(item.metrics_slots[k], outcome);
    if (status->limit_remaining() < least) {
      tightest = status;
      least = status->limit_remaining();
    }
    if (over && !item.shadow) {
      status->set_code(rlspb::RateLimitResponse::OVER_LIMIT);
      r.set_overall_code(rlspb::RateLimitResponse::OVER_LIMIT);
      tightest = status;
      least = 0;
    }
  }
  if (options_.shadow) r.set_overall_code(rlspb::RateLimitResponse::OK);
  if (options_.response_headers && tightest) {
    auto add = [&r](const std::string& name, uint64_t value) {
      auto* h = r.add_response_headers_to_add();
      h->set_key(name);
      h->set_value(std::to_string(value));
    };
    const auto& rd = tightest->duration_until_reset();
    add(options_.limit_header, tightest->current_limit().requests_per_unit());
    add(options_.remaining_header, tightest->limit_remaining());
    add(options_.reset_header, static_cast<uint64_t>(rd.seconds()));
  }
  service_.metrics().ObserveLatency(Metrics::LatencyNowUs() - j.start);
  Done done = std::move(j.done);
  GiveBackJoin(&j);  // before done, which may start this thread's next call
  done(RlsFailure::kNone, "");
}

bool RlsJsonHandler::Handle(HttpRequest& req, const boost::asio::ip::tcp::endpoint&,
                            HttpResponse& res, const std::function<Completion()>& defer) {
  namespace http = boost::beast::http;
  auto reply = [&res](http::status status, std::string body) {
    res.result(status);
    res.set(http::field::content_type, "application/json");
    res.body() = std::move(body);
  };
  auto bad = [&reply](const std::string& message) {
    // The message may quote the caller's bytes, which need not be UTF-8: the answer must
    // stay JSON, so only printable ASCII goes through as it is.
    std::string m;
    for (char ch : message) {
      auto u = static_cast<unsigned char>(ch);
      if (ch == '"' || ch == '\\') m += '\\';
      if (u >= 0x80) {
        m += '?';
      } else if (u >= 0x20) {
        m += ch;
      }
    }
    reply(http::status::bad_request, R"({"error":"bad_request","message":")" + m + R"("})");
  };
  if (req.method() != http::verb::post) {
    res.set(http::field::allow, "POST");
    reply(http::status::method_not_allowed,
          R"({"error":"method_not_allowed","message":"use POST"})");
    return true;
  }
  struct Call {
    rlspb::RateLimitRequest request;
    rlspb::RateLimitResponse response;
    std::shared_ptr<Completion> later;
    bool finished = false;
  };
  if (auto twice = FirstDuplicateKey(req.body())) {
    bad("malformed RateLimitRequest JSON: the key '" + *twice + "' is given twice");
    return true;
  }
  auto call = std::make_shared<Call>();
  auto parsed = google::protobuf::util::JsonStringToMessage(req.body(), &call->request);
  if (!parsed.ok()) {
    bad("malformed RateLimitRequest JSON: " + std::string(parsed.message()));
    return true;
  }
  // Off the workers (an embedding, a fuzzer) there is no loop; the memory store needs none.
  static boost::asio::io_context no_loop;
  boost::asio::io_context* io = CurrentWorkerContext();
  // At envoyproxy/ratelimit's path, its status too: 429 when over the limit.
  const bool envoyproxy_status = req.target().substr(0, req.target().find('?')) == "/json";
  rls_.Decide(
      call->request, &call->response, io ? *io : no_loop,
      [call, reply, bad, envoyproxy_status](RlsFailure failure, std::string error) {
        if (failure == RlsFailure::kUnavailable) {
          reply(http::status::service_unavailable,
                R"({"error":"unavailable","message":"rate limit service unavailable"})");
        } else if (failure != RlsFailure::kNone) {
          bad(error);
        } else {
          google::protobuf::util::JsonPrintOptions o;
          o.always_print_primitive_fields = true;
          std::string out;
          (void)google::protobuf::util::MessageToJsonString(call->response, &out, o);
          bool over = call->response.overall_code() == rlspb::RateLimitResponse::OVER_LIMIT;
          reply(envoyproxy_status && over ? http::status::too_many_requests : http::status::ok,
                std::move(out));
        }
        call->finished = true;
        if (call->later) (*call->later)();
      });
  if (call->finished) return true;
  call->later = std::make_shared<Completion>(defer());
  return false;
}

// ShouldRateLimit as a GrpcMethod. A call's messages live in a Call taken from a per-thread
// pool, so the decision's callback holds one pointer and a call allocates no frame of its own.
class RlsGrpcMethod final : public GrpcMethod {
 public:
  explicit RlsGrpcMethod(Rls& rls) : rls_(rls) {}
  void Call(std::string_view request, boost::asio::io_context& io, GrpcReply reply) override {
    Pending* call = Take();
    call->reply.emplace(std::move(reply));
    call->wire_bytes = request.size();
    if (!call->request.ParseFromArray(request.data(), static_cast<int>(request.size()))) {
      return Finish(call, RlsFailure::kInvalidArgument, "malformed RateLimitRequest message");
    }
    rls_.Decide(call->request, &call->response, io,
                [call](RlsFailure failure, std::string error) { Finish(call, failure, error); });
  }

 private:
  struct Pending {
    rlspb::RateLimitRequest request;
    rlspb::RateLimitResponse response;
    std::optional<GrpcReply> reply;
    size_t wire_bytes = 0;  // the request's, as it came
  };
  // Clear() keeps every element a message's repeated fields ever held, for reuse: a pooled
  // call that once carried a request of a megabyte (hundreds of thousands of descriptors)
  // would hold them, and its answer's statuses, for the life of the process. The messages
  // of a call past this size are freed instead; Envoy's calls are a few hundred bytes.
  static constexpr size_t kKeepBytes = 16 * 1024;
  struct Pool {
    std::vector<std::unique_ptr<Pending>> all;
    std::vector<Pending*> spare;
  };
  static thread_local Pool pool_;

  static Pending* Take() {
    if (pool_.spare.empty()) {
      pool_.all.push_back(std::make_unique<Pending>());
      return pool_.all.back().get();
    }
    Pending* p = pool_.spare.back();
    pool_.spare.pop_back();
    return p;
  }
  static void Finish(Pending* call, RlsFailure failure, const std::string& error) {
    switch (failure) {
      case RlsFailure::kNone:
        call->reply->Ok(call->response);
        break;
      case RlsFailure::kInvalidArgument:
        call->reply->Fail(GrpcCode::kInvalidArgument, error);
        break;
      case RlsFailure::kUnavailable:
        call->reply->Fail(GrpcCode::kUnavailable, error);
        break;
    }
    call->reply.reset();
    if (call->wire_bytes > kKeepBytes) {
      rlspb::RateLimitRequest().Swap(&call->request);
      rlspb::RateLimitResponse().Swap(&call->response);
    } else {
      call->request.Clear();
      call->response.Clear();
    }
    pool_.spare.push_back(call);
  }

  Rls& rls_;
};

thread_local RlsGrpcMethod::Pool RlsGrpcMethod::pool_;

// grpc.health.v1.Health/Check: SERVING for the whole server (""), for the rate limit
// service by its full name, and for "ratelimit", the name envoyproxy/ratelimit registers
// (the one its users' probes and Envoy's grpc_health_check ask for); NOT_FOUND for any
// other name, as gRPC's health checking protocol asks. The process that answers serves;
// whether its store is reachable is /readyz's to say.
constexpr std::string_view kRlsService = "envoy.service.ratelimit.v3.RateLimitService";
constexpr std::string_view kEnvoyRatelimitService = "ratelimit";

// The service a HealthCheckRequest names, or null after answering INVALID_ARGUMENT to a
// malformed one.
std::optional<std::string> HealthService(std::string_view request, GrpcReply& reply) {
  grpc::health::v1::HealthCheckRequest req;
  if (!req.ParseFromArray(request.data(), static_cast<int>(request.size()))) {
    reply.Fail(GrpcCode::kInvalidArgument, "malformed HealthCheckRequest message");
    return std::nullopt;
  }
  return std::move(*req.mutable_service());
}

bool Serves(const std::string& service) {
  return service.empty() || service == kRlsService || service == kEnvoyRatelimitService;
}

class HealthCheckMethod final : public GrpcMethod {
 public:
  void Call(std::string_view request, boost::asio::io_context&, GrpcReply reply) override {
    auto service = HealthService(request, reply);
    if (!service) return;
    if (!Serves(*service)) {
      return reply.Fail(GrpcCode::kNotFound, "unknown service " + service->substr(0, 256));
    }
    grpc::health::v1::HealthCheckResponse resp;
    resp.set_status(grpc::health::v1::HealthCheckResponse::SERVING);
    reply.Ok(resp);
  }
};

// grpc.health.v1.Health/Watch: the status now (SERVING, or SERVICE_UNKNOWN for a name the
// server does not serve, which per the protocol does not end the call), then nothing until
// the server shuts down, when it is NOT_SERVING and the call ends: gRPC clients that check
// health by Watch (client-side load balancing) see a draining Sluice leave at once.
class HealthWatchMethod final : public GrpcMethod {
 public:
  void Call(std::string_view request, boost::asio::io_context&, GrpcReply reply) override {
    auto service = HealthService(request, reply);
    if (!service) return;
    using Response = grpc::health::v1::HealthCheckResponse;
    Response now, last;
    bool known = Serves(*service);
    now.set_status(known ? Response::SERVING : Response::SERVICE_UNKNOWN);
    last.set_status(known ? Response::NOT_SERVING : Response::SERVICE_UNKNOWN);
    reply.Hold(now, last);
  }
};

struct RlsGrpcServer::Impl {
  explicit Impl(Rls& rls) : method(rls) {}
  RlsGrpcMethod method;
  HealthCheckMethod health;
  HealthWatchMethod watch;
  std::unique_ptr<GrpcServer> server;
};

RlsGrpcServer::RlsGrpcServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RlsGrpcServer::~RlsGrpcServer() = default;

std::unique_ptr<RlsGrpcServer> RlsGrpcServer::Start(
    Rls& rls, const std::vector<boost::asio::io_context*>& loops, const RlsGrpcOptions& o,
    int* bound_port, std::string* error) {
  const std::string& address = o.address;
  // "host:port", "[v6]:port"
  auto colon = address.rfind(':');
  uint16_t port = 0;
  std::string host = colon == std::string::npos ? "" : address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  std::string_view port_text =
      colon == std::string::npos ? "" : std::string_view(address).substr(colon + 1);
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (host.empty() || port_text.empty() || ec != std::errc() ||
      end != port_text.data() + port_text.size()) {
    *error = "bad gRPC address '" + address + "': want HOST:PORT";
    return nullptr;
  }
  auto impl = std::make_unique<Impl>(rls);
  GrpcServerOptions options;
  options.max_message_bytes = 1 << 20;  // a RateLimitRequest is a few hundred bytes
  options.stall_timeout = o.stall_timeout;
  options.drain_timeout = o.drain_timeout;
  options.tls_cert_file = o.tls_cert_file;
  options.tls_key_file = o.tls_key_file;
  options.tls_client_ca_file = o.tls_client_ca_file;
  options.max_connections = o.max_connections;
  options.max_connections_per_peer = o.max_connections_per_peer;
  options.max_buffered_bytes = o.max_buffered_bytes;
  uint16_t bound = 0;
  impl->server = GrpcServer::Start(
      loops, host, port,
      {{"/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit", &impl->method},
       {"/grpc.health.v1.Health/Check", &impl->health},
       {"/grpc.health.v1.Health/Watch", &impl->watch}},
      options, &bound, error);
  if (!impl->server) return nullptr;
  *bound_port = bound;
  return std::unique_ptr<RlsGrpcServer>(new RlsGrpcServer(std::move(impl)));
}

void RlsGrpcServer::Shutdown() {
  if (impl_ && impl_->server) impl_->server->Shutdown();
}

void RlsGrpcServer::RenderMetrics(std::string& out) const { impl_->server->RenderMetrics(out); }

bool RlsGrpcServer::ReloadTls(std::string* error) { return impl_->server->ReloadTls(error); }

}  // namespace sluice::server
