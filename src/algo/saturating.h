// Saturating integer arithmetic for the algorithms. Limits, costs and timestamps come from
// config and clients, so any of them may be huge; instead of overflowing (undefined
// behaviour), results clamp to the int64 range, which the algorithms read as "never" or
// "unlimited". Products go through 128-bit integers so they are exact before clamping.
#ifndef SLUICE_ALGO_SATURATING_H_
#define SLUICE_ALGO_SATURATING_H_

#include <cstdint>
#include <limits>
#include <type_traits>

namespace sluice::algo {

__extension__ typedef __int128 i128;  // GCC and Clang both have it on 64-bit targets

inline constexpr int64_t kMaxI64 = std::numeric_limits<int64_t>::max();
inline constexpr int64_t kMinI64 = std::numeric_limits<int64_t>::min();

constexpr int64_t Clamp(int64_t v) { return v; }
constexpr int64_t Clamp(i128 v) {
  if (v > kMaxI64) return kMaxI64;
  if (v < kMinI64) return kMinI64;
  return static_cast<int64_t>(v);
}
// The overflow builtins compile to one instruction and a rarely taken branch, where a
// 128-bit clamp costs a dozen; these run several times per decision.
constexpr int64_t SatAdd(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) return b > 0 ? kMaxI64 : kMinI64;
  return r;
}
constexpr int64_t SatSub(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_sub_overflow(a, b, &r)) return b < 0 ? kMaxI64 : kMinI64;
  return r;
}
constexpr int64_t SatMul(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return (a < 0) != (b < 0) ? kMinI64 : kMaxI64;
  return r;
}

// Exact products. GCC multiplies 128-bit values with three multiplications and a dozen
// instructions even when both fit in 64 bits; these take one imul and an overflow check
// in the common case.
constexpr i128 Mul(int64_t a, int64_t b) {
  int64_t r;
  if (!__builtin_mul_overflow(a, b, &r)) return r;
  return i128{a} * b;
}
constexpr i128 Mul(i128 a, int64_t b) {
  if (a >= kMinI64 && a <= kMaxI64) return Mul(static_cast<int64_t>(a), b);
  return a * b;
}

// floor(a / b) for a >= 0, b > 0, in the type of a (int64_t or i128). 128-bit values that
// fit in 64 bits (nearly all of them) take a 64-bit division: a 128-bit one is a libgcc
// call several times slower, and it showed up as a quarter of a decision's time.
template <class Int>
constexpr Int Div(Int a, std::type_identity_t<Int> b) {
  if constexpr (std::is_same_v<Int, i128>) {
    if (a <= kMaxI64 && b <= kMaxI64) return static_cast<int64_t>(a) / static_cast<int64_t>(b);
  }
  return a / b;
}
// ceil(a / b) for a >= 0, b > 0.
template <class Int>
constexpr Int CeilDiv(Int a, std::type_identity_t<Int> b) {
  Int q = Div(a, b);
  return q * b == a ? q : q + 1;
}

// The largest multiple of `step` <= t (floor division that is right for negative t too).
constexpr int64_t FloorTo(int64_t t, int64_t step) {
  int64_t r = t % step;
  if (r < 0) r += step;
  return SatSub(t, r);
}

}  // namespace sluice::algo

#endif  // SLUICE_ALGO_SATURATING_H_
