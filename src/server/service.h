// Service: the rate limiter behind every front end: the active rule set, the store, and
// the step from a request to a verdict.
//
// Rules are swapped atomically on reload: each worker thread keeps its own reference to the
// active rule set and checks one atomic generation number per request (a relaxed load of a
// line no thread writes on the hot path), so reading the rules makes no core wait for
// another. The store keeps its counters across reloads for limits whose name and policy
// are unchanged.
//
// With a shared store (Redis, Redis Cluster), decisions complete asynchronously on the
// calling worker's loop (DecideRemote). When the store fails or the circuit breaker of
// the Redis node holding the key is open, each rule's fail_mode decides: open (allow), closed
// (reject) or local (the in-memory store, with the same limits); every such decision is counted and
// logged.
//
// With store mode local_sync (the hybrid mode), decisions are made synchronously from local
// counts (Decide, as with the memory store) and a syncer thread exchanges them with Redis;
// while Redis is unreachable the local counts go on deciding, and /readyz and /metrics say so.
//
// Thread-safety: Decide and DecideRemote may be called from any number of threads; Reload
// from any thread.
#ifndef SLUICE_SERVER_SERVICE_H_
#define SLUICE_SERVER_SERVICE_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/unordered/unordered_flat_map.hpp>

#include "rules/rule_set.h"
#include "server/metrics.h"
#include "sluice/memory_store.h"
#include "sluice/status.h"
#include "store/redis/redis_store.h"
#include "store/sync/sync_store.h"
#include "store/sync/syncer.h"

namespace sluice::server {

// A rule set with the store limits its LimitSpecs map to.
struct ActiveRules {
  rules::RuleSet rules;
  rules::TrustedProxies trusted;
  boost::unordered_flat_map<const rules::LimitSpec*, Limit*> limits;
  boost::unordered_flat_map<const rules::Rule*, size_t> metrics_slots;
  // With a shared store: each limit's key id and compiled script arguments.
  boost::unordered_flat_map<const rules::LimitSpec*, std::unique_ptr<redis::RemoteLimit>>
      remote_limits;
  // With store mode local_sync: each limit's synced counters.
  // Held: a limit's table lives while a rule set (or a request in flight on it) uses it.
  boost::unordered_flat_map<const rules::LimitSpec*, std::shared_ptr<sync::SyncLimit>> sync_limits;
  uint64_t generation = 0;

  Limit* LimitFor(const rules::LimitSpec* spec) const;
};

// How a decision was made when the shared store could not make it.
enum class Degraded : uint8_t { kNo, kOpen, kClosed, kLocal };

struct Verdict {
  bool allowed = true;        // what the client is told (always true in shadow mode)
  bool would_reject = false;  // the limits' own answer, also in shadow mode
  Decision decision;          // the deciding limit's decision
  const rules::Rule* rule = nullptr;
  const rules::LimitSpec* limit = nullptr;  // the deciding limit; null if the rule has none
  size_t metrics_slot = 0;                  // the rule's slot in Metrics
  TimeUs now = 0;
  Degraded degraded = Degraded::kNo;
  bool peek = false;  // cost 0: a look at what is left, counted as neither admitted nor refused

  // How long the request waits its turn (leaky_queue) before it goes on. A shadow rule
  // decides and counts but never holds traffic back: no queueing either.
  DurationUs delay() const { return rule && rule->shadow ? 0 : decision.delay; }
};

// One limit decided directly by policy, for front ends with their own rules (Envoy RLS).
struct StoreCheck {
  Limit* local = nullptr;                      // in-memory counters (and the `local` fail mode)
  const redis::RemoteLimit* remote = nullptr;  // with a shared store
  std::string key;
  int64_t cost = 1;
  sync::SyncLimit* synced = nullptr;  // with store mode local_sync
};
struct StoreResult {
  std::vector<Decision> decisions;  // one per check
  Degraded degraded = Degraded::kNo;
};

class Service {
 public:
  // `start_sync` false: a store in mode local_sync gets its tables but no syncer (no thread,
  // no connection), for checking a config (`sluice validate`).
  Service(rules::Config config, MemoryStore::Options store_options, bool start_sync = true);
  ~Service();

