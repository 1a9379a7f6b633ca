// Sliding window counter (the seed's hybrid).
//
// Keeps the counts of the current and the previous epoch-aligned window and estimates the
// rolling count as if the previous window's requests had been spread evenly over it:
//
//   estimate = prev * (W - e) / W + curr        e = time elapsed in the current window
//
// A request of cost c is admitted when estimate + c <= limit. The comparison is done in
// exact integers (prev * (W - e) + (curr + c) * W <= limit * W, in 128 bits), so there is no
// floating-point rounding to disagree about between nodes or with Redis. The estimate
// removes the fixed window's edge burst: right after a full window, the previous count
// still weighs almost fully. It is exact when traffic is even and errs by at most the
// unevenness of the previous window, in exchange for constant memory.
//
// State is 20 bytes, packed to 4-byte alignment so that an entry of the memory store (with
// its 8-byte key fingerprint) is 28 bytes. The window index is stored as its low 32 bits and
// rebuilt from `now`: an entry untouched for 2^31 windows could alias, and the memory store
// sweeps entries two windows after their last use, long before that.
#ifndef SLUICE_ALGO_SLIDING_WINDOW_COUNTER_H_
#define SLUICE_ALGO_SLIDING_WINDOW_COUNTER_H_

#include <cstdint>

#include "algo/saturating.h"
#include "sluice/decision.h"
#include "sluice/policy.h"

namespace sluice::algo {

struct SlidingWindowCounter {
#pragma pack(push, 4)
  struct State {
    uint32_t window = 0;  // low 32 bits of the index of the window `curr` counts in
    int64_t curr = 0;
    int64_t prev = 0;
  };
#pragma pack(pop)
  static_assert(sizeof(State) == 20);

  struct Params {
    int64_t limit;
    DurationUs window;
    bool narrow;  // limit * window is small enough for 64-bit arithmetic
  };

  static Params Compile(const Policy& p);
  static Decision Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit = true);
  static TimeUs ExpiresAt(const State& s, const Params& p, TimeUs now);
};

}  // namespace sluice::algo

#endif  // SLUICE_ALGO_SLIDING_WINDOW_COUNTER_H_
