// SyncStore's state logic with a fake clock (times passed in) and a map standing in for
// Redis' INCRBY/GET; the real round trip is tested by tests/integration/hybrid_test.py.
#include "store/sync/sync_store.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <memory>
#include <stdexcept>
#include <thread>

namespace sluice::sync {
namespace {

constexpr TimeUs kT0 = 1'800'000'000LL * kSecond;  // a window edge for 1s and 1m windows

// What Redis holds: window key -> each node's cumulative hits (never lowered). A round is
// Collect, set this node's field, Apply the sum.
struct FakeRedis {
  std::map<std::string, std::map<const SyncStore*, int64_t>> hashes;

  static std::string Key(const SyncItem& it) {
    return *it.key + ":" + it.limit->id() + ":" + std::to_string(it.window);
  }
  int64_t Total(const std::string& key) const {
    int64_t t = 0;
    for (const auto& [node, own] : hashes.at(key)) t += own;
    return t;
  }
  void Round(SyncStore& s, TimeUs now) {
    std::vector<SyncItem> items;
    s.Collect(now, &items);
    for (const SyncItem& it : items) {
      int64_t& own = hashes[Key(it)][&s];
      own = std::max(own, it.own);
      s.Apply(it, Total(Key(it)));
    }
  }
  // A round whose calls all fail: nothing reaches Redis, nothing is applied.
  static std::vector<SyncItem> FailedRound(SyncStore& s, TimeUs now) {
    std::vector<SyncItem> items;
    s.Collect(now, &items);
    return items;
  }
};

Decision One(SyncStore& s, const std::shared_ptr<SyncLimit>& l, std::string_view key, TimeUs now,
             int64_t cost = 1) {
  SyncCheck c{l.get(), key, cost};
  Decision d;
  size_t deciding = 0;
  EXPECT_EQ(s.CheckAll({&c, 1}, now, {&d, 1}, &deciding), SyncStore::Result::kDecided);
  return d;
}

int Admitted(SyncStore& s, const std::shared_ptr<SyncLimit>& l, std::string_view key, TimeUs now,
             int tries) {
  int n = 0;
  for (int i = 0; i < tries; ++i) n += One(s, l, key, now).allowed ? 1 : 0;
  return n;
}

TEST(SyncStore, OnlyCountsPerWindowAreSyncable) {
  SyncStore s(1024);
  EXPECT_NE(s.AddLimit("a", Policy::FixedWindow(10, kSecond)), nullptr);
  EXPECT_NE(s.AddLimit("b", Policy::SlidingWindowCounter(10, kSecond)), nullptr);
  EXPECT_EQ(s.AddLimit("c", Policy::TokenBucket(10, 10, kSecond)), nullptr);
  EXPECT_EQ(s.AddLimit("d", Policy::Gcra(10, kSecond)), nullptr);
  EXPECT_EQ(s.AddLimit("e", Policy::SlidingWindowLog(10, kSecond)), nullptr);
  EXPECT_EQ(s.AddLimit("f", Policy::FixedWindow(kMaxLimit + 1, kSecond)), nullptr);
  EXPECT_EQ(s.AddLimit("a", Policy::FixedWindow(10, kSecond)), s.AddLimit("a", Policy{}));
}

TEST(SyncStore, OneNodeIsExactWithoutAnySync) {
  SyncStore s(1024);
  auto l = s.AddLimit("fw", Policy::FixedWindow(5, kSecond));
  for (int i = 0; i < 5; ++i) {
    Decision d = One(s, l, "k", kT0 + 10);
    EXPECT_TRUE(d.allowed);
    EXPECT_EQ(d.remaining, 4 - i);
    EXPECT_EQ(d.reset_after, kSecond - 10);
  }
  Decision d = One(s, l, "k", kT0 + 20);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, kSecond - 20);
  EXPECT_EQ(Admitted(s, l, "other", kT0 + 30, 9), 5);   // keys are apart
  EXPECT_EQ(Admitted(s, l, "k", kT0 + kSecond, 9), 5);  // a new window starts fresh
}

TEST(SyncStore, SyncBringsTheOtherNodesHits) {
  // Windows of one second and of one minute: at kT0 the minute's window number has the
  // top bit of the word's window tag set, the second's does not.
  for (DurationUs period : {kSecond, kMinute}) {
    SCOPED_TRACE(period);
    FakeRedis redis;
    SyncStore a(1024), b(1024);
    Policy p = Policy::FixedWindow(10, period);
    auto la = a.AddLimit("fw~1", p);
    auto lb = b.AddLimit("fw~1", p);
    const std::string key = "k:fw~1:" + std::to_string(kT0 / period);
    EXPECT_EQ(Admitted(a, la, "k", kT0 + 1000, 7), 7);
    EXPECT_TRUE(One(b, lb, "k", kT0 + 1000, 0).allowed);  // a peek: b learns of the key
    redis.Round(a, kT0 + 2000);
    redis.Round(b, kT0 + 2000);
    EXPECT_EQ(redis.Total(key), 7);
    Decision d = One(b, lb, "k", kT0 + 3000, 0);
    EXPECT_EQ(d.remaining, 3);
    EXPECT_EQ(Admitted(b, lb, "k", kT0 + 3000, 5), 3);
    // a learns of b's 3 once it decides the key again and syncs: the window is full.
    redis.Round(b, kT0 + 4000);
    EXPECT_EQ(One(a, la, "k", kT0 + 4500, 0).remaining, 3);  // a's last view
    redis.Round(a, kT0 + 4600);
    EXPECT_EQ(Admitted(a, la, "k", kT0 + 5000, 1), 0);
    EXPECT_EQ(redis.Total(key), 10);
  }
}

TEST(SyncStore, OverAdmissionIsWhatTheOthersAdmittedSinceTheLastSync) {
  FakeRedis redis;
  SyncStore a(1024), b(1024), c(1024);
  Policy p = Policy::FixedWindow(30, kSecond);
  SyncStore* nodes[] = {&a, &b, &c};
  std::shared_ptr<SyncLimit> limits[3];
  for (int i = 0; i < 3; ++i) limits[i] = nodes[i]->AddLimit("fw", p);
  // Each node admits 4 per round, then all sync: the total never passes the limit by more
  // than the 2 x 4 the other two admitted within one round.
  int total = 0;
  for (int round = 0; round < 20; ++round) {
    TimeUs now = kT0 + round * 10'000;
    for (int i = 0; i < 3; ++i) total += Admitted(*nodes[i], limits[i], "k", now, 4);
    for (int i = 0; i < 3; ++i) redis.Round(*nodes[i], now + 5000);
  }
  EXPECT_GE(total, 30);
  EXPECT_LE(total, 30 + 2 * 4);
}

TEST(SyncStore, HitsWaitForRedisAndAreSentOnce) {
  FakeRedis redis;
  SyncStore s(1024);
  auto l = s.AddLimit("fw", Policy::FixedWindow(100, kMinute));
  EXPECT_EQ(Admitted(s, l, "k", kT0 + 1, 3), 3);
  auto failed = FakeRedis::FailedRound(s, kT0 + 2);
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_EQ(failed[0].unsent, 3);
  EXPECT_EQ(failed[0].own, 3);
  EXPECT_EQ(s.held(), 1u);
  // Applied, a round's keys wait no more: held counts failures, not traffic.
  SyncStore t(1024);
  auto tl = t.AddLimit("fw", Policy::FixedWindow(100, kMinute));
  for (int i = 0; i < 5; ++i) EXPECT_EQ(Admitted(t, tl, "k" + std::to_string(i), kT0 + 1, 1), 1);
  redis.Round(t, kT0 + 2);
  EXPECT_EQ(t.held(), 0u);
  EXPECT_EQ(Admitted(s, l, "k", kT0 + 3, 2), 2);
  EXPECT_EQ(One(s, l, "k", kT0 + 4, 0).remaining, 95);  // local counts go on
  redis.Round(s, kT0 + 5);
  EXPECT_EQ(redis.Total("k:fw:" + std::to_string(kT0 / kMinute)), 5);
  EXPECT_EQ(One(s, l, "k", kT0 + 6, 0).remaining, 95);
  redis.Round(s, kT0 + 7);  // nothing new: a GET, the total unchanged
  EXPECT_EQ(redis.Total("k:fw:" + std::to_string(kT0 / kMinute)), 5);
  EXPECT_EQ(s.held(), 0u);
}

TEST(SyncStore, ARoundResentAfterALostReplyCountsOnce) {
  FakeRedis redis;
  SyncStore s(1024);
  auto l = s.AddLimit("fw", Policy::FixedWindow(100, kMinute));
  const std::string key = "k:fw:" + std::to_string(kT0 / kMinute);
  EXPECT_EQ(Admitted(s, l, "k", kT0 + 1, 3), 3);
  std::vector<SyncItem> items;
  s.Collect(kT0 + 2, &items);
  for (const SyncItem& it : items) {  // Redis counts them, the reply is lost
    int64_t& own = redis.hashes[FakeRedis::Key(it)][&s];
    own = std::max(own, it.own);
  }
  EXPECT_EQ(Admitted(s, l, "k", kT0 + 3, 2), 2);
  redis.Round(s, kT0 + 4);
  EXPECT_EQ(redis.Total(key), 5);
  EXPECT_EQ(One(s, l, "k", kT0 + 5, 0).remaining, 95);
}

TEST(SyncStore, AReplyLateBySeveralWindowsLeavesTheCurrentWindowsCount) {
  SyncStore s(1024);
  auto l = s.AddLimit("fw", Policy::FixedWindow(10, 100 * kMillisecond));
  EXPECT_EQ(Admitted(s, l, "k", kT0, 3), 3);
  std::vector<SyncItem> items;
  s.Collect(kT0, &items);  // a round for window w, whose reply comes four windows later
  ASSERT_EQ(items.size(), 1u);
  for (int late = 2; late <= 6; late += 2) {  // windows w+2, w+4, w+6 share w's word
    const TimeUs now = kT0 + late * 100 * kMillisecond;
    EXPECT_EQ(Admitted(s, l, "k", now, 4), 4);
    s.Apply(items[0], items[0].own);
    EXPECT_EQ(Admitted(s, l, "k", now + 1, 15), 6) << "window w+" << late;
  }
}

TEST(SyncStore, HitsOfAnEndedWindowAreDroppedAndCounted) {
  SyncStore s(1024);
  auto l = s.AddLimit("fw", Policy::FixedWindow(100, kSecond));
  EXPECT_EQ(Admitted(s, l, "k", kT0 + 1, 4), 4);
  FakeRedis::FailedRound(s, kT0 + 2);
  FakeRedis::FailedRound(s, kT0 + 2 * kSecond + 2);  // the window before the last ended
  EXPECT_EQ(s.dropped(), 4u);
  EXPECT_EQ(s.held(), 0u);
}

TEST(SyncStore, SlidingWindowCounterReadsThePreviousWindowsGlobalCount) {
  FakeRedis redis;
  SyncStore a(1024), b(1024);
  Policy p = Policy::SlidingWindowCounter(10, kSecond);
  auto la = a.AddLimit("swc", p);
  auto lb = b.AddLimit("swc", p);
  EXPECT_EQ(Admitted(a, la, "k", kT0 + 900'000, 10), 10);
  redis.Round(a, kT0 + 950'000);
  // Next window, a quarter in: the previous window weighs 3/4, so 10 - ceil(7.5) = 2 pass.
  TimeUs next = kT0 + kSecond + 250'000;
  EXPECT_TRUE(One(b, lb, "k", next, 0).allowed);  // b has never seen the key
  redis.Round(b, next + 1);
  EXPECT_EQ(One(b, lb, "k", next + 2, 0).remaining, 2);
  EXPECT_EQ(Admitted(b, lb, "k", next + 2, 5), 2);
  EXPECT_EQ(Admitted(a, la, "k", next + 2, 5), 2);  // a's own count of the last window
}

TEST(SyncStore, SeveralLimitsAreAllOrNothing) {
  SyncStore s(1024);
  auto burst = s.AddLimit("burst", Policy::FixedWindow(3, kSecond));
  auto slow = s.AddLimit("slow", Policy::SlidingWindowCounter(100, kMinute));
  SyncCheck checks[] = {{slow.get(), "k", 1}, {burst.get(), "k", 1}};
  Decision out[2];
  size_t deciding = 9;
  for (int i = 0; i < 5; ++i) {
    ASSERT_EQ(s.CheckAll(checks, kT0 + 10, out, &deciding), SyncStore::Result::kDecided);
    EXPECT_EQ(out[1].allowed, i < 3);
    EXPECT_EQ(deciding, 1u);  // the burst limit: least remaining, then the rejecting one
  }
  // The rejected requests spent nothing on the per-minute limit.
  EXPECT_EQ(One(s, slow, "k", kT0 + 20, 0).remaining, 97);
  // The same limit twice in one request counts both.
  SyncCheck twice[] = {{slow.get(), "j", 60}, {slow.get(), "j", 60}};
  EXPECT_EQ(s.CheckAll(twice, kT0 + 30, out, &deciding), SyncStore::Result::kDecided);
  EXPECT_FALSE(out[1].allowed);
  EXPECT_EQ(One(s, slow, "j", kT0 + 40, 0).remaining, 100);
}

TEST(SyncStore, ThreadsTogetherAdmitExactlyTheLimit) {
  SyncStore s(1 << 12);
  auto l = s.AddLimit("fw", Policy::FixedWindow(20'000, kMinute));
  std::atomic<int> admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10'000; ++i) admitted += One(s, l, "hot", kT0 + i, 1).allowed ? 1 : 0;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(admitted.load(), 20'000);
}

TEST(SyncStore, AFullTableSaysSoAndSpendsNothing) {
  SyncStore s(1024);
  auto l = s.AddLimit("fw", Policy::FixedWindow(5, kSecond));
  int full = 0;
  for (int i = 0; i < 1100; ++i) {
    std::string key = "k" + std::to_string(i);
    SyncCheck c{l.get(), key, 1};
    Decision d;
    size_t deciding = 0;
    full += s.CheckAll({&c, 1}, kT0, {&d, 1}, &deciding) == SyncStore::Result::kFull ? 1 : 0;
  }
  EXPECT_GE(full, 76);
  EXPECT_EQ(s.full(), static_cast<uint64_t>(full));
}

// A full table takes over the slots of keys whose state is over (their windows ended, their
// hits sent, the syncer done with them): new keys are synced again, not decided by each
// node alone for good.
TEST(SyncStore, AFullTableTakesOverTheSlotsOfKeysWhoseStateIsOver) {
  FakeRedis redis;
  SyncStore s(1024);
  auto l = s.AddLimit("fw", Policy::FixedWindow(5, kSecond));
  auto decide = [&](const std::string& key, TimeUs now) {
    SyncCheck c{l.get(), key, 1};
    Decision d;
    size_t deciding = 0;
    return s.CheckAll({&c, 1}, now, {&d, 1}, &deciding);
  };
  int full = 0;
  for (int i = 0; i < 3000; ++i) {
    full += decide("old" + std::to_string(i), kT0) == SyncStore::Result::kFull ? 1 : 0;
  }
  EXPECT_EQ(full, 3000 - 1024);  // every slot taken
  redis.Round(s, kT0 + 1);
  // Their window is live: nothing is taken over.
  EXPECT_EQ(decide("early", kT0 + 2), SyncStore::Result::kFull);
  // Past their window and the rounds that fetch them: forgotten, so over.
  for (int i = 0; i < 4; ++i) redis.Round(s, kT0 + 3 * kSecond + i);
  for (int i = 0; i < 2; ++i) redis.Round(s, kT0 + 6 * kSecond + i);
  const uint64_t refused = s.full();
  const TimeUs now = kT0 + 6 * kSecond + 10;
  for (int i = 0; i < 500; ++i) {
    EXPECT_EQ(decide("new" + std::to_string(i), now), SyncStore::Result::kDecided) << i;
  }
  EXPECT_EQ(s.full(), refused);
  redis.Round(s, now + 1);
  EXPECT_EQ(redis.Total("new7:fw:" + std::to_string(kT0 / kSecond + 6)), 1);
  // A new key's count is its own: it starts from zero, and an old key comes back fresh.
  EXPECT_EQ(Admitted(s, l, "new7", now + 2, 6), 4);
  EXPECT_EQ(Admitted(s, l, "old3", now + 2, 6), 5);
}

// Redis restarts empty mid-window: a node keeps the hits it had learned of (the other
// nodes' too), and its own share is in Redis again with its next round.
TEST(SyncStore, AViewOfAWindowNeverFallsWhenRedisLosesItsCounts) {
  FakeRedis redis;
  SyncStore a(1024), b(1024);
  const Policy p = Policy::FixedWindow(100, kMinute);
  auto la = a.AddLimit("fw", p);
  auto lb = b.AddLimit("fw", p);
  EXPECT_EQ(Admitted(a, la, "k", kT0 + 1, 60), 60);
  EXPECT_EQ(Admitted(b, lb, "k", kT0 + 2, 40), 40);
  redis.Round(a, kT0 + 3);
  redis.Round(b, kT0 + 4);
  redis.Round(a, kT0 + 5);
  EXPECT_EQ(One(a, la, "k", kT0 + 6, 0).remaining, 0);
  redis.hashes.clear();  // restarted empty; b is idle from now on
  EXPECT_EQ(Admitted(a, la, "k", kT0 + 7, 1), 0);
  redis.Round(a, kT0 + 8);
  EXPECT_EQ(redis.Total("k:fw:" + std::to_string(kT0 / kMinute)), 60);  // a's share, resent
  EXPECT_EQ(Admitted(a, la, "k", kT0 + 9, 50), 0);  // was 40: b's hits forgotten
}

TEST(SyncStore, IdleKeysAreForgottenAndStartFresh) {
  FakeRedis redis;
  SyncStore s(1024);
  auto l = s.AddLimit("fw", Policy::FixedWindow(2, kSecond));
  EXPECT_EQ(Admitted(s, l, "k", kT0, 3), 2);
  redis.Round(s, kT0 + 1);
  // Idle past its window: after the rounds that follow its last decision, forgotten.
  for (int i = 0; i < 4; ++i) redis.Round(s, kT0 + 3 * kSecond);
  std::vector<SyncItem> items;
  s.Collect(kT0 + 3 * kSecond + 1, &items);
  EXPECT_TRUE(items.empty());
  EXPECT_EQ(Admitted(s, l, "k", kT0 + (int64_t{1} << 24) * kSecond, 3), 2);  // no alias
}

// A limit no rule set holds any more gives its table back once the syncer is done with its
// keys; one still held (a reload kept its policy) is the same object, counts and all.
TEST(SyncStore, ALimitNoOneHoldsIsFreedOnceItsKeysAreSynced) {
  SyncStore s(1 << 20);
  FakeRedis redis;
  auto kept = s.AddLimit("kept", Policy::FixedWindow(10, kSecond));
  std::weak_ptr<SyncLimit> dropped;
  {
    auto d = s.AddLimit("dropped", Policy::FixedWindow(10, kSecond));
    dropped = d;
    EXPECT_EQ(Admitted(s, d, "k", kT0 + 1, 3), 3);
  }
  EXPECT_EQ(Admitted(s, kept, "k", kT0 + 1, 2), 2);
  EXPECT_EQ(s.limits(), 2u);
  // Its hits are still to send: the syncer holds the limit.
  EXPECT_FALSE(dropped.expired());
  redis.Round(s, kT0 + 2);
  EXPECT_EQ(redis.Total("k:dropped:" + std::to_string(kT0 / kSecond)), 3);
  // Past the rounds that fetch a decided key, and past the windows they fetched: forgotten,
  // and freed.
  for (int i = 0; i < 4; ++i) redis.Round(s, kT0 + 3 * kSecond + i);
  EXPECT_FALSE(dropped.expired());
  for (int i = 0; i < 2; ++i) redis.Round(s, kT0 + 6 * kSecond + i);
  EXPECT_TRUE(dropped.expired());
  EXPECT_EQ(s.limits(), 1u);
  EXPECT_EQ(s.AddLimit("kept", Policy::FixedWindow(10, kSecond)), kept);
}

// A table is mapped without backing: a large one costs what its keys touch. (The process'
// resident size moves with other threads' work too; a 48 MB table made resident at once
// would show.)
TEST(SyncStore, AnIdleTableIsNotResident) {
  auto rss_kb = [] {
    FILE* f = std::fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f != nullptr && std::fgets(line, sizeof line, f) != nullptr) {
      if (std::sscanf(line, "VmRSS: %ld kB", &kb) == 1) break;
    }
    if (f != nullptr) std::fclose(f);
    return kb;
  };
  SyncStore s(1 << 20);
  const long before = rss_kb();
  std::vector<std::shared_ptr<SyncLimit>> held;
  for (int i = 0; i < 20; ++i) {
    held.push_back(s.AddLimit("l" + std::to_string(i), Policy::FixedWindow(10, kSecond)));
    EXPECT_EQ(Admitted(s, held.back(), "k", kT0 + 1, 1), 1);
  }
  EXPECT_LT(rss_kb() - before, 16 * 1024);  // 20 tables of 48 MB each: 960 MB if resident
}

TEST(SyncStore, ATableTooLargeToMapIsAnErrorAtTheStart) {
  try {
    SyncStore s(size_t{1} << 57);
    FAIL() << "mapped 2^57 slots";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot be mapped"), std::string::npos) << e.what();
  }
  try {
    SyncStore s(SIZE_MAX);
    FAIL() << "took SIZE_MAX keys";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("too many keys"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace sluice::sync
