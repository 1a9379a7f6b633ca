// Reading a streamed body one piece at a time, in both directions (a client's upload, an
// upstream's answer), into the parser's buffer_body.
//
// Beast's http::async_read_some does not serve here: it reads on while the parser asks for
// more, even once the body has bytes. An eager parse of "5\r\nhello\r\n" takes the chunk and
// then asks for more to read the next chunk's line, so the chunk would wait for the next
// one: a server that sends a chunk and then thinks would have its chunk held back.
// AsyncReadBodyPiece hands over what a read brought as soon as the parser has put any of it
// into the body. Not thread-safe: one read at a time per connection, on its strand.
#ifndef SLUICE_SERVER_BODY_PIECE_H_
#define SLUICE_SERVER_BODY_PIECE_H_

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <utility>

#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <boost/assert.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/read_size.hpp>
#include <boost/beast/http/error.hpp>

namespace sluice::server {

// Whether the last `fresh` bytes of `unparsed` (what the parser of a chunked body left in
// the buffer while it waits for the rest of a chunk's line, a chunk's closing CRLF or the
// trailers) hold a line ended by a bare LF. RFC 9112 7.1 ends each of those lines with
// CRLF; Beast's parser passes over a lone LF looking for one, so a client that sends
// "5\nhello\n0\n\n" would be held, unanswered, until its read deadline. Chunk data never
// waits in the buffer (the parser takes it into the body as it comes), so every LF there
// ends a line of framing. Only the bytes a read just brought are looked at, and the one
// before them (a CR read before its LF): a line sent a byte at a time costs one look each.
inline bool BareLineFeed(std::string_view unparsed, size_t fresh) {
  const size_t from = unparsed.size() > fresh ? unparsed.size() - fresh : 0;
  for (size_t i = unparsed.find('\n', from); i != std::string_view::npos;
       i = unparsed.find('\n', i + 1)) {
    if (i == 0 || unparsed[i - 1] != '\r') return true;
  }
  return false;
}

// The buffer's bytes, as text.
inline std::string_view Unparsed(const boost::beast::flat_buffer& buffer) {
  return {static_cast<const char*>(buffer.data().data()), buffer.size()};
}

// Parses what `buffer` holds, then reads from `stream` only while that put nothing into the
// body. Calls `done(ec)` once the body has bytes (the caller reads how many from the
// buffer_body's remaining size), or the message is done, or on an error (the stream's, or
// the parser's; a message cut short by the stream's end is http::error::partial_message).
// `stream`, `buffer` and `parser` must outlive the call; `done` keeps their owner alive.
// `inline_done`: whether `done` may run within this call (from a completion handler);
// otherwise it is posted, as an asynchronous operation's first completion must be.
// `fresh`: how many of the buffer's bytes the last read brought (all, on a first call).
// The parser must be eager: a lazy one leaves chunk data in the buffer after a chunk's
// line, where an LF is data, not framing. A chunked
// body's line ended by a bare LF is http::error::bad_line_ending (BareLineFeed).
template <class Stream, class Parser, class Done>
void AsyncReadBodyPiece(Stream& stream, boost::beast::flat_buffer& buffer, Parser& parser,
                        Done&& done, bool inline_done = false, size_t fresh = SIZE_MAX) {
  namespace http = boost::beast::http;
  BOOST_ASSERT(parser.eager());
  if (buffer.size() > 0) {
    const size_t room_before = parser.get().body().size;
    boost::beast::error_code ec;
    buffer.consume(parser.put(buffer.data(), ec));
    if (ec == http::error::need_buffer) ec = {};  // the piece is full
    const bool got = parser.get().body().size != room_before;
    if (ec == http::error::need_more) {
      if (got) ec = {};  // the rest of the framing comes with the next piece
    } else if (!ec && !got && !parser.is_done()) {
      ec = http::error::need_more;  // framing only (a chunk's line): read on
    }
    if (ec == http::error::need_more && parser.chunked() && BareLineFeed(Unparsed(buffer), fresh)) {
      ec = http::error::bad_line_ending;
    }
    if (ec != http::error::need_more) {
      if (inline_done) return done(ec);
      return boost::asio::post(stream.get_executor(),
                               [done = std::forward<Done>(done), ec]() mutable { done(ec); });
    }
  }
  // As Beast's own reads: the buffer's room, at least 512 bytes and at most 64 KiB.
  const size_t room = boost::beast::read_size(buffer, 65536);
  if (room == 0) {  // a chunk line longer than the buffer may hold
    boost::beast::error_code ec = http::error::buffer_overflow;
    if (inline_done) return done(ec);
    return boost::asio::post(stream.get_executor(),
                             [done = std::forward<Done>(done), ec]() mutable { done(ec); });
  }
  stream.async_read_some(buffer.prepare(room),
                         [&stream, &buffer, &parser, done = std::forward<Done>(done)](
                             boost::beast::error_code ec, size_t n) mutable {
                           buffer.commit(n);
                           if (ec == boost::asio::error::eof) {
                             // The stream's end ends a body it delimits; any other is cut short.
                             ec = {};
                             parser.put_eof(ec);
                             return done(ec);
                           }
                           if (ec) return done(ec);
                           AsyncReadBodyPiece(stream, buffer, parser, std::move(done), true, n);
                         });
}

}  // namespace sluice::server

#endif  // SLUICE_SERVER_BODY_PIECE_H_
