#include "algo/fixed_window.h"

#include <algorithm>

namespace sluice::algo {

Decision FixedWindow::Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit) {
  TimeUs start = std::max(FloorTo(now, p.window), s.window_start);
  int64_t count = start == s.window_start ? s.count : 0;
  TimeUs end = SatAdd(start, p.window);
  int64_t left = std::max<int64_t>(p.limit - count, 0);

  Decision d;
  d.limit = p.limit;
  if (cost <= left && cost > 0) {
    d.allowed = true;
    d.remaining = left - cost;
    d.reset_after = SatSub(end, now);
    if (commit) {
      s.window_start = start;
      s.count = count + cost;
    }
    return d;
  }
  // Not spent: a peek (cost 0) asks about one unit.
  int64_t units = std::max<int64_t>(cost, 1);
  d.allowed = units <= left;
  d.remaining = left;
  d.reset_after = count > 0 ? SatSub(end, now) : 0;
  if (!d.allowed) d.retry_after = units > p.limit ? kNever : SatSub(end, now);
  return d;
}

TimeUs FixedWindow::ExpiresAt(const State& s, const Params& p, TimeUs) {
  return s.count > 0 ? SatAdd(s.window_start, p.window) : kMinI64;
}

}  // namespace sluice::algo
