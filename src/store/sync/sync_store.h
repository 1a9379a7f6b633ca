// SyncStore: the counters of the "local + sync" (hybrid) mode. Each node decides from its
// own memory, with no network round trip on the request path; a syncer (syncer.h) sends
// the node's hits to Redis in batches and brings back the global totals.
//
// Model (counting algorithms only: fixed_window, sliding_window_counter). For each limit,
// key and epoch-aligned window, the node keeps
//   used    = global + unsent + pending
//   global  = the global total (all nodes) as of this node's last sync of that window
//   pending = hits admitted here since the syncer last took them (then: unsent, until
//             Redis confirms them)
// and admits a request when the algorithm admits it with `used` as the window's count
// (fixed window: used + cost <= limit). A sync sets this node's field of the window's
// Redis hash to its cumulative hits (idempotent: a resent round counts once), reads back
// the sum of all nodes' fields and sets global to it, moving `used` by the difference. A single
// node is exact (its own hits are in `used` at once); several nodes over-admit by at most the hits
// the others admitted that this node has not seen yet (docs/design.md states the bound).
//
// Concurrency: no lock on the request path. Each key has one slot in an open-addressed
// table per limit, found by its 64-bit fingerprint; a slot holds, per window parity, one
// 64-bit word packing the window's low 24 bits with a signed 40-bit count, for `used` and
// for `pending`. Deciding is a compare-and-swap on those words, so cores never wait on each
// other; several limits of a request are all-or-nothing (evaluate all, then commit all by
// CAS, undoing the committed ones when a word changed under us). A slot is never emptied
// (a probe sequence stays unbroken), but a new key whose probe sequence is full takes over
// the slot of a key whose state is over: no count in a window a decision still reads,
// nothing pending, and neither on the stack nor known to the syncer (which forgets an idle
// key once its windows end), so that key is back to fresh and loses nothing. Only when no
// slot of the sequence is over is a new key reported kFull, for the caller to decide
// without sync.
//
// Memory: a table is an anonymous mapping reserved without backing (MAP_NORESERVE), so an
// idle limit costs address space, not memory: a page is backed when a key first lands on
// it. A limit lives while a rule set (or an Envoy config) holds it, or the syncer still
// knows one of its keys: the last of them unmaps its table, so the limits a reload dropped
// or changed give their memory back once their in-flight requests and unsent hits are done.
//
// The first decision of a key in a sync round puts a record (the key's text) on a
// lock-free stack the syncer drains; everything else the syncer does (Collect, Apply)
// runs on the syncer's one thread.
//
// Thread-safety: AddLimit from any thread (a mutex: it runs at (re)load and when a new
// Envoy override limit first appears, never per decision); CheckAll from any number of
// threads; Collect and Apply from one syncer thread; the stats from any.
#ifndef SLUICE_STORE_SYNC_SYNC_STORE_H_
#define SLUICE_STORE_SYNC_SYNC_STORE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <boost/unordered/unordered_flat_map.hpp>

#include "sluice/decision.h"
#include "sluice/policy.h"
#include "sluice/time.h"
#include "store/key_hash.h"

namespace sluice::sync {

// The largest limit (and count) this mode holds: counts are 40-bit signed in a slot word,
// and the others' hits can push a total past the limit.
inline constexpr int64_t kMaxLimit = (int64_t{1} << 36) - 1;

// Whether `policy` can be decided from synced counts (fixed_window, sliding_window_counter
// with limit <= kMaxLimit).
bool Syncable(const Policy& policy);

class SyncLimit;

struct SyncCheck {
  SyncLimit* limit;
  std::string_view key;
  int64_t cost = 1;
};

// One window of one key, as the syncer sends it: this node's cumulative hits in the window
// (`own`, set in Redis as this node's field, never lowered: sending it twice counts once),
// and Apply the sum of every node's field that Redis answers.
struct SyncItem {
  SyncLimit* limit = nullptr;  // held by the store until the next Collect
  size_t slot = 0;
  const std::string* key = nullptr;  // owned by the store; valid until the next Collect
  int64_t window = 0;                // index: floor(now / period)
  int64_t own = 0;                   // this node's hits in the window, sent or not
  int64_t unsent = 0;                // of which Redis has not confirmed these
};

class SyncStore {
 public:
  enum class Result : uint8_t { kDecided, kFull };

  // `capacity`: keys per limit (rounded up to a power of two, at least 1024). Throws
  // std::runtime_error, saying so, when a table that large cannot be mapped.
  explicit SyncStore(size_t capacity);
  ~SyncStore();
  SyncStore(const SyncStore&) = delete;
  SyncStore& operator=(const SyncStore&) = delete;

