// SpinLock: a test-and-test-and-set lock for critical sections of a few dozen nanoseconds
// (one hash table probe and one algorithm step). Uncontended it costs one atomic exchange
// and a plain release store, cheaper than std::mutex's two read-modify-writes; contended it
// spins on a read (no cache-line ping-pong) and yields the CPU after a while, so a holder
// that was preempted is not starved by its waiters. Satisfies Lockable.
#ifndef SLUICE_STORE_SPIN_LOCK_H_
#define SLUICE_STORE_SPIN_LOCK_H_

#include <atomic>
#include <thread>

namespace sluice::internal {

class SpinLock {
 public:
  void lock() {
    for (int spins = 0; locked_.exchange(true, std::memory_order_acquire);) {
      while (locked_.load(std::memory_order_relaxed)) {
        if (++spins < 64) {
          __builtin_ia32_pause();
        } else {
          std::this_thread::yield();
        }
      }
    }
  }
  bool try_lock() {
    return !locked_.load(std::memory_order_relaxed) &&
           !locked_.exchange(true, std::memory_order_acquire);
  }
  void unlock() { locked_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> locked_{false};
};

}  // namespace sluice::internal

#endif  // SLUICE_STORE_SPIN_LOCK_H_
