// Metrics: counters and a latency histogram for /metrics (Prometheus text format).
//
// Each thread that records gets its own block of counters (relaxed atomics that only that
// thread writes), so counting a decision never bounces a cache line between cores; a
// scrape sums the blocks. Rules are counted by name: a name keeps its slot across reloads,
// so its counters stay monotonic as Prometheus expects.
//
// Thread-safety: all methods may be called concurrently.
#ifndef SLUICE_SERVER_METRICS_H_
#define SLUICE_SERVER_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sluice::server {

// `value` escaped for a Prometheus label value (backslash, double quote, newline): rule and
// limit names come from config files, and an envoy descriptor value may hold any character.
std::string PromLabel(std::string_view value);

// Appends one unlabelled metric to a scrape: its HELP and TYPE lines, then its sample.
void AppendMetric(std::string& out, std::string_view name, std::string_view help,
                  std::string_view type, std::string_view value);

class Metrics {
 public:
  static constexpr size_t kMaxRules = 1024;  // more rules share the last slot, "(other)"
  // Upper bounds of the decision latency buckets, in microseconds.
  static constexpr std::array<int64_t, 12> kLatencyBucketsUs = {
      1, 2, 5, 10, 25, 50, 100, 250, 1000, 2500, 10000, 100000};
  // kPeeked: a request of cost 0 (a look at what is left), neither admitted nor refused.
  enum class Outcome { kAllowed, kLimited, kShadowLimited, kDelayed, kPeeked };
  static constexpr size_t kOutcomes = 5;

  Metrics() = default;
  ~Metrics();

  // The slot of a rule name (stable for the life of the process).
  size_t SlotFor(const std::string& rule_name);
  // The slot of a name built from a request's values (an Envoy descriptor's
  // detailed_metric): such names share at most kMaxRequestNames slots, then "(other)", so
  // clients sending new values cannot take the slots that configured rules need.
  static constexpr size_t kMaxRequestNames = 256;
  size_t SlotForRequestValue(const std::string& name);

  void Count(size_t slot, Outcome outcome);
  void ObserveLatency(int64_t micros);
  // Where a latency starts and ends: the monotonic clock, in microseconds, so that a step of
  // the wall clock (NTP, an operator) is never observed as a decision's latency.
  static int64_t LatencyNowUs();
  void CountBadRequest();
  // A queued request (leaky_queue) whose client left before its turn: not forwarded.
  void CountAbandoned();
  void CountQueueShed();  // a queued request whose turn came after the drain deadline
  // A forwarded request whose client left before the upstream answered.
  void CountClientGone();
  // A decision made without the shared store: 0 open, 1 closed, 2 local (rules::FailMode).
  void CountDegraded(size_t mode);
  // A failed store call: 0 timeout, 1 connection, 2 server error.
  void CountStoreError(size_t kind);
  // A request answered 502/504 for the upstream (UpstreamOptions::on_failure's kinds).
  void CountUpstreamFailure(size_t kind);
  // A connection closed at accept, over --max-connections or --max-connections-per-ip.
  void CountConnectionRefused();
  // A request answered 503 unread, over --max-buffered-mib.
  void CountBodyRefused();
  // A request the HTTP server answered without reading it on (HttpOptions::
  // on_request_refused): 400 malformed, 413, 414, 431 over a size bound, 501, 505; others
  // are not counted here.
  void CountRequestRefused(unsigned status);
  void CountAcceptFailure();

  // Prometheus text; `extra` appends gauges the caller owns (keys held, evictions, ...).
  std::string Render(const std::function<void(std::string&)>& extra) const;

 private:
  struct alignas(64) Block {
    std::array<std::array<std::atomic<uint64_t>, kOutcomes>, kMaxRules> rules{};
    std::array<std::atomic<uint64_t>, kLatencyBucketsUs.size() + 1> latency{};
    std::atomic<uint64_t> latency_sum_us{0};
    std::atomic<uint64_t> bad_requests{0};
    std::atomic<uint64_t> abandoned{0};
    std::atomic<uint64_t> queue_shed{0};
    std::atomic<uint64_t> client_gone{0};
    std::array<std::atomic<uint64_t>, 3> degraded{};
    std::array<std::atomic<uint64_t>, 3> store_errors{};
    std::array<std::atomic<uint64_t>, 5> upstream_failures{};
    std::atomic<uint64_t> connections_refused{0};
    std::atomic<uint64_t> bodies_refused{0};
    std::array<std::atomic<uint64_t>, 6> requests_refused{};  // kRefusedStatuses' order
    std::atomic<uint64_t> accept_failures{0};
  };
  Block& Mine();
  // The calling thread's block of each Metrics it records to, by id_: not by address, since
  // a Metrics made where a destroyed one lived must not find that one's freed block.
  static std::vector<std::pair<uint64_t, Block*>>& ThreadBlocks();

  mutable std::mutex mu_;  // guards names_ and blocks_ (not taken per decision)
  std::vector<std::string> names_;
  bool full_said_ = false;          // the first name past kMaxRules was logged
  bool request_full_said_ = false;  // the first request value past kMaxRequestNames was
  bool other_used_ = false;         // a name was given the last slot, "(other)"
  size_t request_names_ = 0;        // of names_, those SlotForRequestValue gave
  std::vector<std::unique_ptr<Block>> blocks_;
  static inline std::atomic<uint64_t> next_id_{1};
  const uint64_t id_ = next_id_.fetch_add(1, std::memory_order_relaxed);
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_METRICS_H_
