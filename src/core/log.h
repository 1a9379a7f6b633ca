// Log: one line per event on stderr, as text ("2026-11-28T01:02:03.456Z WARN message") or,
// for log pipelines, as one JSON object per line ({"time":"...","level":"warn",
// "message":"..."}); and a limiter for events that can repeat thousands of times a second
// (a dead Redis, a flood of bad requests), so a degraded mode is visible without drowning
// the log.
//
// Thread-safety: Log may be called from any thread (one write per line); the format is set
// once at start, before other threads log; LogLimiter is a single atomic.
#ifndef SLUICE_CORE_LOG_H_
#define SLUICE_CORE_LOG_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace sluice {

enum class LogFormat : uint8_t { kText, kJson };

// "text" or "json"; nullopt for anything else.
std::optional<LogFormat> ParseLogFormat(std::string_view name);
void SetLogFormat(LogFormat format);

void Log(std::string_view level, std::string_view message);

// An error that stops the process before it serves (bad flags, a config that does not
// load): the bare message, as a person at a terminal reads it, or in JSON a line at level
// "error", so a log pipeline that parses every line does not lose the one that says why.
void LogFatal(std::string_view message);

// The line Log writes for an event at `when`, newline included. In JSON the level is
// lowercase, and the message is escaped so that any bytes (a Redis reply, a client's path
// quoted in a warning) give valid JSON: control characters as \uXXXX, bytes that are not
// UTF-8 as U+FFFD.
std::string FormatLogLine(LogFormat format, std::chrono::system_clock::time_point when,
                          std::string_view level, std::string_view message);

// Allows one line per interval; Suppressed() says how many were dropped since the last one.
class LogLimiter {
 public:
  explicit LogLimiter(int64_t interval_us = 1'000'000) : interval_us_(interval_us) {}
  // True when a line may be written now (at most one per interval across all threads).
  bool Allow();
  uint64_t TakeSuppressed() { return suppressed_.exchange(0, std::memory_order_relaxed); }
  // Logs `message` at WARN when Allow() does, with " (and N more)" for those suppressed.
  void Warn(std::string_view message);

 private:
  int64_t interval_us_;
  std::atomic<int64_t> next_us_{0};
  std::atomic<uint64_t> suppressed_{0};
};

}  // namespace sluice

#endif  // SLUICE_CORE_LOG_H_
