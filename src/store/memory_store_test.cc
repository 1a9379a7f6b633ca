#include "sluice/memory_store.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace sluice {
namespace {

constexpr TimeUs kT0 = 1699012800 * kSecond;

MemoryStore::Options SmallStore(size_t max_keys, size_t shards = 1) {
  MemoryStore::Options o;
  o.max_keys_per_limit = max_keys;
  o.shards = shards;
  o.hash_seed = 42;
  return o;
}

TEST(MemoryStore, EveryAlgorithmDecidesPerKey) {
  MemoryStore store;
  for (Algorithm a : kAllAlgorithms) {
    SCOPED_TRACE(std::string(AlgorithmName(a)));
    Limit* l = store.AddLimit(std::string(AlgorithmName(a)), Policy{a, 3, kMinute, 0});
    ASSERT_NE(l, nullptr);
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(l->Check("alice", kT0).allowed) << i;
    EXPECT_FALSE(l->Check("alice", kT0).allowed);
    EXPECT_TRUE(l->Check("bob", kT0).allowed);
    EXPECT_EQ(l->size(), 2u);
  }
}

TEST(MemoryStore, AddLimitValidatesAndDeduplicates) {
  MemoryStore store;
  EXPECT_EQ(store.AddLimit("bad", Policy::FixedWindow(-1, kMinute)), nullptr);
  Limit* a = store.AddLimit("x", Policy::FixedWindow(5, kMinute));
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(store.AddLimit("x", Policy::FixedWindow(5, kMinute)), a);
  EXPECT_EQ(store.AddLimit("x", Policy::FixedWindow(6, kMinute)), nullptr);
  EXPECT_EQ(store.FindLimit("x"), a);
  EXPECT_EQ(store.FindLimit("y"), nullptr);
  EXPECT_EQ(a->name(), "x");
  EXPECT_EQ(a->policy(), Policy::FixedWindow(5, kMinute));
}

// A config's limit across reloads: a changed policy gets a table of its own ("x#N"), a
// policy that comes back finds its counts again, and no number of policies runs out of
// names.
TEST(MemoryStore, AddLimitOrVariantKeepsOneTablePerNameAndPolicy) {
  MemoryStore store;
  Policy five = Policy::FixedWindow(5, kMinute), six = Policy::FixedWindow(6, kMinute);
  EXPECT_EQ(store.AddLimitOrVariant("bad", Policy::FixedWindow(-1, kMinute)), nullptr);
  Limit* a = store.AddLimitOrVariant("x", five);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->name(), "x");
  a->Check("k", 0, 2);
  Limit* b = store.AddLimitOrVariant("x", six);
  ASSERT_NE(b, nullptr);
  EXPECT_NE(a, b);
  EXPECT_EQ(b->name(), "x#1");
  EXPECT_EQ(store.AddLimitOrVariant("x", six), b);   // unchanged by a reload
  EXPECT_EQ(store.AddLimitOrVariant("x", five), a);  // back: its counts too
  EXPECT_EQ(a->Check("k", 0, 0).remaining, 3);
  EXPECT_EQ(store.FindLimit("x"), b);                                  // the newest
  EXPECT_EQ(store.TablesFor("x"), (std::vector<const Limit*>{a, b}));  // every one, oldest first
  EXPECT_TRUE(store.TablesFor("nothing").empty());
  // Names that only look alike are other limits.
  Limit* other = store.AddLimitOrVariant("x#y", five);
  EXPECT_NE(other, a);
  EXPECT_EQ(store.FindLimit("x"), b);
  for (int64_t n = 7; n < 2100; ++n) {
    Limit* l = store.AddLimitOrVariant("x", Policy::FixedWindow(n, kMinute));
    ASSERT_NE(l, nullptr) << n;
    EXPECT_EQ(l->policy().limit, n);
  }
  EXPECT_EQ(store.FindLimit("x")->policy().limit, 2099);
}

