// Properties every algorithm must keep, checked over random traces of requests, costs,
// peeks and clock steps (including steps backwards):
//   - 0 <= remaining <= limit;
//   - `remaining` is exact: that many unit requests at the same instant pass, one more fails;
//   - retry_after is exact: the same request passes at now + retry_after, not a microsecond
//     before (kNever: it never passes);
//   - reset_after is exact: at now + reset_after the key is back to full capacity, and its
//     state may be dropped (ExpiresAt <= that time);
//   - what each algorithm promises over any window holds (fixed window: per aligned window;
//     sliding log: per rolling window; token bucket and GCRA: burst + rate * time).
#include <gtest/gtest.h>

#include <deque>
#include <random>

#include "algo/algo_test_util.h"
#include "algo/fixed_window.h"
#include "algo/gcra.h"
#include "algo/leaky_queue.h"
#include "algo/sliding_window_counter.h"
#include "algo/sliding_window_log.h"
#include "algo/token_bucket.h"

namespace sluice::algo {
namespace {

struct Admitted {
  TimeUs at;
  int64_t cost;
};

template <class Algo>
void CheckInvariants(const Policy& policy, uint32_t seed, int steps,
                     void (*window_check)(const Policy&, const std::vector<Admitted>&)) {
  SCOPED_TRACE(testing::Message() << policy.ToString() << " seed " << seed);
  std::mt19937 rng(seed);
  Runner<Algo> r(policy);
  TimeUs now = kNoon;
  std::vector<Admitted> admitted;
  const int64_t capacity =
      Algo::Step(*std::make_unique<typename Algo::State>(), r.params(), now, 0, false).limit;
  ASSERT_EQ(capacity, policy.Capacity());  // what config validation bounds a rule's cost by
  if (capacity > 0) {  // a request costing the capacity passes from a fresh state
    ASSERT_TRUE(Runner<Algo>(policy).Hit(now, capacity).allowed);
  }
  for (int i = 0; i < steps; ++i) {
    // Mostly small steps forward, sometimes a long gap, sometimes the clock steps back.
    switch (rng() % 10) {
      case 0:
        now -= static_cast<DurationUs>(rng() % policy.period);
        break;
      case 1:
        now += static_cast<DurationUs>(rng() % (3 * policy.period));
        break;
      default:
        now += static_cast<DurationUs>(rng() % (policy.period / 8 + 1));
        break;
    }
    int64_t cost = static_cast<int64_t>(rng() % (capacity + 2));
    Decision d = r.Hit(now, cost);
    SCOPED_TRACE(testing::Message() << "step " << i << " now +" << now - kNoon << " cost " << cost);
    ASSERT_GE(d.remaining, 0);
    ASSERT_LE(d.remaining, capacity);
    ASSERT_GE(d.reset_after, 0);
    if (cost > capacity) {
      ASSERT_FALSE(d.allowed) << "a cost above the capacity passed";
    }
    if (d.allowed && cost > 0) admitted.push_back({now, cost});
    if (d.allowed) {
      ASSERT_EQ(d.retry_after, 0);
    }

    {  // remaining is exact
      Runner<Algo> copy = r;
      for (int64_t k = 0; k < d.remaining; ++k) ASSERT_TRUE(copy.Hit(now).allowed) << k;
      ASSERT_FALSE(copy.Hit(now).allowed);
    }
    if (!d.allowed) {  // retry_after is exact (a peek's is for one unit)
      int64_t units = std::max<int64_t>(cost, 1);
      if (d.retry_after == kNever) {
        ASSERT_TRUE(units > capacity || policy.limit == 0) << "kNever for a cost that fits";
      } else {
        ASSERT_GT(d.retry_after, 0);
        ASSERT_TRUE(r.DryRun(SatAdd(now, d.retry_after), units).allowed);
        ASSERT_FALSE(r.DryRun(now + d.retry_after - 1, units).allowed);
      }
    }
    if (d.reset_after != kNever) {  // reset_after is exact
      TimeUs at = now + d.reset_after;
      ASSERT_EQ(r.DryRun(at, 0).remaining, capacity);
      ASSERT_LE(r.ExpiresAt(at), at);
      if (d.reset_after > 0 && d.remaining < capacity) {
        ASSERT_LT(r.DryRun(at - 1, 0).remaining, capacity);
      }
    }
  }
  if (window_check) window_check(policy, admitted);
}

// Admissions are in call order; with the clock stepping back, "time" is the latest seen.
std::vector<Admitted> Monotonic(std::vector<Admitted> a) {
  for (size_t i = 1; i < a.size(); ++i) a[i].at = std::max(a[i].at, a[i - 1].at);
  return a;
}

void FixedWindows(const Policy& p, const std::vector<Admitted>& raw) {
  auto a = Monotonic(raw);
  std::map<TimeUs, int64_t> per_window;
  for (const auto& x : a) per_window[FloorTo(x.at, p.period)] += x.cost;
  for (const auto& [start, sum] : per_window) EXPECT_LE(sum, p.limit) << "window " << start;
}

void RollingWindows(const Policy& p, const std::vector<Admitted>& raw) {
  auto a = Monotonic(raw);
  std::deque<Admitted> window;
  int64_t sum = 0;
  for (const auto& x : a) {
    while (!window.empty() && window.front().at + p.period <= x.at) {
      sum -= window.front().cost;
      window.pop_front();
    }
    window.push_back(x);
    sum += x.cost;
    EXPECT_LE(sum, p.limit) << "rolling window ending " << x.at;
  }
}

// Over any span [a_i, a_j], admitted <= burst + refill over the span.
void BurstPlusRate(const Policy& p, const std::vector<Admitted>& raw) {
  auto a = Monotonic(raw);
  for (size_t i = 0; i < a.size(); ++i) {
    int64_t sum = 0;
    for (size_t j = i; j < a.size(); ++j) {
      sum += a[j].cost;
      i128 refill = i128{a[j].at - a[i].at} * p.limit / p.period;
      EXPECT_LE(sum, p.EffectiveBurst() + refill) << "span " << a[i].at << ".." << a[j].at;
    }
  }
}

class AlgorithmProperties : public testing::TestWithParam<uint32_t> {};

TEST_P(AlgorithmProperties, FixedWindow) {
  CheckInvariants<FixedWindow>(Policy::FixedWindow(7, 10 * kSecond), GetParam(), 400, FixedWindows);
}
TEST_P(AlgorithmProperties, SlidingWindowLog) {
  CheckInvariants<SlidingWindowLog>(Policy::SlidingWindowLog(7, 10 * kSecond), GetParam(), 400,
                                    RollingWindows);
}
TEST_P(AlgorithmProperties, SlidingWindowCounter) {
  CheckInvariants<SlidingWindowCounter>(Policy::SlidingWindowCounter(7, 10 * kSecond), GetParam(),
                                        400, nullptr);
}
TEST_P(AlgorithmProperties, TokenBucket) {
  CheckInvariants<TokenBucket>(Policy::TokenBucket(5, 3, 10 * kSecond), GetParam(), 400,
                               BurstPlusRate);
}
TEST_P(AlgorithmProperties, Gcra) {
  CheckInvariants<Gcra>(Policy::Gcra(4, kSecond, 6), GetParam(), 400, BurstPlusRate);
}
TEST_P(AlgorithmProperties, LeakyQueue) {
  CheckInvariants<LeakyQueue>(Policy::LeakyQueue(4, kSecond, 3), GetParam(), 400, BurstPlusRate);
}

INSTANTIATE_TEST_SUITE_P(Seeds, AlgorithmProperties, testing::Range(1u, 21u));

// With period / refill a whole number of microseconds, a token bucket and a GCRA meter
// with burst = capacity are the same admission function.
TEST(TokenBucketAndGcra, AgreeOnEveryTrace) {
  for (uint32_t seed = 1; seed <= 20; ++seed) {
    std::mt19937 rng(seed);
    Runner<TokenBucket> tb(Policy::TokenBucket(8, 4, kSecond));  // a token per 250 ms
    Runner<Gcra> gcra(Policy::Gcra(4, kSecond, 8));
    TimeUs now = kNoon;
    for (int i = 0; i < 500; ++i) {
      now += static_cast<DurationUs>(rng() % (300 * kMillisecond));
      int64_t cost = static_cast<int64_t>(rng() % 4);
      Decision a = tb.Hit(now, cost), b = gcra.Hit(now, cost);
      ASSERT_EQ(a.allowed, b.allowed) << "seed " << seed << " step " << i;
      ASSERT_EQ(a.remaining, b.remaining) << "seed " << seed << " step " << i;
      ASSERT_EQ(a.retry_after, b.retry_after) << "seed " << seed << " step " << i;
    }
  }
}

}  // namespace
}  // namespace sluice::algo
