// CircuitBreaker: stops a service from waiting on a shared store that is down.
//
// Closed: calls go to the store. After `failures` consecutive failed calls it opens: for
// `open_for` every call is answered at once by the fail mode, without touching the store.
// Calls that fail together count once: a call sent before the last failure counted was
// already in flight when it came, and most likely fails of the same cause (a dropped
// connection answers every call pipelined on it at once; one stall times out every call
// waiting on it). So one reset connection or one brief stall costs only the calls it
// caught, and `failures` counts failures in turn, each of calls sent after the last.
// Then one call at a time is let through as a probe (half-open); the first success closes
// the breaker, its failure opens it again (a call sent before the opening, failing late,
// is no probe and changes nothing). So a dead Redis costs a few deadlines, not one per
// request, and Sluice returns to Redis by itself once it answers.
//
// Thread-safety: all methods are lock-free. The hot path (Allow while closed, Success while
// closed) only reads shared lines; writes happen on failures and state changes.
#ifndef SLUICE_STORE_CIRCUIT_BREAKER_H_
#define SLUICE_STORE_CIRCUIT_BREAKER_H_

#include <atomic>
#include <climits>
#include <cstdint>

namespace sluice {

class CircuitBreaker {
 public:
  enum class State { kClosed, kOpen, kHalfOpen };

  CircuitBreaker(int failures, int64_t open_for_us)
      : threshold_(failures < 1 ? 1 : failures), open_for_us_(open_for_us) {}

  // Whether a call may go to the store at `now_us` (a steady clock). While open, false;
  // once the open time is over, true for one probe at a time.
  bool Allow(int64_t now_us) {
    int64_t until = open_until_.load(std::memory_order_relaxed);
    if (until == 0) return true;  // closed
    if (now_us < until) return false;
    bool expected = false;
    return probing_.compare_exchange_strong(expected, true, std::memory_order_acq_rel);
  }
  void Success() {
    if (failures_.load(std::memory_order_relaxed) != 0)
      failures_.store(0, std::memory_order_relaxed);
    if (open_until_.load(std::memory_order_relaxed) != 0) {
      open_until_.store(0, std::memory_order_relaxed);
      probing_.store(false, std::memory_order_release);
    }
  }
  // A call sent at `sent_us` failed at `now_us` (the clock of Allow). Returns true when
  // this failure opened (or re-opened) the breaker.
  bool Failure(int64_t now_us, int64_t sent_us) {
    if (open_until_.load(std::memory_order_relaxed) != 0) {
      // A call in flight when it opened says nothing new: only a failed probe (sent once
      // the open time was over) opens it again, and frees the probe's turn.
      if (sent_us < last_counted_us_.load(std::memory_order_relaxed)) return false;
      last_counted_us_.store(now_us, std::memory_order_relaxed);
      open_until_.store(now_us + open_for_us_, std::memory_order_relaxed);
      probing_.store(false, std::memory_order_release);
      return true;
    }
    if (sent_us < last_counted_us_.load(std::memory_order_relaxed)) return false;
    last_counted_us_.store(now_us, std::memory_order_relaxed);
    if (failures_.fetch_add(1, std::memory_order_relaxed) + 1 >= threshold_) {
      failures_.store(0, std::memory_order_relaxed);
      open_until_.store(now_us + open_for_us_, std::memory_order_relaxed);
      return true;
    }
    return false;
  }
  // Opens at once, whatever the count: the store refused what every call needs (at start,
  // a Redis that answers but refuses the script). Then probed as after any opening.
  void Trip(int64_t now_us) {
    failures_.store(0, std::memory_order_relaxed);
    last_counted_us_.store(now_us, std::memory_order_relaxed);
    open_until_.store(now_us + open_for_us_, std::memory_order_relaxed);
    probing_.store(false, std::memory_order_release);
  }
  State state(int64_t now_us) const {
    int64_t until = open_until_.load(std::memory_order_relaxed);
    if (until == 0) return State::kClosed;
    return now_us < until ? State::kOpen : State::kHalfOpen;
  }

 private:
  const int threshold_;
  const int64_t open_for_us_;
  std::atomic<int> failures_{0};
  std::atomic<int64_t> last_counted_us_{INT64_MIN};  // when the last failure counted came
  std::atomic<int64_t> open_until_{0};               // 0: closed
  std::atomic<bool> probing_{false};
};

}  // namespace sluice

#endif  // SLUICE_STORE_CIRCUIT_BREAKER_H_
