#include "algo/leaky_queue.h"

#include <gtest/gtest.h>

#include "algo/algo_test_util.h"

namespace sluice::algo {
namespace {

using R = Runner<LeakyQueue>;

TEST(LeakyQueue, RequestsWaitTheirTurnAtAConstantRate) {
  R r(Policy::LeakyQueue(10, kSecond, /*bucket=*/4));  // one every 100 ms, 3 may wait
  for (int i = 0; i < 4; ++i) {
    Decision d = r.Hit(kNoon);
    SCOPED_TRACE(i);
    EXPECT_TRUE(d.allowed);
    EXPECT_EQ(d.delay, i * 100 * kMillisecond);
    EXPECT_EQ(d.remaining, 3 - i);
  }
  Decision d = r.Hit(kNoon);  // the bucket is full
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.delay, 0);
  EXPECT_EQ(d.retry_after, 100 * kMillisecond);
  // 250 ms later the queue has moved on by 2.5 places: this one waits 150 ms.
  d = r.Hit(kNoon + 250 * kMillisecond);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.delay, 150 * kMillisecond);
}

TEST(LeakyQueue, DelayIsBoundedByTheBucket) {
  R r(Policy::LeakyQueue(100, kSecond, 50));
  DurationUs longest = 0;
  for (int i = 0; i < 1000; ++i) {
    Decision d = r.Hit(kNoon + i * kMillisecond);
    if (d.allowed) longest = std::max(longest, d.delay);
  }
  EXPECT_EQ(longest, 49 * 10 * kMillisecond);
}

TEST(LeakyQueue, OutputRateIsConstant) {
  // Whatever the arrival pattern, admitted requests start at least T apart.
  R r(Policy::LeakyQueue(20, kSecond, 10));
  std::vector<TimeUs> starts;
  for (int burst = 0; burst < 5; ++burst) {
    for (int i = 0; i < 15; ++i) {
      TimeUs now = kNoon + burst * 300 * kMillisecond;
      Decision d = r.Hit(now);
      if (d.allowed) starts.push_back(now + d.delay);
    }
  }
  ASSERT_GT(starts.size(), 10u);
  for (size_t i = 1; i < starts.size(); ++i)
    EXPECT_GE(starts[i] - starts[i - 1], 50 * kMillisecond);
}

TEST(LeakyQueue, AdmitsExactlyWhatGcraAdmits) {
  R queue(Policy::LeakyQueue(5, kSecond, 3));
  Runner<Gcra> meter(Policy::Gcra(5, kSecond, 3));
  for (int i = 0; i < 200; ++i) {
    TimeUs t = kNoon + (i * 37 % 11) * 23 * kMillisecond + i * 50 * kMillisecond;
    int64_t cost = i % 3;
    Decision q = queue.Hit(t, cost), m = meter.Hit(t, cost);
    EXPECT_EQ(q.allowed, m.allowed) << i;
    EXPECT_EQ(q.remaining, m.remaining) << i;
  }
}

}  // namespace
}  // namespace sluice::algo
