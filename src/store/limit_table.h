// LimitTable<Algo>: one policy's per-key state in memory, the Limit behind MemoryStore.
//
// Algo is one of the algorithm structs in src/algo (State, Params, Compile, Step,
// ExpiresAt). Keys are 64-bit fingerprints split into 2^k shards by their top bits; each
// shard is a boost::unordered_flat_map (open addressing, 1 byte of metadata per slot, SIMD
// probing) guarded by a SpinLock on its own cache line. A fingerprint is stored as two
// 32-bit halves so that 4-byte-aligned states (the sliding window counter's) pack into
// 28-byte slots.
//
// Thread-safety: public methods lock the one shard they touch. StepLocked and ShardLock
// are for MemoryStore::CheckAll, which holds the shard locks itself.
#ifndef SLUICE_STORE_LIMIT_TABLE_H_
#define SLUICE_STORE_LIMIT_TABLE_H_

#include <algorithm>
#include <bit>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include <boost/unordered/unordered_flat_map.hpp>

#include "algo/saturating.h"
#include "sluice/memory_store.h"
#include "store/huge_page_allocator.h"
#include "store/key_hash.h"
#include "store/spin_lock.h"

namespace sluice::internal {

template <class Algo>
class LimitTable final : public Limit {
 public:
  using State = typename Algo::State;

  LimitTable(std::string name, const Policy& policy, const MemoryStore::Options& options,
             uint64_t seed)
      : Limit(std::move(name), policy), params_(Algo::Compile(policy)), hasher_(seed) {
    // No more shards than keys: each shard holds at least one, and max_keys_per_limit is a
    // bound on all of them together (rounded down to a multiple of the shard count).
    const size_t max_keys = std::max<size_t>(options.max_keys_per_limit, 1);
    size_t shards = std::bit_ceil(std::max<size_t>(options.shards, 1));
    if (shards > max_keys) shards = std::bit_floor(max_keys);
    shard_bits_ = std::countr_zero(shards);
    size_t cap = max_keys / shards;
    shards_ = std::make_unique<Shard[]>(shards);
    shard_count_ = shards;
    for (size_t i = 0; i < shards; ++i) shards_[i].cap = cap;
  }

  // flatten: the hash, the probe and the algorithm's Step (visible under LTO) are inlined
  // into one function, the whole decision path.
  [[gnu::flatten]] Decision Check(std::string_view key, TimeUs now, int64_t cost) override {
    uint64_t fp = hasher_(key);
    Shard& shard = ShardFor(fp);
    std::lock_guard lock(shard.lock);
    return Step(shard, fp, now, cost, /*commit=*/true);
  }

  bool Reset(std::string_view key) override {
    uint64_t fp = hasher_(key);
    Shard& shard = ShardFor(fp);
    std::lock_guard lock(shard.lock);
    auto it = shard.map.find(Split(fp));
    if (it == shard.map.end()) return false;
    shard.heap_bytes -= HeapBytes(it->second);
    shard.map.erase(it);
    return true;
  }

  size_t Sweep(TimeUs now) override {
    size_t dropped = 0;
    for (size_t i = 0; i < shard_count_; ++i) dropped += SweepShard(i, now);
    return dropped;
  }

  size_t shard_count() const override { return shard_count_; }

  size_t SweepShard(size_t shard, TimeUs now) override {
    Shard& s = shards_[shard];
    std::lock_guard lock(s.lock);
    size_t dropped = DropExpired(s, now);
    // An empty shard frees its slots, and a large one holding less than an eighth of what
    // they could is shrunk to fit: a burst of one-off keys, or a table a reload left
    // unused, does not keep its peak memory once the keys expire. The hysteresis (growth
    // at 7/8 full) keeps a steady key count from being rehashed sweep after sweep, and
    // small shards are left alone (a rehash there would free next to nothing).
    size_t slots = s.map.bucket_count();
    if ((s.map.empty() && slots > 0) || (slots >= 4096 && s.map.size() * 8 < slots)) {
      s.map.rehash(0);
    }
    return dropped;
  }

