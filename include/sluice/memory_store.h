// MemoryStore: rate limit state held in this process, for one node or for an application
// that limits in-process with no server.
//
// A store holds Limits; a Limit is one policy's counters, keyed by client (any string: an
// IP, a user ID, "api_key:...|/api/search"). Keys are kept as 64-bit keyed hashes
// (fingerprints), not strings, so per-key memory is the algorithm's state plus 8 bytes; two
// distinct keys share counters only if their fingerprints collide (about n^2 / 2^65 for n
// keys: 3e-6 at ten million keys), and the hash seed is random per store so collisions
// cannot be chosen by clients.
//
// Each Limit is split into shards by fingerprint, each with its own small spin lock, so
// threads deciding different keys almost never touch the same lock or cache line; one key's
// decisions are serialized, which is what makes them exact. Idle keys (whose state is back
// to fresh) are dropped by Sweep; a full shard first sweeps, then evicts up to an eighth of
// its keys, those with the most left (counted in evictions()), so a flood of distinct keys
// is bounded by max_keys_per_limit. A key with nothing left is never evicted (its client
// would be admitted again): when every key of a full shard is at its limit, a new key is
// refused until one is back to fresh (counted in full_refusals()).
//
// Thread-safety: all methods may be called concurrently. Limits live as long as the store;
// Limit pointers stay valid until the store is destroyed.
#ifndef SLUICE_MEMORY_STORE_H_
#define SLUICE_MEMORY_STORE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "sluice/decision.h"
#include "sluice/policy.h"
#include "sluice/time.h"

namespace sluice {

namespace internal {
class SpinLock;
}  // namespace internal
class MemoryStore;

class Limit {
 public:
  virtual ~Limit() = default;
  Limit(const Limit&) = delete;
  Limit& operator=(const Limit&) = delete;

  const std::string& name() const { return name_; }
  const Policy& policy() const { return policy_; }

  // Decides one request of `cost` units for `key` at `now`. Cost 0 peeks: nothing is
  // spent and `allowed` says whether one more unit would pass. Negative costs count as 0.
  virtual Decision Check(std::string_view key, TimeUs now, int64_t cost = 1) = 0;
  // Forgets a key: its next request is decided as a fresh one's. Returns whether it was held.
  virtual bool Reset(std::string_view key) = 0;
  // Drops every key whose state is back to fresh at `now`; returns how many. A table left
  // far emptier than its memory gives the memory back.
  virtual size_t Sweep(TimeUs now) = 0;
  // Sweep is a sweep of each shard in turn; one shard's (shard < shard_count()) is the
  // step MemoryStore::SweepStep takes, so no one call holds its thread for long.
  virtual size_t shard_count() const = 0;
  virtual size_t SweepShard(size_t shard, TimeUs now) = 0;
  virtual size_t size() const = 0;
  // The memory the table holds, approximately, in bytes.
  virtual size_t bytes() const = 0;
  virtual uint64_t evictions() const = 0;
  // New keys refused because their shard was full of keys at their limit.
  virtual uint64_t full_refusals() const { return 0; }

 protected:
  Limit(std::string name, const Policy& policy) : name_(std::move(name)), policy_(policy) {}

 private:
  // For MemoryStore::CheckAll, which locks every shard a request touches (in address
  // order, so two requests never wait on each other in a cycle) and then steps them.
  friend class MemoryStore;
  virtual uint64_t Fingerprint(std::string_view key) const = 0;
  virtual internal::SpinLock& ShardLock(uint64_t fingerprint) = 0;
  virtual Decision StepLocked(uint64_t fingerprint, TimeUs now, int64_t cost, bool commit) = 0;

  std::string name_;
  Policy policy_;
};

// One limit of a request decided by MemoryStore::CheckAll.
struct LimitCheck {
  Limit* limit;
  std::string_view key;
  int64_t cost = 1;
};

class MemoryStore {
 public:
  struct Options {
    // Keys each Limit holds at most; a full shard evicts (see above). Each shard holds
    // max_keys_per_limit / shards of them (at least 1), so a bound below the shard count
    // holds one key per shard.
    size_t max_keys_per_limit = 1 << 20;
    // Shards per Limit, rounded up to a power of two.
    size_t shards = 64;
    // 0: random. Fixed seeds are for tests only.
    uint64_t hash_seed = 0;
  };

