// Naive fixed window counter: a map from window index to the units admitted in it.
//
// The definition (fixed_window.h): windows of length W aligned to the epoch, at most
// `limit` units per window, rejected requests spend nothing, and a clock stepping back
// keeps the later window current. Here a request counts in the window of the instant it is
// decided at (LatestAdmission: never earlier than the latest admission), so the later window
// stays current by construction. Every window ever used is kept: nothing is forgotten.
//
// A value type for tests and fuzzers; not thread-safe.
#ifndef SLUICE_ALGO_REFERENCE_NAIVE_FIXED_WINDOW_H_
#define SLUICE_ALGO_REFERENCE_NAIVE_FIXED_WINDOW_H_

#include <map>

#include "algo/reference/reference_decision.h"
#include "sluice/policy.h"

namespace sluice::algo::reference {

class NaiveFixedWindow {
 public:
  explicit NaiveFixedWindow(const Policy& p) : limit_(p.limit), window_(p.period) {}

  int64_t Capacity() const { return limit_; }
  bool Admits(i128 now, i128 units) const { return Spent(now) + units <= limit_; }
  bool Fresh(i128 now) const { return Spent(now) == 0; }
  // Once the latest window with an admission has ended.
  std::optional<i128> FreshBy(i128 now) const {
    if (!clock_.latest()) return now;
    return (FloorDiv(*clock_.latest(), window_) + 1) * window_;
  }
  i128 Spend(i128 now, i128 cost) {
    spent_[FloorDiv(clock_.Admit(now), window_)] += cost;
    return 0;
  }

 private:
  i128 Spent(i128 now) const {
    auto it = spent_.find(FloorDiv(clock_.Effective(now), window_));
    return it == spent_.end() ? 0 : it->second;
  }

  int64_t limit_;
  DurationUs window_;
  std::map<i128, i128> spent_;  // window index -> units admitted in that window
  LatestAdmission clock_;
};

}  // namespace sluice::algo::reference

#endif  // SLUICE_ALGO_REFERENCE_NAIVE_FIXED_WINDOW_H_
