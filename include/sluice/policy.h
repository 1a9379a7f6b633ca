// Policy: what one limit allows, independent of who is limited.
//
// A policy is a value; it is validated once (Validate) and then read by any number of
// threads. The meaning of the three numbers depends on the algorithm:
//
//   algorithm                 limit                      period        burst (0 = limit)
//   fixed_window              requests per window        window        -
//   sliding_window_log        requests per window        window        -
//   sliding_window_counter    requests per window        window        -
//   token_bucket              tokens refilled / period   refill period capacity
//   gcra (leaky bucket meter) requests per period        period        burst size
//   leaky_queue (shaping)     requests per period        period        bucket size: 1 served
//                                                                      now + burst-1 queued
#ifndef SLUICE_POLICY_H_
#define SLUICE_POLICY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "sluice/status.h"
#include "sluice/time.h"

namespace sluice {

enum class Algorithm : uint8_t {
  kFixedWindow,
  kSlidingWindowLog,
  kSlidingWindowCounter,
  kTokenBucket,
  kGcra,
  kLeakyQueue,
};

inline constexpr Algorithm kAllAlgorithms[] = {
    Algorithm::kFixedWindow,
    Algorithm::kSlidingWindowLog,
    Algorithm::kSlidingWindowCounter,
    Algorithm::kTokenBucket,
    Algorithm::kGcra,
    Algorithm::kLeakyQueue,
};

// The config name of an algorithm ("fixed_window", ...), and back.
std::string_view AlgorithmName(Algorithm a);
std::optional<Algorithm> ParseAlgorithm(std::string_view name);

struct Policy {
  Algorithm algorithm = Algorithm::kSlidingWindowCounter;
  int64_t limit = 0;
  DurationUs period = kMinute;
  int64_t burst = 0;  // 0: same as limit

  int64_t EffectiveBurst() const { return burst > 0 ? burst : limit; }
  // The most one request may cost and pass, from a fresh state: a window's limit, a
  // bucket's burst. A request costing more is refused whatever the state.
  int64_t Capacity() const { return TakesBurst() ? EffectiveBurst() : limit; }
  // Whether the algorithm reads `burst` (the windowed ones count `limit` only).
  bool TakesBurst() const {
    return algorithm == Algorithm::kTokenBucket || algorithm == Algorithm::kGcra ||
           algorithm == Algorithm::kLeakyQueue;
  }
  // Validate, and also refuse a burst the algorithm would ignore: in a config or on a
  // command line, a setting that does nothing is a mistake to report.
  Status ValidateStrict() const;

  // limit >= 0, burst >= 0, 1 ms <= period <= 10 years.
  Status Validate() const;
  // "sliding_window_counter 60/1m", "token_bucket 10/1s burst 20".
  std::string ToString() const;

  static Policy FixedWindow(int64_t limit, DurationUs window) {
    return {Algorithm::kFixedWindow, limit, window, 0};
  }
  static Policy SlidingWindowLog(int64_t limit, DurationUs window) {
    return {Algorithm::kSlidingWindowLog, limit, window, 0};
  }
  static Policy SlidingWindowCounter(int64_t limit, DurationUs window) {
    return {Algorithm::kSlidingWindowCounter, limit, window, 0};
  }
  static Policy TokenBucket(int64_t capacity, int64_t refill, DurationUs per) {
    return {Algorithm::kTokenBucket, refill, per, capacity};
  }
  static Policy Gcra(int64_t limit, DurationUs per, int64_t burst = 0) {
    return {Algorithm::kGcra, limit, per, burst};
  }
  static Policy LeakyQueue(int64_t limit, DurationUs per, int64_t bucket = 0) {
    return {Algorithm::kLeakyQueue, limit, per, bucket};
  }

  friend bool operator==(const Policy&, const Policy&) = default;
};

// "1m" -> kMinute, "250ms", "1h", "1d", "30s", "1w"; nullopt for anything else.
std::optional<DurationUs> ParseDuration(std::string_view text);
// The shortest exact form of a duration: 60000000 -> "1m".
std::string FormatDuration(DurationUs d);

}  // namespace sluice

#endif  // SLUICE_POLICY_H_