  MemoryStore();
  explicit MemoryStore(const Options& options);
  ~MemoryStore();

  // Adds a limit, or returns the existing one with this name if its policy is the same.
  // Returns nullptr when the policy is invalid (Policy::Validate; for GCRA and leaky_queue,
  // ValidateStrict: a burst the clock can drain) or the name is taken
  // by a different policy.
  Limit* AddLimit(std::string name, const Policy& policy);
  // The limit a config names `name`, across reloads: the table named `name`, or one named
  // "name#N" made earlier, with this policy; otherwise a new one, named `name` if that is
  // free and "name#N" (a new N) if another policy holds it. A policy that comes back after
  // a reload finds its counts again. nullptr only for an invalid policy.
  Limit* AddLimitOrVariant(const std::string& name, const Policy& policy);
  // The newest table named `name` or made by AddLimitOrVariant for it; nullptr if none.
  Limit* FindLimit(std::string_view name) const;
  // Every table made for `name` (by AddLimit, or by AddLimitOrVariant for each policy it
  // was given), oldest first; tables are never dropped. For counters that must not fall
  // when a reload moves a name to another policy's table.
  std::vector<const Limit*> TablesFor(std::string_view name) const;

  // Decides several limits of one request all-or-nothing: either every limit admits and
  // each spends its cost, or nothing is spent anywhere. Fills out[i] for checks[i]
  // (out.size() >= checks.size()) and returns the index of the deciding decision: the first
  // rejecting limit with the longest retry_after, or, when all admit, the one with the
  // fewest remaining. Atomic against all other calls on the same keys.
  size_t CheckAll(std::span<const LimitCheck> checks, TimeUs now, std::span<Decision> out);

  // Sweeps every limit; returns the number of keys dropped. With a million keys in a
  // table this holds its thread for milliseconds (about 9 ms per million on a 2-core VM).
  // Run Sweep (or SweepStep passes) regularly, not only for memory: a sliding window
  // counter keeps its window's index in 32 bits, so a key neither used nor swept for 2^31
  // of its windows (25 days at 1 ms windows, 68 years at 1 s) would read an old count
  // again. `sluice serve` runs a pass every 10 s.
  size_t Sweep(TimeUs now);
  // One step of a sweep spread over many calls: sweeps the shard after the one the last
  // step swept, over every shard of every limit in turn, and returns the keys dropped. A
  // step ends a pass (sets *pass_done) once every shard of the limits the pass began with
  // has been swept; the next step starts a pass over the limits there are then. A server
  // runs the steps of a pass one event loop turn apart, so requests wait at most one
  // shard's sweep (1/64 of a table) rather than a whole store's.
  size_t SweepStep(TimeUs now, bool* pass_done = nullptr);
  // The memory every table holds, those no rule uses since a reload included.
  size_t bytes() const;
  // Each limit's name and Limit::full_refusals(), for a periodic report.
  std::vector<std::pair<std::string, uint64_t>> FullRefusals() const;

  const Options& options() const { return options_; }

 private:
  Options options_;
  mutable std::mutex limits_mu_;  // guards limits_ (not on the decision path)
  std::vector<std::unique_ptr<Limit>> limits_;
  // Guarded by limits_mu_: each table by its own name, and by the name it was added for
  // (the tables AddLimitOrVariant made for one name, oldest first); the last N of a "name#N".
  std::unordered_map<std::string, Limit*> by_table_;
  std::unordered_map<std::string, std::vector<Limit*>> by_name_;
  uint64_t variants_ = 0;
  // SweepStep's place, guarded by limits_mu_: the limit (an index in limits_, which only
  // grows) and the shard the next step sweeps, and how many limits the pass covers.
  size_t sweep_limit_ = 0;
  size_t sweep_shard_ = 0;
  size_t sweep_limits_ = 0;
  Limit* Insert(std::string table, const std::string& name, const Policy& policy);
};

}  // namespace sluice

#endif  // SLUICE_MEMORY_STORE_H_
