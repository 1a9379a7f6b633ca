#include "algo/gcra.h"

#include <algorithm>

namespace sluice::algo {

Gcra::Params Gcra::Compile(const Policy& p) {
  int64_t burst = p.EffectiveBurst();
  if (p.limit <= 0 || burst <= 0) return {0, 0, 0};
  auto interval = static_cast<int64_t>(CeilDiv(p.period, p.limit));
  return {burst, interval, i128{burst} * interval};
}

Decision Gcra::Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit,
                    DurationUs* delay_out) {
  Decision d;
  d.limit = p.burst;
  if (p.interval == 0) {  // limit 0: nothing passes, ever
    d.allowed = false;
    d.retry_after = kNever;
    return d;
  }
  TimeUs start = std::max(s.tat, now);
  int64_t units = cost == 0 ? 1 : cost;
  // Backlogs (TAT - now) are compared in 128 bits: exact for any limit, burst and cost.
  i128 backlog = i128{start} - now;
  i128 backlog_after = backlog + i128{units} * p.interval;
  d.allowed = backlog_after <= p.tolerance;
  if (d.allowed && cost > 0) {
    backlog = backlog_after;
    if (commit) s.tat = Clamp(i128{now} + backlog_after);
    if (delay_out) *delay_out = start - now;
  }
  d.remaining = Clamp(std::max<i128>((p.tolerance - backlog) / p.interval, 0));
  d.reset_after = Clamp(backlog);
  if (!d.allowed) {
    d.retry_after = units > p.burst ? kNever : Clamp(backlog_after - p.tolerance);
  }
  return d;
}

TimeUs Gcra::ExpiresAt(const State& s, const Params&, TimeUs) { return s.tat; }

}  // namespace sluice::algo
