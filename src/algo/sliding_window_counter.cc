#include "algo/sliding_window_counter.h"

#include <algorithm>

namespace sluice::algo {
namespace {

// The full index of the window whose low 32 bits are `low`, nearest to `near`.
int64_t RebuildIndex(uint32_t low, int64_t near) {
  auto delta = static_cast<int32_t>(low - static_cast<uint32_t>(near));
  return near + delta;
}

struct View {
  int64_t index;  // the current window
  TimeUs t;       // now, or the start of the stored window if time went backwards
  int64_t curr;
  int64_t prev;
};

// floor(t / w), with one division.
int64_t WindowIndex(TimeUs t, DurationUs w) {
  int64_t q = t / w;
  return t % w < 0 ? q - 1 : q;
}

View Load(const SlidingWindowCounter::State& s, DurationUs w, TimeUs now) {
  int64_t now_index = WindowIndex(now, w);
  if (s.curr == 0 && s.prev == 0) return {now_index, now, 0, 0};
  int64_t stored = RebuildIndex(s.window, now_index);
  if (stored > now_index) return {stored, SatMul(stored, w), s.curr, s.prev};
  if (stored == now_index) return {now_index, now, s.curr, s.prev};
  if (stored == now_index - 1) return {now_index, now, 0, s.curr};
  return {now_index, now, 0, 0};
}

// The decision in integers of type Int: int64_t when every product is known to fit (the
// common case, a few instructions each), __int128 otherwise (exact for any limit).
template <class Int>
Decision Decide(SlidingWindowCounter::State& s, const SlidingWindowCounter::Params& p,
                const View& v, TimeUs now, int64_t cost, bool commit) {
  const Int w = p.window;
  DurationUs to_end = p.window - (v.t - SatMul(v.index, p.window));  // (0, W]
  // prev * (W - e): the previous window's weight, scaled by W.
  const Int prev_part = Int{v.prev} * to_end;
  const Int capacity = Int{p.limit} * w;
  auto fits = [&](Int c) { return prev_part + (Int{v.curr} + c) * w <= capacity; };
  // floor((capacity - prev_part - curr * W) / W) = limit - curr - ceil(prev_part / W).
  auto remaining_after = [&](int64_t curr) -> int64_t {
    Int r = Int{p.limit} - curr - (prev_part == 0 ? Int{0} : Int{CeilDiv(prev_part, w)});
    return r <= 0 ? 0 : Clamp(r);
  };

  Decision d;
  d.limit = p.limit;
  int64_t units = std::max<int64_t>(cost, 1);  // a peek asks about one unit
  d.allowed = units <= p.limit && fits(units);
  int64_t curr = v.curr + (d.allowed ? cost : 0);
  if (d.allowed && cost > 0 && commit) {
    s.window = static_cast<uint32_t>(v.index);
    s.curr = curr;
    s.prev = v.prev;
  }
  // Nothing remains when one more unit would not fit: that costs no division.
  d.remaining = fits(Int{curr - v.curr} + 1) ? remaining_after(curr) : 0;
  DurationUs ahead = v.t - now;  // > 0 only if time went backwards
  if (curr > 0) {
    d.reset_after = SatAdd(ahead, SatAdd(to_end, p.window));
  } else if (v.prev > 0) {
    d.reset_after = SatAdd(ahead, to_end);
  }
  if (d.allowed) return d;

  if (units > p.limit) {
    d.retry_after = kNever;
    return d;
  }
  // Within this window only the previous window's weight falls: need
  // prev * (to_end - x) <= (limit - curr - units) * W.
  Int slack = (Int{p.limit} - v.curr - units) * w;
  if (slack >= 0 && v.prev > 0) {
    Int x = to_end - Int{Div(slack, v.prev)};
    if (x < to_end) {
      d.retry_after = SatAdd(ahead, Clamp(std::max<Int>(x, 1)));
      return d;
    }
  }
  // Next window: curr becomes the previous count and decays from full weight:
  // curr * (W - y) <= (limit - units) * W.
  Int y = 0;
  if (v.curr > 0) y = std::clamp<Int>(w - Int{Div((Int{p.limit} - units) * w, v.curr)}, 0, w);
  d.retry_after = SatAdd(ahead, Clamp(Int{to_end} + y));
  return d;
}

}  // namespace

SlidingWindowCounter::Params SlidingWindowCounter::Compile(const Policy& p) {
  // Every product in Decide is at most about 2 * limit * window when the counts are within
  // the limit; keep a factor of 8 of headroom below 2^63.
  bool narrow = Mul(p.limit, p.period) < (i128{1} << 59);
  return {p.limit, p.period, narrow};
}

Decision SlidingWindowCounter::Step(State& s, const Params& p, TimeUs now, int64_t cost,
                                    bool commit) {
  View v = Load(s, p.window, now);
  if (p.narrow && v.curr <= p.limit && v.prev <= p.limit && cost <= p.limit) {
    return Decide<int64_t>(s, p, v, now, cost, commit);
  }
  return Decide<i128>(s, p, v, now, cost, commit);
}

TimeUs SlidingWindowCounter::ExpiresAt(const State& s, const Params& p, TimeUs now) {
  if (s.curr == 0 && s.prev == 0) return kMinI64;
  int64_t index = RebuildIndex(s.window, WindowIndex(now, p.window));
  // curr counts until the end of the window after its own.
  return SatMul(SatAdd(index, 2), p.window);
}

}  // namespace sluice::algo
