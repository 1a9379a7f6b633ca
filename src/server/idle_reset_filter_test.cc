#include "server/idle_reset_filter.h"

#include <gtest/gtest.h>

#include <string>

namespace sluice::server {
namespace {

std::string Frame(uint8_t type, uint32_t stream, std::string payload, uint8_t flags = 0) {
  std::string f;
  f += static_cast<char>(payload.size() >> 16);
  f += static_cast<char>(payload.size() >> 8);
  f += static_cast<char>(payload.size());
  f += static_cast<char>(type);
  f += static_cast<char>(flags);
  f += static_cast<char>(stream >> 24);
  f += static_cast<char>(stream >> 16);
  f += static_cast<char>(stream >> 8);
  f += static_cast<char>(stream);
  return f + payload;
}

const std::string kPreface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const std::string kCancel("\0\0\0\x08", 4);
std::string Headers(uint32_t s) { return Frame(0x1, s, "hpack block", 0x4); }
std::string Data(uint32_t s) { return Frame(0x0, s, std::string(40, 'd'), 0x1); }
std::string Reset(uint32_t s) { return Frame(0x3, s, kCancel); }

// What the filter passes of `in`, fed in pieces of `piece` bytes.
std::string Filtered(IdleResetFilter& f, const std::string& in, size_t piece) {
  std::string out;
  for (size_t at = 0; at < in.size(); at += piece) {
    std::string chunk = in.substr(at, piece);
    EXPECT_TRUE(f.Pass(reinterpret_cast<const uint8_t*>(chunk.data()), chunk.size(),
                       [&](const uint8_t* p, size_t n) {
                         out.append(reinterpret_cast<const char*>(p), n);
                         return true;
                       }));
  }
  return out;
}

TEST(IdleResetFilter, DropsResetsOfStreamsNeverOpenedWhateverTheReadBoundaries) {
  std::string settings = Frame(0x4, 0, "");
  std::string in = kPreface + settings + Headers(1) + Data(1) + Reset(3) + Headers(5) + Data(5) +
                   Reset(5) + Reset(7);
  std::string want = kPreface + settings + Headers(1) + Data(1) + Headers(5) + Data(5) + Reset(5);
  for (size_t piece : {size_t{1}, size_t{2}, size_t{5}, size_t{9}, size_t{10}, size_t{4096}}) {
    IdleResetFilter f;
    EXPECT_EQ(Filtered(f, in, piece), want) << "in pieces of " << piece;
    EXPECT_EQ(f.dropped(), 2u);
  }
}

TEST(IdleResetFilter, PassesResetsOfOpenStreamsAndEveryMalformedOne) {
  std::string in = kPreface + Headers(9) + Reset(9) + Reset(3) +    // opened: 9, 3 closed by it
                   Reset(0) +                                       // stream 0: nghttp2's error
                   Reset(12) +                                      // a server stream id
                   Frame(0x3, 11, std::string("\0\0\0\x08\0", 5));  // wrong length
  IdleResetFilter f;
  EXPECT_EQ(Filtered(f, in, 7), in);
  EXPECT_EQ(f.dropped(), 0u);
}

TEST(IdleResetFilter, SkipsPayloadsThatLookLikeFrames) {
  // A DATA payload holding the bytes of an idle reset is data, not a frame.
  std::string in = kPreface + Frame(0x1, 1, "h", 0x4) + Frame(0x0, 1, Reset(99));
  IdleResetFilter f;
  EXPECT_EQ(Filtered(f, in, 3), in);
  EXPECT_EQ(f.dropped(), 0u);
}

TEST(IdleResetFilter, StopsWhenTheSessionFails) {
  std::string in = kPreface + Headers(1) + Reset(3) + Data(1);
  IdleResetFilter f;
  int feeds = 0;
  EXPECT_FALSE(f.Pass(reinterpret_cast<const uint8_t*>(in.data()), in.size(),
                      [&](const uint8_t*, size_t) { return ++feeds < 1; }));
  EXPECT_EQ(feeds, 1);  // the run before the reset; nothing after it
}

}  // namespace
}  // namespace sluice::server
