// Naive GCRA: the leaky bucket as a meter, kept as the bucket's level.
//
// The definition (gcra.h): a bucket of `burst` units that leaks one unit every T = period /
// limit, rounded up to a whole microsecond; a request of cost c is admitted when c more
// units fit, and then fills the bucket by c. The level is kept in microseconds of leaking
// (units * T), so it drains by exactly one per microsecond and is never negative; GCRA's
// theoretical arrival time is this level's end, which the reference never forms. A clock
// stepping back decides at the latest admission's instant (no time passed); the real
// algorithm measures its backlog from `now`, so a step back of X adds X of backlog
// (gcra_test pins this), which sequence_check.h holds to the "refunds nothing" bound. As
// gcra.h documents, a request whose bucket would drain past the int64 range is refused.
//
// A value type for tests and fuzzers; not thread-safe.
#ifndef SLUICE_ALGO_REFERENCE_NAIVE_GCRA_H_
#define SLUICE_ALGO_REFERENCE_NAIVE_GCRA_H_

#include "algo/reference/reference_decision.h"
#include "sluice/policy.h"

namespace sluice::algo::reference {

class NaiveGcra {
 public:
  // limit 0 admits nothing, ever: a bucket of no size.
  explicit NaiveGcra(const Policy& p)
      : burst_(p.limit > 0 ? p.EffectiveBurst() : 0),
        interval_(p.limit > 0 ? CeilDiv(p.period, p.limit) : 1) {}

  int64_t Capacity() const { return burst_; }
  // The bucket must drain within the int64 range, where the real algorithm keeps its end.
  bool Admits(i128 now, i128 units) const {
    i128 after = Level(now) + units * interval_;
    return after <= i128{burst_} * interval_ && clock_.Effective(now) + after <= kMaxI64;
  }
  bool Fresh(i128 now) const { return Level(now) == 0; }
  std::optional<i128> FreshBy(i128 now) const { return std::max(now, at_ + level_); }
  i128 Spend(i128 now, i128 cost) {
    level_ = Level(now) + cost * interval_;
    at_ = clock_.Admit(now);
    return 0;
  }

 private:
  // Microseconds of leaking left at `now`.
  i128 Level(i128 now) const {
    if (!clock_.latest()) return 0;
    return std::max<i128>(0, level_ - (clock_.Effective(now) - at_));
  }

  int64_t burst_;
  i128 interval_;  // T
  i128 level_ = 0;
  i128 at_ = 0;
  LatestAdmission clock_;
};

}  // namespace sluice::algo::reference

#endif  // SLUICE_ALGO_REFERENCE_NAIVE_GCRA_H_
