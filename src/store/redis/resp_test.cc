#include "store/redis/resp.h"

#include <gtest/gtest.h>

namespace sluice::redis {
namespace {

TEST(Resp, CommandIsAnArrayOfBulkStrings) {
  std::string out;
  AppendCommand(out, {"EVALSHA", "abc", "1", ""});
  EXPECT_EQ(out, "*4\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n$0\r\n\r\n");
}

TEST(Resp, ParsesEveryType) {
  std::string buf =
      "*6\r\n:-42\r\n$5\r\nhe\r\no\r\n+OK\r\n-NOSCRIPT No matching\r\n$-1\r\n*1\r\n:1\r\n";
  Reply r;
  size_t used = 0;
  ASSERT_EQ(ParseReply(buf, r, &used), ParseStatus::kOk);
  EXPECT_EQ(used, buf.size());
  ASSERT_EQ(r.type, Reply::Type::kArray);
  ASSERT_EQ(r.elements.size(), 6u);
  EXPECT_EQ(r.elements[0].integer, -42);
  EXPECT_EQ(r.elements[1].str, "he\r\no");  // bulk strings are binary-safe
  EXPECT_EQ(r.elements[2].type, Reply::Type::kStatus);
  EXPECT_TRUE(r.elements[3].ErrorIs("NOSCRIPT"));
  EXPECT_FALSE(r.elements[3].ErrorIs("NOSCRIP"));
  EXPECT_EQ(r.elements[4].type, Reply::Type::kNil);
  EXPECT_EQ(r.elements[5].elements[0].integer, 1);
}

TEST(Resp, EveryPrefixOfAReplyIsIncompleteAndConsumesNothing) {
  std::string buf = "*3\r\n:1\r\n$3\r\nabc\r\n*2\r\n+x\r\n-ERR y\r\n";
  for (size_t n = 0; n < buf.size(); ++n) {
    Reply r;
    size_t used = 7;
    EXPECT_EQ(ParseReply(std::string_view(buf).substr(0, n), r, &used), ParseStatus::kIncomplete)
        << n;
    EXPECT_EQ(used, 0u);
  }
}

// A peer announcing arrays of a million elements in a few bytes must not have memory for
// them: what is allocated follows the bytes received.
TEST(Resp, AnAnnouncedLengthAllocatesNothingBeforeItsElementsCome) {
  std::string buf;
  for (int i = 0; i < 8; ++i) buf += "*1048576\r\n";
  Reply r;
  size_t used = 0;
  EXPECT_EQ(ParseReply(buf, r, &used), ParseStatus::kIncomplete);
  EXPECT_EQ(r.elements.capacity(), 0u);
  EXPECT_EQ(used, 0u);
}

TEST(Resp, PipelinedRepliesParseOneAtATime) {
  std::string buf = ":1\r\n:2\r\n";
  Reply r;
  size_t used = 0;
  ASSERT_EQ(ParseReply(buf, r, &used), ParseStatus::kOk);
  EXPECT_EQ(used, 4u);
  EXPECT_EQ(r.integer, 1);
  ASSERT_EQ(ParseReply(std::string_view(buf).substr(used), r, &used), ParseStatus::kOk);
  EXPECT_EQ(r.integer, 2);
}

TEST(Resp, MalformedInputIsAProtocolError) {
  for (std::string bad : {"?x\r\n", ":12a\r\n", ":\r\n", "$5\r\nabcdefg\r\n", "$-2\r\n", "*-5\r\n",
                          "+a\rb\r\n", "$99999999999\r\n", "*2000000\r\n"}) {
    Reply r;
    size_t used = 0;
    EXPECT_EQ(ParseReply(bad, r, &used), ParseStatus::kProtocolError) << bad;
  }
  std::string deep(kMaxReplyDepth + 2, '*');
  std::string nested;
  for (size_t i = 0; i < kMaxReplyDepth + 2; ++i) nested += "*1\r\n";
  nested += ":1\r\n";
  Reply r;
  size_t used = 0;
  EXPECT_EQ(ParseReply(nested, r, &used), ParseStatus::kProtocolError);
}

}  // namespace
}  // namespace sluice::redis
