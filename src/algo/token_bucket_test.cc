#include "algo/token_bucket.h"

#include <gtest/gtest.h>

#include "algo/algo_test_util.h"

namespace sluice::algo {
namespace {

using R = Runner<TokenBucket>;

TEST(TokenBucket, SeedBucketCapacityTenRefillOnePerSecond) {
  R r(Policy::TokenBucket(/*capacity=*/10, /*refill=*/1, kSecond));
  EXPECT_EQ(r.Admit(kNoon, 12), 10);  // a burst up to the capacity
  Decision d = r.Hit(kNoon);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.limit, 10);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.retry_after, kSecond);
  EXPECT_EQ(d.reset_after, 10 * kSecond);
  EXPECT_EQ(r.Admit(kNoon + kSecond - 1, 1), 0);
  EXPECT_EQ(r.Admit(kNoon + kSecond, 2), 1);
  EXPECT_EQ(r.Admit(kNoon + 4 * kSecond, 5), 3);
}

TEST(TokenBucket, FractionalRefillIsCarriedNotLost) {
  // 3 tokens per 10 s: one every 3.33 s. Checking every second must not lose the
  // fractions: exactly 3 tokens come back over 10 s.
  R r(Policy::TokenBucket(3, 3, 10 * kSecond));
  EXPECT_EQ(r.Admit(kNoon, 3), 3);
  int64_t admitted = 0;
  for (int s = 1; s <= 10; ++s) admitted += r.Admit(kNoon + s * kSecond, 1);
  EXPECT_EQ(admitted, 3);
}

TEST(TokenBucket, RetryAfterIsExact) {
  R r(Policy::TokenBucket(4, 3, 10 * kSecond));  // a token every 3333333.3 us
  EXPECT_EQ(r.Admit(kNoon, 4), 4);
  Decision d = r.Hit(kNoon, 2);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, 6666667);
  EXPECT_FALSE(r.DryRun(kNoon + 6666666, 2).allowed);
  EXPECT_TRUE(r.DryRun(kNoon + 6666667, 2).allowed);
}

TEST(TokenBucket, CostAboveCapacityNeverPasses) {
  R r(Policy::TokenBucket(5, 1, kSecond));
  Decision d = r.Hit(kNoon, 6);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, kNever);
  EXPECT_EQ(d.remaining, 5);
}

TEST(TokenBucket, NoRefillIsAOneTimeQuota) {
  R r(Policy::TokenBucket(3, 0, kSecond));
  EXPECT_EQ(r.Admit(kNoon, 5), 3);
  Decision d = r.Hit(kNoon + 365 * kDay);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, kNever);
  EXPECT_EQ(d.reset_after, kNever);
}

TEST(TokenBucket, ZeroCapacityRejectsEverything) {
  R r(Policy{Algorithm::kTokenBucket, 0, kSecond, 0});
  EXPECT_EQ(r.Hit(kNoon).retry_after, kNever);
  EXPECT_FALSE(r.Peek(kNoon).allowed);
}

TEST(TokenBucket, HugeValuesDoNotOverflow) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  R r(Policy::TokenBucket(kMax, kMax, kMillisecond));
  EXPECT_TRUE(r.Hit(kNoon, kMax).allowed);
  EXPECT_TRUE(r.Hit(kNoon + kMinute, kMax).allowed);  // refilled in full
  Decision d = r.Hit(kNoon + kMinute, 1);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, 1);
}

TEST(TokenBucket, AClockNearItsEndDoesNotOverflow) {
  // The time a refused request waits is anchor + refill time - now: the sum is taken wide.
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  R r(Policy::TokenBucket(3, 2, kSecond));
  EXPECT_EQ(r.Admit(kMax - 1, 5), 3);
  Decision d = r.Hit(kMax - 1);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after, kSecond / 2);
  EXPECT_EQ(d.reset_after, 3 * kSecond / 2);
}

TEST(TokenBucket, TimeGoingBackwardsAddsNothing) {
  R r(Policy::TokenBucket(2, 1, kSecond));
  EXPECT_EQ(r.Admit(kNoon + kHour, 2), 2);
  EXPECT_EQ(r.Admit(kNoon, 1), 0);
  EXPECT_EQ(r.Admit(kNoon + kHour + kSecond, 2), 1);
}

TEST(TokenBucket, PeekShowsTokensWithoutTakingThem) {
  R r(Policy::TokenBucket(5, 1, kSecond));
  EXPECT_EQ(r.Admit(kNoon, 2), 2);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(r.Peek(kNoon).remaining, 3);
}

}  // namespace
}  // namespace sluice::algo
