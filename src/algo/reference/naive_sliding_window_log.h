// Naive sliding window log: every admitted request's (time, cost), summed over the window.
//
// The definition (sliding_window_log.h): a request of cost c is admitted when the costs
// admitted in (t - W, t] plus c stay within the limit, where t is now or, if the clock
// stepped back, the newest admission's time. The list keeps every admission that can still
// count, in call order; the sum is taken afresh by scanning all of it at every question.
//
// A value type for tests and fuzzers; not thread-safe.
#ifndef SLUICE_ALGO_REFERENCE_NAIVE_SLIDING_WINDOW_LOG_H_
#define SLUICE_ALGO_REFERENCE_NAIVE_SLIDING_WINDOW_LOG_H_

#include <vector>

#include "algo/reference/reference_decision.h"
#include "sluice/policy.h"

namespace sluice::algo::reference {

class NaiveSlidingWindowLog {
 public:
  explicit NaiveSlidingWindowLog(const Policy& p) : limit_(p.limit), window_(p.period) {}

  int64_t Capacity() const { return limit_; }
  bool Admits(i128 now, i128 units) const { return Used(now) + units <= limit_; }
  bool Fresh(i128 now) const { return Used(now) == 0; }
  // Once the newest admission has left the window.
  std::optional<i128> FreshBy(i128 now) const {
    return clock_.latest() ? *clock_.latest() + window_ : now;
  }
  i128 Spend(i128 now, i128 cost) {
    i128 t = clock_.Admit(now);
    // Entries out of the window at t can never count again: no question is asked before t.
    std::erase_if(admitted_, [&](const Entry& e) { return e.at <= t - window_; });
    admitted_.push_back({t, cost});
    return 0;
  }

 private:
  struct Entry {
    i128 at;
    i128 cost;
  };
  i128 Used(i128 now) const {
    i128 t = clock_.Effective(now), used = 0;
    for (const Entry& e : admitted_) {
      if (e.at > t - window_ && e.at <= t) used += e.cost;
    }
    return used;
  }

  int64_t limit_;
  DurationUs window_;
  std::vector<Entry> admitted_;
  LatestAdmission clock_;
};

}  // namespace sluice::algo::reference

#endif  // SLUICE_ALGO_REFERENCE_NAIVE_SLIDING_WINDOW_LOG_H_
