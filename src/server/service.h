// Service: the rate limiter behind every front end: the active rule set, the store, and
// the step from a request to a verdict.
//
// Rules are swapped atomically on reload: each worker thread keeps its own reference to the
// active rule set and checks one atomic generation number per request (a relaxed load of a
// line no thread writes on the hot path), so reading the rules makes no core wait for
// another. The store keeps its counters across reloads for limits whose name and policy
// are unchanged.
//
// Thread-safety: Decide may be called from any number of threads; Reload from any thread.
#ifndef SLUICE_SERVER_SERVICE_H_
#define SLUICE_SERVER_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <boost/unordered/unordered_flat_map.hpp>

#include "rules/rule_set.h"
#include "server/metrics.h"
#include "sluice/memory_store.h"
#include "sluice/status.h"

namespace sluice::server {

// A rule set with the store limits its LimitSpecs map to.
struct ActiveRules {
  rules::RuleSet rules;
  rules::TrustedProxies trusted;
  boost::unordered_flat_map<const rules::LimitSpec*, Limit*> limits;
  boost::unordered_flat_map<const rules::Rule*, size_t> metrics_slots;
  uint64_t generation = 0;

  Limit* LimitFor(const rules::LimitSpec* spec) const;
};

struct Verdict {
  bool allowed = true;        // what the client is told (always true in shadow mode)
  bool would_reject = false;  // the limits' own answer, also in shadow mode
  Decision decision;          // the deciding limit's decision
  const rules::Rule* rule = nullptr;
  const rules::LimitSpec* limit = nullptr;  // the deciding limit; null if the rule has none
  size_t metrics_slot = 0;                  // the rule's slot in Metrics
  TimeUs now = 0;
};

class Service {
 public:
  Service(rules::Config config, MemoryStore::Options store_options);

  // The active rules as this thread sees them: valid until this thread's next call to
  // Active(). No lock, no shared counter: a relaxed check of the reload generation.
  const ActiveRules& Active();
  // Decides one request under `active` (from Active()). `req.path` must be normalized.
  // `cost` overrides the rule's cost.
  Verdict Decide(const ActiveRules& active, const rules::Request& req,
                 std::optional<int64_t> cost = std::nullopt);
  // Replaces the rules; on error the current rules stay and the error is returned.
  Status Reload(rules::Config config);

  std::shared_ptr<const ActiveRules> rules() const;
  MemoryStore& store() { return store_; }
  Metrics& metrics() { return metrics_; }
  uint64_t reloads() const { return generation_.load(std::memory_order_relaxed) - 1; }

 private:
  std::shared_ptr<const ActiveRules> Build(rules::Config config, uint64_t generation);

  MemoryStore store_;
  Metrics metrics_;
  mutable std::mutex mu_;  // guards active_ (reload and per-thread refresh only)
  std::shared_ptr<const ActiveRules> active_;
  std::atomic<uint64_t> generation_{0};
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_SERVICE_H_
