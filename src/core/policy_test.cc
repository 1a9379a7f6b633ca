#include "sluice/policy.h"

#include <gtest/gtest.h>

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

TEST(Policy, DescribesItself) {
  EXPECT_EQ(Policy::SlidingWindowCounter(60, kMinute).ToString(), "sliding_window_counter 60/1m");
  EXPECT_EQ(Policy::TokenBucket(20, 10, kSecond).ToString(), "token_bucket 10/1s capacity 20");
  EXPECT_EQ(Policy::LeakyQueue(5, kSecond, 3).ToString(), "leaky_queue 5/1s burst 3");
}

}  // namespace
}  // namespace sluice
