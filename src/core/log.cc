#include "core/log.h"

#include <cstdio>
#include <ctime>
#include <string>

namespace sluice {
namespace {

std::atomic<LogFormat> g_format{LogFormat::kText};

// RFC 3339 in UTC with milliseconds: lines of one second stay in order across processes.
void AppendTime(std::string& out, std::chrono::system_clock::time_point when) {
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(when.time_since_epoch());
  const std::time_t t = static_cast<std::time_t>(ms.count() / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);  // std::gmtime's one static result would race between threads
  char text[40];
  const size_t n = std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S", &tm);
  std::snprintf(text + n, sizeof text - n, ".%03dZ", static_cast<int>(ms.count() % 1000));
  out.append(text);
}

// Length of the well-formed UTF-8 sequence at s[i] (RFC 3629: no overlongs, no surrogates,
// nothing past U+10FFFF), or 0.
size_t Utf8Length(std::string_view s, size_t i) {
  const auto at = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = at(i);
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (i + n > s.size() || at(i + 1) < lo || at(i + 1) > hi) return 0;
  for (size_t k = 2; k < n; ++k) {
    if (at(i + k) < 0x80 || at(i + k) > 0xBF) return 0;
  }
  return n;
}

void AppendJsonString(std::string& out, std::string_view s) {
  out.push_back('"');
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      const size_t n = Utf8Length(s, i);
      if (n == 0) {
        out.append("\xEF\xBF\xBD");  // U+FFFD for the byte that begins no character
        ++i;
      } else {
        out.append(s.substr(i, n));
        i += n;
      }
      continue;
    }
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(static_cast<char>(c));
    } else if (c == '\n') {
      out.append("\\n");
    } else if (c == '\t') {
      out.append("\\t");
    } else if (c < 0x20 || c == 0x7F) {
      char esc[8];
      std::snprintf(esc, sizeof esc, "\\u%04x", c);
      out.append(esc);
    } else {
      out.push_back(static_cast<char>(c));
    }
    ++i;
  }
  out.push_back('"');
}

}  // namespace

std::optional<LogFormat> ParseLogFormat(std::string_view name) {
  if (name == "text") return LogFormat::kText;
  if (name == "json") return LogFormat::kJson;
  return std::nullopt;
}

void SetLogFormat(LogFormat format) { g_format.store(format, std::memory_order_relaxed); }

std::string FormatLogLine(LogFormat format, std::chrono::system_clock::time_point when,
                          std::string_view level, std::string_view message) {
  std::string line;
  line.reserve(message.size() + 64);
  if (format == LogFormat::kText) {
    AppendTime(line, when);
    line.append(" ").append(level).append(" ").append(message).append("\n");
    return line;
  }
  line.append("{\"time\":\"");
  AppendTime(line, when);
  line.append("\",\"level\":\"");
  for (char c : level) {
    line.push_back(c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c);
  }
  line.append("\",\"message\":");
  AppendJsonString(line, message);
  line.append("}\n");
  return line;
}

void Log(std::string_view level, std::string_view message) {
  const std::string line = FormatLogLine(g_format.load(std::memory_order_relaxed),
                                         std::chrono::system_clock::now(), level, message);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

void LogFatal(std::string_view message) {
  if (g_format.load(std::memory_order_relaxed) == LogFormat::kJson) return Log("ERROR", message);
  std::string line(message);
  line.push_back('\n');
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
