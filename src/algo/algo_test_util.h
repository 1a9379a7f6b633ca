// Helpers for the algorithm tests: a policy's state driven by explicit timestamps.
#ifndef SLUICE_ALGO_ALGO_TEST_UTIL_H_
#define SLUICE_ALGO_ALGO_TEST_UTIL_H_

#include <cstdint>

#include "sluice/decision.h"
#include "sluice/policy.h"
#include "sluice/time.h"

namespace sluice::algo {

// 2023-11-03T12:00:00Z, a minute boundary, as the tests' origin of time.
inline constexpr TimeUs kNoon = 1699012800 * kSecond;

template <class Algo>
class Runner {
 public:
  explicit Runner(const Policy& policy) : params_(Algo::Compile(policy)) {}

  Decision Hit(TimeUs t, int64_t cost = 1) { return Algo::Step(state_, params_, t, cost); }
  Decision Peek(TimeUs t) { return Algo::Step(state_, params_, t, 0); }
  // A decision on a copy of the state: what Hit would say, without spending.
  Decision DryRun(TimeUs t, int64_t cost = 1) const {
    typename Algo::State copy = state_;
    return Algo::Step(copy, params_, t, cost, /*commit=*/false);
  }
  // How many of `n` unit requests at `t` are admitted (they are spent).
  int64_t Admit(TimeUs t, int64_t n) {
    int64_t admitted = 0;
    for (int64_t i = 0; i < n; ++i) admitted += Hit(t).allowed ? 1 : 0;
    return admitted;
  }
  TimeUs ExpiresAt(TimeUs now) const { return Algo::ExpiresAt(state_, params_, now); }
  typename Algo::State& state() { return state_; }
  const typename Algo::Params& params() const { return params_; }

 private:
  typename Algo::Params params_;
  typename Algo::State state_{};
};

}  // namespace sluice::algo

#endif  // SLUICE_ALGO_ALGO_TEST_UTIL_H_