  size_t size() const override {
    size_t n = 0;
    for (size_t i = 0; i < shard_count_; ++i) {
      std::lock_guard lock(shards_[i].lock);
      n += shards_[i].map.size();
    }
    return n;
  }

  size_t bytes() const override {
    size_t n = sizeof(*this) + shard_count_ * sizeof(Shard);
    for (size_t i = 0; i < shard_count_; ++i) {
      std::lock_guard lock(shards_[i].lock);
      // Each slot, and a 16-byte metadata word per group of 15.
      size_t slots = shards_[i].map.bucket_count();
      n += slots * sizeof(typename Map::value_type) + (slots + 14) / 15 * 16;
      n += shards_[i].heap_bytes;
    }
    return n;
  }

  uint64_t evictions() const override { return SumShards(&Shard::evictions); }
  uint64_t full_refusals() const override { return SumShards(&Shard::full_refusals); }

 private:
  struct Fp {
    uint32_t lo, hi;
    friend bool operator==(Fp, Fp) = default;
  };
  // The fingerprint is already a strong hash, so the map may use it as is (avalanching),
  // once the 6..10 top bits that chose the shard are rotated out of the bits the map reads
  // (its top bits for the position, its low byte for the tag).
  struct FpHash {
    using is_avalanching = void;
    size_t operator()(Fp f) const { return std::rotl((uint64_t{f.hi} << 32) | f.lo, 16); }
  };
  using Map = boost::unordered_flat_map<Fp, State, FpHash, std::equal_to<Fp>,
                                        HugePageAllocator<std::pair<const Fp, State>>>;

  struct alignas(64) Shard {
    mutable SpinLock lock;
    Map map;
    size_t cap = 0;
    uint64_t evictions = 0;
    uint64_t full_refusals = 0;  // new keys refused: every key held was at its limit
    size_t heap_bytes = 0;       // what the states hold outside their slots (sliding logs)
  };

  uint64_t SumShards(uint64_t Shard::*counter) const {
    uint64_t n = 0;
    for (size_t i = 0; i < shard_count_; ++i) {
      std::lock_guard lock(shards_[i].lock);
      n += shards_[i].*counter;
    }
    return n;
  }

  // A state's own allocation (the sliding window log's entries), 0 for the others.
  static size_t HeapBytes(const State& s) {
    if constexpr (requires { Algo::HeapBytes(s); }) {
      return Algo::HeapBytes(s);
    } else {
      return 0;
    }
  }

  static Fp Split(uint64_t fp) {
    return {static_cast<uint32_t>(fp), static_cast<uint32_t>(fp >> 32)};
  }

  Shard& ShardFor(uint64_t fp) { return shards_[shard_bits_ == 0 ? 0 : fp >> (64 - shard_bits_)]; }

  uint64_t Fingerprint(std::string_view key) const override { return hasher_(key); }
  SpinLock& ShardLock(uint64_t fp) override { return ShardFor(fp).lock; }
  Decision StepLocked(uint64_t fp, TimeUs now, int64_t cost, bool commit) override {
    return Step(ShardFor(fp), fp, now, cost, commit);
  }

