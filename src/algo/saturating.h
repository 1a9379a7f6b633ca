// Saturating integer arithmetic for the algorithms. Limits, costs and timestamps come from
// config and clients, so any of them may be huge; instead of overflowing (undefined
// behaviour), results clamp to the int64 range, which the algorithms read as "never" or
// "unlimited". Products go through 128-bit integers so they are exact before clamping.
#ifndef SLUICE_ALGO_SATURATING_H_
#define SLUICE_ALGO_SATURATING_H_

#include <cstdint>
#include <limits>

namespace sluice::algo {

__extension__ typedef __int128 i128;  // GCC and Clang both have it on 64-bit targets

inline constexpr int64_t kMaxI64 = std::numeric_limits<int64_t>::max();
inline constexpr int64_t kMinI64 = std::numeric_limits<int64_t>::min();

constexpr int64_t Clamp(i128 v) {
  if (v > kMaxI64) return kMaxI64;
  if (v < kMinI64) return kMinI64;
  return static_cast<int64_t>(v);
}
constexpr int64_t SatAdd(int64_t a, int64_t b) { return Clamp(i128{a} + b); }
constexpr int64_t SatSub(int64_t a, int64_t b) { return Clamp(i128{a} - b); }
constexpr int64_t SatMul(int64_t a, int64_t b) { return Clamp(i128{a} * b); }

// ceil(a / b) for a >= 0, b > 0.
constexpr i128 CeilDiv(i128 a, i128 b) { return a / b + (a % b != 0 ? 1 : 0); }

// The largest multiple of `step` <= t (floor division that is right for negative t too).
constexpr int64_t FloorTo(int64_t t, int64_t step) {
  int64_t r = t % step;
  if (r < 0) r += step;
  return t - r;
}

}  // namespace sluice::algo

#endif  // SLUICE_ALGO_SATURATING_H_