  // The limit with this id (its Redis name, which includes a hash of the policy), made on
  // first use; the same object for the same id while anyone holds it, so counters survive
  // reloads. Null if the policy is not Syncable, or (with *error set) if its table cannot be
  // mapped. A SyncCheck's limit must be held by its caller for the call.
  std::shared_ptr<SyncLimit> AddLimit(const std::string& id, const Policy& policy,
                                      std::string* error = nullptr);
  // Limits alive (held by rules or by the syncer), for tests and stats.
  size_t limits() const;

  // Decides `checks` all-or-nothing at `now`: fills out[i] and *deciding (as
  // MemoryStore::CheckAll). kFull when a key has no slot left (nothing was spent).
  Result CheckAll(std::span<const SyncCheck> checks, TimeUs now, std::span<Decision> out,
                  size_t* deciding);

  // Syncer side. The windows to send at `now`: every key decided since the last Collect,
  // and every window whose hits Redis has not confirmed (kept until the window no longer
  // matters to any decision; bounded, as keys are, by the tables). Takes the pending hits.
  void Collect(TimeUs now, std::vector<SyncItem>* out);
  // Redis holds `total` for the item's window (its `own` included). An item not applied
  // (Redis failed) keeps its hits unsent: the next Collect sends them again.
  void Apply(const SyncItem& item, int64_t total);

  // Keys whose hits Redis has not confirmed: those with hits to send at the last Collect,
  // less those a round has applied since.
  size_t held() const { return held_.load(std::memory_order_relaxed); }
  // Decisions refused a slot (the table was full), and the time of the last (0: none).
  uint64_t full() const { return full_.load(std::memory_order_relaxed); }
  TimeUs last_full() const { return last_full_.load(std::memory_order_relaxed); }
  // Hits never sent because their window ended while Redis was unreachable.
  uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }

  struct Record;  // a key to sync, pushed by the deciding thread

 private:
  struct Known;  // the syncer's view of one key's windows

  void Touch(SyncLimit& limit, size_t slot, uint64_t fingerprint, std::string_view key);

  const size_t capacity_;
  internal::KeyHasher hasher_;
  mutable std::mutex limits_mu_;  // AddLimit's: rules and RLS load apart
  boost::unordered_flat_map<std::string, std::weak_ptr<SyncLimit>> limits_;  // by id
  std::atomic<Record*> records_{nullptr};  // Treiber stack, drained by Collect
  // Syncer thread only. A Known holds its limit: the table outlives the syncer's use of it.
  boost::unordered_flat_map<std::pair<const SyncLimit*, size_t>, std::unique_ptr<Known>>
      known_;  // (limit, slot) ->
  std::atomic<size_t> held_{0};
  std::atomic<uint64_t> full_{0};
  std::atomic<TimeUs> last_full_{0};
  std::atomic<uint64_t> dropped_{0};
};

class SyncLimit : public std::enable_shared_from_this<SyncLimit> {
 public:
  // The table is mapped here; mapped() says whether that worked.
  SyncLimit(std::string id, const Policy& policy, size_t capacity);
  ~SyncLimit();
  SyncLimit(const SyncLimit&) = delete;
  SyncLimit& operator=(const SyncLimit&) = delete;

  const std::string& id() const { return id_; }
  const Policy& policy() const { return policy_; }
  // How many past windows a decision reads: 0 (fixed window) or 1 (sliding counter).
  int64_t history() const { return policy_.algorithm == Algorithm::kSlidingWindowCounter; }

 private:
  friend class SyncStore;
  // Plain words, accessed through std::atomic_ref, in an anonymous mapping: zero until
  // written, and a page costs memory only once a key lands on it.
  struct Slot {
    uint64_t fingerprint;  // 0: empty
    uint64_t used[2];      // by window parity: (count << 24) | (window & 0xffffff)
    uint64_t pending[2];
    uint64_t listed;  // kOnStack | kKnown
  };
  static constexpr uint64_t kOnStack = 1;  // a record for this slot waits for Collect
  static constexpr uint64_t kKnown = 2;    // the syncer knows the slot's key

  // The slot of `fingerprint`, inserting it (in a free slot, else one whose key's state is
  // over at `now`); nullptr when no slot of the probe sequence is either.
  Slot* Find(uint64_t fingerprint, bool insert, TimeUs now);
  // Takes `s` over for `fingerprint` if its key's state is over at window `w`.
  bool Reclaim(Slot& s, uint64_t fingerprint, int64_t w);
  size_t IndexOf(const Slot* s) const { return static_cast<size_t>(s - slots_); }
  bool mapped() const { return slots_ != nullptr; }

  const std::string id_;
  const Policy policy_;
  const size_t mask_;
  Slot* slots_ = nullptr;
};

}  // namespace sluice::sync

#endif  // SLUICE_STORE_SYNC_SYNC_STORE_H_
