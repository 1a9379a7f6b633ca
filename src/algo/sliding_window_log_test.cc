#include "algo/sliding_window_log.h"

#include <gtest/gtest.h>

#include "algo/algo_test_util.h"

namespace sluice::algo {
namespace {

using R = Runner<SlidingWindowLog>;

TEST(SlidingWindowLog, TableOfSteps) {
  R r(Policy::SlidingWindowLog(3, 10 * kSecond));
  struct Step {
    DurationUs at;
    int64_t cost;
    bool allowed;
    int64_t remaining;
    DurationUs reset_after;
    DurationUs retry_after;
  };
  const Step steps[] = {
      {0, 1, true, 2, 10 * kSecond, 0},
      {1 * kSecond, 1, true, 1, 10 * kSecond, 0},
      {2 * kSecond, 1, true, 0, 10 * kSecond, 0},
      {3 * kSecond, 1, false, 0, 9 * kSecond, 7 * kSecond},  // the 0s entry leaves at 10s
      {3 * kSecond, 2, false, 0, 9 * kSecond, 8 * kSecond},  // two must leave: at 11s
      {10 * kSecond, 1, true, 0, 10 * kSecond, 0},
      {10 * kSecond, 4, false, 0, 10 * kSecond, kNever},
  };
  for (const Step& s : steps) {
    SCOPED_TRACE(testing::Message() << "at +" << s.at << "us cost " << s.cost);
    Decision d = r.Hit(kNoon + s.at, s.cost);
    EXPECT_EQ(d.allowed, s.allowed);
    EXPECT_EQ(d.limit, 3);
    EXPECT_EQ(d.remaining, s.remaining);
    EXPECT_EQ(d.reset_after, s.reset_after);
    EXPECT_EQ(d.retry_after, s.retry_after);
  }
}

TEST(SlidingWindowLog, NoEdgeBurst) {
  R r(Policy::SlidingWindowLog(100, kMinute));
  EXPECT_EQ(r.Admit(kNoon + 59 * kSecond, 100), 100);
  EXPECT_EQ(r.Admit(kNoon + 61 * kSecond, 100), 0);
  EXPECT_EQ(r.Admit(kNoon + 119 * kSecond - 1, 1), 0);
  EXPECT_EQ(r.Admit(kNoon + 119 * kSecond, 100), 100);
}

TEST(SlidingWindowLog, SameInstantSharesOneEntry) {
  R r(Policy::SlidingWindowLog(1000, kMinute));
  EXPECT_EQ(r.Admit(kNoon, 500), 500);
  EXPECT_EQ(r.state().log.size(), 1u);
  EXPECT_EQ(r.state().total, 500);
}

TEST(SlidingWindowLog, ABusyKeysLogHoldsAtMostTwiceItsLiveEntries) {
  // Expired entries are dropped in bulk, so a key admitted at its limit's pace neither
  // moves its whole log on every decision nor keeps the entries that left the window.
  R r(Policy::SlidingWindowLog(1000, kSecond));
  for (int64_t i = 0; i < 20'000; ++i) {
    ASSERT_TRUE(r.Hit(kNoon + i * kMillisecond).allowed) << i;
    const auto& s = r.state();
    ASSERT_EQ(s.total, std::min<int64_t>(i + 1, 1000)) << i;
    ASSERT_LE(s.log.size(), 2 * (s.log.size() - s.head) + 1) << i;
  }
  EXPECT_FALSE(r.Hit(kNoon + 19'999 * kMillisecond).allowed);
  Decision d = r.Hit(kNoon + 20'000 * kMillisecond - 1);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, 1);  // when the entry at 19.000 s leaves
}

TEST(SlidingWindowLog, PeekAndRejectionSpendNothing) {
  R r(Policy::SlidingWindowLog(2, kMinute));
  EXPECT_TRUE(r.Peek(kNoon).allowed);
  EXPECT_FALSE(r.Hit(kNoon, 3).allowed);
  EXPECT_EQ(r.Admit(kNoon, 3), 2);
  EXPECT_FALSE(r.Peek(kNoon).allowed);
}

TEST(SlidingWindowLog, ZeroAndHugeLimits) {
  R zero(Policy::SlidingWindowLog(0, kMinute));
  EXPECT_EQ(zero.Hit(kNoon).retry_after, kNever);
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  R huge(Policy::SlidingWindowLog(kMax, kMinute));
  EXPECT_TRUE(huge.Hit(kNoon, kMax).allowed);
  Decision d = huge.Hit(kNoon + 1, kMax);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, kMinute - 1);
}

TEST(SlidingWindowLog, TimeGoingBackwardsRefundsNothing) {
  R r(Policy::SlidingWindowLog(2, kMinute));
  EXPECT_EQ(r.Admit(kNoon + kMinute, 2), 2);
  Decision d = r.Hit(kNoon);  // a minute in the past
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, 2 * kMinute);  // relative to the (stepped back) now
}

}  // namespace
}  // namespace sluice::algo
