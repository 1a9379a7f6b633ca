// Runs a scenario (scenario.h) against a real algorithm and its naive reference, step by
// step, and reports the first disagreement or broken promise as text ("" when all held).
//
// At every request (and dry run) it checks:
//   - agreement with the reference: every field of the Decision equal. The exception is a
//     clock that stepped back behind the latest admission, where the references decide as if
//     no time passed (design.md) and the sliding window counter, token bucket, GCRA and
//     queue are stricter by design (they measure from `now` or from their own grid or window
//     start). There the documented bound "refunds nothing" is asserted instead: the real
//     algorithm admits only what the reference admits and has at most its remaining; when
//     both decide alike, reset_after, retry_after and delay are equal. The fixed window and
//     the log define the step back exactly as the references do and must agree exactly;
//   - the shared definitions on the real algorithm itself: 0 <= remaining <= limit and that
//     many units pass now, one more does not; the same request retried at now + retry_after
//     passes and 1 us earlier does not (kNever: not even a fresh key would admit it); at
//     now + reset_after the key decides as if never seen, 1 us earlier not, and ExpiresAt
//     lets it be dropped by then; a dry run (commit == false) decides the same and changes
//     nothing;
//   - what each algorithm promises over any window: fixed window at most the limit per
//     aligned window; log at most the limit per rolling window; counter at most the limit
//     per aligned window and, as its documented approximation allows, fewer than twice the
//     limit per rolling window; token bucket, GCRA and queue at most burst + rate * span
//     over any span; the queue's admitted requests also start their turns one interval apart
//     at least, each within (burst - 1) intervals.
// A sweep action drops the state when ExpiresAt allows it, which the reference must then see
// as fresh. Dropping forgets, so a later step back is not held to the old window (the
// memory store's documented limitation); the reference is dropped with it.
//
// Header-only, for tests and fuzzers; a checker is a value used by one thread.
#ifndef SLUICE_ALGO_REFERENCE_SEQUENCE_CHECK_H_
#define SLUICE_ALGO_REFERENCE_SEQUENCE_CHECK_H_

#include <algorithm>
#include <cstring>
#include <deque>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "algo/fixed_window.h"
#include "algo/gcra.h"
#include "algo/leaky_queue.h"
#include "algo/reference/naive_fixed_window.h"
#include "algo/reference/naive_gcra.h"
#include "algo/reference/naive_leaky_queue.h"
#include "algo/reference/naive_sliding_window_counter.h"
#include "algo/reference/naive_sliding_window_log.h"
#include "algo/reference/naive_token_bucket.h"
#include "algo/reference/reference_decision.h"
#include "algo/reference/scenario.h"
#include "algo/sliding_window_counter.h"
#include "algo/sliding_window_log.h"
#include "algo/token_bucket.h"

namespace sluice::algo::reference {

enum class Promise { kAlignedWindow, kRollingWindow, kWeightedWindow, kBurstPlusRate };

// Per algorithm: its reference, its promise, and whether it defines a step back of the
// clock exactly as the references do (no time passed).
template <class Reference, Promise kWhat, bool kExact>
struct TraitsOf {
  using Ref = Reference;
  static constexpr Promise kPromise = kWhat;
  static constexpr bool kExactBackwards = kExact;
};
template <class Algo>
struct Traits;
template <>
struct Traits<FixedWindow> : TraitsOf<NaiveFixedWindow, Promise::kAlignedWindow, true> {};
template <>
struct Traits<SlidingWindowLog> : TraitsOf<NaiveSlidingWindowLog, Promise::kRollingWindow, true> {};
template <>
struct Traits<SlidingWindowCounter>
    : TraitsOf<NaiveSlidingWindowCounter, Promise::kWeightedWindow, false> {};
template <>
struct Traits<TokenBucket> : TraitsOf<NaiveTokenBucket, Promise::kBurstPlusRate, false> {};
template <>
struct Traits<Gcra> : TraitsOf<NaiveGcra, Promise::kBurstPlusRate, false> {};
template <>
struct Traits<LeakyQueue> : TraitsOf<NaiveLeakyQueue, Promise::kBurstPlusRate, false> {};

inline std::string Show(const Decision& d) {
  std::ostringstream os;
  os << "{allowed " << d.allowed << " limit " << d.limit << " remaining " << d.remaining
     << " reset_after " << d.reset_after << " retry_after "
     << (d.retry_after == kNever ? std::string("never") : std::to_string(d.retry_after))
     << " delay " << d.delay << "}";
  return os.str();
}

template <class State>
bool SameState(const State& a, const State& b) {
  static_assert(std::is_trivially_copyable_v<State>);
  return std::memcmp(&a, &b, sizeof(State)) == 0;
}
inline bool SameState(const SlidingWindowLog::State& a, const SlidingWindowLog::State& b) {
  // The live entries: where the expired ones are dropped is bookkeeping.
  if (a.total != b.total || a.log.size() - a.head != b.log.size() - b.head) return false;
  for (size_t i = a.head, j = b.head; i < a.log.size(); ++i, ++j) {
    if (a.log[i].at != b.log[j].at || a.log[i].cost != b.log[j].cost) return false;
  }
  return true;
}

struct CheckStats {
  int64_t decisions = 0;
  int64_t admitted = 0;
  int64_t rejected = 0;
  int64_t bounded = 0;  // decisions after a step back, held to the bound
  int64_t sweeps = 0;
};

template <class Algo>
class SequenceChecker {
  using Ref = typename Traits<Algo>::Ref;

