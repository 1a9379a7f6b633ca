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

View Load(const SlidingWindowCounter::State& s, DurationUs w, TimeUs now) {
  int64_t now_index = FloorTo(now, w) / w;
  if (s.curr == 0 && s.prev == 0) return {now_index, now, 0, 0};
  int64_t stored = RebuildIndex(s.window, now_index);
  if (stored > now_index) return {stored, SatMul(stored, w), s.curr, s.prev};
  if (stored == now_index) return {now_index, now, s.curr, s.prev};
  if (stored == now_index - 1) return {now_index, now, 0, s.curr};
  return {now_index, now, 0, 0};
}

}  // namespace

Decision SlidingWindowCounter::Step(State& s, const Params& p, TimeUs now, int64_t cost,
                                    bool commit) {
  const i128 w = p.window;
  View v = Load(s, p.window, now);
  DurationUs elapsed = v.t - SatMul(v.index, p.window);
  DurationUs to_end = p.window - elapsed;  // (0, W]
  // prev * (W - e), the previous window's weight scaled by W.
  i128 prev_part = i128{v.prev} * to_end;
  i128 capacity = i128{p.limit} * w;
  auto fits = [&](int64_t c) { return prev_part + (i128{v.curr} + c) * w <= capacity; };
  auto remaining_after = [&](int64_t curr) -> int64_t {
    i128 room = capacity - prev_part - i128{curr} * w;
    return room <= 0 ? 0 : Clamp(room / w);
  };

  Decision d;
  d.limit = p.limit;
  d.allowed = cost == 0 ? fits(1) : fits(cost);
  int64_t curr = v.curr + (d.allowed ? cost : 0);
  if (d.allowed && cost > 0 && commit) {
    s.window = static_cast<uint32_t>(v.index);
    s.curr = curr;
    s.prev = v.prev;
  }
  d.remaining = remaining_after(curr);
  DurationUs ahead = v.t - now;  // > 0 only if time went backwards
  if (curr > 0) {
    d.reset_after = SatAdd(ahead, SatAdd(to_end, p.window));
  } else if (v.prev > 0) {
    d.reset_after = SatAdd(ahead, to_end);
  }
  if (d.allowed) return d;

  cost = std::max<int64_t>(cost, 1);  // a peek asks about one unit
  if (cost > p.limit) {
    d.retry_after = kNever;
    return d;
  }
  // Within this window only the previous window's weight falls: need
  // prev * (to_end - x) <= (limit - curr - cost) * W.
  i128 slack = (i128{p.limit} - v.curr - cost) * w;
  if (slack >= 0 && v.prev > 0) {
    i128 x = to_end - slack / v.prev;
    if (x < to_end) {
      d.retry_after = SatAdd(ahead, Clamp(std::max<i128>(x, 1)));
      return d;
    }
  }
  // Next window: curr becomes the previous count and decays from full weight:
  // curr * (W - y) <= (limit - cost) * W.
  i128 y = 0;
  if (v.curr > 0) y = std::clamp<i128>(w - (i128{p.limit} - cost) * w / v.curr, 0, w);
  d.retry_after = SatAdd(ahead, Clamp(to_end + y));
  return d;
}

TimeUs SlidingWindowCounter::ExpiresAt(const State& s, const Params& p, TimeUs now) {
  if (s.curr == 0 && s.prev == 0) return kMinI64;
  int64_t index = RebuildIndex(s.window, FloorTo(now, p.window) / p.window);
  // curr counts until the end of the window after its own.
  return SatMul(SatAdd(index, 2), p.window);
}

}  // namespace sluice::algo
