#include "algo/sliding_window_counter.h"

#include <gtest/gtest.h>

#include "algo/algo_test_util.h"

namespace sluice::algo {
namespace {

using R = Runner<SlidingWindowCounter>;

TEST(SlidingWindowCounter, SeedWeightedEstimate) {
  // The seed's example: 80 in the previous window, 30 in the current, 25% into it:
  // 80 * 0.75 + 30 = 90 of 100, so exactly 10 more pass.
  R r(Policy::SlidingWindowCounter(100, kMinute));
  EXPECT_EQ(r.Admit(kNoon, 80), 80);
  EXPECT_EQ(r.Admit(kNoon + kMinute + 15 * kSecond, 30), 30);
  Decision d = r.Peek(kNoon + kMinute + 15 * kSecond);
  EXPECT_EQ(d.remaining, 10);
  EXPECT_EQ(r.Admit(kNoon + kMinute + 15 * kSecond, 11), 10);
}

TEST(SlidingWindowCounter, NoEdgeBurst) {
  R r(Policy::SlidingWindowCounter(100, kMinute));
  EXPECT_EQ(r.Admit(kNoon + 59 * kSecond, 100), 100);
  // 2 s later the previous window still weighs 59/60: 98.3 of 100 used, one passes.
  EXPECT_EQ(r.Admit(kNoon + 61 * kSecond, 100), 1);
}

TEST(SlidingWindowCounter, RetryAfterIsWhenTheEstimateMakesRoom) {
  R r(Policy::SlidingWindowCounter(10, 10 * kSecond));
  EXPECT_EQ(r.Admit(kNoon, 10), 10);
  // In the next window the 10 weigh (10s - e)/10s: one unit fits once 10 * (10s - e) <=
  // 9 * 10s, i.e. e >= 1s.
  Decision d = r.Hit(kNoon + 10 * kSecond);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, kSecond);
  EXPECT_FALSE(r.Hit(kNoon + 11 * kSecond - 1).allowed);
  EXPECT_TRUE(r.Hit(kNoon + 11 * kSecond).allowed);
}

TEST(SlidingWindowCounter, RetryAcrossTheWindowBoundary) {
  R r(Policy::SlidingWindowCounter(10, 10 * kSecond));
  EXPECT_EQ(r.Admit(kNoon + 5 * kSecond, 10), 10);
  // Full now; at the next window the 10 weigh fully, so cost 5 waits until they have
  // decayed to 5: 5 s into the next window, 10 s from now.
  Decision d = r.Hit(kNoon + 5 * kSecond, 5);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, 10 * kSecond);
  EXPECT_EQ(d.reset_after, 15 * kSecond);
}

TEST(SlidingWindowCounter, CostAboveLimitNeverPasses) {
  R r(Policy::SlidingWindowCounter(5, kMinute));
  Decision d = r.Hit(kNoon, 6);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, kNever);
  EXPECT_EQ(d.remaining, 5);
}

TEST(SlidingWindowCounter, ZeroAndHugeLimits) {
  R zero(Policy::SlidingWindowCounter(0, kMinute));
  EXPECT_EQ(zero.Hit(kNoon).retry_after, kNever);
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  R huge(Policy::SlidingWindowCounter(kMax, 3650 * kDay));
  EXPECT_TRUE(huge.Hit(kNoon, kMax).allowed);
  Decision d = huge.Hit(kNoon, 1);
  EXPECT_FALSE(d.allowed);
  EXPECT_GT(d.retry_after, 0);
  EXPECT_NE(d.retry_after, kNever);
}

TEST(SlidingWindowCounter, TimeGoingBackwardsRefundsNothing) {
  R r(Policy::SlidingWindowCounter(4, kMinute));
  EXPECT_EQ(r.Admit(kNoon + kMinute, 4), 4);
  EXPECT_EQ(r.Admit(kNoon, 1), 0);  // back in the previous window: still full
  EXPECT_EQ(r.Admit(kNoon - kHour, 1), 0);
  EXPECT_EQ(r.Admit(kNoon + 3 * kMinute, 4), 4);
}

TEST(SlidingWindowCounter, StateIsTwentyBytes) {
  EXPECT_EQ(sizeof(SlidingWindowCounter::State), 20u);
  EXPECT_EQ(alignof(SlidingWindowCounter::State), 4u);
}

}  // namespace
}  // namespace sluice::algo
