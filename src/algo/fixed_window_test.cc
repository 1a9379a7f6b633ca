#include "algo/fixed_window.h"

#include <gtest/gtest.h>

#include "algo/algo_test_util.h"

namespace sluice::algo {
namespace {

using R = Runner<FixedWindow>;

TEST(FixedWindow, TableOfSteps) {
  R r(Policy::FixedWindow(3, kMinute));
  struct Step {
    DurationUs at;  // after kNoon
    int64_t cost;
    bool allowed;
    int64_t remaining;
    DurationUs reset_after;
    DurationUs retry_after;
  };
  const Step steps[] = {
      {0, 1, true, 2, kMinute, 0},
      {10 * kSecond, 2, true, 0, 50 * kSecond, 0},
      {20 * kSecond, 1, false, 0, 40 * kSecond, 40 * kSecond},
      {59 * kSecond, 0, false, 0, kSecond, kSecond},    // peek: nothing left until 12:01
      {kMinute, 1, true, 2, kMinute, 0},                // new window
      {kMinute + 1, 4, false, 2, kMinute - 1, kNever},  // more than the limit: never
      {kMinute + 2, 2, true, 0, kMinute - 2, 0},        // the rejection spent nothing
  };
  for (const Step& s : steps) {
    SCOPED_TRACE(testing::Message() << "at +" << s.at << "us cost " << s.cost);
    Decision d = r.Hit(kNoon + s.at, s.cost);
    EXPECT_EQ(d.allowed, s.allowed);
    EXPECT_EQ(d.limit, 3);
    EXPECT_EQ(d.remaining, s.remaining);
    EXPECT_EQ(d.reset_after, s.reset_after);
    EXPECT_EQ(d.retry_after, s.retry_after);
    EXPECT_EQ(d.delay, 0);
  }
}

TEST(FixedWindow, SeedEdgeBurstPassesTwiceTheLimit) {
  // The seed's example: 100 at 12:00:59 and 100 at 12:01:01 all pass, 200 in 2 seconds.
  R r(Policy::FixedWindow(100, kMinute));
  EXPECT_EQ(r.Admit(kNoon + 59 * kSecond, 100), 100);
  EXPECT_EQ(r.Admit(kNoon + 61 * kSecond, 100), 100);
  EXPECT_EQ(r.Admit(kNoon + 62 * kSecond, 1), 0);
}

TEST(FixedWindow, WindowsAlignToTheEpoch) {
  R r(Policy::FixedWindow(1, kHour));
  Decision d = r.Hit(kNoon + 25 * kMinute);
  EXPECT_EQ(d.reset_after, 35 * kMinute);
}

TEST(FixedWindow, PeekSpendsNothing) {
  R r(Policy::FixedWindow(2, kMinute));
  for (int i = 0; i < 5; ++i) {
    Decision d = r.Peek(kNoon);
    EXPECT_TRUE(d.allowed);
    EXPECT_EQ(d.remaining, 2);
    EXPECT_EQ(d.reset_after, 0);  // a key never seen is already at full capacity
  }
  EXPECT_EQ(r.Admit(kNoon, 3), 2);
}

TEST(FixedWindow, ZeroLimitRejectsEverythingForever) {
  R r(Policy::FixedWindow(0, kMinute));
  Decision d = r.Hit(kNoon);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.retry_after, kNever);
  EXPECT_FALSE(r.Peek(kNoon).allowed);
}

TEST(FixedWindow, HugeLimitsAndCostsDoNotOverflow) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  R r(Policy::FixedWindow(kMax, kMinute));
  EXPECT_TRUE(r.Hit(kNoon, kMax - 1).allowed);
  Decision d = r.Hit(kNoon, 1);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  d = r.Hit(kNoon, kMax);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, kMinute);
  R small(Policy::FixedWindow(10, kMinute));
  EXPECT_EQ(small.Hit(kNoon, kMax).retry_after, kNever);
}

TEST(FixedWindow, TimeGoingBackwardsRefundsNothing) {
  R r(Policy::FixedWindow(2, kMinute));
  EXPECT_EQ(r.Admit(kNoon + kMinute, 2), 2);  // fill the 12:01 window
  // The clock steps back into 12:00: the later window stays current.
  Decision d = r.Hit(kNoon + 30 * kSecond);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, 90 * kSecond);
  EXPECT_TRUE(r.Hit(kNoon + 2 * kMinute).allowed);
}

TEST(FixedWindow, ExpiresAtTheEndOfItsWindow) {
  R r(Policy::FixedWindow(2, kMinute));
  EXPECT_LE(r.ExpiresAt(kNoon), kNoon);  // fresh
  r.Hit(kNoon + kSecond);
  EXPECT_EQ(r.ExpiresAt(kNoon + kSecond), kNoon + kMinute);
}

}  // namespace
}  // namespace sluice::algo
