// Sliding window log.
//
// Keeps the time and cost of every admitted request of the last W; a request of cost c is
// admitted when the costs logged in (now - W, now] plus c stay within the limit. This is
// the exact rolling limit: no window edges, no approximation, and retry_after is exactly
// when enough old entries leave the window. The price is memory and work proportional to
// the requests in a window (16 bytes per distinct microsecond logged), so it suits low
// limits (logins, password resets, expensive endpoints), not high-volume APIs, where the
// sliding window counter gives nearly the same answer in 28 bytes.
//
// Entries logged in the same microsecond share one slot. If time goes backwards the newest
// logged time stands in for now, so nothing is refunded.
#ifndef SLUICE_ALGO_SLIDING_WINDOW_LOG_H_
#define SLUICE_ALGO_SLIDING_WINDOW_LOG_H_

#include <cstdint>
#include <vector>

#include "algo/saturating.h"
#include "sluice/decision.h"
#include "sluice/policy.h"

namespace sluice::algo {

struct SlidingWindowLog {
  struct Entry {
    TimeUs at;
    int64_t cost;
  };
  struct State {
    // Oldest first. Entries before `head` have left the window and are dropped in bulk
    // once they are half the vector: dropping each as it expires would move the whole
    // log, a cost proportional to the limit on every decision of a busy key.
    std::vector<Entry> log;
    uint32_t head = 0;
    int64_t total = 0;  // sum of log[head..].cost, saturating
  };
  struct Params {
    int64_t limit;
    DurationUs window;
  };

  static Params Compile(const Policy& p) { return {p.limit, p.period}; }
  static Decision Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit = true);
  static TimeUs ExpiresAt(const State& s, const Params& p, TimeUs now);
  // The log's own allocation, which a store counts in its memory.
  static size_t HeapBytes(const State& s) { return s.log.capacity() * sizeof(Entry); }
};

}  // namespace sluice::algo

#endif  // SLUICE_ALGO_SLIDING_WINDOW_LOG_H_
