#include "algo/gcra.h"

#include <algorithm>
#include <type_traits>

namespace sluice::algo {

Gcra::Params Gcra::Compile(const Policy& p) {
  int64_t burst = p.EffectiveBurst();
  if (p.limit <= 0 || burst <= 0) return {0, 0, 0};
  auto interval = static_cast<int64_t>(CeilDiv(p.period, p.limit));
  return {burst, interval, Mul(burst, interval)};
}

namespace {

// Backlogs (TAT - now) are compared exactly: in int64_t when they are known to fit (a
// tolerance and a backlog below 2^61, and a cost within the burst), else in __int128.
template <class Int>
Decision Decide(Gcra::State& s, const Gcra::Params& p, TimeUs now, TimeUs start, int64_t cost,
                bool commit, DurationUs* delay_out) {
  Decision d;
  d.limit = p.burst;
  int64_t units = cost == 0 ? 1 : cost;
  const Int tolerance = static_cast<Int>(p.tolerance);
  Int backlog = Int{start} - now;
  Int backlog_after = backlog + Int{units} * p.interval;
  // The TAT is stored in 64 bits. A saturated TAT would forget backlog (a burst that takes
  // millennia to drain would then admit without end), so a request that would move it past
  // kMaxI64 is refused, and no wait admits it: the TAT only moves later. Only the 128-bit
  // path can get there (int64_t's bounds keep now + backlog below 2^62).
  Int room = tolerance;  // how much backlog may be there after a request
  bool storable = true;
  if constexpr (std::is_same_v<Int, i128>) {
    room = std::min<Int>(tolerance, Int{kMaxI64} - now);
    storable = Int{now} + backlog_after <= kMaxI64;
  }
  d.allowed = backlog_after <= room;
  if (d.allowed && cost > 0) {
    backlog = backlog_after;
    if (commit) s.tat = static_cast<TimeUs>(Int{now} + backlog_after);
    if (delay_out) *delay_out = SatSub(start, now);
  }
  d.remaining = backlog >= room ? 0 : Clamp(Div(room - backlog, Int{p.interval}));
  d.reset_after = Clamp(backlog);
  if (!d.allowed) {
    d.retry_after = units > p.burst || !storable ? kNever : Clamp(backlog_after - tolerance);
  }
  return d;
}

constexpr int64_t kNarrow = int64_t{1} << 61;

}  // namespace

Decision Gcra::Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit,
                    DurationUs* delay_out) {
  if (p.interval == 0) {  // limit 0: nothing passes, ever
    Decision d;
    d.limit = p.burst;
    d.allowed = false;
    d.retry_after = kNever;
    return d;
  }
  TimeUs start = std::max(s.tat, now);
  if (p.tolerance < kNarrow && cost <= p.burst && now > -kNarrow && now < kNarrow &&
      SatSub(start, now) < kNarrow) {
    return Decide<int64_t>(s, p, now, start, cost, commit, delay_out);
  }
  return Decide<i128>(s, p, now, start, cost, commit, delay_out);
}

TimeUs Gcra::ExpiresAt(const State& s, const Params&, TimeUs) { return s.tat; }

}  // namespace sluice::algo
