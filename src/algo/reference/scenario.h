// A scenario for the sequence checker: a policy, a start time and a sequence of actions,
// decoded from arbitrary bytes. The fuzzer hands over its input; the unit test hands over
// seeded random bytes, so both explore through the same decoder. Any byte string decodes to
// a valid scenario (missing bytes read as zero).
//
// Actions carry a shape and raw bits rather than numbers: a shape is resolved against the
// policy and the current time when the action runs ("the capacity plus one", "to the next
// window boundary, less a microsecond"), so random bytes hit the edges that matter.
//
// Header-only, for tests and fuzzers; plain values.
#ifndef SLUICE_ALGO_REFERENCE_SCENARIO_H_
#define SLUICE_ALGO_REFERENCE_SCENARIO_H_

#include <cstdint>
#include <span>
#include <vector>

#include "algo/saturating.h"
#include "sluice/policy.h"
#include "sluice/time.h"

namespace sluice::algo::reference {

enum class Op : uint8_t {
  kRequest,  // Step with commit (cost 0: a peek)
  kDryRun,   // Step with commit == false: decides, changes nothing
  kAdvance,  // the clock moves forward
  kBack,     // the clock steps back
  kSweep,    // the state is dropped if ExpiresAt says it may be (as a store's sweep does)
};

struct Action {
  Op op;
  uint8_t shape;  // which cost or duration, see ResolveCost / ResolveAdvance / ResolveBack
  uint64_t raw;   // random bits for the shapes that draw a number
};

struct Scenario {
  Policy policy;
  TimeUs start;
  std::vector<Action> actions;
};

// Reads bytes front to back; past the end every byte is 0.
class ByteReader {
 public:
  explicit ByteReader(std::span<const uint8_t> bytes) : bytes_(bytes) {}
  bool done() const { return pos_ >= bytes_.size(); }
  uint8_t Byte() { return pos_ < bytes_.size() ? bytes_[pos_++] : 0; }
  // 32 bits from the input, spread over 64 by splitmix64 so that `raw % n` covers wide ranges.
  uint64_t Raw() {
    uint64_t x = 0;
    for (int i = 0; i < 4; ++i) x |= uint64_t{Byte()} << (8 * i);
    x += 0x9e3779b97f4a7c15u;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9u;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebu;
    return x ^ (x >> 31);
  }

