// The Redis store's decision script and its protocol, without I/O.
//
// Every limit of one request is decided by one call of sluice.lua (EVALSHA), atomically in
// Redis: the script is the twin of src/algo and of MemoryStore::CheckAll (script_test.cc
// keeps them in agreement). This file builds the call's arguments and reads its reply:
//
//   EVALSHA <ScriptSha1()> <n> key_1 .. key_n  args
//
//   key_i      the state of limit i (the caller's: all in one hash slot)
//   args       one binary string: now, then one 33-byte record per limit, every number a
//              little-endian double (the script's own number type, so neither side parses
//              or prints decimal text, and Redis builds a one-element ARGV):
//     now        8 bytes: microseconds, or -1 for Redis' TIME (production: Redis' clock
//                decides, so the nodes' clocks need not agree)
//     code       1 byte, then a b c: CompiledLimit, the algorithm and the numbers its
//                Compile() derives:
//                  0 fixed_window, 1 sliding_window_log, 2 sliding_window_counter: limit, period, 0
//                  3 token_bucket: capacity, cycle, cycle_tokens
//                  4 gcra, 5 leaky_queue: burst, interval, tolerance
//     cost       clamped to [0, kMaxScriptCost]
//
// The reply is one bulk string: the `now` the script used (a double), then per limit a
// 41-byte record, allowed (1 byte, 0/1) then the doubles limit (the first compiled number),
// remaining, reset_after, retry_after, delay (-1 for kNever).
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
#include <bit>
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

inline constexpr size_t kScriptRecordSize = 33;       // per limit in args: code, a, b, c, cost
inline constexpr size_t kScriptReplyRecordSize = 41;  // per limit in the reply: allowed .. delay
// Costs are sent clamped to this: a cost above a limit's capacity is decided the same
// whatever its size, and the script's doubles stay exact.
inline constexpr int64_t kMaxScriptCost = int64_t{1} << 52;

// Writes v at p as a little-endian double (8 bytes); exact for |v| < 2^53.
inline void PutScriptNumber(char* p, int64_t v) {
  uint64_t bits = std::bit_cast<uint64_t>(static_cast<double>(v));
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>(bits >> (8 * i));
}

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

// A policy compiled for the script: the first 25 bytes of its args record (code, a, b, c).
// Compile once per policy; per request only keys and costs vary.
class CompiledLimit {
 public:
  CompiledLimit() = default;
  explicit CompiledLimit(const Policy& p);

  // The algorithm code and its three numbers, as sent.
  std::string_view record() const { return std::string_view(record_.data(), record_.size()); }
  // The i-th number (0: the algorithm code, 1..3: its numbers), for tests and logs.
  int64_t number(size_t i) const;

 private:
  std::array<char, kScriptRecordSize - 8> record_ = {};
};

inline CompiledLimit CompileForScript(const Policy& p) { return CompiledLimit(p); }

// One limit of a request: its compiled policy and cost. The call's KEYS (one per check, in
// the same order) are the caller's; checks with the same key must have the same limit: they
// are decided once, for the sum of their costs (as MemoryStore::CheckAll does).
struct ScriptCheck {
  const CompiledLimit* limit;
  int64_t cost = 1;
};

// Writes v at p (room for 20 characters) and returns its text (for the key count).
inline std::string_view FormatScriptNumber(char* p, int64_t v) {
  return std::string_view(p, static_cast<size_t>(std::to_chars(p, p + 20, v).ptr - p));
}

// Passes the call's ARGV to `sink` (a callable taking std::string_view): the one args string
// for `now` (nullopt: Redis' TIME decides; an explicit now must be >= 0) and the checks. The
// view is valid only during the sink call (copy it); up to 8 checks nothing is allocated.
template <class Sink>
void AppendScriptArgs(std::span<const ScriptCheck> checks, std::optional<TimeUs> now, Sink&& sink) {
  constexpr size_t kStackChecks = 8;
  char stack[8 + kScriptRecordSize * kStackChecks];
  std::string heap;
  const size_t size = 8 + kScriptRecordSize * checks.size();
  char* p = stack;
  if (checks.size() > kStackChecks) {
    heap.resize(size);
    p = heap.data();
  }
  PutScriptNumber(p, now ? *now : -1);
  char* at = p + 8;
  for (const ScriptCheck& c : checks) {
    std::string_view r = c.limit->record();
    std::copy(r.begin(), r.end(), at);
    PutScriptNumber(at + r.size(), std::clamp<int64_t>(c.cost, 0, kMaxScriptCost));
    at += kScriptRecordSize;
  }
  sink(std::string_view(p, size));
}

// Reads the script's reply for out.size() limits: `bytes` must be
// 8 + kScriptReplyRecordSize * out.size() long. Returns false (leaving *now alone) when the
// reply is not one the script gives.
bool ParseScriptReply(std::string_view bytes, std::span<Decision> out, TimeUs* now);
// The same from a RESP reply (a bulk string).
bool ParseScriptReply(const Reply& reply, std::span<Decision> out, TimeUs* now);

}  // namespace sluice::redis

#endif  // SLUICE_STORE_REDIS_SCRIPT_H_
