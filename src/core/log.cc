#include "core/log.h"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <string>

namespace sluice {

void Log(std::string_view level, std::string_view message) {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
  std::string line;
  line.reserve(message.size() + 48);
  line.append(when).append(" ").append(level).append(" ").append(message).append("\n");
  std::fwrite(line.data(), 1, line.size(), stderr);
}

bool LogLimiter::Allow() {
  int64_t now = std::chrono::duration_cast<std::chrono::microseconds>(
                    std::chrono::steady_clock::now().time_since_epoch())
                    .count();
  int64_t next = next_us_.load(std::memory_order_relaxed);
  if (now >= next &&
      next_us_.compare_exchange_strong(next, now + interval_us_, std::memory_order_relaxed)) {
    return true;
  }
  suppressed_.fetch_add(1, std::memory_order_relaxed);
  return false;
}

void LogLimiter::Warn(std::string_view message) {
  if (!Allow()) return;
  const uint64_t more = TakeSuppressed();
  if (more == 0) return Log("WARN", message);
  Log("WARN", std::string(message) + " (and " + std::to_string(more) + " more)");
}

}  // namespace sluice
