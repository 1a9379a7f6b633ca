// IdleResetFilter: takes out of a client's HTTP/2 byte stream the RST_STREAM frames for
// streams the client never opened, before nghttp2 reads it.
//
// HTTP/2 makes a reset of an idle stream a connection error (RFC 9113, 6.4), and nghttp2
// ends the whole connection for it. gRPC's C core (so its C++, Python, Ruby and PHP clients,
// up to at least 1.54) sends exactly that when a call is cancelled between taking its
// stream id and writing its HEADERS (grpc/grpc#19655, #38758): one cancelled call would fail
// every other call on the connection. Such a reset carries no meaning (the stream never
// started, and a later stream's HEADERS closes it implicitly), so dropping it is safe; the
// gRPC C core's own server ignores it too. Everything else, malformed frames included, goes
// to nghttp2 as it came.
//
// The filter follows frame boundaries only: a 9-byte header per frame, the payload skipped.
// It copies nothing except a frame header split across two reads. One per connection; not
// thread-safe.
#ifndef SLUICE_SERVER_IDLE_RESET_FILTER_H_
#define SLUICE_SERVER_IDLE_RESET_FILTER_H_

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace sluice::server {

class IdleResetFilter {
 public:
  // Passes `data[0, n)` on through feed(const uint8_t*, size_t) -> bool, in order, in one
  // or more runs, leaving out the idle streams' resets. Returns false as soon as a feed
  // does (the session failed); the rest is not passed.
  template <typename Feed>
  bool Pass(const uint8_t* data, size_t n, Feed&& feed);

  uint64_t dropped() const { return dropped_; }

 private:
  static constexpr size_t kHeader = 9;
  static constexpr size_t kPreface = 24;  // "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
  static constexpr uint8_t kHeaders = 0x1, kRstStream = 0x3;

  // Reads a whole frame header: whether its frame is dropped; sets the payload to skip.
  bool Drop(const uint8_t* h) {
    payload_left_ = (size_t{h[0]} << 16) | (size_t{h[1]} << 8) | h[2];
    uint32_t stream =
        ((uint32_t{h[5]} & 0x7f) << 24) | (uint32_t{h[6]} << 16) | (uint32_t{h[7]} << 8) | h[8];
    if (h[3] == kHeaders) {
      highest_opened_ = std::max(highest_opened_, stream);
      return false;
    }
    // Only a well-formed reset of a client stream: nghttp2 judges anything else.
    bool idle_reset =
        h[3] == kRstStream && payload_left_ == 4 && (stream & 1) != 0 && stream > highest_opened_;
    if (idle_reset) ++dropped_;
    return idle_reset;
  }

  size_t preface_left_ = kPreface;
  std::array<uint8_t, kHeader> header_{};
  size_t header_have_ = 0;   // bytes of a frame header split across reads
  size_t payload_left_ = 0;  // of the current frame
  bool dropping_ = false;    // the current frame's payload
  uint32_t highest_opened_ = 0;
  uint64_t dropped_ = 0;
};

template <typename Feed>
bool IdleResetFilter::Pass(const uint8_t* data, size_t n, Feed&& feed) {
  size_t i = 0, run = 0;  // data[run, i) is passed, not yet fed
  auto flush = [&] {
    bool ok = run == i || feed(data + run, i - run);
    run = i;
    return ok;
  };
  while (i < n) {
    if (preface_left_ > 0) {
      size_t k = std::min(preface_left_, n - i);
      preface_left_ -= k;
      i += k;
    } else if (payload_left_ > 0) {
      size_t k = std::min(payload_left_, n - i);
      payload_left_ -= k;
      if (dropping_) {
        if (!flush()) return false;
        run = i + k;
      }
      i += k;
    } else if (header_have_ == 0 && n - i >= kHeader) {
      dropping_ = Drop(data + i);
      if (dropping_) {
        if (!flush()) return false;
        run = i + kHeader;
      }
      i += kHeader;
    } else {  // a header split across reads: gathered, then fed from here if passed
      if (!flush()) return false;
      size_t k = std::min(kHeader - header_have_, n - i);
      std::memcpy(header_.data() + header_have_, data + i, k);
      header_have_ += k;
      i += k;
      run = i;
      if (header_have_ == kHeader) {
        header_have_ = 0;
        dropping_ = Drop(header_.data());
        if (!dropping_ && !feed(header_.data(), kHeader)) return false;
      }
    }
  }
  return flush();
}

}  // namespace sluice::server

#endif  // SLUICE_SERVER_IDLE_RESET_FILTER_H_
