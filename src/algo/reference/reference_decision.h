// The Decision of a naive reference algorithm, derived from the shared definitions alone.
//
// A reference (naive_*.h) states only what its algorithm means: whether `units` would be
// admitted at a time (Admits), whether the state is as if never seen (Fresh), a time by
// which it is (FreshBy, nullopt: never), and what admitting a request records (Spend).
// Every field of the Decision then follows from decision.h's definitions by search, never by
// the closed forms the real algorithms use:
//   remaining    the most units one more request could take now (binary search over k);
//   reset_after  the first instant the state is fresh (binary search over time);
//   retry_after  the first later instant this request would be admitted, kNever if even a
//                fresh state would not admit it or the state never becomes fresh.
// The searches rely on admission and freshness being monotone in time when nothing else
// happens, which holds for every algorithm's definition. All arithmetic is in __int128, so a
// reference never saturates or overflows where the real algorithm is careful to.
//
// Header-only, for tests and fuzzers; references are values, not shared between threads.
#ifndef SLUICE_ALGO_REFERENCE_REFERENCE_DECISION_H_
#define SLUICE_ALGO_REFERENCE_REFERENCE_DECISION_H_

#include <algorithm>
#include <cstdint>
#include <optional>

#include "algo/saturating.h"
#include "sluice/decision.h"
#include "sluice/time.h"

namespace sluice::algo::reference {

// floor(a / b) for any a and b > 0.
constexpr i128 FloorDiv(i128 a, i128 b) {
  i128 q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
// ceil(a / b) for any a and b > 0.
constexpr i128 CeilDiv(i128 a, i128 b) { return -FloorDiv(-a, b); }

// "No time passed": design.md's rule for a clock stepping back. A reference decides at the
// latest instant it admitted a request whenever `now` is earlier, so nothing is refunded.
class LatestAdmission {
 public:
  i128 Effective(i128 now) const { return latest_ ? std::max(now, *latest_) : now; }
  // Records an admission at `now`; returns the instant it counts at.
  i128 Admit(i128 now) {
    latest_ = Effective(now);
    return *latest_;
  }
  const std::optional<i128>& latest() const { return latest_; }

 private:
  std::optional<i128> latest_;
};

// The first x in [lo, hi] with pred(x), for pred false then true on [lo, hi] and pred(hi).
template <class Pred>
i128 FirstTrue(i128 lo, i128 hi, Pred pred) {
  while (lo < hi) {
    i128 mid = lo + (hi - lo) / 2;
    if (pred(mid)) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// The last x in [lo, hi] with pred(x), for pred true then false on [lo, hi] and pred(lo).
template <class Pred>
i128 LastTrue(i128 lo, i128 hi, Pred pred) {
  while (lo < hi) {
    i128 mid = lo + (hi - lo + 1) / 2;
    if (pred(mid)) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Durations beyond int64 read as kNever, as the real algorithms' saturation does.
constexpr DurationUs ToDuration(i128 d) { return d >= kNever ? kNever : static_cast<int64_t>(d); }

// The decision `ref` gives for a request of `cost` at `now` (0: a peek, asking about one
// unit). `after`, when given, receives the reference once the request is recorded (equal to
// `ref` when nothing is spent).
template <class Ref>
Decision Decide(const Ref& ref, TimeUs now, int64_t cost, Ref* after = nullptr) {
  Decision d;
  d.limit = ref.Capacity();
  const i128 units = std::max<int64_t>(cost, 1);
  d.allowed = ref.Admits(now, units);
  Ref next = ref;
  if (d.allowed && cost > 0) d.delay = ToDuration(next.Spend(now, cost));

  d.remaining = static_cast<int64_t>(
      LastTrue(0, d.limit, [&](i128 k) { return k == 0 || next.Admits(now, k); }));

  if (std::optional<i128> fresh_by = next.FreshBy(now)) {
    i128 at = FirstTrue(now, std::max<i128>(now, *fresh_by), [&](i128 t) { return next.Fresh(t); });
    d.reset_after = ToDuration(at - now);
  } else {
    d.reset_after = kNever;
  }

  if (!d.allowed) {
    std::optional<i128> fresh_by = ref.FreshBy(now);
    if (!fresh_by || !ref.Admits(std::max<i128>(now + 1, *fresh_by), units)) {
      d.retry_after = kNever;
    } else {
      i128 at = FirstTrue(now + 1, std::max<i128>(now + 1, *fresh_by),
                          [&](i128 t) { return ref.Admits(t, units); });
      d.retry_after = ToDuration(at - now);
    }
  }
  if (after) *after = std::move(next);
  return d;
}

}  // namespace sluice::algo::reference

#endif  // SLUICE_ALGO_REFERENCE_REFERENCE_DECISION_H_