// A sliding window log's entries live outside the table's slots: they are counted too,
// from the first entry to the last key's reset or sweep.
TEST(MemoryStore, CountsTheMemoryOfSlidingWindowLogs) {
  MemoryStore::Options one_shard;
  one_shard.shards = 1;  // one slot array: only the logs change the count below
  MemoryStore store(one_shard);
  Limit* log = store.AddLimitOrVariant("x", Policy::SlidingWindowLog(100'000, kSecond));
  log->Check("a", 0);
  const size_t one = log->bytes();
  for (int64_t i = 1; i <= 50'000; ++i) ASSERT_TRUE(log->Check("a", i).allowed);
  EXPECT_GE(log->bytes(), one + 50'000 * 16);  // 16 bytes per microsecond logged
  EXPECT_LT(log->bytes(), one + 50'000 * 16 * 2 + 4096);
  EXPECT_TRUE(log->Reset("a"));
  EXPECT_EQ(log->bytes(), one - 16);  // the reset key's log is no longer counted
  log->Check("b", 0);
  log->Check("c", 0);
  const size_t two = log->bytes();
  EXPECT_EQ(store.Sweep(2 * kSecond), 2u);
  EXPECT_LT(log->bytes(), two - 32);  // the logs, and the emptied shard's slots
}

// A table a reload replaced, or one a burst of one-off keys filled, gives its memory back
// once the keys expire; a table whose keys are live keeps what it needs.
TEST(MemoryStore, SweepGivesBackTheMemoryOfExpiredKeys) {
  MemoryStore store;
  Limit* burst = store.AddLimitOrVariant("x", Policy::FixedWindow(5, kSecond));
  Limit* live = store.AddLimitOrVariant("y", Policy::FixedWindow(5, kMinute));
  const size_t empty = burst->bytes();
  for (int i = 0; i < 200'000; ++i) {
    burst->Check("k" + std::to_string(i), 0);
    if (i < 1000) live->Check("k" + std::to_string(i), 0);
  }
  const size_t peak = burst->bytes();
  EXPECT_GT(peak, empty + 200'000 * 8);  // at least the fingerprints
  EXPECT_EQ(store.bytes(), peak + live->bytes());
  EXPECT_EQ(store.Sweep(kSecond / 2), 0u);  // nothing expired yet: nothing moves
  EXPECT_EQ(burst->bytes(), peak);
  const size_t live_bytes = live->bytes();
  EXPECT_EQ(store.Sweep(2 * kSecond), 200'000u);
  EXPECT_EQ(burst->size(), 0u);
  EXPECT_EQ(burst->bytes(), empty);
  EXPECT_EQ(live->size(), 1000u);
  EXPECT_EQ(live->bytes(), live_bytes);
  // The emptied table still decides, and grows again.
  EXPECT_EQ(burst->Check("k1", 3 * kSecond).remaining, 4);
  EXPECT_EQ(burst->Check("k1", 3 * kSecond).remaining, 3);
}

TEST(MemoryStore, PeeksAndRejectionsOfUnknownKeysStoreNothing) {
  MemoryStore store;
  Limit* l = store.AddLimit("l", Policy::FixedWindow(2, kMinute));
  for (int i = 0; i < 100; ++i) {
    EXPECT_TRUE(l->Check("peek" + std::to_string(i), kT0, 0).allowed);
    EXPECT_FALSE(l->Check("big" + std::to_string(i), kT0, 3).allowed);
  }
  EXPECT_EQ(l->size(), 0u);
  EXPECT_TRUE(l->Check("k", kT0, -5).allowed);  // negative cost: a peek
  EXPECT_EQ(l->size(), 0u);
}

TEST(MemoryStore, ResetForgetsAKey) {
  MemoryStore store;
  Limit* l = store.AddLimit("l", Policy::TokenBucket(1, 1, kHour));
  EXPECT_TRUE(l->Check("k", kT0).allowed);
  EXPECT_FALSE(l->Check("k", kT0).allowed);
  EXPECT_TRUE(l->Reset("k"));
  EXPECT_FALSE(l->Reset("k"));
  EXPECT_TRUE(l->Check("k", kT0).allowed);
}

TEST(MemoryStore, SweepDropsOnlyKeysBackToFresh) {
  MemoryStore store;
  Limit* fw = store.AddLimit("fw", Policy::FixedWindow(5, kMinute));
  Limit* tb = store.AddLimit("tb", Policy::TokenBucket(5, 1, kSecond));
  for (int i = 0; i < 10; ++i) {
    fw->Check("k" + std::to_string(i), kT0);
    tb->Check("k" + std::to_string(i), kT0);
  }
  EXPECT_EQ(store.Sweep(kT0 + kSecond - 1), 0u);
  EXPECT_EQ(tb->size(), 10u);
  EXPECT_EQ(store.Sweep(kT0 + kSecond), 10u);  // the buckets refilled, the windows run on
  EXPECT_EQ(tb->size(), 0u);
  EXPECT_EQ(fw->size(), 10u);
  EXPECT_EQ(fw->Sweep(kT0 + kMinute), 10u);
  EXPECT_EQ(fw->size(), 0u);
}

TEST(MemoryStore, SweepStepsSweepOneShardEachAndAPassCoversEveryLimit) {
  MemoryStore store(SmallStore(/*max_keys=*/100'000, /*shards=*/4));
  Limit* a = store.AddLimit("a", Policy::FixedWindow(5, kSecond));
  Limit* b = store.AddLimit("b", Policy::FixedWindow(5, kSecond));
  for (int i = 0; i < 1000; ++i) {
    a->Check("k" + std::to_string(i), kT0);
    b->Check("k" + std::to_string(i), kT0);
  }
  // A pass is one step per shard of each limit (4 + 4), each dropping one shard's keys.
  size_t dropped = 0;
  bool done = false;
  int steps = 0;
  while (!done) {
    size_t before = a->size() + b->size();
    size_t n = store.SweepStep(kT0 + kSecond, &done);
    EXPECT_EQ(before - n, a->size() + b->size());
    EXPECT_LT(n, 1000u) << "one step swept more than one shard";
    dropped += n;
    ++steps;
  }
  EXPECT_EQ(steps, 8);
  EXPECT_EQ(dropped, 2000u);
  EXPECT_EQ(a->size() + b->size(), 0u);

  // A limit added during a pass is swept from the next pass on.
  a->Check("x", kT0 + kSecond);
  store.SweepStep(kT0 + 3 * kSecond, &done);  // the pass starts, over a and b
  ASSERT_FALSE(done);
  Limit* c = store.AddLimit("c", Policy::FixedWindow(5, kSecond));
  c->Check("y", kT0 + kSecond);
  steps = 1;
  while (!done) {
    store.SweepStep(kT0 + 3 * kSecond, &done);
    ++steps;
  }
  EXPECT_EQ(steps, 8);
  EXPECT_EQ(a->size(), 0u);
  EXPECT_EQ(c->size(), 1u);
  steps = 0;
  done = false;
  while (!done) {
    store.SweepStep(kT0 + 3 * kSecond, &done);
    ++steps;
  }
  EXPECT_EQ(steps, 12);
  EXPECT_EQ(c->size(), 0u);

  // A store without limits ends its pass at once.
  MemoryStore empty;
  EXPECT_EQ(empty.SweepStep(kT0, &done), 0u);
  EXPECT_TRUE(done);
}

TEST(MemoryStore, AFloodOfDistinctKeysIsBoundedAndCountsEvictions) {
  MemoryStore store(SmallStore(/*max_keys=*/800, /*shards=*/4));
  Limit* l = store.AddLimit("l", Policy::SlidingWindowCounter(10, kHour));
  for (int i = 0; i < 20000; ++i) l->Check("flood" + std::to_string(i), kT0 + i);
  EXPECT_LE(l->size(), 800u);
  EXPECT_GE(l->size(), 600u);
  EXPECT_EQ(l->evictions(), 20000u - l->size());
}

TEST(MemoryStore, FullShardEvictsKeysWithTheMostLeftFirst) {
  MemoryStore store(SmallStore(/*max_keys=*/8));
  Limit* l = store.AddLimit("l", Policy::Gcra(1, kSecond, 100));
  // "heavy" spent 90 units and resets last; 7 light keys spent one each.
  EXPECT_TRUE(l->Check("heavy", kT0, 90).allowed);
  for (int i = 0; i < 7; ++i) l->Check("light" + std::to_string(i), kT0);
  EXPECT_EQ(l->size(), 8u);
  l->Check("newcomer", kT0);  // full: one key must go, not the heavy one
  EXPECT_EQ(l->evictions(), 1u);
  Decision d = l->Check("heavy", kT0, 0);
  EXPECT_EQ(d.remaining, 10);
}

TEST(MemoryStore, AKeyAtItsLimitIsNeverEvictedByAFloodOfNewKeys) {
  // Forgetting a refused key would admit its client again: a bypass anyone could force by
  // sending new keys. Neither keys that spend a little nor keys that spend all evict it;
  // once every key held is at its limit, new keys are refused until one is fresh again.
  for (Algorithm a : kAllAlgorithms) {
    SCOPED_TRACE(std::string(AlgorithmName(a)));
    MemoryStore store(SmallStore(/*max_keys=*/8));
    Limit* l = store.AddLimit("l", Policy{a, 3, kMinute, 0});
    int admitted = 0;
    while (l->Check("victim", kT0).allowed) ++admitted;
    EXPECT_EQ(admitted, 3);
    for (int i = 0; i < 1000; ++i) l->Check("light" + std::to_string(i), kT0 + i);
    EXPECT_FALSE(l->Check("victim", kT0 + 1000).allowed);
    for (int i = 0; i < 1000; ++i) {
      for (int j = 0; j < 3; ++j) l->Check("heavy" + std::to_string(i), kT0 + 2000 + i);
    }
    EXPECT_FALSE(l->Check("victim", kT0 + 3000).allowed);
    EXPECT_LE(l->size(), 8u);
    // Full of keys at their limit: a new key is refused, told when room comes, and counted.
    Decision d = l->Check("newcomer", kT0 + 4000);
    EXPECT_FALSE(d.allowed);
    EXPECT_GT(d.retry_after, 0);
    EXPECT_LE(d.retry_after, 2 * kMinute + kSecond);  // a sliding counter: two windows
    EXPECT_GT(l->full_refusals(), 0u);
    // Once the keys are fresh again, new keys are admitted and stored.
    EXPECT_TRUE(l->Check("newcomer", kT0 + 3 * kMinute).allowed);
  }
}

TEST(MemoryStore, AFullTableSaysWhenTheFirstKeyCanGo) {
  // A bucket of 100 refilling one a second: the key holding the table can go (one token
  // back) after a second, not after the 100 its refill to full takes.
  MemoryStore store(SmallStore(/*max_keys=*/1));
  Limit* l = store.AddLimit("l", Policy::TokenBucket(100, 1, kSecond));
  ASSERT_TRUE(l->Check("a", kT0, 100).allowed);
  Decision d = l->Check("b", kT0);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, kSecond);
  EXPECT_TRUE(l->Check("b", kT0 + d.retry_after).allowed);
}

TEST(MemoryStore, AddLimitRefusesABacklogTheClockCannotDrain) {
  MemoryStore store;
  // A backlog longer than the clock holds: Validate takes it, the decisions could not.
  const Policy endless = Policy::Gcra(1, kDay, 200'000'000);
  ASSERT_TRUE(endless.Validate().ok());
  EXPECT_EQ(store.AddLimit("g", endless), nullptr);
  EXPECT_EQ(store.AddLimitOrVariant("g", endless), nullptr);
}

TEST(MemoryStore, MaxKeysIsABoundOnAllShards) {
  for (size_t max_keys : {1, 5, 100, 1000}) {
    MemoryStore store(SmallStore(max_keys, /*shards=*/64));
    Limit* l = store.AddLimit("l", Policy::FixedWindow(5, kMinute));
    for (int i = 0; i < 5000; ++i) l->Check("k" + std::to_string(i), kT0);
    EXPECT_LE(l->size(), max_keys) << max_keys;
    EXPECT_GE(l->size(), std::min<size_t>(max_keys, 64) * 7 / 8) << max_keys;
  }
}

TEST(MemoryStore, ExpiredKeysMakeRoomBeforeLiveOnesAreEvicted) {
  MemoryStore store(SmallStore(/*max_keys=*/4));
  Limit* l = store.AddLimit("l", Policy::FixedWindow(5, kMinute));
  for (int i = 0; i < 4; ++i) l->Check("old" + std::to_string(i), kT0);
  l->Check("new", kT0 + kMinute);  // the old windows are over: nothing live is lost
  EXPECT_EQ(l->evictions(), 0u);
  EXPECT_EQ(l->size(), 1u);
}

TEST(MemoryStore, CheckAllIsAllOrNothing) {
  // A request rejected by its per-hour limit consumes nothing from its per-minute limit.
  MemoryStore store;
  Limit* minute = store.AddLimit("per_minute", Policy::FixedWindow(5, kMinute));
  Limit* hour = store.AddLimit("per_hour", Policy::FixedWindow(7, kHour));
  auto check = [&](TimeUs t, std::vector<Decision>& out) {
    LimitCheck checks[] = {{minute, "user:1", 1}, {hour, "user:1", 1}};
    out.resize(2);
    return store.CheckAll(checks, t, out);
  };
  std::vector<Decision> out;
  for (int i = 0; i < 5; ++i) {
    check(kT0, out);
    EXPECT_TRUE(out[0].allowed && out[1].allowed);
  }
  size_t deciding = check(kT0, out);  // the minute is spent
  EXPECT_EQ(deciding, 0u);
  EXPECT_FALSE(out[0].allowed);
  EXPECT_TRUE(out[1].allowed);
  EXPECT_EQ(out[1].remaining, 2);  // the rejection spent nothing from the hour
  check(kT0 + kMinute, out);
  check(kT0 + kMinute, out);
  deciding = check(kT0 + kMinute, out);  // now the hour is spent
  EXPECT_EQ(deciding, 1u);
  EXPECT_FALSE(out[1].allowed);
  EXPECT_TRUE(out[0].allowed);
  EXPECT_EQ(out[0].remaining, 3);  // only the two admitted requests count in this minute
  EXPECT_EQ(minute->Check("user:1", kT0 + kMinute, 0).remaining, 3);
}

// A limit whose table is full of keys at their limit refuses a new key: in CheckAll that
// refusal is the request's, and the other limits spend nothing, in either order.
TEST(MemoryStore, CheckAllSpendsNothingWhenAFullTableRefusesTheKey) {
  MemoryStore store(SmallStore(8));
  Limit* user = store.AddLimit("user", Policy::FixedWindow(10, kMinute));
  Limit* login = store.AddLimit("login", Policy::FixedWindow(1, kMinute));
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(login->Check("full" + std::to_string(i), kT0).allowed);
  }
  std::vector<Decision> out(2);
  for (int i = 0; i < 3; ++i) {
    const std::string key = "new" + std::to_string(i);  // the checks hold views of it
    LimitCheck both[] = {{user, "alice", 1}, {login, key, 1}};
    EXPECT_EQ(store.CheckAll(both, kT0, out), 1u);
    EXPECT_FALSE(out[1].allowed);
    LimitCheck reversed[] = {{login, key, 1}, {user, "alice", 1}};
    EXPECT_EQ(store.CheckAll(reversed, kT0, out), 0u);
    EXPECT_FALSE(out[0].allowed);
  }
  EXPECT_EQ(user->Check("alice", kT0, 0).remaining, 10);
  EXPECT_EQ(login->full_refusals(), 6u);
}

// An algorithm the enum does not name is refused, and the store stays whole.
TEST(MemoryStore, AnUnknownAlgorithmIsRefused) {
  Policy p = Policy::FixedWindow(5, kMinute);
  p.algorithm = static_cast<Algorithm>(99);
  EXPECT_EQ(p.Validate().message(), "unknown algorithm 99");
  MemoryStore store;
  EXPECT_EQ(store.AddLimit("x", p), nullptr);
  EXPECT_EQ(store.AddLimitOrVariant("x", p), nullptr);
  Limit* good = store.AddLimit("x", Policy::FixedWindow(5, kMinute));
  ASSERT_NE(good, nullptr);
  EXPECT_TRUE(good->Check("k", kT0).allowed);
  EXPECT_EQ(store.Sweep(kT0 + kHour), 1u);
  EXPECT_EQ(store.SweepStep(kT0), 0u);  // no pass_done wanted
  EXPECT_EQ(store.FullRefusals().size(), 1u);
}

TEST(MemoryStore, CheckAllReportsTheTightestLimitWhenAllAdmit) {
  MemoryStore store;
  Limit* a = store.AddLimit("a", Policy::TokenBucket(100, 10, kSecond));
  Limit* b = store.AddLimit("b", Policy::SlidingWindowLog(3, kMinute));
  LimitCheck checks[] = {{a, "k", 1}, {b, "k", 1}};
  Decision out[2];
  EXPECT_EQ(store.CheckAll(checks, kT0, out), 1u);
  EXPECT_EQ(out[0].remaining, 99);
  EXPECT_EQ(out[1].remaining, 2);
}

TEST(MemoryStore, CheckAllMergesRepeatsOfOneLimitAndKey) {
  MemoryStore store;
  Limit* l = store.AddLimit("l", Policy::FixedWindow(3, kMinute));
  LimitCheck twice[] = {{l, "k", 2}, {l, "k", 2}};
  Decision out[2];
  store.CheckAll(twice, kT0, out);  // 4 units against 3: neither is spent
  EXPECT_FALSE(out[0].allowed);
  EXPECT_FALSE(out[1].allowed);
  EXPECT_EQ(l->Check("k", kT0, 0).remaining, 3);
  LimitCheck ok[] = {{l, "k", 1}, {l, "k", 2}};
  store.CheckAll(ok, kT0, out);
  EXPECT_TRUE(out[0].allowed && out[1].allowed);
  EXPECT_EQ(l->Check("k", kT0, 0).remaining, 0);
}

TEST(MemoryStore, CheckAllCarriesTheQueueDelay) {
  MemoryStore store;
  Limit* q = store.AddLimit("q", Policy::LeakyQueue(10, kSecond, 5));
  Limit* w = store.AddLimit("w", Policy::FixedWindow(100, kMinute));
  LimitCheck checks[] = {{q, "k", 1}, {w, "k", 1}};
  Decision out[2];
  store.CheckAll(checks, kT0, out);
  store.CheckAll(checks, kT0, out);
  EXPECT_TRUE(out[0].allowed);
  EXPECT_EQ(out[0].delay, 100 * kMillisecond);
}

TEST(MemoryStore, KeysOfOneLimitAreIndependentOfOtherLimits) {
  MemoryStore store;
  Limit* a = store.AddLimit("a", Policy::FixedWindow(1, kMinute));
  Limit* b = store.AddLimit("b", Policy::FixedWindow(1, kMinute));
  EXPECT_TRUE(a->Check("same", kT0).allowed);
  EXPECT_TRUE(b->Check("same", kT0).allowed);
  EXPECT_FALSE(a->Check("same", kT0).allowed);
}

}  // namespace
}  // namespace sluice
