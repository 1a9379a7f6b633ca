#include "algo/leaky_queue.h"

namespace sluice::algo {

Decision LeakyQueue::Step(State& s, const Params& p, TimeUs now, int64_t cost, bool commit) {
  DurationUs delay = 0;
  Decision d = Gcra::Step(s, p, now, cost, commit, &delay);
  d.delay = delay;
  return d;
}

}  // namespace sluice::algo
