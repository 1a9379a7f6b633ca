// Fixed window counter.
//
// Time is cut into windows of length W aligned to the Unix epoch (so every node and Redis
// agree on where a window starts); a key may spend `limit` units per window and the count
// starts from zero at each boundary. State is one window start and one count: 16 bytes.
// It is the cheapest algorithm and the easiest to explain, and it has the well-known edge
// burst: `limit` requests at the end of one window plus `limit` at the start of the next
// pass within a moment (the seed's 100 at 12:00:59 + 100 at 12:01:01). The sliding
// algorithms exist to remove that burst.
//
// Rejected requests consume nothing. If time goes backwards the later window stays current,
// so a clock step never refunds a count.
#ifndef SLUICE_ALGO_FIXED_WINDOW_H_
#define SLUICE_ALGO_FIXED_WINDOW_H_

#include <cstdint>

#include "algo/saturating.h"
#include "sluice/decision.h"
#include "sluice/policy.h"

namespace sluice::algo {

struct FixedWindow {
  struct State {
    TimeUs window_start = kMinI64;  // kMinI64: never used
    int64_t count = 0;
  };
  struct Params {
    int64_t limit;
    DurationUs window;
  };

  static Params Compile(const Policy& p) { return {p.limit, p.period}; }
  // `cost` >= 0; 0 peeks: allowed says whether one more unit would pass, nothing is spent.
  // With commit == false the decision is computed but the state is left as it was.
  static Decision Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit = true);
  // From this time on the state decides exactly like a fresh one and may be dropped.
  static TimeUs ExpiresAt(const State& s, const Params& p, TimeUs now);
};

}  // namespace sluice::algo

#endif  // SLUICE_ALGO_FIXED_WINDOW_H_