 public:
  SequenceChecker(const Policy& policy, TimeUs start)
      : policy_(policy), params_(Algo::Compile(policy)), ref_(policy), now_(start) {
    typename Algo::State fresh{};
    capacity_ = Algo::Step(fresh, params_, now_, 0, false).limit;
    if (policy.limit > 0) {
      interval_ = static_cast<int64_t>(CeilDiv(i128{policy.period}, i128{policy.limit}));
    }
    // The counter keeps its window index in 32 bits (sliding_window_counter.h): farther
    // than 2^31 windows from its last use a state aliases; stores drop it long before.
    if constexpr (std::is_same_v<Algo, SlidingWindowCounter>) {
      reach_ = static_cast<int64_t>(std::min<i128>(i128{policy.period} << 30, kMaxI64));
    }
  }

  // Runs one action; "" if everything held, else what failed.
  std::string Apply(const Action& a) {
    ++step_;
    switch (a.op) {
      case Op::kRequest:
      case Op::kDryRun:
        return Request(ResolveCost(a.shape, a.raw, capacity_), a.op == Op::kRequest);
      case Op::kAdvance: {
        now_ = std::min(SatAdd(now_, ResolveAdvance(a.shape, a.raw, now_, policy_)),
                        kScenarioTimeBound);
        if (latest_ && now_ - *latest_ >= reach_) {
          // A store would have dropped the state long ago (ExpiresAt is two windows on).
          if (!ref_.Fresh(now_)) return Fail("the reference is not fresh far past its use");
          Drop();
        }
        return "";
      }
      case Op::kBack: {
        now_ = std::max(now_ - ResolveBack(a.shape, a.raw, now_, policy_), -kScenarioTimeBound);
        if (latest_) now_ = std::max(now_, SatAdd(SatSub(*latest_, reach_), 1));
        return "";
      }
      case Op::kSweep:
        if (Algo::ExpiresAt(state_, params_, now_) <= now_) {
          if (!ref_.Fresh(now_)) return Fail("ExpiresAt lets a state be dropped that is not fresh");
          Drop();
          ++stats_.sweeps;
        }
        return "";
    }
    return "";
  }

  std::string Run(const std::vector<Action>& actions) {
    for (const Action& a : actions) {
      std::string error = Apply(a);
      if (!error.empty()) return error;
    }
    return "";
  }

  const CheckStats& stats() const { return stats_; }

 private:
  struct Admitted {
    TimeUs at;  // the latest admission's time if the clock had stepped back
    int64_t cost;
    TimeUs start;  // the queue: when its turn starts
  };

