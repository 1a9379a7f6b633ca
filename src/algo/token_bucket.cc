#include "algo/token_bucket.h"

#include <algorithm>
#include <numeric>

namespace sluice::algo {
namespace {

// The bucket at time t (t >= anchor): anchor moved forward by whole cycles, and the
// tokens that arrived since the new anchor. Int is int64_t when the products are known to
// fit (Params::narrow and a bucket not yet full), __int128 otherwise.
struct Level {
  TokenBucket::State state;
  int64_t partial;  // tokens gained since state.anchor, not yet in state.base
  int64_t tokens() const { return state.base + partial; }
};

template <class Int>
Level LevelAt(const TokenBucket::State& s, const TokenBucket::Params& p, TimeUs t) {
  Int elapsed = Int{t} - s.anchor;
  // The comparisons skip divisions in the common case of a busy key (nothing gained yet).
  Int scaled = elapsed * p.refill;
  Int gained = scaled < p.period ? Int{0} : Div(scaled, Int{p.period});
  if (gained >= Int{p.capacity} - s.base) return {{p.capacity, t}, 0};  // full
  Int cycles = elapsed < p.cycle ? Int{0} : Div(elapsed, Int{p.cycle});
  Int cycle_gain = cycles * p.cycle_tokens;
  TokenBucket::State moved{static_cast<int64_t>(s.base + cycle_gain),
                           static_cast<int64_t>(s.anchor + cycles * p.cycle)};
  return {moved, static_cast<int64_t>(gained - cycle_gain)};
}

// Time from t until the bucket holds `target` tokens.
template <class Int>
DurationUs TimeToReach(const Level& l, const TokenBucket::Params& p, TimeUs t, int64_t target) {
  if (l.tokens() >= target) return 0;
  if (p.refill == 0) return kNever;
  Int need_since_anchor = Int{target} - l.state.base;
  // In 128 bits even on the narrow path: the products fit, but an anchor near the end of
  // the clock plus the time to refill may not.
  i128 at = i128{l.state.anchor} + (p.token_time > 0
                                        ? need_since_anchor * p.token_time
                                        : CeilDiv(need_since_anchor * p.period, Int{p.refill}));
  return Clamp(std::max<i128>(at - t, 0));
}

template <class Int>
Decision Decide(TokenBucket::State& s, const TokenBucket::Params& p, TimeUs now, TimeUs t,
                int64_t cost, bool commit) {
  Level l;
  if (s.anchor == kMinI64) {
    l = {{p.capacity, t}, 0};
  } else if (p.refill == 0) {
    l = {{std::min(s.base, p.capacity), t}, 0};
  } else {
    l = LevelAt<Int>(s, p, t);
  }
  DurationUs ahead = SatSub(t, now);

  Decision d;
  d.limit = p.capacity;
  d.allowed = cost == 0 ? l.tokens() >= 1 : cost <= l.tokens();
  if (d.allowed && cost > 0) {
    l.state.base -= cost;
    if (commit) s = l.state;
  }
  d.remaining = std::max<int64_t>(l.tokens(), 0);
  d.reset_after = SatAdd(ahead, TimeToReach<Int>(l, p, t, p.capacity));
  if (d.allowed) return d;
  int64_t units = std::max<int64_t>(cost, 1);  // a peek asks about one unit
  d.retry_after = units > p.capacity ? kNever : SatAdd(ahead, TimeToReach<Int>(l, p, t, units));
  return d;
}

}  // namespace

TokenBucket::Params TokenBucket::Compile(const Policy& policy) {
  Params p{policy.EffectiveBurst(), policy.limit, policy.period, policy.period, 0, 0, 0, false};
  if (p.refill > 0) {
    int64_t g = std::gcd(p.refill, p.period);
    p.cycle = p.period / g;
    p.cycle_tokens = p.refill / g;
    if (p.cycle_tokens == 1) p.token_time = p.cycle;
    // Below fill_time every product in Decide is at most about
    // (capacity + cycle_tokens) * period; keep a factor of 8 of headroom below 2^63.
    i128 span = (i128{p.capacity} + p.cycle_tokens + 2) * p.period;
    p.narrow = span < (i128{1} << 59);
    if (p.narrow) p.fill_time = static_cast<int64_t>(CeilDiv(span, i128{p.refill}));
  }
  return p;
}

Decision TokenBucket::Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit) {
  TimeUs t = s.anchor == kMinI64 ? now : std::max(now, s.anchor);
  if (p.narrow && (s.anchor == kMinI64 || SatSub(t, s.anchor) < p.fill_time))
    return Decide<int64_t>(s, p, now, t, cost, commit);
  return Decide<i128>(s, p, now, t, cost, commit);
}

TimeUs TokenBucket::ExpiresAt(const State& s, const Params& p, TimeUs) {
  if (s.anchor == kMinI64 || s.base >= p.capacity) return kMinI64;
  if (p.refill == 0) return kMaxI64;
  return Clamp(i128{s.anchor} + CeilDiv((i128{p.capacity} - s.base) * p.period, i128{p.refill}));
}

}  // namespace sluice::algo