  // The active rules as this thread sees them: valid until this thread's next call to
  // Active(). No lock, no shared counter: a relaxed check of the reload generation.
  const ActiveRules& Active();
  // This thread's current rules as an owning pointer, for work that outlives the call.
  std::shared_ptr<const ActiveRules> ActiveShared();
  // Decides one request under `active` (from Active()) with the in-memory store.
  // `req.path` must be normalized. `cost` overrides the rule's cost.
  Verdict Decide(const ActiveRules& active, const rules::Request& req,
                 std::optional<int64_t> cost = std::nullopt);
  // With a shared store: decides one request there and calls `done` later on `io` (the
  // calling worker's loop), never inside this call. The request's strings may go once this
  // returns.
  void DecideRemote(std::shared_ptr<const ActiveRules> active, const rules::Request& req,
                    std::optional<int64_t> cost, boost::asio::io_context& io,
                    std::function<void(Verdict)> done);
  // Decides `checks` all-or-nothing in the configured store. In memory, or from synced
  // counts (local_sync; checks without `synced` are decided in memory): fills *out and
  // returns true. With a shared store: returns false and calls `done` later on `io`, the
  // fail mode `mode` answering when the store cannot.
  bool CheckStore(std::span<const StoreCheck> checks, rules::FailMode mode,
                  boost::asio::io_context& io, StoreResult* out,
                  std::function<void(StoreResult)> done);
  // The store's fail_mode, for checks that come with no rule of their own.
  // (The file's, as last loaded: a reload applies a changed one.)
  rules::FailMode DefaultFailMode() const {
    return default_fail_mode_.load(std::memory_order_relaxed);
  }
  // Whether decisions go to a shared store (then use DecideRemote).
  bool remote() const { return remote_ != nullptr; }
  // Whether decisions are local counts synced with Redis (store mode local_sync).
  bool local_sync() const { return sync_ != nullptr; }
  // With local_sync, how often the syncer runs (what a window must be longer than).
  DurationUs sync_interval() const { return store_config_.sync_interval; }
  // The synced counts of a limit named `name` (local_sync), keyed in Redis as the Redis
  // store would key it; null without local_sync, or for a policy synced counts cannot
  // decide (sync::Syncable). From any thread.
  std::shared_ptr<sync::SyncLimit> AddSyncLimit(const std::string& name, const Policy& policy,
                                                std::string* error = nullptr);
  // Prometheus lines about the sync (local_sync only; nothing otherwise).
  void RenderSyncMetrics(std::string& out) const;
  // The store's state for /readyz: {"store": "...", "state": "..."} fields, and whether
  // decisions are made as configured (false while a node's circuit breaker is open).
  bool StoreReady(std::string* type, std::string* state) const;
  // Opens this worker's store connections ahead of its first decision (at worker start).
  void ConnectThread(boost::asio::io_context& io);
  // Closes this worker's store connections (at worker exit).
  void CloseThread();
  // Replaces the rules; on error the current rules stay and the error is returned.
  Status Reload(rules::Config config);
  // Reads the store's TLS files again (certificate rotation) for the connections made
  // from here on, the Redis store's and the syncer's; on an error (*error) the current ones
  // stay. From any thread.
  bool ReloadStoreTls(std::string* error);

