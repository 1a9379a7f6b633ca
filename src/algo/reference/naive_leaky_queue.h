// Naive leaky bucket as a queue: a simulated queue of scheduled departures.
//
// The definition (leaky_queue.h): a bucket of `burst` places drained one request unit every
// T = period / limit (rounded up to a whole microsecond); a request of cost c that finds c
// free places is admitted and waits for its turn, one that does not is rejected. Here every
// admitted request is a run of c drain slots of T microseconds, starting when the queue
// ahead of it has drained (or at once); a unit holds its place until its slot ends. The
// request's `delay` is how long it waits for its first slot. Nothing here is GCRA's
// theoretical arrival time: the admissions must agree with Gcra::Step's rule all the same.
// A clock stepping back decides at the latest admission's instant (no time passed); the real
// queue, like GCRA, counts a step back as backlog, held to the "refunds nothing" bound.
//
// A value type for tests and fuzzers; not thread-safe.
#ifndef SLUICE_ALGO_REFERENCE_NAIVE_LEAKY_QUEUE_H_
#define SLUICE_ALGO_REFERENCE_NAIVE_LEAKY_QUEUE_H_

#include <vector>

#include "algo/reference/reference_decision.h"
#include "sluice/policy.h"

namespace sluice::algo::reference {

class NaiveLeakyQueue {
 public:
  explicit NaiveLeakyQueue(const Policy& p)
      : places_(p.limit > 0 ? p.EffectiveBurst() : 0),
        slot_(p.limit > 0 ? CeilDiv(p.period, p.limit) : 1) {}

  int64_t Capacity() const { return places_; }
  // As gcra.h documents, the queue must drain within the int64 range.
  bool Admits(i128 now, i128 units) const {
    return Waiting(now) + units <= places_ && Start(now) + units * slot_ <= kMaxI64;
  }
  bool Fresh(i128 now) const { return Waiting(now) == 0; }
  // Once the last scheduled slot has ended.
  std::optional<i128> FreshBy(i128 now) const {
    return queue_.empty() ? now : std::max(now, queue_.back().End(slot_));
  }
  // Schedules the request; returns its wait from `now`.
  i128 Spend(i128 now, i128 cost) {
    i128 t = clock_.Admit(now);
    // Runs over by t can hold no place again: no question is asked before t any more.
    while (!queue_.empty() && queue_.front().End(slot_) <= t) queue_.erase(queue_.begin());
    i128 start = Start(t);
    queue_.push_back({start, cost});
    return start - now;
  }

 private:
  struct Run {
    i128 start;
    i128 units;
    i128 End(i128 slot) const { return start + units * slot; }
  };
  // When a request admitted at `now` would get its first slot.
  i128 Start(i128 now) const {
    i128 t = clock_.Effective(now);
    return queue_.empty() ? t : std::max(t, queue_.back().End(slot_));
  }
  // Units whose slot has not ended at `now`: those still holding a place.
  i128 Waiting(i128 now) const {
    i128 t = clock_.Effective(now), waiting = 0;
    for (const Run& r : queue_) {
      i128 done = std::clamp<i128>(FloorDiv(t - r.start, slot_), 0, r.units);
      waiting += r.units - done;
    }
    return waiting;
  }

  int64_t places_;
  i128 slot_;  // T: one unit's drain time
  std::vector<Run> queue_;
  LatestAdmission clock_;
};

}  // namespace sluice::algo::reference

#endif  // SLUICE_ALGO_REFERENCE_NAIVE_LEAKY_QUEUE_H_
