// Naive token bucket in exact rational arithmetic.
//
// The definition (token_bucket.h): a bucket of `capacity` tokens gaining `refill` tokens per
// `period`, continuously and without ever holding more than the capacity; a request of cost
// c takes c tokens or, when fewer are there, nothing. The level is kept as tokens * period,
// an integer, so a fraction of a token is exact: it gains `refill` per microsecond and a
// token is `period`. No grid, anchor or cycle: the real algorithm's grid must give the same
// whole tokens at every microsecond. A clock stepping back decides at the latest admission's
// instant (no time passed); the real algorithm may decide a little earlier (its grid anchor),
// which sequence_check.h holds to the "refunds nothing" bound instead.
//
// A value type for tests and fuzzers; not thread-safe.
#ifndef SLUICE_ALGO_REFERENCE_NAIVE_TOKEN_BUCKET_H_
#define SLUICE_ALGO_REFERENCE_NAIVE_TOKEN_BUCKET_H_

#include "algo/reference/reference_decision.h"
#include "sluice/policy.h"

namespace sluice::algo::reference {

class NaiveTokenBucket {
 public:
  explicit NaiveTokenBucket(const Policy& p)
      : capacity_(p.EffectiveBurst()),
        refill_(p.limit),
        period_(p.period),
        level_(i128{capacity_} * period_) {}

  int64_t Capacity() const { return capacity_; }
  bool Admits(i128 now, i128 units) const { return Level(now) >= units * period_; }
  bool Fresh(i128 now) const { return Level(now) == Full(); }
  std::optional<i128> FreshBy(i128 now) const {
    if (Level(now) == Full()) return now;
    if (refill_ == 0) return std::nullopt;
    return clock_.Effective(now) + CeilDiv(Full() - Level(now), refill_);
  }
  i128 Spend(i128 now, i128 cost) {
    level_ = Level(now) - cost * period_;
    at_ = clock_.Admit(now);
    return 0;
  }

 private:
  i128 Full() const { return i128{capacity_} * period_; }
  // Tokens * period at `now`: what was there at the last admission plus the refill since,
  // at most full (compared before multiplying, so that no product can overflow).
  i128 Level(i128 now) const {
    if (refill_ == 0 || level_ == Full()) return level_;
    i128 elapsed = clock_.Effective(now) - at_;
    if (elapsed >= CeilDiv(Full() - level_, refill_)) return Full();
    return level_ + elapsed * refill_;
  }

  int64_t capacity_;
  int64_t refill_;  // tokens per period
  DurationUs period_;
  i128 level_;  // tokens * period at `at_`
  i128 at_ = 0;
  LatestAdmission clock_;
};

}  // namespace sluice::algo::reference

#endif  // SLUICE_ALGO_REFERENCE_NAIVE_TOKEN_BUCKET_H_
