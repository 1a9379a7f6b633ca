// GCRA: the leaky bucket as a meter (the Generic Cell Rate Algorithm of ATM networks).
//
// With emission interval T = period / limit, the only state is the theoretical arrival
// time (TAT): when the bucket would next be empty if requests kept draining at one per T.
// A request of cost c at time now is admitted when
//
//   max(TAT, now) + c*T - now <= burst * T
//
// and then TAT becomes max(TAT, now) + c*T. This is the leaky bucket as a meter: the same
// admissions as a bucket of size `burst` leaking one unit per T, without storing a level
// or running a timer. It gives a smooth rate with a bounded burst in 8 bytes of state and
// one comparison, which is why redis-cell, throttled and Stripe use it.
//
// T is rounded up to a whole microsecond (1.0000003 * 60s instead of 60s / 7 for 7 per
// minute), so the rate is never exceeded; rates above one per microsecond per key are
// therefore held to 1M/s. Time going backwards leaves TAT where it is: nothing is refunded.
// TAT is an int64_t: a request that would move it past the year 294,000 (only bursts that
// take millennia to drain get there) is refused with retry_after kNever, since a saturated
// TAT would forget the backlog and admit without end.
#ifndef SLUICE_ALGO_GCRA_H_
#define SLUICE_ALGO_GCRA_H_

#include <cstdint>

#include "algo/saturating.h"
#include "sluice/decision.h"
#include "sluice/policy.h"

namespace sluice::algo {

struct Gcra {
  struct State {
    TimeUs tat = kMinI64;  // theoretical arrival time; kMinI64: never used
  };
  struct Params {
    int64_t burst;
    DurationUs interval;  // T; 0 when limit or burst is 0 (nothing is ever admitted)
    i128 tolerance;       // burst * T, exact
  };

  static Params Compile(const Policy& p);
  // `delay_out`, when given, receives how long after now the request's first unit starts
  // draining (what the leaky bucket as a queue makes the request wait).
  static Decision Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit = true,
                       DurationUs* delay_out = nullptr);
  static TimeUs ExpiresAt(const State& s, const Params& p, TimeUs now);
};

}  // namespace sluice::algo

#endif  // SLUICE_ALGO_GCRA_H_
