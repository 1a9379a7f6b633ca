// ResponseHead: an upstream answer's head read in place, for gateway mode's common case.
//
// Most answers an upstream gives are plain: HTTP/1.1, a final status other than 204 and
// 304, a Content-Length and no Transfer-Encoding. For those the gateway reads the head's
// lines where they lie in the connection's buffer and writes them on to the client as they
// came (less the ones that are not the client's), instead of building Beast's field tree
// for the upstream's head and a second one for the client's. That was a fifth of the
// gateway's instructions per request (docs/design.md).
//
// The parser is strict: it accepts a subset of what Beast's parser accepts, and calls any
// other head "not simple" (interim answers, chunked or unframed bodies, HTTP/1.0, obsolete
// line folding, bytes outside printable ASCII, a repeated Content-Length, a
// Proxy-Connection field, a head longer than kMaxSimpleHead). The gateway then hands the same
// buffered bytes to Beast's parser, which answers them as it always has. fuzz/response_head_fuzz.cc
// checks that on every head this parser accepts, Beast reads the same status, length, keep-alive
// and fields.
//
// Thread-safety: a pure function over bytes the caller owns; the views point into them.
#ifndef SLUICE_SERVER_RESPONSE_HEAD_H_
#define SLUICE_SERVER_RESPONSE_HEAD_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

#include <boost/container/small_vector.hpp>

namespace sluice::server {

struct ResponseHead {
  struct Line {
    std::string_view name;
    std::string_view value;  // without the white space around it
    std::string_view raw;    // the whole line as it came, its CRLF included
  };
  unsigned status = 0;
  std::string_view reason;
  uint64_t content_length = 0;
  bool close = false;  // a Connection header names "close"
  size_t size = 0;     // bytes of the head, its blank line included
  boost::container::small_vector<Line, 12> lines;
  // The field names the Connection headers list, other than close and keep-alive.
  boost::container::small_vector<std::string_view, 2> connection_named;
};

// Longer heads are left to Beast, whose own bound (8 KiB) then decides whether they are
// read at all.
inline constexpr size_t kMaxSimpleHead = 4 * 1024;

enum class HeadParse {
  kIncomplete,  // every line so far is simple, the blank line is yet to come: read more
  kNotSimple,   // leave it to Beast's parser
  kSimple,      // `out` describes the head, which is out.size bytes long
};

HeadParse ParseSimpleResponseHead(std::string_view bytes, ResponseHead& out);

}  // namespace sluice::server

#endif  // SLUICE_SERVER_RESPONSE_HEAD_H_
