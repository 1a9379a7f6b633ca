// Leaky bucket as a queue (traffic shaping).
//
// Requests enter a bucket of `burst` places that drains one request every T = period /
// limit; a request that finds a place is admitted but must wait for its turn, and one that
// finds the bucket full is rejected. The output is a constant rate with no burst at all,
// at the price of latency: the decision's `delay` is how long the caller must hold the
// request before passing it on (0 for the request at the head of the queue). The bucket
// holds at most burst - 1 waiting requests, so the delay is bounded by (burst - 1) * T.
//
// Which requests are admitted is exactly GCRA's rule (a queue position is a TAT offset),
// so this reuses Gcra::Step and adds the wait: the meter and the queue differ in when a
// request proceeds, not in whether it may. State: the time the queue drains, 8 bytes.
#ifndef SLUICE_ALGO_LEAKY_QUEUE_H_
#define SLUICE_ALGO_LEAKY_QUEUE_H_

#include "algo/gcra.h"

namespace sluice::algo {

struct LeakyQueue {
  using State = Gcra::State;
  using Params = Gcra::Params;

  static Params Compile(const Policy& p) { return Gcra::Compile(p); }
  static Decision Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit = true);
  static TimeUs ExpiresAt(const State& s, const Params& p, TimeUs now) {
    return Gcra::ExpiresAt(s, p, now);
  }
};

}  // namespace sluice::algo

#endif  // SLUICE_ALGO_LEAKY_QUEUE_H_