  std::string Request(int64_t cost, bool commit) {
    cost_ = cost;
    ++stats_.decisions;
    const typename Algo::State before = state_;
    Ref after = ref_;
    const Decision want = Decide(ref_, now_, cost, &after);

    typename Algo::State scratch = state_;
    const Decision dry = Algo::Step(scratch, params_, now_, cost, false);
    if (!SameState(scratch, state_)) return Fail("a dry run changed the state");
    Decision got = dry;
    if (commit) {
      got = Algo::Step(state_, params_, now_, cost, true);
      if (got != dry) return Fail("commit and dry run differ: " + Show(got) + " vs " + Show(dry));
    }

    if (std::string e = Invariants(got, cost); !e.empty()) return e;
    const bool backwards = latest_ && now_ < *latest_ && !Traits<Algo>::kExactBackwards;
    if (!backwards) {
      if (got != want) return Fail("real " + Show(got) + " reference " + Show(want));
    } else {
      ++stats_.bounded;
      if (got.allowed && !want.allowed) {
        return Fail(
            "after a step back the real algorithm admits what the reference (no time "
            "passed) rejects: real " +
            Show(got) + " reference " + Show(want));
      }
      if (got.allowed == want.allowed &&
          (got.limit != want.limit || got.remaining > want.remaining ||
           got.reset_after != want.reset_after || got.retry_after != want.retry_after ||
           got.delay != want.delay)) {
        return Fail("after a step back: real " + Show(got) + " reference " + Show(want));
      }
    }
    typename Algo::State spent = before;  // what a dry run's remaining speaks of
    Algo::Step(spent, params_, now_, cost, true);
    if (std::string e = Definitions(before, spent, got, cost); !e.empty()) return e;

    if (!commit || !got.allowed || cost == 0) {
      if (commit && !got.allowed) ++stats_.rejected;
      return "";
    }
    ++stats_.admitted;
    ref_ = std::move(after);
    TimeUs at = latest_ ? std::max(now_, *latest_) : now_;
    latest_ = at;
    return Promises({at, cost, SatAdd(now_, got.delay)});
  }

  std::string Invariants(const Decision& d, int64_t cost) {
    if (d.limit != capacity_) return Fail("limit changed: " + Show(d));
    if (d.remaining < 0 || d.remaining > capacity_) return Fail("remaining out of range");
    if (d.reset_after < 0) return Fail("negative reset_after");
    if (d.allowed && d.retry_after != 0) return Fail("admitted with a retry_after");
    if (!d.allowed && d.retry_after <= 0) return Fail("rejected without a retry_after");
    if (!std::is_same_v<Algo, LeakyQueue> && d.delay != 0) return Fail("a delay outside a queue");
    if (d.delay < 0) return Fail("negative delay");
    if (d.delay > 0 && (!d.allowed || cost == 0)) return Fail("a delay for nothing admitted");
    if (std::is_same_v<Algo, LeakyQueue> && d.delay > 0 &&
        i128{d.delay} > i128{interval_} * (capacity_ - 1)) {
      return Fail("waits longer than (burst - 1) intervals");
    }
    return "";
  }

  Decision DryRun(const typename Algo::State& s, TimeUs t, int64_t cost) const {
    typename Algo::State copy = s;
    return Algo::Step(copy, params_, t, cost, false);
  }

  // decision.h's definitions, checked on the real algorithm's own states.
  // `after` is `before` once the request is decided with commit (== before unless spent).
  std::string Definitions(const typename Algo::State& before, const typename Algo::State& after,
                          const Decision& d, int64_t cost) {
    // remaining: that many units pass now, one more does not.
    if (d.remaining <= 16) {
      typename Algo::State copy = after;
      for (int64_t k = 0; k < d.remaining; ++k) {
        if (!Algo::Step(copy, params_, now_, 1).allowed) return Fail("remaining is too high");
      }
      if (Algo::Step(copy, params_, now_, 1).allowed) return Fail("remaining is too low");
    } else {
      if (!DryRun(after, now_, d.remaining).allowed) return Fail("remaining is too high");
      if (d.remaining < capacity_ && DryRun(after, now_, d.remaining + 1).allowed) {
        return Fail("remaining is too low");
      }
    }
    // retry_after: the same request passes then, not a microsecond before.
    const int64_t units = std::max<int64_t>(cost, 1);
    if (!d.allowed) {
      if (d.retry_after == kNever) {
        if (units <= capacity_ && DryRun(before, kScenarioTimeBound * 2, units).allowed) {
          return Fail("kNever, yet a fresh-enough key admits it");
        }
      } else if (d.retry_after < kMaxI64 / 4) {
        if (!DryRun(before, now_ + d.retry_after, units).allowed) {
          return Fail("not admitted at now + retry_after");
        }
        if (DryRun(before, now_ + d.retry_after - 1, units).allowed) {
          return Fail("admitted 1 us before now + retry_after");
        }
      }
    }
    // reset_after: as if never seen then (full capacity), not a microsecond before;
    // droppable then.
    if (d.reset_after != kNever && d.reset_after < kMaxI64 / 4) {
      const TimeUs at = now_ + d.reset_after;
      const typename Algo::State fresh{};
      if (DryRun(after, at, 0) != DryRun(fresh, at, 0)) {
        return Fail("not as if never seen at now + reset_after");
      }
      if (d.reset_after > 0 && DryRun(after, at - 1, 0) == DryRun(fresh, at - 1, 0)) {
        return Fail("as if never seen 1 us before now + reset_after");
      }
      if (Algo::ExpiresAt(after, params_, at) > at) {
        return Fail("ExpiresAt later than now + reset_after");
      }
    }
    return "";
  }

