// Every algorithm against its naive reference (src/algo/reference), on seeded random action
// sequences: requests of every cost from peeks to past the capacity, dry runs, the clock
// creeping, crossing window boundaries, jumping years and stepping back, and sweeps. Each
// decision must agree with the reference and keep decision.h's definitions and the
// algorithm's promise over any window (reference/sequence_check.h says exactly what).
// fuzz/algo_sequence_fuzz.cc runs the same checker on the fuzzer's inputs.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "algo/reference/sequence_check.h"

namespace sluice::algo::reference {

// Faults the checker must notice (see CatchesPlantedFaults).
struct RetriesEarly : FixedWindow {
  static Decision Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit = true) {
    Decision d = FixedWindow::Step(s, p, now, cost, commit);
    if (!d.allowed && d.retry_after != kNever && d.retry_after > 1) --d.retry_after;
    return d;
  }
};
template <>
struct Traits<RetriesEarly> : Traits<FixedWindow> {};

struct RefundsOnStepBack : Gcra {
  static Decision Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit = true) {
    State copy = s;
    if (copy.tat != kMinI64 && now < copy.tat - p.tolerance) copy.tat = now;  // forgets backlog
    Decision d = Gcra::Step(copy, p, now, cost, commit);
    if (commit) s = copy;
    return d;
  }
};
template <>
struct Traits<RefundsOnStepBack> : Traits<Gcra> {};

namespace {

std::vector<uint8_t> RandomBytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> bytes(n);
  for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
  return bytes;
}

// Sequences of `actions` steps for each policy, from a few start times.
CheckStats RunPolicies(const std::vector<Policy>& policies, int seeds, size_t actions) {
  CheckStats stats;
  for (const Policy& p : policies) {
    for (int seed = 1; seed <= seeds; ++seed) {
      std::mt19937_64 rng(static_cast<uint64_t>(seed) * 7919 + static_cast<uint64_t>(p.limit));
      std::vector<uint8_t> bytes = RandomBytes(rng, actions * 5);
      ByteReader in(bytes);
      Scenario s{p, seed % 3 == 0 ? 0 : kScenarioNoon + seed, DecodeActions(in, actions)};
      std::string error = CheckScenario(s, &stats);
      if (!error.empty()) {
        ADD_FAILURE() << "seed " << seed << ": " << error;
        return stats;
      }
    }
  }
  return stats;
}

const DurationUs kWindows[] = {kMillisecond, 250 * kMillisecond, kSecond, 7777777, kMinute, kHour,
                               kDay};
const int64_t kLimits[] = {1, 2, 7, 60, 1000};

// Every limit with every window, and a limit of 0.
std::vector<Policy> WindowPolicies(Policy (*make)(int64_t, DurationUs)) {
  std::vector<Policy> out;
  for (DurationUs w : kWindows) {
    for (int64_t limit : kLimits) out.push_back(make(limit, w));
  }
  out.push_back(make(0, kMinute));
  return out;
}

// Rates with bursts below, at and above them, and a limit of 0.
std::vector<Policy> RatePolicies(Algorithm a) {
  std::vector<Policy> out;
  for (DurationUs w : kWindows) {
    for (int64_t limit : kLimits) {
      for (int64_t burst : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{1500}}) {
        out.push_back({a, limit, w, burst});
      }
    }
  }
  out.push_back({a, 0, kSecond, 0});
  out.push_back({a, 0, kSecond, 3});
  return out;
}

// The sequences must exercise both outcomes, sweeps and (where the bound applies) steps
// back behind the latest admission, or they prove little.
void RunAndExpectCoverage(const std::vector<Policy>& policies, int seeds, size_t actions,
                          bool bounded_steps_back) {
  CheckStats s = RunPolicies(policies, seeds, actions);
  EXPECT_GT(s.admitted, s.decisions / 10);
  EXPECT_GT(s.rejected, s.decisions / 20);
  EXPECT_GT(s.sweeps, 0);
  EXPECT_EQ(s.bounded > 0, bounded_steps_back);
}

TEST(ReferenceAgreement, FixedWindow) {
  RunAndExpectCoverage(WindowPolicies(&Policy::FixedWindow), 2, 200, false);
}
TEST(ReferenceAgreement, SlidingWindowLog) {
  RunAndExpectCoverage(WindowPolicies(&Policy::SlidingWindowLog), 2, 200, false);
}
TEST(ReferenceAgreement, SlidingWindowCounter) {
  RunAndExpectCoverage(WindowPolicies(&Policy::SlidingWindowCounter), 2, 200, true);
}
TEST(ReferenceAgreement, TokenBucket) {
  RunAndExpectCoverage(RatePolicies(Algorithm::kTokenBucket), 1, 150, true);
}
TEST(ReferenceAgreement, Gcra) {
  RunAndExpectCoverage(RatePolicies(Algorithm::kGcra), 1, 150, true);
}
TEST(ReferenceAgreement, LeakyQueue) {
  RunAndExpectCoverage(RatePolicies(Algorithm::kLeakyQueue), 1, 150, true);
}

