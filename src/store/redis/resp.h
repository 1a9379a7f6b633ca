// RESP: the Redis serialization protocol (version 2), as Sluice speaks it to Redis.
//
// Commands are written as arrays of bulk strings appended to a caller's buffer, so a
// connection can pipeline many commands into one write. Replies are parsed from a byte
// buffer into a Reply tree; a parse that runs out of bytes says so and consumes nothing, so
// the caller reads more and parses again from the same place. Replies Sluice expects are
// small (arrays of integers, short errors, CLUSTER SLOTS), so re-parsing a partial reply is
// cheaper than keeping parser state. A Reply reused across parses keeps its capacity, so a
// connection's steady state allocates nothing.
//
// Bounds against a hostile or broken peer: nesting depth, array length and string length are
// limited; anything else malformed is a protocol error, never a crash.
//
// Thread-safety: plain functions and values.
#ifndef SLUICE_STORE_REDIS_RESP_H_
#define SLUICE_STORE_REDIS_RESP_H_

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sluice::redis {

// Appends `args` as one command (a RESP array of bulk strings).
void AppendCommand(std::string& out, std::span<const std::string_view> args);
inline void AppendCommand(std::string& out, std::initializer_list<std::string_view> args) {
  AppendCommand(out, std::span<const std::string_view>(args.begin(), args.size()));
}

struct Reply {
  enum class Type : uint8_t { kNil, kInteger, kString, kStatus, kError, kArray };
  Type type = Type::kNil;
  int64_t integer = 0;
  std::string str;              // kString, kStatus, kError
  std::vector<Reply> elements;  // kArray

  bool is_error() const { return type == Type::kError; }
  // "ERR msg" -> true for prefix "ERR"; for MOVED, ASK, NOSCRIPT, ...
  bool ErrorIs(std::string_view prefix) const;
  // A short readable form for logs and test messages.
  std::string ToString() const;
};

enum class ParseStatus { kOk, kIncomplete, kProtocolError };

inline constexpr size_t kMaxReplyDepth = 8;
inline constexpr int64_t kMaxArrayLength = 1 << 20;
inline constexpr int64_t kMaxStringLength = 64 << 20;

// Parses one reply from the front of `buf` into `out`. kOk sets *consumed to its length;
// kIncomplete and kProtocolError leave *consumed at 0.
ParseStatus ParseReply(std::string_view buf, Reply& out, size_t* consumed);

}  // namespace sluice::redis

#endif  // SLUICE_STORE_REDIS_RESP_H_
