#include "algo/sliding_window_log.h"

#include <algorithm>

namespace sluice::algo {

Decision SlidingWindowLog::Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit) {
  TimeUs t = s.log.empty() ? now : std::max(now, s.log.back().at);
  // An entry logged at `at` counts while t < at + window.
  const auto head = s.log.begin() + s.head;
  auto first_live = std::partition_point(
      head, s.log.end(), [&](const Entry& e) { return SatAdd(e.at, p.window) <= t; });
  int64_t used = s.total;
  for (auto it = head; it != first_live; ++it) used -= it->cost;
  if (first_live == s.log.end()) used = 0;  // a saturated total may not subtract back to 0
  int64_t left = std::max<int64_t>(p.limit - used, 0);

  Decision d;
  d.limit = p.limit;
  int64_t units = std::max<int64_t>(cost, 1);  // a peek asks about one unit
  d.allowed = units <= left;
  bool logs = d.allowed && cost > 0;
  d.remaining = logs ? left - cost : left;
  if (logs && commit) {
    // Expired entries are dropped only when a new one is logged: the newest entry then
    // keeps the latest time seen, so a clock stepping back cannot revive spent entries'
    // room.
    size_t live_from = static_cast<size_t>(first_live - s.log.begin());
    if (live_from == s.log.size()) {
      s.log.clear();
      live_from = 0;
    } else if (live_from * 2 >= s.log.size() || live_from > UINT32_MAX) {  // each moves once
      s.log.erase(s.log.begin(), first_live);
      live_from = 0;
    }
    if (s.log.size() > live_from && s.log.back().at == t) {
      s.log.back().cost += cost;  // cannot overflow: used + cost <= limit
    } else {
      s.log.push_back({t, cost});
    }
    s.head = static_cast<uint32_t>(live_from);
    s.total = used + cost;
    first_live = s.log.begin() + s.head;
  }
  TimeUs newest = logs ? t : (first_live == s.log.end() ? kMinI64 : s.log.back().at);
  d.reset_after = newest == kMinI64 ? 0 : SatSub(SatAdd(newest, p.window), now);
  if (d.allowed) return d;

  if (units > p.limit) {
    d.retry_after = kNever;
    return d;
  }
  // Walk from the oldest live entry until enough has left the window to fit `units`.
  for (auto it = first_live; it != s.log.end(); ++it) {
    used -= it->cost;
    if (p.limit - used >= units) {
      d.retry_after = SatSub(SatAdd(it->at, p.window), now);
      break;
    }
  }
  return d;
}

TimeUs SlidingWindowLog::ExpiresAt(const State& s, const Params& p, TimeUs) {
  return s.log.empty() ? kMinI64 : SatAdd(s.log.back().at, p.window);
}

}  // namespace sluice::algo