// Policies and start times as the fuzzer decodes them: huge limits, bursts and costs, odd
// periods up to ten years, times near 2^52 and before 1970.
TEST(ReferenceAgreement, DecodedScenarios) {
  std::mt19937_64 rng(20231103);
  CheckStats stats;
  for (int i = 0; i < 300; ++i) {
    std::vector<uint8_t> bytes = RandomBytes(rng, 20 + 5 * 120);
    std::string error = CheckScenario(DecodeScenario(bytes, 120), &stats);
    ASSERT_TRUE(error.empty()) << "scenario " << i << ": " << error;
  }
  EXPECT_GT(stats.admitted, 0);
  EXPECT_GT(stats.rejected, 0);
}

// The references themselves, on the examples the algorithms' tests and headers give.
TEST(ReferenceAgreement, ReferencesReadTheDefinitionsAsDocumented) {
  {  // token_bucket_test: 3 tokens per 10 s, capacity 4, a token every 3333333.3 us
    NaiveTokenBucket r(Policy::TokenBucket(4, 3, 10 * kSecond));
    for (int i = 0; i < 4; ++i) ASSERT_TRUE(Decide(r, kScenarioNoon, 1, &r).allowed);
    Decision d = Decide(r, kScenarioNoon, 2);
    EXPECT_FALSE(d.allowed);
    EXPECT_EQ(d.retry_after, 6666667);
  }
  {  // gcra_test: a step back of an hour adds an hour of backlog in GCRA; the reference
     // decides as if no time passed, so it still admits nothing until the latest admission's
     // interval is over
    NaiveGcra r(Policy::Gcra(1, kSecond, 1));
    ASSERT_TRUE(Decide(r, kScenarioNoon + kHour, 1, &r).allowed);
    Decision d = Decide(r, kScenarioNoon, 1);
    EXPECT_FALSE(d.allowed);
    EXPECT_EQ(d.retry_after, kHour + kSecond);
  }
  {  // fixed_window.h: 100 at 12:00:59 and 100 at 12:01:01 both pass
    NaiveFixedWindow r(Policy::FixedWindow(100, kMinute));
    EXPECT_TRUE(Decide(r, kScenarioNoon + 59 * kSecond, 100, &r).allowed);
    EXPECT_TRUE(Decide(r, kScenarioNoon + 61 * kSecond, 100, &r).allowed);
  }
  {  // sliding_window_counter.h: right after a full window the previous count weighs almost
     // fully: 1 s in, 100 * 59/60 = 98.3 of it, and 2 more fit once 1.2 s have passed
    NaiveSlidingWindowCounter r(Policy::SlidingWindowCounter(100, kMinute));
    EXPECT_TRUE(Decide(r, kScenarioNoon + 59 * kSecond, 100, &r).allowed);
    Decision d = Decide(r, kScenarioNoon + 61 * kSecond, 2);
    EXPECT_FALSE(d.allowed);
    EXPECT_EQ(d.remaining, 1);
    EXPECT_EQ(d.retry_after, 200 * kMillisecond);
  }
  {  // leaky_queue.h: burst 3 holds one served and two waiting, one interval apart
    NaiveLeakyQueue r(Policy::LeakyQueue(10, kSecond, 3));
    EXPECT_EQ(Decide(r, kScenarioNoon, 1, &r).delay, 0);
    EXPECT_EQ(Decide(r, kScenarioNoon, 1, &r).delay, 100 * kMillisecond);
    EXPECT_EQ(Decide(r, kScenarioNoon, 1, &r).delay, 200 * kMillisecond);
    EXPECT_FALSE(Decide(r, kScenarioNoon, 1).allowed);
  }
}

// The checker is not vacuous: algorithms with a planted fault fail it.
TEST(ReferenceAgreement, CatchesPlantedFaults) {
  auto first_error = [](auto make_checker) {
    std::mt19937_64 rng(1);
    for (int seed = 0; seed < 50; ++seed) {
      auto checker = make_checker();
      std::vector<uint8_t> bytes = RandomBytes(rng, 5 * 200);
      ByteReader in(bytes);
      std::string error = checker.Run(DecodeActions(in, 200));
      if (!error.empty()) return error;
    }
    return std::string();
  };
  std::string early = first_error(
      [] { return SequenceChecker<RetriesEarly>(Policy::FixedWindow(5, kSecond), kScenarioNoon); });
  EXPECT_NE(early.find("retry_after"), std::string::npos) << early;
  std::string refund = first_error([] {
    return SequenceChecker<RefundsOnStepBack>(Policy::Gcra(5, kSecond, 2), kScenarioNoon);
  });
  EXPECT_NE(refund.find("step back"), std::string::npos) << refund;
}

}  // namespace
}  // namespace sluice::algo::reference
