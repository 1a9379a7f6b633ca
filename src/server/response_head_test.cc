// ResponseHead: which upstream heads the gateway reads in place, and what it reads.
#include "server/response_head.h"

#include <gtest/gtest.h>

#include <string>

namespace sluice::server {
namespace {

TEST(ResponseHeadTest, APlainAnswerIsReadInPlace) {
  const std::string bytes =
      "HTTP/1.1 200 OK\r\nServer: up\r\nContent-Length:  2 \r\nSet-Cookie: a=1\r\n"
      "Set-Cookie: b=2\r\nConnection: keep-alive, X-Hop\r\n\r\nok";
  ResponseHead head;
  ASSERT_EQ(ParseSimpleResponseHead(bytes, head), HeadParse::kSimple);
  EXPECT_EQ(head.status, 200u);
  EXPECT_EQ(head.reason, "OK");
  EXPECT_EQ(head.content_length, 2u);
  EXPECT_FALSE(head.close);
  EXPECT_EQ(head.size, bytes.size() - 2);
  ASSERT_EQ(head.lines.size(), 5u);
  EXPECT_EQ(head.lines[1].name, "Content-Length");
  EXPECT_EQ(head.lines[1].value, "2");
  EXPECT_EQ(head.lines[1].raw, "Content-Length:  2 \r\n");
  EXPECT_EQ(head.lines[3].value, "b=2");  // a repeated field is kept, in order
  ASSERT_EQ(head.connection_named.size(), 1u);
  EXPECT_EQ(head.connection_named[0], "X-Hop");
}

TEST(ResponseHeadTest, ConnectionCloseIsSeenInAnyCase) {
  ResponseHead head;
  ASSERT_EQ(ParseSimpleResponseHead("HTTP/1.1 503 Busy\r\nconnection: CLOSE\r\n"
                                    "Content-Length: 0\r\n\r\n",
                                    head),
            HeadParse::kSimple);
  EXPECT_TRUE(head.close);
  EXPECT_EQ(head.status, 503u);
}

TEST(ResponseHeadTest, AHeadNotYetWholeAsksForMore) {
  const std::string bytes = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
  ResponseHead head;
  for (size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_EQ(ParseSimpleResponseHead(bytes.substr(0, n), head), HeadParse::kIncomplete) << n;
  }
  EXPECT_EQ(ParseSimpleResponseHead(bytes, head), HeadParse::kSimple);
}

// Each of these is Beast's to read: the gateway hands it the same bytes.
TEST(ResponseHeadTest, AnythingButThePlainCaseIsLeftToBeast) {
  const char* const kHeads[] = {
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",  // chunked
      "HTTP/1.1 200 OK\r\nServer: up\r\n\r\n",                  // delimited by the close
      "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",           // HTTP/1.0
      "HTTP/1.1 100 Continue\r\n\r\n",                          // interim
      "HTTP/1.1 101 Switching Protocols\r\nContent-Length: 0\r\n\r\n",
      "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",  // no body whatever it says
      "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",  // repeated
      "HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-A: 1\r\n folded\r\n\r\n",  // obs-fold
      "HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\n",                     // space before the colon
      "HTTP/1.1 200 OK\nContent-Length: 1\n\n",                            // bare LF
      "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-A: caf\xc3\xa9\r\n\r\n",  // not ASCII
      "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: a b\r\n\r\n",   // not a token
      "HTTP/1.1 200\r\nContent-Length: 1\r\n\r\n",  // no space after the status
      "HTTP/1.1 2000 OK\r\nContent-Length: 1\r\n\r\n",
      // Beast reads it as a Connection field (its close, and a list to validate).
      "HTTP/1.1 200 OK\r\nProxy-Connection: close\r\nContent-Length: 1\r\n\r\n",
  };
  for (const char* bytes : kHeads) {
    ResponseHead head;
    EXPECT_EQ(ParseSimpleResponseHead(bytes, head), HeadParse::kNotSimple) << bytes;
  }
}

TEST(ResponseHeadTest, ALongHeadIsLeftToBeast) {
  std::string bytes = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Big: ";
  bytes.append(kMaxSimpleHead, 'x');
  ResponseHead head;
  EXPECT_EQ(ParseSimpleResponseHead(bytes, head), HeadParse::kNotSimple);  // not even whole
  bytes += "\r\n\r\n";
  EXPECT_EQ(ParseSimpleResponseHead(bytes, head), HeadParse::kNotSimple);
}

}  // namespace
}  // namespace sluice::server