  std::shared_ptr<const ActiveRules> rules() const;
  MemoryStore& store() { return store_; }
  // The shared store (null unless remote()).
  redis::RedisStore* remote_store() { return remote_.get(); }
  Metrics& metrics() { return metrics_; }
  // The parts of the config a reload reads, each reloaded whatever another's outcome.
  enum class ReloadPart { kRules, kEnvoy, kGrpcTls, kStoreTls };
  static constexpr size_t kReloadParts = 4;
  static std::string_view ReloadPartName(ReloadPart part);
  // Reloads applied: of the rules (each a new generation) and of the other parts
  // (CountReload).
  uint64_t reloads() const {
    return generation_.load(std::memory_order_relaxed) - 1 +
           other_reloads_.load(std::memory_order_relaxed);
  }
  // A reload of a part other than the rules (Reload counts those) applied.
  void CountReload(ReloadPart part) {
    other_reloads_.fetch_add(1, std::memory_order_relaxed);
    SetReloadOutcome(part, true);
  }
  // A reload refused (a bad file, a change that takes a restart): the part runs on as it was.
  void CountReloadFailure(ReloadPart part) {
    reload_failures_.fetch_add(1, std::memory_order_relaxed);
    SetReloadOutcome(part, false);
  }
  uint64_t reload_failures() const { return reload_failures_.load(std::memory_order_relaxed); }
  // Whether the part's last reload applied; nullopt if it was never reloaded.
  std::optional<bool> last_reload_ok(ReloadPart part) const {
    int8_t v = last_reload_[static_cast<size_t>(part)].load(std::memory_order_relaxed);
    return v < 0 ? std::nullopt : std::optional<bool>(v == 1);
  }
  // A decision made without counters (the shared store unreachable): `mode` open or closed
  // (local goes to memory).
  Decision FailDecision(const Policy& policy, rules::FailMode mode) const;
  // Logs a warning for each in-memory limit whose full table refused new keys since the
  // last call (every key it held was at its limit). From one thread: the main loop's tick.
  void ReportFullTables();

 private:
  std::vector<std::pair<std::string, uint64_t>> full_refusals_seen_;  // ReportFullTables
  struct PendingRemote;
  std::shared_ptr<const ActiveRules> Build(rules::Config config, uint64_t generation);
  void FinishRemote(PendingRemote& p, redis::StoreError error, std::span<const Decision> decisions);
  Verdict Degrade(PendingRemote& p, redis::StoreError error);
  void LogDegraded(std::string_view what, rules::FailMode mode, redis::StoreError error);
  void CountVerdict(const Verdict& v);
  void CountStoreError(redis::StoreError error);
  // Decides the thread's resolved checks from the synced counts into t.decisions; false when
  // a key found no slot (then the caller decides them in memory).
  bool DecideSynced(const ActiveRules& active, TimeUs now, size_t* deciding);

  MemoryStore store_;
  rules::StoreConfig store_config_;  // the running store's, as it started
  std::string region_;               // the config's: its shares' keys and the syncer's publications
  std::atomic<rules::FailMode> default_fail_mode_;
  std::unique_ptr<redis::RedisStore> remote_;
  std::unique_ptr<sync::SyncStore> sync_;  // local_sync: the counters; before the syncer
  std::unique_ptr<sync::Syncer> syncer_;   // stopped (after a last round) first
  Metrics metrics_;
  std::mutex reload_mu_;   // one Reload at a time (generation_ and Build's registrations)
  mutable std::mutex mu_;  // guards active_ (its swap and per-thread refresh only)
  std::shared_ptr<const ActiveRules> active_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> reload_failures_{0};
  std::atomic<uint64_t> other_reloads_{0};
  void SetReloadOutcome(ReloadPart part, bool ok) {
    last_reload_[static_cast<size_t>(part)].store(ok ? 1 : 0, std::memory_order_relaxed);
  }
  std::array<std::atomic<int8_t>, kReloadParts> last_reload_{-1, -1, -1, -1};  // -1 never
  // Names this Service in each thread's cached view of the rules (Active()).
  static inline std::atomic<uint64_t> next_id_{1};
  const uint64_t id_ = next_id_.fetch_add(1, std::memory_order_relaxed);
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_SERVICE_H_