  Decision Step(Shard& shard, uint64_t fp, TimeUs now, int64_t cost, bool commit) {
    cost = std::max<int64_t>(cost, 0);
    Fp key = Split(fp);
    auto it = shard.map.find(key);
    if (it != shard.map.end()) {
      const size_t before = HeapBytes(it->second);
      Decision d = Algo::Step(it->second, params_, now, cost, commit);
      shard.heap_bytes += HeapBytes(it->second) - before;  // modular: a shrink subtracts
      return d;
    }
    // A key is stored only once it has spent something: peeks and rejections of unknown
    // keys allocate nothing, so they cannot be used to fill the table. A full table's
    // refusal is decided in a dry run (commit false) too: CheckAll commits nothing unless
    // every limit admits, and this one would not.
    State fresh{};
    Decision d = Algo::Step(fresh, params_, now, cost, commit);
    if (d.allowed && cost > 0) {
      if (shard.map.size() >= shard.cap) {
        TimeUs room_at = MakeRoom(shard, now);
        if (room_at > now) {  // every key held is at its limit: this one is refused
          ++shard.full_refusals;
          Decision refused = d;
          refused.allowed = false;
          refused.remaining = 0;
          // kNever (no key held ever comes back) stays kNever, not a wait of centuries.
          const DurationUs wait = room_at >= kNever ? kNever : room_at - now;
          refused.retry_after = wait;
          refused.reset_after = std::max(d.reset_after, wait);
          refused.delay = 0;
          return refused;
        }
      }
      if (commit) {
        shard.heap_bytes += HeapBytes(fresh);
        shard.map.emplace(key, std::move(fresh));
      }
    }
    return d;
  }

  bool Expired(const State& s, TimeUs now) const { return Algo::ExpiresAt(s, params_, now) <= now; }

  // Erases the states `drop` picks, keeping heap_bytes.
  template <class Pred>
  size_t EraseIf(Shard& shard, Pred drop) {
    return boost::unordered::erase_if(shard.map, [&](const auto& kv) {
      if (!drop(kv.second)) return false;
      shard.heap_bytes -= HeapBytes(kv.second);
      return true;
    });
  }

  size_t DropExpired(Shard& shard, TimeUs now) {
    return EraseIf(shard, [&](const State& s) { return Expired(s, now); });
  }

  // Frees at least an eighth of a full shard when it can, so the O(shard) scan is paid
  // once per cap/8 insertions: expired keys first, then the live keys with the most left
  // (forgetting one gives its client back only what it had spent). A key with nothing
  // left is never forgotten: its client would be admitted again, a bypass anyone could
  // force by flooding the table with new keys. Returns `now` or earlier once there is
  // room; when every key held is at its limit, none is made and the return is when the
  // first of them has a unit left again, and can go (the new key is refused until then, as
  // nginx refuses a request its exhausted zone has no room for).
  TimeUs MakeRoom(Shard& shard, TimeUs now) {
    size_t want = std::max<size_t>(shard.cap / 8, 1);
    size_t freed = DropExpired(shard, now);
    if (freed >= want || shard.map.size() < shard.cap) return now;
    struct Candidate {
      int64_t left;
      Fp key;
    };
    std::vector<Candidate> candidates;
    candidates.reserve(shard.map.size());
    // When the first key held has a unit left again (its peek's retry_after): it can then
    // be evicted, and the new key stored.
    TimeUs first_room = kNever;
    for (auto& kv : shard.map) {
      Decision peek = Algo::Step(kv.second, params_, now, 0, /*commit=*/false);
      if (peek.allowed) {
        candidates.push_back({peek.remaining, kv.first});
      } else if (peek.retry_after < kNever) {
        first_room = std::min(first_room, algo::SatAdd(now, peek.retry_after));
      }
    }
    if (candidates.empty()) return std::max(first_room, now + 1);
    size_t evict = std::min(want - freed, candidates.size());
    std::nth_element(candidates.begin(), candidates.begin() + static_cast<ptrdiff_t>(evict - 1),
                     candidates.end(),
                     [](const Candidate& a, const Candidate& b) { return a.left > b.left; });
    for (size_t i = 0; i < evict; ++i) {
      auto it = shard.map.find(candidates[i].key);
      shard.heap_bytes -= HeapBytes(it->second);
      shard.map.erase(it);
    }
    shard.evictions += evict;
    return now;
  }

  const typename Algo::Params params_;
  const KeyHasher hasher_;
  int shard_bits_ = 0;
  size_t shard_count_ = 0;
  std::unique_ptr<Shard[]> shards_;
};

}  // namespace sluice::internal

#endif  // SLUICE_STORE_LIMIT_TABLE_H_
