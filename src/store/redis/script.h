// The Redis store's decision script and its protocol, without I/O.
//
// Every limit of one request is decided by one call of sluice.lua (EVALSHA), atomically in
// Redis: the script is the twin of src/algo and of MemoryStore::CheckAll (script_test.cc
// keeps them in agreement). This file builds the call's arguments and reads its reply:
//
//   EVALSHA <ScriptSha1()> <n> key_1 .. key_n  now  (code a b c cost) x n
//
//   key_i      the state of limit i (the caller's: all in one hash slot)
//   now        microseconds, or "" for Redis' TIME (production: Redis' clock decides, so
//              the nodes' clocks need not agree)
//   code a b c CompiledLimit: the algorithm and the numbers its Compile() derives:
//                0 fixed_window, 1 sliding_window_log, 2 sliding_window_counter: limit, period, 0
//                3 token_bucket: capacity, cycle, cycle_tokens
//                4 gcra, 5 leaky_queue: burst, interval, tolerance
//   cost       clamped to [0, kMaxScriptCost]
//
// The reply is an array of 6n + 1 integers: per limit allowed (0/1), limit, remaining,
// reset_after, retry_after, delay (-1 for kNever), then the `now` the script used.
//
// Lua numbers are doubles, exact for integers below 2^53, so the script is exact only for
// policies ScriptExact accepts and times below 2^52 us (the year 2112); the config refuses
// the other policies when the store is Redis.
//
// Thread-safety: plain functions and values.
#ifndef SLUICE_STORE_REDIS_SCRIPT_H_
#define SLUICE_STORE_REDIS_SCRIPT_H_

#include <algorithm>
#include <array>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "sluice/decision.h"
#include "sluice/policy.h"
#include "sluice/time.h"

namespace sluice::redis {

struct Reply;

// The Lua source of the script (sluice.lua, embedded at build time).
extern const std::string_view kScript;
// The lowercase hex SHA-1 of kScript: what SCRIPT LOAD answers and EVALSHA takes.
const std::string& ScriptSha1();
// The lowercase hex SHA-1 of any bytes.
std::string Sha1Hex(std::string_view data);

inline constexpr size_t kScriptArgsPerLimit = 5;   // code, a, b, c, cost
inline constexpr size_t kScriptReplyPerLimit = 6;  // allowed .. delay
// Costs are sent clamped to this: a cost above a limit's capacity is decided the same
// whatever its size, and the script's doubles stay exact.
inline constexpr int64_t kMaxScriptCost = int64_t{1} << 52;

// Whether the script decides `p` exactly like src/algo: every count below 2^52, every
// product below 2^53, and every state's time (now plus at most the time it takes to refill)
// below 2^53. Per algorithm:
//   fixed_window, sliding_window_log  limit < 2^52
//   sliding_window_counter            limit * period < 2^53
//   token_bucket                      capacity < 2^52; with refill > 0 also
//                                     refill * period < 2^53 and
//                                     ceil(capacity * period / refill) + period < 2^52
//   gcra, leaky_queue                 burst * ceil(period / limit) < 2^52
bool ScriptExact(const Policy& p);

// A policy compiled for the script: its code and three numbers, preformatted. Compile once
// per policy; per request only keys and costs vary.
class CompiledLimit {
 public:
  CompiledLimit() = default;
  explicit CompiledLimit(const Policy& p);

  // The i-th ARGV field (0: the algorithm code, 1..3: its numbers).
  std::string_view field(size_t i) const {
    return std::string_view(text_).substr(start_[i], start_[i + 1] - start_[i]);
  }

 private:
  std::string text_;                   // the four fields back to back
  std::array<uint8_t, 5> start_ = {};  // where each field starts; start_[4] is the end
};

inline CompiledLimit CompileForScript(const Policy& p) { return CompiledLimit(p); }

// One limit of a request: its compiled policy and cost. The call's KEYS (one per check, in
// the same order) are the caller's; checks with the same key must have the same limit: they
// are decided once, for the sum of their costs (as MemoryStore::CheckAll does).
struct ScriptCheck {
  const CompiledLimit* limit;
  int64_t cost = 1;
};

// Writes v at p (room for 20 characters) and returns its text.
inline std::string_view FormatScriptNumber(char* p, int64_t v) {
  return std::string_view(p, static_cast<size_t>(std::to_chars(p, p + 20, v).ptr - p));
}

// Passes the call's ARGV to `sink` (a callable taking std::string_view), one argument at a
// time: `now` (nullopt: "", Redis' TIME decides), then code, a, b, c, cost per check. The
// views are valid only during each sink call (copy them); nothing is allocated here.
template <class Sink>
void AppendScriptArgs(std::span<const ScriptCheck> checks, std::optional<TimeUs> now, Sink&& sink) {
  char buf[20];
  sink(now ? FormatScriptNumber(buf, *now) : std::string_view());
  for (const ScriptCheck& c : checks) {
    for (size_t i = 0; i < 4; ++i) sink(c.limit->field(i));
    sink(FormatScriptNumber(buf, std::clamp<int64_t>(c.cost, 0, kMaxScriptCost)));
  }
}

// Reads the script's reply for out.size() limits: values.size() must be 6 * out.size() + 1.
// Returns false (leaving *now alone) when the reply is not one the script gives.
bool ParseScriptReply(std::span<const int64_t> values, std::span<Decision> out, TimeUs* now);
// The same from a RESP reply (an array of integers).
bool ParseScriptReply(const Reply& reply, std::span<Decision> out, TimeUs* now);

}  // namespace sluice::redis

#endif  // SLUICE_STORE_REDIS_SCRIPT_H_
