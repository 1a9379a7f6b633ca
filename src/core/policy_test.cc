#include "sluice/policy.h"

#include <gtest/gtest.h>

#include <limits>

namespace sluice {
namespace {

TEST(Policy, AlgorithmNamesRoundTrip) {
  for (Algorithm a : kAllAlgorithms) EXPECT_EQ(ParseAlgorithm(AlgorithmName(a)), a);
  EXPECT_EQ(ParseAlgorithm("token-bucket"), std::nullopt);
}

TEST(Policy, ParsesDurations) {
  EXPECT_EQ(ParseDuration("1m"), kMinute);
  EXPECT_EQ(ParseDuration("250ms"), 250 * kMillisecond);
  EXPECT_EQ(ParseDuration("30s"), 30 * kSecond);
  EXPECT_EQ(ParseDuration("1h"), kHour);
  EXPECT_EQ(ParseDuration("1d"), kDay);
  EXPECT_EQ(ParseDuration("2w"), 14 * kDay);
  EXPECT_EQ(ParseDuration("5us"), 5);
  for (const char* bad : {"", "m", "1", "1x", "-1m", "1.5m", "1 m", "99999999999999999999d"}) {
    EXPECT_EQ(ParseDuration(bad), std::nullopt) << bad;
  }
}

TEST(Policy, FormatsDurationsShortestExact) {
  EXPECT_EQ(FormatDuration(kMinute), "1m");
  EXPECT_EQ(FormatDuration(90 * kSecond), "90s");
  EXPECT_EQ(FormatDuration(1500), "1500us");
  EXPECT_EQ(FormatDuration(7 * kDay), "1w");
}

TEST(Policy, ValidatesRanges) {
  EXPECT_TRUE(Policy::FixedWindow(0, kMinute).Validate().ok());
  EXPECT_EQ(Policy::FixedWindow(-1, kMinute).Validate().message(), "limit must be >= 0, got -1");
  EXPECT_EQ(Policy::Gcra(1, kSecond, -2).Validate().message(), "burst must be >= 0, got -2");
  EXPECT_EQ(Policy::FixedWindow(1, 999).Validate().message(),
            "period must be between 1ms and 3650d, got 999us");
  EXPECT_FALSE(Policy::FixedWindow(1, 3651 * kDay).Validate().ok());
}

// A GCRA or queue backlog is a time in 64-bit microseconds: a burst that takes more than
// 2^62 us to drain could not all be admitted, though answers would name it as the limit.
TEST(Policy, RefusesABurstBeyondTheClock) {
  const int64_t max = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(Policy::Gcra(1, 3650 * kDay, max).ValidateStrict().message(),
            "burst 9223372036854775807 at 1/3650d takes more than 146,000 years to drain, "
            "longer than Sluice's clock can hold");
  EXPECT_FALSE(Policy::LeakyQueue(1, kDay, int64_t{1} << 40).ValidateStrict().ok());
  // At one a second (T = 10^6 us), the most is floor(2^62 / 10^6).
  EXPECT_TRUE(Policy::Gcra(1, kSecond, 4'611'686'018'427).ValidateStrict().ok());
  EXPECT_FALSE(Policy::Gcra(1, kSecond, 4'611'686'018'428).ValidateStrict().ok());
  EXPECT_TRUE(Policy::Gcra(1000, kSecond, 1'000'000'000).ValidateStrict().ok());
  EXPECT_TRUE(Policy::Gcra(0, kSecond, max).ValidateStrict().ok());  // admits nothing
  EXPECT_TRUE(Policy::TokenBucket(max, 1, 3650 * kDay).ValidateStrict().ok());
  // A limit near 2^63 makes the rounding up of period / limit overflow 64 bits: such a
  // policy drains its burst in 1 us per request, too, and takes as long to refuse.
  EXPECT_EQ(Policy::Gcra(max - 807, kSecond).ValidateStrict().message(),
            "burst 9223372036854775000 at 9223372036854775000/1s takes more than 146,000 "
            "years to drain, longer than Sluice's clock can hold");
  EXPECT_FALSE(Policy::LeakyQueue(max, kMillisecond).ValidateStrict().ok());
}

TEST(Policy, DescribesItself) {
  EXPECT_EQ(Policy::SlidingWindowCounter(60, kMinute).ToString(), "sliding_window_counter 60/1m");
  EXPECT_EQ(Policy::TokenBucket(20, 10, kSecond).ToString(), "token_bucket 10/1s capacity 20");
  EXPECT_EQ(Policy::LeakyQueue(5, kSecond, 3).ToString(), "leaky_queue 5/1s burst 3");
}

}  // namespace
}  // namespace sluice
