#include "server/body_piece.h"

#include <gtest/gtest.h>

#include <cstdint>

namespace sluice::server {
namespace {

TEST(BareLineFeedTest, AnLfWithoutItsCrEndsALineBadly) {
  EXPECT_TRUE(BareLineFeed("5\n", SIZE_MAX));
  EXPECT_TRUE(BareLineFeed("\n", SIZE_MAX));
  EXPECT_TRUE(BareLineFeed("5;a=b\r\nX-T: 1\n", SIZE_MAX));  // a trailer's line
  EXPECT_FALSE(BareLineFeed("5;a=b", SIZE_MAX));             // not ended yet
  EXPECT_FALSE(BareLineFeed("\r\n5;a=b\r", SIZE_MAX));       // its LF may come next
  EXPECT_FALSE(BareLineFeed("0\r\nX-T: 1\r\n", SIZE_MAX));
}

TEST(BareLineFeedTest, OnlyTheFreshBytesAreLookedAtWithTheOneBeforeThem) {
  // A CR that came with the last read and its LF with this one: one line end.
  EXPECT_FALSE(BareLineFeed("5;a=b\r\n", 1));
  // An LF looked at before is not looked at again (a line sent a byte at a time).
  EXPECT_FALSE(BareLineFeed("5\nabc", 3));
  EXPECT_TRUE(BareLineFeed("5\nabc", 4));
  EXPECT_TRUE(BareLineFeed("5\n", 1));
  EXPECT_FALSE(BareLineFeed("", 10));
}

}  // namespace
}  // namespace sluice::server