 private:
  std::span<const uint8_t> bytes_;
  size_t pos_ = 0;
};

// 2023-11-03T12:00:00Z, a minute boundary.
inline constexpr TimeUs kScenarioNoon = 1699012800 * kSecond;
// Times stay within +-2^53 us (about 285 years either side of 1970): the range every store
// uses, which keeps the Redis twin's doubles exact.
inline constexpr TimeUs kScenarioTimeBound = int64_t{1} << 53;

inline int64_t Below(uint64_t raw, int64_t n) {
  return n <= 0 ? 0 : static_cast<int64_t>(raw % static_cast<uint64_t>(n));
}

// Any policy Policy::Validate accepts, weighted towards the ones people configure.
inline Policy DecodePolicy(ByteReader& in) {
  Policy p;
  p.algorithm = kAllAlgorithms[in.Byte() % 6];
  uint8_t limit_kind = in.Byte();
  uint64_t r = in.Raw();
  switch (limit_kind % 8) {
    case 0:
      p.limit = 0;
      break;
    case 1:
      p.limit = 1;
      break;
    case 2:
      p.limit = 2 + Below(r, 9);
      break;
    case 5:
      p.limit = 1 + Below(r, 100000);
      break;
    case 6:
      p.limit = int64_t{1} << (20 + Below(r, 43));
      break;
    case 7:
      p.limit = kMaxI64 - Below(r, 2);
      break;
    default:
      p.limit = 1 + Below(r, 1000);
      break;
  }
  uint8_t period_kind = in.Byte();
  r = in.Raw();
  constexpr DurationUs kPeriods[] = {kMillisecond, kSecond,     kMinute, kHour,
                                     kDay,         3650 * kDay, 1000003};
  p.period = period_kind % 8 < 7 ? kPeriods[period_kind % 8]
                                 : kMillisecond + Below(r, kDay - kMillisecond + 1);
  uint8_t burst_kind = in.Byte();
  r = in.Raw();
  switch (burst_kind % 6) {
    case 1:
      p.burst = 1 + Below(r, 1000);
      break;
    case 2:
      p.burst = 1 + Below(r, 5);
      break;
    case 3:
      p.burst = int64_t{1} << (20 + Below(r, 43));
      break;
    default:
      p.burst = 0;
      break;  // same as limit
  }
  return p;
}

inline TimeUs DecodeStart(ByteReader& in) {
  uint8_t kind = in.Byte();
  uint64_t r = in.Raw();
  switch (kind % 6) {
    case 1:
      return 0;
    case 2:
      return Below(r, kScenarioTimeBound / 2);
    case 3:
      return kScenarioTimeBound / 2 - Below(r, kDay);
    case 4:
      return -Below(r, kDay * 365);
    default:
      return kScenarioNoon;
  }
}

// Each action takes five bytes: an opcode (op and shape) and 32 random bits.
inline std::vector<Action> DecodeActions(ByteReader& in, size_t max_actions) {
  std::vector<Action> actions;
  while (!in.done() && actions.size() < max_actions) {
    uint8_t b = in.Byte();
    Op op = b % 16 < 7    ? Op::kRequest
            : b % 16 < 9  ? Op::kDryRun
            : b % 16 < 13 ? Op::kAdvance
            : b % 16 < 15 ? Op::kBack
                          : Op::kSweep;
    actions.push_back({op, static_cast<uint8_t>(b / 16), in.Raw()});
  }
  return actions;
}

inline Scenario DecodeScenario(std::span<const uint8_t> bytes, size_t max_actions) {
  ByteReader in(bytes);
  Scenario s;
  s.policy = DecodePolicy(in);
  s.start = DecodeStart(in);
  s.actions = DecodeActions(in, max_actions);
  return s;
}

// A request's cost: peeks, unit requests, the capacity's edges, and costs no limit allows.
inline int64_t ResolveCost(uint8_t shape, uint64_t raw, int64_t capacity) {
  switch (shape % 16) {
    case 0:
      return 0;
    case 5:
      return 2;
    case 6:
      return 1 + Below(raw, 8);
    case 7:
      return std::max<int64_t>(capacity - 1, 0);
    case 8:
      return capacity;
    case 9:
      return SatAdd(capacity, 1);
    case 10:
      return Below(raw, SatAdd(capacity, 2));
    case 11: {
      constexpr int64_t kHuge[] = {int64_t{1} << 31, int64_t{1} << 52, (int64_t{1} << 53) + 1,
                                   kMaxI64 - 1, kMaxI64};
      return kHuge[raw % 5];
    }
    case 12:
      return Below(raw, capacity / 2 + 1);
    case 13:
      return capacity / 2;
    case 15:
      return static_cast<int64_t>(raw >> 1);
    default:
      return 1;
  }
}

// How far the clock moves forward from `now`: not at all, a microsecond, within a window,
// onto a window boundary and either side of it, whole windows, a rate's interval, years.
inline DurationUs ResolveAdvance(uint8_t shape, uint64_t raw, TimeUs now, const Policy& p) {
  const DurationUs w = p.period;
  const DurationUs interval = p.limit > 0 ? std::max<int64_t>(w / p.limit, 1) : w;
  const DurationUs to_boundary = w - (now % w + w) % w;
  switch (shape % 16) {
    case 0:
      return 0;
    case 2:
    case 12:
      return Below(raw, w / 64 + 1);
    case 3:
    case 14:
      return Below(raw, w + 1);
    case 4:
      return to_boundary;
    case 5:
      return to_boundary - 1;
    case 6:
      return to_boundary + 1;
    case 7:
      return (1 + Below(raw, 8)) * w;
    case 8:
      return interval * (1 + Below(raw, 4));
    case 9:
      return interval - 1;
    case 10:
      return Below(raw, 1000 * w);
    case 11:
      return Below(raw, 3650 * kDay);
    case 15:
      return Below(raw, 2 * w);
    default:
      return 1;
  }
}

// How far the clock steps back from `now`.
inline DurationUs ResolveBack(uint8_t shape, uint64_t raw, TimeUs now, const Policy& p) {
  const DurationUs w = p.period;
  switch (shape % 8) {
    case 1:
      return Below(raw, w / 8 + 1);
    case 2:
      return Below(raw, w + 1);
    case 3:
      return (now % w + w) % w + 1;  // into the previous window's last microsecond
    case 4:
      return Below(raw, 10 * w);
    case 5:
      return Below(raw, kDay);
    case 6:
      return Below(raw, 365 * kDay);
    case 7:
      return p.limit > 0 ? std::max<int64_t>(w / p.limit, 1) : w;
    default:
      return 1;
  }
}

}  // namespace sluice::algo::reference

#endif  // SLUICE_ALGO_REFERENCE_SCENARIO_H_
