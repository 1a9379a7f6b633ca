#include "sluice/memory_store.h"

#include <algorithm>
#include <array>

#include <boost/container/small_vector.hpp>

#include "algo/fixed_window.h"
#include "algo/gcra.h"
#include "algo/leaky_queue.h"
#include "algo/sliding_window_counter.h"
#include "algo/sliding_window_log.h"
#include "algo/token_bucket.h"
#include "store/limit_table.h"

namespace sluice {
namespace {

std::unique_ptr<Limit> MakeLimit(std::string name, const Policy& policy,
                                 const MemoryStore::Options& options) {
  uint64_t seed = options.hash_seed;
  switch (policy.algorithm) {
    case Algorithm::kFixedWindow:
      return std::make_unique<internal::LimitTable<algo::FixedWindow>>(std::move(name), policy,
                                                                       options, seed);
    case Algorithm::kSlidingWindowLog:
      return std::make_unique<internal::LimitTable<algo::SlidingWindowLog>>(std::move(name), policy,
                                                                            options, seed);
    case Algorithm::kSlidingWindowCounter:
      return std::make_unique<internal::LimitTable<algo::SlidingWindowCounter>>(
          std::move(name), policy, options, seed);
    case Algorithm::kTokenBucket:
      return std::make_unique<internal::LimitTable<algo::TokenBucket>>(std::move(name), policy,
                                                                       options, seed);
    case Algorithm::kGcra:
      return std::make_unique<internal::LimitTable<algo::Gcra>>(std::move(name), policy, options,
                                                                seed);
    case Algorithm::kLeakyQueue:
      return std::make_unique<internal::LimitTable<algo::LeakyQueue>>(std::move(name), policy,
                                                                      options, seed);
  }
  return nullptr;
}

}  // namespace

MemoryStore::MemoryStore() : MemoryStore(Options{}) {}
MemoryStore::MemoryStore(const Options& options) : options_(options) {}
MemoryStore::~MemoryStore() = default;

Limit* MemoryStore::Insert(std::string table, const std::string& name, const Policy& policy) {
  auto made = MakeLimit(table, policy, options_);
  if (!made) return nullptr;  // an algorithm Validate let through: nothing is stored
  limits_.push_back(std::move(made));
  Limit* l = limits_.back().get();
  by_table_.emplace(std::move(table), l);
  by_name_[name].push_back(l);
  return l;
}

namespace {

// Validate's checks, and for an algorithm that keeps a backlog (GCRA, the queue) that its
// burst drains within the clock's range (ValidateStrict's): past it, its answers would
// name a limit no fresh key could spend. A burst an algorithm ignores stays allowed here.
bool Decidable(const Policy& p) {
  return p.Validate().ok() && (!p.TakesBurst() || p.ValidateStrict().ok());
}

}  // namespace

Limit* MemoryStore::AddLimit(std::string name, const Policy& policy) {
  if (!Decidable(policy)) return nullptr;
  std::lock_guard lock(limits_mu_);
  if (auto it = by_table_.find(name); it != by_table_.end()) {
    return it->second->policy() == policy ? it->second : nullptr;
  }
  return Insert(name, name, policy);
}

Limit* MemoryStore::AddLimitOrVariant(const std::string& name, const Policy& policy) {
  if (!Decidable(policy)) return nullptr;
  std::lock_guard lock(limits_mu_);
  if (auto it = by_name_.find(name); it != by_name_.end()) {
    for (Limit* l : it->second) {
      if (l->policy() == policy) return l;
    }
  }
  std::string table = name;
  while (by_table_.contains(table)) table = name + "#" + std::to_string(++variants_);
  return Insert(std::move(table), name, policy);
}

Limit* MemoryStore::FindLimit(std::string_view name) const {
  std::lock_guard lock(limits_mu_);
  std::string n(name);
  if (auto it = by_name_.find(n); it != by_name_.end() && !it->second.empty()) {
    return it->second.back();
  }
  auto it = by_table_.find(n);
  return it == by_table_.end() ? nullptr : it->second;
}

std::vector<const Limit*> MemoryStore::TablesFor(std::string_view name) const {
  std::lock_guard lock(limits_mu_);
  auto it = by_name_.find(std::string(name));
  if (it == by_name_.end()) return {};
  return {it->second.begin(), it->second.end()};
}

size_t MemoryStore::CheckAll(std::span<const LimitCheck> checks, TimeUs now,
                             std::span<Decision> out) {
  const size_t n = checks.size();
  if (n == 0) return 0;
  if (n == 1) {
    out[0] = checks[0].limit->Check(checks[0].key, now, checks[0].cost);
    return 0;
  }
  struct Item {
    uint64_t fp;
    int64_t cost;    // summed over checks of the same limit and key
    size_t same_as;  // index of the first check of the same limit and key
  };
  boost::container::small_vector<Item, 8> items(n);
  boost::container::small_vector<internal::SpinLock*, 8> locks;
  for (size_t i = 0; i < n; ++i) {
    Limit* limit = checks[i].limit;
    items[i] = {limit->Fingerprint(checks[i].key), std::max<int64_t>(checks[i].cost, 0), i};
    for (size_t j = 0; j < i; ++j) {
      if (checks[j].limit == limit && items[j].fp == items[i].fp) {
        items[i].same_as = j;
        items[j].cost = algo::SatAdd(items[j].cost, items[i].cost);
        break;
      }
    }
    locks.push_back(&limit->ShardLock(items[i].fp));
  }
  std::sort(locks.begin(), locks.end());
  locks.erase(std::unique(locks.begin(), locks.end()), locks.end());
  for (auto* l : locks) l->lock();
  // Released however this scope ends: a step that throws (std::bad_alloc growing a table
  // or a log) must not leave the shards locked for every later caller.
  struct Unlock {
    decltype(locks)& held;
    ~Unlock() {
      for (auto* l : held) l->unlock();
    }
  } unlock{locks};

  auto step_all = [&](bool commit) {
    bool all = true;
    for (size_t i = 0; i < n; ++i) {
      if (items[i].same_as != i) continue;
      out[i] = checks[i].limit->StepLocked(items[i].fp, now, items[i].cost, commit);
      all = all && out[i].allowed;
    }
    return all;
  };
  if (step_all(/*commit=*/false)) {
    step_all(/*commit=*/true);
  } else {
    // Nothing is spent: the limits that would have admitted report their state as is.
    for (size_t i = 0; i < n; ++i) {
      if (items[i].same_as == i && out[i].allowed) {
        out[i] = checks[i].limit->StepLocked(items[i].fp, now, 0, false);
        out[i].allowed = true;
      }
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (items[i].same_as != i) out[i] = out[items[i].same_as];
  }
  return DecidingIndex(out.first(n));
}

size_t MemoryStore::Sweep(TimeUs now) {
  std::vector<Limit*> limits;
  {
    std::lock_guard lock(limits_mu_);
    for (const auto& l : limits_) limits.push_back(l.get());
  }
  size_t dropped = 0;
  for (Limit* l : limits) dropped += l->Sweep(now);
  return dropped;
}

size_t MemoryStore::SweepStep(TimeUs now, bool* pass_done) {
  Limit* limit = nullptr;
  size_t shard = 0;
  {
    std::lock_guard lock(limits_mu_);
    if (sweep_limit_ == 0 && sweep_shard_ == 0) sweep_limits_ = limits_.size();
    if (sweep_limit_ < sweep_limits_) {
      limit = limits_[sweep_limit_].get();
      shard = sweep_shard_;
      if (++sweep_shard_ == limit->shard_count()) {
        sweep_shard_ = 0;
        ++sweep_limit_;
      }
    }
    const bool done = sweep_limit_ >= sweep_limits_;
    if (pass_done) *pass_done = done;
    if (done) sweep_limit_ = 0;
  }
  // Limits live as long as the store, so the table is swept outside limits_mu_: a reload
  // adding limits does not wait on it.
  return limit ? limit->SweepShard(shard, now) : 0;
}

std::vector<std::pair<std::string, uint64_t>> MemoryStore::FullRefusals() const {
  std::lock_guard lock(limits_mu_);
  std::vector<std::pair<std::string, uint64_t>> out;
  for (const auto& l : limits_) out.emplace_back(l->name(), l->full_refusals());
  return out;
}

size_t MemoryStore::bytes() const {
  std::lock_guard lock(limits_mu_);
  size_t n = 0;
  for (const auto& l : limits_) n += l->bytes();
  return n;
}

}  // namespace sluice
