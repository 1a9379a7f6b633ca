// CircuitBreaker with times as numbers: when it opens, what counts as a failure in turn,
// and how it closes again.
#include "store/circuit_breaker.h"

#include <gtest/gtest.h>

namespace sluice {
namespace {

constexpr int64_t kOpenFor = 1'000'000;  // 1 s

TEST(CircuitBreaker, OpensAfterFailuresInTurn) {
  CircuitBreaker b(3, kOpenFor);
  // Each call sent after the last failure came back: three failures in turn.
  EXPECT_FALSE(b.Failure(100, 50));
  EXPECT_FALSE(b.Failure(200, 150));
  EXPECT_TRUE(b.Failure(300, 250));
  EXPECT_EQ(b.state(300), CircuitBreaker::State::kOpen);
  EXPECT_FALSE(b.Allow(300 + kOpenFor - 1));
}

// A dropped connection fails every call pipelined on it at once, and one stall times out
// every call waiting on it: the calls in flight when a failure came count with it.
TEST(CircuitBreaker, CallsThatFailTogetherCountOnce) {
  CircuitBreaker b(3, kOpenFor);
  for (int64_t sent = 0; sent < 64; ++sent) EXPECT_FALSE(b.Failure(1000, sent)) << sent;
  EXPECT_FALSE(b.Failure(1001, 999));  // sent before the failure at 1000 was counted
  EXPECT_EQ(b.state(1001), CircuitBreaker::State::kClosed);
  EXPECT_TRUE(b.Allow(1001));
  // Two more, each of a call sent after the last: now it opens.
  EXPECT_FALSE(b.Failure(2000, 1500));
  EXPECT_TRUE(b.Failure(3000, 2500));
  EXPECT_EQ(b.state(3000), CircuitBreaker::State::kOpen);
}

TEST(CircuitBreaker, ASuccessStartsTheCountAgain) {
  CircuitBreaker b(2, kOpenFor);
  EXPECT_FALSE(b.Failure(100, 50));
  b.Success();
  EXPECT_FALSE(b.Failure(200, 150));
  EXPECT_TRUE(b.Failure(300, 250));
}

TEST(CircuitBreaker, OneProbeAtATimeOnceTheOpenTimeIsOver) {
  CircuitBreaker b(1, kOpenFor);
  EXPECT_TRUE(b.Failure(100, 50));
  EXPECT_FALSE(b.Allow(100 + kOpenFor - 1));
  EXPECT_EQ(b.state(100 + kOpenFor), CircuitBreaker::State::kHalfOpen);
  EXPECT_TRUE(b.Allow(100 + kOpenFor));   // the probe
  EXPECT_FALSE(b.Allow(100 + kOpenFor));  // no second one while it is out
  // A failed probe opens it again for the whole time.
  EXPECT_TRUE(b.Failure(200 + kOpenFor, 100 + kOpenFor));
  EXPECT_FALSE(b.Allow(200 + 2 * kOpenFor - 1));
  EXPECT_TRUE(b.Allow(200 + 2 * kOpenFor));
  b.Success();  // the probe answered: closed
  EXPECT_EQ(b.state(200 + 2 * kOpenFor), CircuitBreaker::State::kClosed);
  EXPECT_TRUE(b.Allow(200 + 2 * kOpenFor));
  EXPECT_TRUE(b.Allow(200 + 2 * kOpenFor));
}

// A call sent before the breaker opened, failing late (its deadline, a slow reset), is
// not a failed probe: it must neither extend the open time nor free the probe's turn while
// the probe is still out.
TEST(CircuitBreaker, ALateFailureOfACallFromBeforeTheOpeningIsNoProbe) {
  CircuitBreaker b(1, kOpenFor);
  EXPECT_TRUE(b.Failure(1000, 900));   // open until 1000 + kOpenFor
  EXPECT_FALSE(b.Failure(2000, 950));  // in flight when it opened
  EXPECT_EQ(b.state(1000 + kOpenFor), CircuitBreaker::State::kHalfOpen);
  const int64_t probe = 1000 + kOpenFor;
  EXPECT_TRUE(b.Allow(probe));
  EXPECT_FALSE(b.Failure(probe + 10, 980));   // another old one, while the probe is out
  EXPECT_FALSE(b.Allow(probe + 20));          // the probe's turn is still taken
  EXPECT_TRUE(b.Failure(probe + 30, probe));  // the probe fails: open again
  EXPECT_EQ(b.state(probe + 30 + kOpenFor - 1), CircuitBreaker::State::kOpen);
  EXPECT_FALSE(b.Failure(probe + 40, probe + 1));  // sent before the re-opening
  EXPECT_EQ(b.state(probe + 30 + kOpenFor), CircuitBreaker::State::kHalfOpen);
}

TEST(CircuitBreaker, TripOpensAtOnceAndIsProbedAsAnyOpening) {
  CircuitBreaker b(5, kOpenFor);
  EXPECT_FALSE(b.Failure(100, 50));  // one of five: still closed
  b.Trip(200);
  EXPECT_EQ(b.state(200), CircuitBreaker::State::kOpen);
  EXPECT_FALSE(b.Allow(200 + kOpenFor - 1));
  EXPECT_TRUE(b.Allow(200 + kOpenFor));  // the probe
  b.Success();
  EXPECT_EQ(b.state(200 + kOpenFor), CircuitBreaker::State::kClosed);
  // The count the trip found was dropped: it takes five failures in turn again.
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(b.Failure(1000 + i * 10, 1000 + i * 10 - 1));
  EXPECT_TRUE(b.Failure(1040, 1039));
}

}  // namespace
}  // namespace sluice
