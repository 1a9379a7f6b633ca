// Decision: the answer to "may this request go on?", one type for every algorithm and store.
//
// All durations are relative to the `now` the decision was made at, in microseconds.
// Definitions shared by all algorithms (so headers mean the same thing whatever the rule):
//   limit        the most requests of cost 1 a fresh key admits at once (its capacity)
//   remaining    how many requests of cost 1 would be admitted right now, after this one
//   reset_after  time until the key is back to full capacity, as if never seen
//   retry_after  0 when allowed; otherwise time until this request (same cost) would be
//                admitted if nothing else happens; kNever when no wait ever admits it
//   delay        leaky bucket as a queue only: how long an admitted request waits its turn
#ifndef SLUICE_DECISION_H_
#define SLUICE_DECISION_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>

#include "sluice/time.h"

namespace sluice {

struct Decision {
  bool allowed = true;
  int64_t limit = 0;
  int64_t remaining = 0;
  DurationUs reset_after = 0;
  DurationUs retry_after = 0;
  DurationUs delay = 0;

  friend bool operator==(const Decision&, const Decision&) = default;
};

// Which of a request's decisions speaks for it: the rejection that lasts longest, or when
// all admit, the limit closest to rejecting. Every store picks the same way.
inline size_t DecidingIndex(std::span<const Decision> d) {
  size_t best = 0;
  bool any_rejected = false;
  for (size_t i = 0; i < d.size(); ++i) {
    if (!d[i].allowed) {
      if (!any_rejected || d[i].retry_after > d[best].retry_after) best = i;
      any_rejected = true;
    } else if (!any_rejected && d[i].remaining < d[best].remaining) {
      best = i;
    }
  }
  return best;
}

// The decision a request is answered by: the deciding one, with, when every limit admits,
// the longest delay any of them asks. A queue's turn holds the request whatever the other
// limits leave: the queue counted it as served at that turn.
inline Decision RequestDecision(std::span<const Decision> d, size_t deciding) {
  Decision out = d[deciding];
  if (out.allowed) {
    for (const Decision& x : d) out.delay = std::max(out.delay, x.delay);
  }
  return out;
}

}  // namespace sluice

#endif  // SLUICE_DECISION_H_
