// Concurrency: many threads deciding at once must admit exactly what one thread would.
// Run under ThreadSanitizer in CI.
#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "sluice/memory_store.h"

namespace sluice {
namespace {

constexpr TimeUs kT0 = 1699012800 * kSecond;
constexpr int kThreads = 8;

// Every thread sends `per_thread` requests for `key` at the same instant (so no refill or
// window change can blur the count); returns how many were admitted.
int64_t Hammer(Limit* l, const std::string& key, int per_thread) {
  std::atomic<int64_t> admitted{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      int64_t mine = 0;
      for (int i = 0; i < per_thread; ++i) mine += l->Check(key, kT0).allowed ? 1 : 0;
      admitted.fetch_add(mine);
    });
  }
  go.store(true, std::memory_order_release);
  for (auto& th : threads) th.join();
  return admitted.load();
}

TEST(MemoryStoreConcurrency, ThreadsHammeringOneKeyAdmitExactlyTheLimit) {
  MemoryStore store;
  for (Algorithm a : kAllAlgorithms) {
    SCOPED_TRACE(std::string(AlgorithmName(a)));
    Limit* l = store.AddLimit(std::string(AlgorithmName(a)), Policy{a, 1000, kHour, 0});
    ASSERT_NE(l, nullptr);
    EXPECT_EQ(Hammer(l, "hot", 500), 1000);
  }
}

TEST(MemoryStoreConcurrency, ManyKeysAtOnceStayConsistent) {
  MemoryStore store;
  Limit* l = store.AddLimit("l", Policy::TokenBucket(3, 1, kHour));
  constexpr int kKeys = 2000;
  std::vector<std::string> keys;
  for (int k = 0; k < kKeys; ++k) keys.push_back("user:" + std::to_string(k));
  std::atomic<int64_t> admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      int64_t mine = 0;
      // Each thread walks the keys from a different offset, 2 requests per key.
      for (int i = 0; i < 2 * kKeys; ++i) {
        mine += l->Check(keys[(i + t * 251) % kKeys], kT0).allowed ? 1 : 0;
      }
      admitted.fetch_add(mine);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(admitted.load(), 3 * kKeys);  // 16 requests per key, 3 tokens each
  EXPECT_EQ(l->size(), static_cast<size_t>(kKeys));
  for (const auto& k : keys) ASSERT_EQ(l->Check(k, kT0, 0).remaining, 0) << k;
}

TEST(MemoryStoreConcurrency, CheckAllAcrossLimitsIsAtomicAndDeadlockFree) {
  // Threads check the same two limits in opposite orders on overlapping keys; every
  // admission spends on both, so the two limits' counts must stay equal.
  MemoryStore store;
  Limit* a = store.AddLimit("a", Policy::FixedWindow(5000, kHour));
  Limit* b = store.AddLimit("b", Policy::SlidingWindowLog(300, kHour));
  std::atomic<int64_t> admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Decision out[2];
      int64_t mine = 0;
      for (int i = 0; i < 2000; ++i) {
        std::string key = "k" + std::to_string(i % 4);
        LimitCheck ab[] = {{a, key, 1}, {b, key, 1}};
        LimitCheck ba[] = {{b, key, 1}, {a, key, 1}};
        store.CheckAll(t % 2 ? std::span<const LimitCheck>(ab) : std::span<const LimitCheck>(ba),
                       kT0, out);
        mine += out[0].allowed && out[1].allowed ? 1 : 0;
      }
      admitted.fetch_add(mine);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(admitted.load(), 4 * 300);
  for (int k = 0; k < 4; ++k) {
    std::string key = "k" + std::to_string(k);
    EXPECT_EQ(a->Check(key, kT0, 0).remaining, 5000 - 300) << key;
    EXPECT_EQ(b->Check(key, kT0, 0).remaining, 0) << key;
  }
}

TEST(MemoryStoreConcurrency, SweepAndEvictionRaceWithDecisions) {
  MemoryStore::Options o;
  o.max_keys_per_limit = 512;
  o.shards = 4;
  MemoryStore store(o);
  Limit* l = store.AddLimit("l", Policy::Gcra(10, kSecond));
  std::atomic<bool> stop{false};
  std::thread sweeper([&] {
    TimeUs t = kT0;
    bool done = false;
    // Whole sweeps and the server's one-shard steps, while a reload adds limits.
    for (int n = 0; !stop.load(); ++n) {
      t += kMillisecond;
      if (n % 2 == 0) {
        store.Sweep(t);
      } else {
        store.SweepStep(t, &done);
      }
      if (n % 100 == 0 && n < 2000)
        store.AddLimit("added" + std::to_string(n), Policy::Gcra(5, kSecond));
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20000; ++i) l->Check("k" + std::to_string(t * 100000 + i), kT0 + i);
    });
  }
  for (auto& th : threads) th.join();
  stop.store(true);
  sweeper.join();
  EXPECT_LE(l->size(), 512u);
}

}  // namespace
}  // namespace sluice