  // What the algorithm promises over any window, for the admission just made.
  std::string Promises(const Admitted& x) {
    const Policy& p = policy_;
    if constexpr (Traits<Algo>::kPromise == Promise::kBurstPlusRate) {
      if (!admitted_.empty() && std::is_same_v<Algo, LeakyQueue>) {
        const Admitted& last = admitted_.back();
        if (i128{x.start} < i128{last.start} + i128{last.cost} * interval_) {
          return Fail("the queue starts a turn before the previous one ended");
        }
      }
      admitted_.push_back(x);
      i128 sum = 0;
      for (auto it = admitted_.rbegin(); it != admitted_.rend(); ++it) {
        sum += it->cost;
        i128 refill = i128{x.at - it->at} * p.limit / p.period;
        if (sum > p.EffectiveBurst() + refill) return Fail("more than burst + rate over a span");
      }
      return "";
    } else {
      admitted_.push_back(x);
      // Only admissions of the last window can share one with this one.
      while (admitted_.front().at <= x.at - p.period) admitted_.pop_front();
      i128 aligned = 0, rolling = 0;
      const TimeUs start = FloorTo(x.at, p.period);
      for (const Admitted& y : admitted_) {
        rolling += y.cost;
        if (y.at >= start) aligned += y.cost;
      }
      if (Traits<Algo>::kPromise != Promise::kRollingWindow && aligned > p.limit) {
        return Fail("more than the limit in an aligned window");
      }
      if (Traits<Algo>::kPromise == Promise::kRollingWindow && rolling > p.limit) {
        return Fail("more than the limit in a rolling window");
      }
      if (Traits<Algo>::kPromise == Promise::kWeightedWindow && rolling > 2 * i128{p.limit} - 1) {
        return Fail("twice the limit in a rolling window");
      }
      return "";
    }
  }

  void Drop() {
    state_ = {};
    ref_ = Ref(policy_);
    latest_.reset();
    admitted_.clear();
  }

  std::string Fail(const std::string& what) const {
    std::ostringstream os;
    os << policy_.ToString() << ": step " << step_ << " at " << now_ << " us, cost " << cost_
       << ": " << what;
    return os.str();
  }

  Policy policy_;
  typename Algo::Params params_;
  typename Algo::State state_{};
  Ref ref_;
  TimeUs now_;
  int64_t capacity_ = 0;
  DurationUs interval_ = 0;       // GCRA's T, rounded up; 0 for limit 0
  DurationUs reach_ = kMaxI64;    // how far from its last use a state stays meaningful
  std::optional<TimeUs> latest_;  // the latest admission's time (never decreases)
  std::deque<Admitted> admitted_;
  int64_t step_ = 0;
  int64_t cost_ = 0;
  CheckStats stats_;
};

// Runs a scenario through the checker of its policy's algorithm.
inline std::string CheckScenario(const Scenario& s, CheckStats* stats = nullptr) {
  auto run = [&](auto checker) {
    std::string error = checker.Run(s.actions);
    if (stats) {
      const CheckStats& c = checker.stats();
      stats->decisions += c.decisions;
      stats->admitted += c.admitted;
      stats->rejected += c.rejected;
      stats->bounded += c.bounded;
      stats->sweeps += c.sweeps;
    }
    return error;
  };
  switch (s.policy.algorithm) {
    case Algorithm::kFixedWindow:
      return run(SequenceChecker<FixedWindow>(s.policy, s.start));
    case Algorithm::kSlidingWindowLog:
      return run(SequenceChecker<SlidingWindowLog>(s.policy, s.start));
    case Algorithm::kSlidingWindowCounter:
      return run(SequenceChecker<SlidingWindowCounter>(s.policy, s.start));
    case Algorithm::kTokenBucket:
      return run(SequenceChecker<TokenBucket>(s.policy, s.start));
    case Algorithm::kGcra:
      return run(SequenceChecker<Gcra>(s.policy, s.start));
    case Algorithm::kLeakyQueue:
      return run(SequenceChecker<LeakyQueue>(s.policy, s.start));
  }
  return "unknown algorithm";
}

}  // namespace sluice::algo::reference

#endif  // SLUICE_ALGO_REFERENCE_SEQUENCE_CHECK_H_
