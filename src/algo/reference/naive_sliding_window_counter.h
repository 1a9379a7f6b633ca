// Naive sliding window counter: the seed's weighted formula over two windows' totals.
//
// The definition (sliding_window_counter.h): with curr and prev the units admitted in the
// current and the previous epoch-aligned window and e the time elapsed in the current one,
//
//   estimate = prev * (W - e) / W + curr,   admitted when estimate + c <= limit,
//
// compared here as the exact rational it is (both sides times W). The totals come from a
// map of every window's admissions. A clock stepping back decides at the latest admission's
// instant (no time passed); the real algorithm is stricter there (it decides at `now` within
// the latest window), which sequence_check.h holds to the "refunds nothing" bound instead.
//
// A value type for tests and fuzzers; not thread-safe.
#ifndef SLUICE_ALGO_REFERENCE_NAIVE_SLIDING_WINDOW_COUNTER_H_
#define SLUICE_ALGO_REFERENCE_NAIVE_SLIDING_WINDOW_COUNTER_H_

#include <map>

#include "algo/reference/reference_decision.h"
#include "sluice/policy.h"

namespace sluice::algo::reference {

class NaiveSlidingWindowCounter {
 public:
  explicit NaiveSlidingWindowCounter(const Policy& p) : limit_(p.limit), window_(p.period) {}

  int64_t Capacity() const { return limit_; }
  bool Admits(i128 now, i128 units) const {
    i128 t = clock_.Effective(now);
    i128 index = FloorDiv(t, window_), elapsed = t - index * window_;
    i128 prev = In(index - 1), curr = In(index);
    return prev * (window_ - elapsed) + (curr + units) * window_ <= i128{limit_} * window_;
  }
  bool Fresh(i128 now) const {
    i128 index = FloorDiv(clock_.Effective(now), window_);
    return In(index) == 0 && In(index - 1) == 0;
  }
  // Once the window after the latest admission's has ended: it no longer weighs.
  std::optional<i128> FreshBy(i128 now) const {
    if (!clock_.latest()) return now;
    return (FloorDiv(*clock_.latest(), window_) + 2) * window_;
  }
  i128 Spend(i128 now, i128 cost) {
    admitted_[FloorDiv(clock_.Admit(now), window_)] += cost;
    return 0;
  }

 private:
  i128 In(i128 index) const {
    auto it = admitted_.find(index);
    return it == admitted_.end() ? 0 : it->second;
  }

  int64_t limit_;
  DurationUs window_;
  std::map<i128, i128> admitted_;  // window index -> units admitted in that window
  LatestAdmission clock_;
};

}  // namespace sluice::algo::reference

#endif  // SLUICE_ALGO_REFERENCE_NAIVE_SLIDING_WINDOW_COUNTER_H_
