#include "core/log.h"

#include <gtest/gtest.h>

#include <chrono>

namespace sluice {
namespace {

// 2026-11-28T01:02:03.456Z
const std::chrono::system_clock::time_point kWhen{std::chrono::milliseconds(1'795'827'723'456)};

TEST(LogTest, TextLineIsTimeLevelAndMessage) {
  EXPECT_EQ(FormatLogLine(LogFormat::kText, kWhen, "WARN", "redis 127.0.0.1:6379 answered x"),
            "2026-11-28T01:02:03.456Z WARN redis 127.0.0.1:6379 answered x\n");
}

TEST(LogTest, MillisecondsArePaddedToThreeDigits) {
  const auto when = std::chrono::system_clock::time_point(std::chrono::milliseconds(7));
  EXPECT_EQ(FormatLogLine(LogFormat::kText, when, "INFO", "m"),
            "1970-01-01T00:00:00.007Z INFO m\n");
}

TEST(LogTest, JsonLineIsOneObjectWithALowercaseLevel) {
  EXPECT_EQ(FormatLogLine(LogFormat::kJson, kWhen, "WARN", "reload failed"),
            R"({"time":"2026-11-28T01:02:03.456Z","level":"warn","message":"reload failed"})"
            "\n");
}

TEST(LogTest, JsonEscapesWhatJsonCannotHoldAsItIs) {
  EXPECT_EQ(
      FormatLogLine(LogFormat::kJson, kWhen, "ERROR", "a \"quoted\" \\ line\nnext\tx\x01\x7f"),
      R"({"time":"2026-11-28T01:02:03.456Z","level":"error",)"
      R"("message":"a \"quoted\" \\ line\nnext\tx\u0001\u007f"})"
      "\n");
}

TEST(LogTest, JsonKeepsUtf8AndReplacesBytesThatAreNot) {
  // Kept: 2-, 3- and 4-byte characters. Replaced, one U+FFFD per byte that begins no
  // character: a stray continuation byte, 0xFF, an overlong '/', a surrogate, a character
  // past U+10FFFF, and a sequence cut off by the end of the message.
  const std::string kept = "\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80";
  const std::string fffd = "\xEF\xBF\xBD";
  const std::string line =
      FormatLogLine(LogFormat::kJson, kWhen, "WARN",
                    kept + "|\x80|\xFF|\xC0\xAF|\xED\xA0\x80|\xF4\x90\x80\x80|\xE2\x82");
  EXPECT_EQ(line, R"({"time":"2026-11-28T01:02:03.456Z","level":"warn","message":")" + kept + "|" +
                      fffd + "|" + fffd + "|" + fffd + fffd + "|" + fffd + fffd + fffd + "|" +
                      fffd + fffd + fffd + fffd + "|" + fffd + fffd + "\"}\n");
}

TEST(LogTest, FormatsAreNamedTextAndJson) {
  EXPECT_EQ(ParseLogFormat("text"), LogFormat::kText);
  EXPECT_EQ(ParseLogFormat("json"), LogFormat::kJson);
  EXPECT_EQ(ParseLogFormat("JSON"), std::nullopt);
  EXPECT_EQ(ParseLogFormat(""), std::nullopt);
}

}  // namespace
}  // namespace sluice
