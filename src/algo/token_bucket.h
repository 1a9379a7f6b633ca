// Token bucket.
//
// A bucket holds up to `capacity` tokens and gains `refill` tokens every `period`; a request
// of cost c takes c tokens, or is rejected (taking nothing) when fewer are there. It allows
// bursts up to the capacity and a long-run rate of refill/period, with the two set apart.
//
// The refill is exact in integers, however often the bucket is looked at: tokens arrive on
// a fixed grid, the k-th at anchor + ceil(k * period / refill), so the bucket holds
// base + floor((now - anchor) * refill / period) tokens (at most capacity). Spending lowers
// base; the anchor moves only by whole grid cycles (period / gcd(refill, period)
// microseconds, which bring exactly refill / gcd tokens) or when the bucket is full, so no
// fraction of a token is ever lost or granted early. With period / refill a whole number
// of microseconds this admits exactly what GCRA with burst = capacity admits
// (properties_test checks it); it is kept as its own algorithm because operators think in
// tokens and capacity, and its state reads as "tokens left".
//
// State: base and anchor, 16 bytes. Time going backwards adds nothing.
#ifndef SLUICE_ALGO_TOKEN_BUCKET_H_
#define SLUICE_ALGO_TOKEN_BUCKET_H_

#include <cstdint>

#include "algo/saturating.h"
#include "sluice/decision.h"
#include "sluice/policy.h"

namespace sluice::algo {

struct TokenBucket {
  struct State {
    int64_t base = 0;         // tokens at `anchor`, less those spent since; may be < 0
    TimeUs anchor = kMinI64;  // kMinI64: never used, the bucket is full
  };
  struct Params {
    int64_t capacity;
    int64_t refill;  // tokens per period
    DurationUs period;
    DurationUs cycle;       // period / gcd(refill, period): the grid repeats after it
    int64_t cycle_tokens;   // refill / gcd(refill, period): tokens per cycle
    DurationUs token_time;  // period / refill when that is a whole number, else 0
    DurationUs fill_time;   // with narrow: past this much idle time the bucket is full
    bool narrow;            // the numbers are small enough for 64-bit arithmetic
  };

  static Params Compile(const Policy& p);
  static Decision Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit = true);
  static TimeUs ExpiresAt(const State& s, const Params& p, TimeUs now);
};

}  // namespace sluice::algo

#endif  // SLUICE_ALGO_TOKEN_BUCKET_H_
