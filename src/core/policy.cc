#include "sluice/policy.h"

#include <charconv>
#include <limits>
#include <string>

namespace sluice {
namespace {

struct AlgorithmEntry {
  Algorithm algorithm;
  std::string_view name;
};
constexpr AlgorithmEntry kAlgorithmNames[] = {
    {Algorithm::kFixedWindow, "fixed_window"},
    {Algorithm::kSlidingWindowLog, "sliding_window_log"},
    {Algorithm::kSlidingWindowCounter, "sliding_window_counter"},
    {Algorithm::kTokenBucket, "token_bucket"},
    {Algorithm::kGcra, "gcra"},
    {Algorithm::kLeakyQueue, "leaky_queue"},
};

struct UnitEntry {
  std::string_view suffix;
  DurationUs unit;
};
// Longest suffix first, so "ms" is not read as "m".
constexpr UnitEntry kUnits[] = {
    {"us", kMicrosecond}, {"ms", kMillisecond}, {"s", kSecond},  {"m", kMinute},
    {"h", kHour},         {"d", kDay},          {"w", 7 * kDay},
};

constexpr DurationUs kMaxPeriod = 3650 * kDay;

}  // namespace

std::string_view AlgorithmName(Algorithm a) {
  for (const auto& e : kAlgorithmNames) {
    if (e.algorithm == a) return e.name;
  }
  return "unknown";
}

std::optional<Algorithm> ParseAlgorithm(std::string_view name) {
  for (const auto& e : kAlgorithmNames) {
    if (e.name == name) return e.algorithm;
  }
  return std::nullopt;
}

Status Policy::Validate() const {
  if (AlgorithmName(algorithm) == std::string_view("unknown")) {
    return Status::Invalid("unknown algorithm " + std::to_string(static_cast<int>(algorithm)));
  }
  if (limit < 0) return Status::Invalid("limit must be >= 0, got " + std::to_string(limit));
  if (burst < 0) return Status::Invalid("burst must be >= 0, got " + std::to_string(burst));
  if (period < kMillisecond || period > kMaxPeriod) {
    return Status::Invalid("period must be between 1ms and 3650d, got " + FormatDuration(period));
  }
  return Status::Ok();
}

Status Policy::ValidateStrict() const {
  if (Status st = Validate(); !st.ok()) return st;
  if (burst > 0 && !TakesBurst()) {
    return Status::Invalid("burst applies to token_bucket, gcra and leaky_queue; " +
                           std::string(AlgorithmName(algorithm)) +
                           " allows 'limit' per window, no more");
  }
  // GCRA and the queue keep a key's backlog as a time in 64-bit microseconds: a burst that
  // takes longer than 2^62 us (146,000 years) to drain cannot all be admitted from a fresh
  // state, though the answers would name it as the limit.
  if ((algorithm == Algorithm::kGcra || algorithm == Algorithm::kLeakyQueue) && limit > 0) {
    __extension__ using Wide = __int128;
    Wide drain = Wide{EffectiveBurst()} * ((Wide{period} + limit - 1) / limit);  // no wrap
    if (drain > (Wide{1} << 62)) {
      return Status::Invalid("burst " + std::to_string(EffectiveBurst()) + " at " +
                             std::to_string(limit) + "/" + FormatDuration(period) +
                             " takes more than 146,000 years to drain, longer than Sluice's "
                             "clock can hold");
    }
  }
  return Status::Ok();
}

std::string Policy::ToString() const {
  std::string out(AlgorithmName(algorithm));
  out += ' ';
  out += std::to_string(limit);
  out += '/';
  out += FormatDuration(period);
  if (burst > 0) {
    out += algorithm == Algorithm::kTokenBucket ? " capacity " : " burst ";
    out += std::to_string(burst);
  }
  return out;
}

std::optional<DurationUs> ParseDuration(std::string_view text) {
  for (const auto& u : kUnits) {
    if (text.size() <= u.suffix.size() || !text.ends_with(u.suffix)) continue;
    std::string_view digits = text.substr(0, text.size() - u.suffix.size());
    // "1m" must not match the "s" of "1ms" etc.: the rest must be digits only.
    int64_t n = 0;
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), n);
    if (ec != std::errc() || end != digits.data() + digits.size() || n < 0) return std::nullopt;
    if (n > std::numeric_limits<int64_t>::max() / u.unit) return std::nullopt;
    return n * u.unit;
  }
  return std::nullopt;
}

std::string FormatDuration(DurationUs d) {
  // Largest unit first for the shortest exact form.
  static constexpr UnitEntry kDescending[] = {
      {"w", 7 * kDay}, {"d", kDay},    {"h", kHour},
      {"m", kMinute},  {"s", kSecond}, {"ms", kMillisecond},
  };
  if (d > 0) {
    for (const auto& u : kDescending) {
      if (d % u.unit == 0) return std::to_string(d / u.unit) + std::string(u.suffix);
    }
  }
  return std::to_string(d) + "us";
}

}  // namespace sluice
