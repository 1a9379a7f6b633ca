// Time in Sluice: integer microseconds since the Unix epoch.
//
// Every algorithm takes `now` as an argument and never reads a clock, so tests pass plain
// numbers and a decision is a pure function of (state, policy, now, cost). Microseconds
// keep every timestamp below 2^53, so the same integers are exact in Redis' Lua (doubles)
// and memory and Redis stores can agree bit for bit. Clocks are only read at the edges
// (servers, an embedding program) through the Clock interface below.
//
// A `now` is a real time: any value but the two ends of int64 (a token bucket marks a key
// never used with the lowest), which no clock gives.
//
// Thread-safety: SystemClock and ManualClock are safe to share between threads.
#ifndef SLUICE_TIME_H_
#define SLUICE_TIME_H_

#include <atomic>
#include <cstdint>
#include <limits>

namespace sluice {

using TimeUs = int64_t;      // microseconds since 1970-01-01T00:00:00Z
using DurationUs = int64_t;  // microseconds

inline constexpr DurationUs kMicrosecond = 1;
inline constexpr DurationUs kMillisecond = 1000;
inline constexpr DurationUs kSecond = 1000 * kMillisecond;
inline constexpr DurationUs kMinute = 60 * kSecond;
inline constexpr DurationUs kHour = 60 * kMinute;
inline constexpr DurationUs kDay = 24 * kHour;

// A duration that never ends: the retry_after of a request no wait can admit (its cost is
// above the limit's capacity, or the limit never refills).
inline constexpr DurationUs kNever = std::numeric_limits<int64_t>::max();

class Clock {
 public:
  virtual ~Clock() = default;
  virtual TimeUs Now() const = 0;
};

// Wall-clock time (CLOCK_REALTIME). Wall time, not monotonic time, because reset times are
// reported to clients as Unix timestamps and because Redis' TIME is wall time; the
// algorithms tolerate the clock stepping backwards (they never refund).
class SystemClock final : public Clock {
 public:
  TimeUs Now() const override;
  static const SystemClock& Instance();
};

// A clock that moves only when told to: for tests and simulations.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(TimeUs start = 0) : now_(start) {}
  TimeUs Now() const override { return now_.load(std::memory_order_relaxed); }
  void Set(TimeUs t) { now_.store(t, std::memory_order_relaxed); }
  void Advance(DurationUs d) { now_.fetch_add(d, std::memory_order_relaxed); }

 private:
  std::atomic<TimeUs> now_;
};

}  // namespace sluice

#endif  // SLUICE_TIME_H_
