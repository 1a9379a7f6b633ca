#include "algo/token_bucket.h"

#include <algorithm>
#include <numeric>

namespace sluice::algo {
namespace {

// The bucket at time t (t >= anchor): anchor moved forward by whole cycles, and the
// tokens that arrived since the new anchor.
struct Level {
  TokenBucket::State state;
  int64_t partial;  // tokens gained since state.anchor, not yet in state.base
  int64_t tokens() const { return state.base + partial; }
};

Level LevelAt(const TokenBucket::State& s, const TokenBucket::Params& p, TimeUs t) {
  if (s.anchor == kMinI64) return {{p.capacity, t}, 0};
  if (p.refill == 0) return {{std::min(s.base, p.capacity), t}, 0};
  i128 elapsed = i128{t} - s.anchor;
  i128 gained = elapsed * p.refill / p.period;
  if (gained >= i128{p.capacity} - s.base) return {{p.capacity, t}, 0};  // full
  i128 cycles = elapsed / p.cycle;
  TokenBucket::State moved{static_cast<int64_t>(s.base + cycles * p.cycle_tokens),
                           static_cast<int64_t>(s.anchor + cycles * p.cycle)};
  return {moved, static_cast<int64_t>(gained - cycles * p.cycle_tokens)};
}

// Time from t until the bucket holds `target` tokens.
DurationUs TimeToReach(const Level& l, const TokenBucket::Params& p, TimeUs t, int64_t target) {
  if (l.tokens() >= target) return 0;
  if (p.refill == 0) return kNever;
  i128 need_since_anchor = i128{target} - l.state.base;
  i128 at = l.state.anchor + CeilDiv(need_since_anchor * p.period, p.refill);
  return Clamp(std::max<i128>(at - t, 0));
}

}  // namespace

TokenBucket::Params TokenBucket::Compile(const Policy& policy) {
  Params p{policy.EffectiveBurst(), policy.limit, policy.period, policy.period, 0};
  if (p.refill > 0) {
    int64_t g = std::gcd(p.refill, p.period);
    p.cycle = p.period / g;
    p.cycle_tokens = p.refill / g;
  }
  return p;
}

Decision TokenBucket::Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit) {
  TimeUs t = s.anchor == kMinI64 ? now : std::max(now, s.anchor);
  Level l = LevelAt(s, p, t);
  DurationUs ahead = t - now;

  Decision d;
  d.limit = p.capacity;
  d.allowed = cost == 0 ? l.tokens() >= 1 : cost <= l.tokens();
  if (d.allowed && cost > 0) {
    l.state.base -= cost;
    if (commit) s = l.state;
  }
  d.remaining = std::max<int64_t>(l.tokens(), 0);
  d.reset_after = SatAdd(ahead, TimeToReach(l, p, t, p.capacity));
  if (d.allowed) return d;
  int64_t units = std::max<int64_t>(cost, 1);  // a peek asks about one unit
  d.retry_after = units > p.capacity ? kNever : SatAdd(ahead, TimeToReach(l, p, t, units));
  return d;
}

TimeUs TokenBucket::ExpiresAt(const State& s, const Params& p, TimeUs) {
  if (s.anchor == kMinI64 || s.base >= p.capacity) return kMinI64;
  if (p.refill == 0) return kMaxI64;
  return Clamp(i128{s.anchor} + CeilDiv((i128{p.capacity} - s.base) * p.period, p.refill));
}

}  // namespace sluice::algo
