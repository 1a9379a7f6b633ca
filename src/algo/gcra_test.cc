#include "algo/gcra.h"

#include <gtest/gtest.h>

#include "algo/algo_test_util.h"

namespace sluice::algo {
namespace {

using R = Runner<Gcra>;

TEST(Gcra, TableOfSteps) {
  R r(Policy::Gcra(2, kSecond));  // T = 500 ms, burst 2
  struct Step {
    DurationUs at;
    int64_t cost;
    bool allowed;
    int64_t remaining;
    DurationUs reset_after;
    DurationUs retry_after;
  };
  const Step steps[] = {
      {0, 1, true, 1, 500 * kMillisecond, 0},
      {0, 1, true, 0, kSecond, 0},
      {0, 1, false, 0, kSecond, 500 * kMillisecond},
      {500 * kMillisecond, 1, true, 0, kSecond, 0},
      {600 * kMillisecond, 2, false, 0, 900 * kMillisecond, 900 * kMillisecond},
      {600 * kMillisecond, 3, false, 0, 900 * kMillisecond, kNever},
      {1500 * kMillisecond, 2, true, 0, kSecond, 0},
  };
  for (const Step& s : steps) {
    SCOPED_TRACE(testing::Message() << "at +" << s.at << "us cost " << s.cost);
    Decision d = r.Hit(kNoon + s.at, s.cost);
    EXPECT_EQ(d.allowed, s.allowed);
    EXPECT_EQ(d.limit, 2);
    EXPECT_EQ(d.remaining, s.remaining);
    EXPECT_EQ(d.reset_after, s.reset_after);
    EXPECT_EQ(d.retry_after, s.retry_after);
    EXPECT_EQ(d.delay, 0);
  }
}

TEST(Gcra, SteadyRateWithoutEdgeBurst) {
  R r(Policy::Gcra(60, kMinute, /*burst=*/1));  // one per second, no burst
  int64_t admitted = 0;
  for (int ms = 0; ms < 60000; ms += 100) admitted += r.Admit(kNoon + ms * kMillisecond, 1);
  EXPECT_EQ(admitted, 60);
}

TEST(Gcra, IntervalRoundsUpSoTheRateIsNeverExceeded) {
  R r(Policy::Gcra(7, kMinute, 1));  // 8571428.57 us -> 8571429 us
  EXPECT_EQ(r.params().interval, 8571429);
  EXPECT_EQ(r.Admit(kNoon, 1), 1);
  EXPECT_EQ(r.Admit(kNoon + 8571428, 1), 0);
  EXPECT_EQ(r.Admit(kNoon + 8571429, 1), 1);
}

TEST(Gcra, ZeroLimitOrBurstRejectsEverything) {
  R r(Policy::Gcra(0, kSecond));
  EXPECT_EQ(r.Hit(kNoon).retry_after, kNever);
  EXPECT_FALSE(r.Peek(kNoon).allowed);
}

TEST(Gcra, HugeValuesDoNotOverflow) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  R r(Policy::Gcra(kMax, kSecond, kMax));
  EXPECT_EQ(r.params().interval, 1);
  EXPECT_TRUE(r.Hit(kNoon, 1000).allowed);
  Decision d = r.Hit(kNoon, kMax);
  EXPECT_FALSE(d.allowed);
  EXPECT_GT(d.retry_after, 0);
  R slow(Policy::Gcra(1, 3650 * kDay, kMax));
  EXPECT_TRUE(slow.Hit(kNoon, 2).allowed);
  EXPECT_FALSE(slow.Hit(kNoon, kMax).allowed);
}

TEST(Gcra, TimeGoingBackwardsRefundsNothing) {
  R r(Policy::Gcra(1, kSecond, 1));
  EXPECT_TRUE(r.Hit(kNoon + kHour).allowed);
  Decision d = r.Hit(kNoon);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, kHour + kSecond);
}

TEST(Gcra, ABurstThatTakesMillenniaToDrainStillLimits) {
  // One per ten years with a burst of 100000: past about 29000 admissions the TAT would leave
  // int64's range. Saturating it forgot the backlog and every request passed; now the
  // requests that cannot be stored are refused, for good.
  R r(Policy::Gcra(1, 3650 * kDay, 100000));
  const int64_t storable = (kMaxI64 - kNoon) / r.params().interval;
  EXPECT_EQ(r.Admit(kNoon, 200000), storable);
  Decision d = r.Hit(kNoon);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.retry_after, kNever);
  EXPECT_FALSE(r.Hit(kNoon + kDay).allowed);
  EXPECT_EQ(r.Hit(kNoon + kDay).reset_after, storable * r.params().interval - kDay);
}

TEST(Gcra, ExpiresWhenTheBucketHasDrained) {
  R r(Policy::Gcra(10, kSecond));
  r.Hit(kNoon, 3);
  EXPECT_EQ(r.ExpiresAt(kNoon), kNoon + 300 * kMillisecond);
}

}  // namespace
}  // namespace sluice::algo
