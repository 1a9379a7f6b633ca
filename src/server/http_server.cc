#include "server/http_server.h"

#include "server/body_piece.h"
#include "server/peer_connections.h"
#include "server/wire.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <ctime>
#include <list>
#include <mutex>
#include <optional>
#include <string_view>
#include <utility>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/buffer_body.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/rfc7230.hpp>
#include <boost/beast/http/write.hpp>

namespace sluice::server {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

class Session;

// What connections share with the server: the options, the drain flag, and per-worker lists
// of open connections (touched only by that worker's thread).
struct ServerState {
  explicit ServerState(HttpOptions o) : options(std::move(o)) {}
  HttpOptions options;
  std::atomic<bool> draining{false};
  std::atomic<size_t> connections{0};                       // on every listener
  std::vector<std::list<std::weak_ptr<Session>>> sessions;  // per worker
  // Per worker, the bytes its connections' bodies read whole may take (HttpOptions::
  // max_buffered_body_bytes); each written only on its worker's thread.
  struct alignas(64) BodyBudget {
    size_t held = 0;
  };
  std::vector<BodyBudget> body_budget;  // per worker
  size_t body_budget_per_worker = 0;
};

// The connection bounds of one listening address, shared by its workers' acceptors: each
// listener has its own, so clients holding the public port's slots cannot take the admin
// port's away (its /healthz and /metrics stay reachable).
struct ListenerBounds {
  ListenerBounds(const HttpOptions& o, size_t workers, bool reserve)
      : per_peer(o.max_connections_per_peer), spares(reserve ? workers : 0, -1) {
    for (size_t w = 0; w < spares.size(); ++w) TakeSpare(w);
  }
  ~ListenerBounds() {
    for (int fd : spares) {
      if (fd >= 0) ::close(fd);
    }
  }
  std::atomic<size_t> connections{0};
  PeerConnections per_peer;

  // The descriptors held in reserve, one per worker (each touched only by its thread), for
  // a listener that must answer when the process is out of them (the admin port: /metrics
  // and the probes). Empty when not reserving.
  std::vector<int> spares;
  void TakeSpare(size_t worker) {
    if (worker < spares.size() && spares[worker] < 0) {
      spares[worker] = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    }
  }
  bool HasSpare(size_t worker) const { return worker < spares.size() && spares[worker] >= 0; }
  // Gives up the worker's reserve descriptor; false when it holds none.
  bool GiveSpare(size_t worker) {
    if (!HasSpare(worker)) return false;
    ::close(spares[worker]);
    spares[worker] = -1;
    return true;
  }
};

namespace {

// Deadlines are checked by one coarse timer per worker (every kTick) instead of a timer per
// socket operation: arming and cancelling a timer on every read and write showed up in
// profiles, and a rate limiter's timeouts need no finer grain than this.
constexpr auto kTick = std::chrono::milliseconds(250);
thread_local std::chrono::steady_clock::time_point t_coarse_now = std::chrono::steady_clock::now();

}  // namespace

namespace {

thread_local asio::io_context* t_worker_context = nullptr;

// The body's "error" is the status as a snake_case token ("bad_request",
// "request_header_fields_too_large"), as every other error of Sluice's is written.
void JsonError(HttpResponse& res, http::status status, std::string_view message) {
  res.result(status);
  res.set(http::field::content_type, "application/json");
  std::string token;
  for (char c : http::obsolete_reason(status)) {
    token += c == ' ' || c == '-' ? '_' : static_cast<char>(c >= 'A' && c <= 'Z' ? c + 32 : c);
  }
  res.body() = "{\"error\":\"" + token + "\",\"message\":\"" + std::string(message) + "\"}";
}

}  // namespace

asio::io_context& WorkerContext() { return *t_worker_context; }
asio::io_context* CurrentWorkerContext() { return t_worker_context; }

std::optional<uint64_t> AnnouncedLength(const http::fields& fields) {
  auto it = fields.find(http::field::content_length);
  if (it == fields.end()) return std::nullopt;
  uint64_t length = 0;
  auto v = it->value();
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), length);
  if (ec != std::errc() || end != v.data() + v.size()) return std::nullopt;
  return length;
}

void LimitRequestParser(HttpRequestParser& parser, const HttpOptions& options) {
  parser.header_limit(static_cast<uint32_t>(options.max_header_bytes));
  parser.body_limit(options.max_body_bytes);
}

// What a client is told of a request Beast's parser refused.
std::string Malformed(beast::error_code ec) {
  // Beast's words for a line ended by a bare LF (body_piece.h's BareLineFeed) or a CR
  // followed by something else.
  if (ec == http::error::bad_line_ending)
    return "malformed HTTP request: a line must end with CRLF";
  return "malformed HTTP request: " + ec.message();
}

void RejectUnparsedRequest(HttpResponse& res, beast::error_code ec, bool line_parsed) {
  if (ec == http::error::header_limit) {
    // RFC 9112 3: a request line longer than the server parses is answered 414.
    if (!line_parsed) {
      JsonError(res, http::status::uri_too_long, "request target too long");
    } else {
      JsonError(res, http::status::request_header_fields_too_large, "request header too large");
    }
  } else if (ec == http::error::buffer_overflow) {
    JsonError(res, http::status::bad_request, "a chunk line or the trailers are too long");
  } else if (ec == http::error::body_limit) {
    JsonError(res, http::status::payload_too_large, "request body too large");
  } else {
    JsonError(res, http::status::bad_request, Malformed(ec));
  }
}

// Whether the client's connection persists after this request (RFC 9112 9.3), reading
// every Connection line as one list (RFC 9110 5.3): Beast reads only the first, so
// "Connection: keep-alive" then "Connection: close" kept the connection open.
static bool KeepAlive(const HttpRequest& req) {
  bool close = false, keep_alive = false;
  auto [begin, end] = req.equal_range(http::field::connection);
  for (auto it = begin; it != end; ++it) {
    for (auto token : http::token_list(it->value())) {
      close = close || beast::iequals(token, "close");
      keep_alive = keep_alive || beast::iequals(token, "keep-alive");
    }
  }
  if (close) return false;
  return req.version() >= 11 || keep_alive;
}

bool ContentLengthIsPlain(const http::fields& fields) {
  auto [begin, end] = fields.equal_range(http::field::content_length);
  if (begin == end) return true;
  if (std::next(begin) != end) return false;
  std::string_view v = begin->value();
  return !v.empty() && std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// RFC 9112 6.1 and 6.3: a request with Transfer-Encoding is framed by chunks only when
// chunked is its final coding; otherwise where its body ends cannot be known (400). Sluice,
// as nginx, decodes no other coding (501). Either way the connection is closed after the
// answer, so no byte after such a head is read as a request, by Sluice or by an upstream
// that would frame it differently.
std::optional<std::pair<http::status, std::string_view>> TransferEncodingFault(
    const http::fields& fields, bool chunked) {
  auto [begin, end] = fields.equal_range(http::field::transfer_encoding);
  if (begin == end) return std::nullopt;
  if (!chunked) {
    // Beast reads a chunked coding named twice ("chunked, chunked") as not chunked: RFC 9112
    // 6.1 forbids it, and the client is told that rather than that it must end with it.
    std::string_view last;
    int chunked_named = 0;
    for (auto it = begin; it != end; ++it) {
      for (auto coding : http::token_list(it->value())) {
        last = std::string_view(coding.data(), coding.size());
        chunked_named += beast::iequals(last, "chunked") ? 1 : 0;
      }
    }
    if (chunked_named > 1 && beast::iequals(last, "chunked")) {
      return std::pair{http::status::bad_request,
                       std::string_view("Transfer-Encoding names chunked more than once")};
    }
    return std::pair{http::status::bad_request,
                     std::string_view("Transfer-Encoding must end with chunked")};
  }
  size_t codings = 0;
  for (auto it = begin; it != end; ++it) {
    for (auto coding : http::token_list(it->value())) {
      (void)coding;
      ++codings;
    }
  }
  if (codings != 1) {
    return std::pair{http::status::not_implemented,
                     std::string_view("no transfer coding but chunked is supported")};
  }
  return std::nullopt;
}

std::optional<std::string_view> ToOriginForm(HttpRequest& req) {
  std::string_view target = req.target();
  size_t scheme_end = target.find("://");
  if (scheme_end == std::string_view::npos) return std::nullopt;
  std::string_view scheme = target.substr(0, scheme_end);
  if (!beast::iequals(scheme, "http") && !beast::iequals(scheme, "https")) return std::nullopt;
  std::string_view rest = target.substr(scheme_end + 3);
  size_t end = rest.find_first_of("/?#");
  std::string_view authority = rest.substr(0, end);
  if (authority.empty()) return "an absolute request target must name a host";
  // "http://user@host/" is deprecated, and a source of confusion over which host is meant
  // (RFC 9110 4.2.4).
  if (authority.find('@') != std::string_view::npos) {
    return "a request target must not carry user information";
  }
  std::string host(authority);
  std::string path;
  if (end == std::string_view::npos || rest[end] != '/') path = "/";
  if (end != std::string_view::npos) path += rest.substr(end);
  req.erase(http::field::host);
  req.set(http::field::host, host);
  req.target(path);
  return std::nullopt;
}

// "Date: <IMF-fixdate>\r\n" for this second (RFC 9110 6.6.1: an origin server with a
// clock sends Date; it also lets a client whose clock is off read X-RateLimit-Reset, an
// epoch time). Formatted once a second per thread, by hand: strftime's names follow the
// locale.
std::string_view DateLine() {
  thread_local time_t second = -1;
  thread_local std::array<char, 48> line{};
  thread_local size_t length = 0;
  const time_t now = ::time(nullptr);
  if (now != second) {
    second = now;
    struct tm t;
    gmtime_r(&now, &t);
    static constexpr const char* kDays[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static constexpr const char* kMonths[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                              "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    int n = std::snprintf(line.data(), line.size(), "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
                          kDays[t.tm_wday], t.tm_mday, kMonths[t.tm_mon], t.tm_year + 1900,
                          t.tm_hour, t.tm_min, t.tm_sec);
    length = n > 0 ? static_cast<size_t>(n) : 0;
  }
  return {line.data(), length};
}

// One contiguous buffer in a string the connection reuses: for the small answers Sluice
// gives this is several times cheaper than walking Beast's serializer's buffer sequence,
// and it goes out in one send.
void SerializeResponse(const HttpResponse& res, bool head, std::string& out) {
  out.clear();
  out += res.version() == 10 ? "HTTP/1.0 " : "HTTP/1.1 ";
  char code[8];
  auto [end, ec] = std::to_chars(code, code + sizeof code, res.result_int());
  out.append(code, end);
  out += ' ';
  // Beast reads an empty reason as the usual one for the code: for a code without one (an
  // upstream's "299 "), that is "<unknown-status>", which is written empty instead.
  if (http::int_to_status(res.result_int()) != http::status::unknown ||
      res.reason() != http::obsolete_reason(res.result())) {
    out += res.reason();
  }
  out += "\r\n";
  // An upstream's answer keeps its own Date.
  if (res.find(http::field::date) == res.end() && !RenderedHas(res.rendered_fields, "date")) {
    out += DateLine();
  }
  AppendHeaderLines(out, res, res.rendered_fields);
  if (!head) out += res.body();  // a HEAD answer has the length but not the body
}

// Pieces of a streamed request body are read into a buffer of this size.
constexpr size_t kUploadPiece = 64 * 1024;
// What a connection's buffers may keep between requests.
constexpr size_t kIdleBytes = 16 * 1024;
// A connection reads up to this much past its head bound ahead of the parser.
constexpr size_t kReadAhead = 64 * 1024;
// The read buffer's room while a body is streamed (a few pieces of a chunked body per read).
constexpr size_t kStreamedReadRoom = 64 * 1024;

class Session : public std::enable_shared_from_this<Session> {
 public:
  // `peer_key`: counted in bounds->per_peer for this connection (released with it).
  Session(tcp::socket socket, Handler& handler, std::shared_ptr<ServerState> state, size_t worker,
          std::shared_ptr<ListenerBounds> bounds, std::optional<uint64_t> peer_key)
      : socket_(std::move(socket)),
        // Bytes read and not yet parsed: a head (bounded by the parser), and past it a chunk
        // line or trailer section, which Beast's parser holds whole until it ends and bounds
        // by nothing. Bounded here, a chunk extension or trailer sent without end is refused
        // (400) instead of held: 517 MB in 3 s from one client before.
        buffer_(state->options.max_header_bytes + kReadAhead),
        handler_(handler),
        state_(std::move(state)),
        worker_(worker),
        bounds_(std::move(bounds)),
        peer_key_(peer_key) {
    state_->connections.fetch_add(1, std::memory_order_relaxed);
    bounds_->connections.fetch_add(1, std::memory_order_relaxed);
  }
  ~Session() {
    ReleaseBody();
    state_->connections.fetch_sub(1, std::memory_order_relaxed);
    bounds_->connections.fetch_sub(1, std::memory_order_relaxed);
    if (peer_key_) bounds_->per_peer.Release(*peer_key_);
    if (!bounds_->spares.empty()) {  // as Close does
      beast::error_code ignored;
      socket_.close(ignored);
      bounds_->TakeSpare(worker_);
    }
  }

  void Start(std::list<std::weak_ptr<Session>>::iterator self) {
    self_ = self;
    beast::error_code ec;
    peer_ = socket_.remote_endpoint(ec);
    // Each response goes out in one send; Nagle's algorithm would hold a second one back
    // until the client's delayed ACK (up to 40 ms) on a keep-alive connection.
    socket_.set_option(tcp::no_delay(true), ec);
    ReadNext();
  }

  // Closes the connection if it is between requests; one in a request finishes it first.
  // A request whose bytes have come but are not read yet (in the buffer, or in the
  // socket) is one in a request: closed, its client would see a reset and could not know
  // whether to send it again. It is answered, with Connection: close.
  void CloseIfIdle() {
    if (!reading_ || (parser_ && parser_->got_some()) || buffer_.size() > 0) return;
    beast::error_code ec;
    if (socket_.available(ec) > 0 && !ec) return;
    Close();
  }

  // Called by the worker's tick: a connection past its deadline is closed, which cancels
  // its pending read or write.
  void CheckDeadline(std::chrono::steady_clock::time_point now) {
    // The next request on a kept-alive connection has begun: from here it has the read
    // timeout, not what is left of the idle one, so a head dribbled a byte at a time is cut
    // off as on a new connection. (Bytes wait in buffer_ until the head is whole.)
    if (idle_ && reading_ && buffer_.size() > 0) {
      idle_ = false;
      deadline_ = std::min(deadline_, now + state_->options.read_timeout);
    }
    if (now > deadline_) return Close();
    CheckClient(now);
  }

 private:
  void ReadNext() {
    parser_.emplace();
    LimitRequestParser(*parser_, state_->options);
    // The body's bound is applied once the head is read (OnHeader): a body the handler
    // streams has none here.
    parser_->body_limit(boost::none);
    if (body_parser_) {
      body_parser_.reset();
      upload_piece_.reset();
    }
    // The room a large request (a streamed upload, a decision batch read whole) was read
    // into goes back: a kept-alive connection should not hold it while idle.
    if (buffer_.capacity() > kIdleBytes) buffer_.shrink_to_fit();
    reading_ = true;
    // Waiting for the next request (nothing of it here yet): the idle timeout.
    idle_ = !first_ && buffer_.size() == 0;
    deadline_ =
        t_coarse_now + (idle_ ? state_->options.idle_timeout : state_->options.read_timeout);
    first_ = false;
    http::async_read_header(
        socket_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->OnHeader(ec); });
  }

  void OnHeader(beast::error_code ec) {
    // RFC 9112 2.2: a server SHOULD ignore empty lines before a request line (a client may
    // send a CRLF after a body, as older ones did); Beast's parser reads one as a bad method.
    // A few are skipped, as nginx does, and the request is read again.
    if (ec && blank_lines_skipped_ < kMaxBlankLines) {
      auto data = buffer_.data();
      std::string_view bytes(static_cast<const char*>(data.data()), data.size());
      size_t n = 0;
      while (n < bytes.size() && blank_lines_skipped_ < kMaxBlankLines &&
             (bytes[n] == '\n' ||
              (bytes[n] == '\r' && n + 1 < bytes.size() && bytes[n + 1] == '\n'))) {
        n += bytes[n] == '\r' ? 2 : 1;
        ++blank_lines_skipped_;
      }
      if (n > 0) {
        buffer_.consume(n);
        return ReadNext();
      }
    }
    blank_lines_skipped_ = 0;
    if (ec == http::error::bad_version) {
      switch (ReadVersion()) {
        case Version::kNewerMinor:
          return ReadNext();  // read again as HTTP/1.1
        case Version::kUnsupported:
          return Refuse(http::status::http_version_not_supported,
                        "HTTP version not supported: this port speaks HTTP/1.0 and HTTP/1.1");
        case Version::kMalformed:
          break;  // a 400, as any malformed request line
      }
    }
    // A head that came whole between two ticks was never seen half-read by CheckDeadline:
    // its request gets the read timeout from here, not what is left of the idle one.
    if (idle_) deadline_ = std::min(deadline_, t_coarse_now + state_->options.read_timeout);
    idle_ = false;
    if (!ec) {
      if (auto fault = TransferEncodingFault(parser_->get(), parser_->chunked())) {
        return Refuse(fault->first, fault->second);
      }
      // RFC 9110 8.6: forwarded as it came, a repeated length ("5, 5", or two fields) may
      // be read otherwise by the upstream; nginx refuses it too.
      if (!ContentLengthIsPlain(parser_->get())) {
        return Refuse(http::status::bad_request, "Content-Length must be one number");
      }
      // An HTTP/1.0 request has no chunks: its framing is faulty, so the connection ends
      // after the answer (RFC 9112 6.1).
      if (parser_->chunked() && parser_->get().version() < 11) parser_->get().keep_alive(false);
      // An HTTP/1.1 request names one host (RFC 9112 3.2), an absolute-form one too (whose
      // Host is then replaced by the target's authority): with none, or two that may
      // differ, Sluice and the upstream could each read another.
      size_t hosts = parser_->get().count(http::field::host);
      if (hosts > 1 || (hosts == 0 && parser_->get().version() >= 11)) {
        return Refuse(http::status::bad_request, "a request must have exactly one Host header");
      }
      if (auto fault = ToOriginForm(parser_->get())) {
        return Refuse(http::status::bad_request, *fault);
      }
    }
    if (ec || parser_->is_done()) return OnRead(ec);
    if (handler_.StreamsBody(parser_->get())) return OnStreamedRequest();
    const size_t max = state_->options.max_body_bytes;
    const auto length = parser_->content_length();
    if (length && *length > max) return OnRead(http::error::body_limit);
    // Beast's body takes room for the announced length at once: counted from here.
    const size_t want = length ? static_cast<size_t>(*length) : max;
    size_t& held = state_->body_budget[worker_].held;
    // A worker holding nothing reads any one body (up to max_body_bytes): a share smaller
    // than the largest body must not refuse it on an idle server.
    if (held > 0 && held + want > state_->body_budget_per_worker) {
      if (state_->options.on_body_refused) state_->options.on_body_refused();
      return Refuse(http::status::service_unavailable,
                    "request bodies in flight are over the server's bound "
                    "(--max-buffered-mib); retry shortly");
    }
    held += want;
    body_held_ = want;
    parser_->body_limit(max);
    auto read_body = [self = shared_from_this()] {
      if (self->parser_->chunked()) return self->ReadChunkedBody();
      http::async_read(self->socket_, self->buffer_, *self->parser_,
                       [self](beast::error_code e, size_t) { self->OnRead(e); });
    };
    // A client that waits to be told to send its body (a body read whole: the decision
    // API's, or a small upload the handler takes whole) is told at once.
    if (parser_->get().version() >= 11 &&
        beast::iequals(parser_->get()[http::field::expect], "100-continue")) {
      static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
      return asio::async_write(socket_, asio::buffer(kContinue.data(), kContinue.size()),
                               [self = shared_from_this(), read_body](beast::error_code e, size_t) {
                                 if (e) return self->Close();
                                 read_body();
                               });
    }
    read_body();
  }

  // A chunked body read whole, as http::async_read reads it, but a line ended by a bare LF
  // is refused at once (BareLineFeed) instead of waiting, unanswered until the read
  // deadline, for a CR that will not come. `fresh`: the bytes the last read brought.
  // Runs from a completion handler (OnRead may run within it).
  void ReadChunkedBody(size_t fresh = SIZE_MAX) {
    parser_->eager(true);
    beast::error_code ec;
    while (buffer_.size() > 0) {  // a put may stop short of the bytes it has
      ec = {};
      const size_t used = parser_->put(buffer_.data(), ec);
      buffer_.consume(used);
      if (ec || parser_->is_done() || used == 0) break;
    }
    if (parser_->is_done()) return OnRead({});
    if (ec && ec != http::error::need_more) return OnRead(ec);
    if (BareLineFeed(Unparsed(buffer_), fresh)) return OnRead(http::error::bad_line_ending);
    const size_t room = beast::read_size(buffer_, 65536);
    if (room == 0) return OnRead(http::error::buffer_overflow);
    socket_.async_read_some(buffer_.prepare(room),
                            [self = shared_from_this()](beast::error_code e, size_t n) {
                              self->buffer_.commit(n);
                              if (e == asio::error::eof) {
                                e = {};
                                self->parser_->put_eof(e);  // cut short: partial_message
                              }
                              if (e) return self->OnRead(e);
                              self->ReadChunkedBody(n);
                            });
  }

  void OnRead(beast::error_code ec) {
    reading_ = false;
    ReleaseBody();
    if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
        ec == asio::error::operation_aborted || ec == asio::error::connection_reset) {
      return Close();
    }
    res_.Reset();
    res_.version(11);
    if (ec) {
      RejectUnparsedRequest(res_, ec, !parser_->get().target().empty());
      return RefuseWritten(ec != http::error::partial_message);
    }
    Dispatch(parser_->get(), nullptr);
  }

  // What the request line's version is, Beast having refused it. RFC 9112 2.3: a minor
  // version above 1 (HTTP/1.2) is read as HTTP/1.1, the highest this server speaks; it is
  // rewritten so in the buffer, which the next parse reads. Another major version is 505.
  enum class Version { kNewerMinor, kUnsupported, kMalformed };
  Version ReadVersion() {
    auto data = buffer_.data();
    char* bytes = static_cast<char*>(data.data());
    std::string_view head(bytes, data.size());
    size_t end = head.find('\n');
    if (end == std::string_view::npos) return Version::kMalformed;
    size_t line_end = end > 0 && head[end - 1] == '\r' ? end - 1 : end;
    // "... HTTP/D.D" at the line's end, after a space.
    if (line_end < 9 || head.substr(line_end - 9, 6) != " HTTP/" || head[line_end - 2] != '.') {
      return Version::kMalformed;
    }
    const char major = head[line_end - 3], minor = head[line_end - 1];
    if (!std::isdigit(static_cast<unsigned char>(major)) ||
        !std::isdigit(static_cast<unsigned char>(minor))) {
      return Version::kMalformed;
    }
    if (major != '1') return Version::kUnsupported;
    if (minor <= '1') return Version::kMalformed;  // 1.0 and 1.1 failed for another reason
    bytes[line_end - 1] = '1';
    return Version::kNewerMinor;
  }

  // The body read whole is read (or never will be): its room goes back to the budget.
  void ReleaseBody() {
    if (body_held_ == 0) return;  // (touches its worker's count only when it took some)
    state_->body_budget[worker_].held -= body_held_;
    body_held_ = 0;
  }

  // Answers a request that is not read on, and closes the connection after.
  void Refuse(http::status status, std::string_view message) {
    reading_ = false;
    res_.Reset();
    res_.version(11);
    JsonError(res_, status, message);
    RefuseWritten();
  }
  // `counted` false: no request was refused, a client left in the middle of one.
  void RefuseWritten(bool counted = true) {
    // A refusal comes before Dispatch: head_ is still the last request's. A HEAD's answer
    // has no body, whatever it says; any other's has its body.
    head_ = !parser_->get().target().empty() && parser_->get().method() == http::verb::head;
    if (counted && state_->options.on_request_refused) {
      state_->options.on_request_refused(res_.result_int());
    }
    res_.keep_alive(false);
    linger_ = true;  // the client may still be sending what was refused
    Write();
  }

  // The head is in; the body goes to the handler as it arrives.
  void OnStreamedRequest() {
    reading_ = false;
    res_.Reset();
    res_.version(11);
    stream_req_ = {};
    stream_req_.base() = parser_->get().base();
    // HTTP/1.0 has no interim answers: its client would take a 100 for the answer.
    expect_continue_ = stream_req_.version() >= 11 &&
                       beast::iequals(stream_req_[http::field::expect], "100-continue");
    body_parser_.emplace(std::move(*parser_));
    // Beast reads into the room the buffer has, at least 512 bytes: a head's worth, which
    // would read a large body 512 bytes per system call.
    buffer_.reserve(kStreamedReadRoom);
    body_parser_->body_limit(boost::none);
    // Each read parses all the chunks it brought, up to a piece: one by one, a body sent in
    // 1-byte chunks cost a system call and a loop turn per byte (10,000 sends for 60 KB).
    body_parser_->eager(true);
    parser_.reset();
    Dispatch(stream_req_, std::make_unique<RequestBody>(shared_from_this()));
  }

  // What the client sent since its request, looked at without reading: nothing yet, more
  // (a pipelined request, on the socket or already read), or the end of the stream with
  // nothing unread before it, or a reset (gone). MSG_PEEK leaves any bytes for the next read.
  enum class Peer { kQuiet, kMore, kGone };
  Peer Peek() {
    if (closed_) return Peer::kGone;
    if (buffer_.size() == 0) {
      char c;
      ssize_t n = ::recv(socket_.native_handle(), &c, 1, MSG_PEEK | MSG_DONTWAIT);
      if (n == 0) return Peer::kGone;
      if (n < 0) {
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? Peer::kQuiet
                                                                         : Peer::kGone;
      }
    }
    // Bytes wait unread (a body not read yet, a pipelined request), and the client may
    // have left after them: POLLRDHUP tells that it has shut its side, as nginx reads
    // EPOLLRDHUP. (A queued upload's client that hangs up must not be forwarded.)
    pollfd p{socket_.native_handle(), POLLRDHUP, 0};
    if (::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0) {
      return Peer::kGone;
    }
    return Peer::kMore;
  }
  bool PeerGone() { return Peek() == Peer::kGone; }

  // While the answer is deferred, nothing reads the connection: the worker's tick peeks at
  // it (CheckDeadline) once the request has waited a tick, so the many answered sooner cost
  // no system call, and a client gone is seen within two ticks.
  void WatchClient(std::function<void()> on_gone) {
    if (closed_ || watching_ || (body_parser_ && !body_parser_->is_done())) return;
    watching_ = true;
    watch_since_ = std::chrono::steady_clock::now();
    on_gone_ = std::move(on_gone);
  }

  void StopWatchingClient() {
    watching_ = false;
    on_gone_ = nullptr;
  }

  void CheckClient(std::chrono::steady_clock::time_point now) {
    if (!watching_ || now - watch_since_ < kTick) return;
    Peer peer = Peek();
    if (peer == Peer::kQuiet) return;
    auto gone = std::move(on_gone_);
    StopWatchingClient();  // a pipelined request: its sender has not left
    if (peer == Peer::kMore) return;
    if (gone) gone();
    Close();
  }

  void Dispatch(HttpRequest& req, std::unique_ptr<BodySource> body) {
    res_.version(req.version());
    res_.keep_alive(KeepAlive(req));
    head_ = req.method() == http::verb::head;
    // A deferred answer (upstream, queue delay) has deadlines of its own.
    deadline_ = std::chrono::steady_clock::time_point::max();
    bool ready = true;
    auto defer = [this] {
      return Completion(
          shared_from_this(),
          [](void* s, std::unique_ptr<BodySource> answer) {
            static_cast<Session*>(s)->Finish(std::move(answer));
          },
          [](void* s) { return static_cast<Session*>(s)->PeerGone(); },
          [](void* s, std::function<void()> on_gone) {
            static_cast<Session*>(s)->WatchClient(std::move(on_gone));
          });
    };
    try {
      ready = body ? handler_.HandleStream(req, std::move(body), peer_, res_, defer)
                   : handler_.Handle(req, peer_, res_, defer);
    } catch (const std::exception& e) {
      // A library threw on input it rejects: answer this one request, never the process.
      res_.Reset();
      res_.version(11);
      JsonError(res_, http::status::bad_request, "request rejected: " + std::string(e.what()));
      res_.keep_alive(false);
    }
    if (ready) Finish();
  }

  // The request's body, read from the client one piece at a time (for HandleStream).
  class RequestBody final : public BodySource {
   public:
    explicit RequestBody(std::shared_ptr<Session> s) : s_(std::move(s)) {}
    void Read(Got got) override { s_->ReadBodyPiece(std::move(got)); }
    // Stops a read of the next piece in progress (an upstream answered early); the
    // connection stays the session's to close.
    void Cancel() override { s_->CancelBodyRead(); }
    std::string Failure() const override { return s_->BodyFailure(); }

   private:
    std::shared_ptr<Session> s_;
  };

  // What was wrong with the body the client sent, if that is why its read failed (the
  // words the listener uses for a body it reads whole); "" if the client left or stalled.
  std::string BodyFailure() const {
    const beast::error_code& ec = body_error_;
    if (!ec || ec.category() != http::make_error_code(http::error::bad_chunk).category() ||
        ec == http::error::partial_message || ec == http::error::end_of_stream) {
      return {};
    }
    if (ec == http::error::buffer_overflow) return "a chunk line or the trailers are too long";
    return Malformed(ec);
  }

  void CancelBodyRead() {
    if (!body_reading_) return;
    beast::error_code ignored;
    socket_.cancel(ignored);  // its handler runs, with operation_aborted
  }

  void ReadBodyPiece(BodySource::Got got) {
    if (closed_ || !body_parser_) {
      return asio::post(socket_.get_executor(), [got] { got(false, {}, false); });
    }
    if (expect_continue_) {  // the client waits for this before it sends the body
      expect_continue_ = false;
      static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
      deadline_ = t_coarse_now + state_->options.read_timeout;
      return asio::async_write(
          socket_, asio::buffer(kContinue.data(), kContinue.size()),
          [self = shared_from_this(), got = std::move(got)](beast::error_code ec, size_t) mutable {
            if (ec) return got(false, {}, false);
            self->ReadBodyPiece(std::move(got));
          });
    }
    if (body_parser_->is_done()) {
      return asio::post(socket_.get_executor(), [got] { got(true, {}, true); });
    }
    if (!upload_piece_) upload_piece_ = std::make_unique<std::array<char, kUploadPiece>>();
    auto& body = body_parser_->get().body();
    body.data = upload_piece_->data();
    body.size = upload_piece_->size();
    deadline_ = t_coarse_now + state_->options.read_timeout;  // a slow upload is cut off
    body_reading_ = true;
    AsyncReadBodyPiece(
        socket_, buffer_, *body_parser_,
        [self = shared_from_this(), got = std::move(got)](beast::error_code ec) mutable {
          self->body_reading_ = false;
          self->deadline_ = std::chrono::steady_clock::time_point::max();
          self->body_error_ = ec;
          if (ec) return got(false, {}, false);
          size_t n = self->upload_piece_->size() - self->body_parser_->get().body().size;
          got(true, std::string_view(self->upload_piece_->data(), n),
              self->body_parser_->is_done());
        });
  }

  void Finish(std::unique_ptr<BodySource> body = nullptr) {
    StopWatchingClient();
    if (state_->draining.load(std::memory_order_relaxed)) res_.keep_alive(false);
    if (body_parser_ && !body_parser_->is_done()) {
      // The body was not read (a refusal): the next request cannot be found after it.
      res_.keep_alive(false);
      linger_ = true;
    }
    if (body && !closed_) {
      body_ = std::move(body);
      return WriteStreamedHead();
    }
    Write();
  }

  void Write() {
    unsigned status = res_.result_int();
    if (status == 204 || (status >= 100 && status < 200)) {
      // No body, and no length either (RFC 9112 6.3).
      res_.erase(http::field::content_length);
      res_.erase(http::field::transfer_encoding);
      res_.body().clear();
    } else if (status == 304) {
      res_.body().clear();  // its length, if any, is the one its 200 would have had
    } else if (!(head_ && res_.body().empty())) {
      // A HEAD answer relayed from an upstream keeps its GET's framing fields as they came.
      res_.prepare_payload();
    }
    SerializeResponse(res_, head_, out_);
    deadline_ = t_coarse_now + state_->options.read_timeout;
    asio::async_write(socket_, asio::buffer(out_),
                      [self = shared_from_this()](beast::error_code ec, size_t) {
                        if (!ec && self->linger_) return self->Linger();
                        self->AfterResponse(ec);
                      });
  }

  void AfterResponse(beast::error_code ec) {
    if (ec || !res_.keep_alive() || state_->draining.load(std::memory_order_relaxed)) {
      return Close();
    }
    // The answer is out: a kept-alive connection waits for its next request holding a few
    // KiB, whatever it last carried. Ten thousand idle connections that each kept their
    // largest answer (twice: the response and its serialized copy) would hold gigabytes.
    // (Reset alone keeps the body's capacity: a string moved from an empty one keeps its own.)
    if (res_.body().capacity() > kIdleBytes) std::string().swap(res_.body());
    res_.Reset();
    if (out_.capacity() > kIdleBytes) std::string().swap(out_);
    ReadNext();
  }

  // A streamed body is framed by the length the source announced (res_'s Content-Length),
  // else by chunks for an HTTP/1.1 client, else (HTTP/1.0) by the end of the connection.
  void WriteStreamedHead() {
    chunked_ = false;
    if (!res_.has_content_length()) {
      if (res_.version() >= 11) {
        res_.chunked(true);
        chunked_ = true;
      } else {
        res_.keep_alive(false);
      }
    }
    res_.body().clear();
    SerializeResponse(res_, /*head=*/true, out_);
    deadline_ = t_coarse_now + state_->options.read_timeout;
    asio::async_write(socket_, asio::buffer(out_),
                      [self = shared_from_this()](beast::error_code ec, size_t) {
                        if (ec) return self->Close();
                        self->ReadPiece();
                      });
  }

  void ReadPiece() {
    // The source has deadlines of its own while it waits (the upstream's timeout).
    deadline_ = std::chrono::steady_clock::time_point::max();
    body_->Read([self = shared_from_this()](bool ok, std::string_view piece, bool last) {
      if (!ok || self->closed_) return self->Close();
      self->WritePiece(piece, last);
    });
  }

  void WritePiece(std::string_view piece, bool last) {
    deadline_ = t_coarse_now + state_->options.read_timeout;
    asio::async_write(socket_, frame_.Frame(piece, last, chunked_),
                      [self = shared_from_this(), last](beast::error_code ec, size_t) {
                        if (ec || !last) return ec ? self->Close() : self->ReadPiece();
                        self->body_.reset();
                        if (self->linger_) return self->Linger();  // as Write does
                        self->AfterResponse(ec);
                      });
  }

  // After refusing a request mid-upload, read and discard what the client is still sending
  // for a moment before closing, so it gets to read the refusal instead of a reset.
  void Linger() {
    beast::error_code ec;
    socket_.shutdown(tcp::socket::shutdown_send, ec);
    deadline_ = t_coarse_now + std::chrono::seconds(2);
    drain_ = std::make_unique<std::array<char, 16384>>();
    DrainSome();
  }
  void DrainSome() {
    socket_.async_read_some(asio::buffer(*drain_),
                            [self = shared_from_this()](beast::error_code ec, size_t n) {
                              self->drained_ += n;
                              if (ec || self->drained_ > (size_t{16} << 20)) return self->Close();
                              self->DrainSome();
                            });
  }

  void Close() {
    if (body_) {
      // Also breaks the cycle session -> source -> exchange -> request body -> session.
      body_->Cancel();
      body_.reset();
    }
    beast::error_code ec;
    socket_.shutdown(tcp::socket::shutdown_both, ec);
    socket_.close(ec);
    // The descriptor goes back to the reserve (a listener that keeps one) before another
    // listener of this loop can take it: out of descriptors, one waiting to accept would.
    bounds_->TakeSpare(worker_);
    if (!closed_) {
      closed_ = true;
      state_->sessions[worker_].erase(self_);
    }
  }

  tcp::socket socket_;
  std::chrono::steady_clock::time_point deadline_;
  bool idle_ = false;  // between requests: deadline_ is the idle timeout's
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  // A request whose body is streamed: its head, and the parser that reads the body.
  HttpRequest stream_req_;
  std::optional<http::request_parser<http::buffer_body>> body_parser_;
  std::unique_ptr<std::array<char, kUploadPiece>> upload_piece_;
  beast::error_code body_error_;  // how the last read of a streamed body ended
  static constexpr int kMaxBlankLines = 8;
  int blank_lines_skipped_ = 0;  // before the request being read (RFC 9112 2.2)
  bool expect_continue_ = false;
  // A deferred answer's watch on the client (WatchClient, CheckClient).
  bool watching_ = false;
  std::chrono::steady_clock::time_point watch_since_;
  std::function<void()> on_gone_;
  HttpResponse res_;
  Handler& handler_;
  std::shared_ptr<ServerState> state_;
  size_t worker_;
  size_t body_held_ = 0;  // of its worker's body budget, what the body being read takes
  std::shared_ptr<ListenerBounds> bounds_;
  std::optional<uint64_t> peer_key_;
  tcp::endpoint peer_;
  std::list<std::weak_ptr<Session>>::iterator self_;
  bool first_ = true;
  bool reading_ = false;
  bool closed_ = false;
  bool linger_ = false;
  bool head_ = false;
  bool body_reading_ = false;  // a read of the request body's next piece is in progress
  std::string out_;
  std::unique_ptr<BodySource> body_;  // a response body being streamed
  bool chunked_ = false;
  PieceFrame frame_;  // the response body's piece being written
  std::unique_ptr<std::array<char, 16384>> drain_;
  size_t drained_ = 0;
};

struct HttpServer::Listener : std::enable_shared_from_this<Listener> {
  Listener(asio::io_context& ctx, Handler& h, std::shared_ptr<ServerState> s, size_t w,
           std::shared_ptr<ListenerBounds> b)
      : acceptor(ctx),
        backoff(ctx),
        handler(h),
        state(std::move(s)),
        worker(w),
        bounds(std::move(b)) {}

  void Accept() {
    acceptor.async_accept([self = shared_from_this()](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted || !self->acceptor.is_open()) return;
      if (!ec) {
        self->Admit(std::move(socket));
        self->bounds->TakeSpare(self->worker);
        return self->Accept();
      }
      if (self->state->options.on_accept_failed) self->state->options.on_accept_failed(ec);
      const bool out_of_files = ec == asio::error::no_descriptors ||
                                ec == boost::system::errc::too_many_files_open_in_system;
      // Linux says EMFILE with no connection waiting too: the reserve is given up only for
      // one that waits, and accepted here at once (on this loop: no other listener of it
      // takes the descriptor first).
      if (out_of_files && self->bounds->HasSpare(self->worker) && self->ConnectionWaits() &&
          self->bounds->GiveSpare(self->worker)) {
        tcp::socket waiting(self->acceptor.get_executor());
        beast::error_code aec;
        self->acceptor.non_blocking(true, aec);
        if (!aec) self->acceptor.accept(waiting, aec);
        if (aec) {
          self->bounds->TakeSpare(self->worker);
        } else {
          self->Admit(std::move(waiting));
          self->bounds->TakeSpare(self->worker);  // a refused one's descriptor too
          return self->Accept();
        }
      }
      // Out of file descriptors (or similar): the connection stays queued, so accepting
      // again at once would spin. Back off briefly. (A reserve another thread's descriptor
      // took is taken again once one is free.)
      self->bounds->TakeSpare(self->worker);
      self->backoff.expires_after(std::chrono::milliseconds(100));
      self->backoff.async_wait([self](const beast::error_code&) { self->Accept(); });
    });
  }

  bool ConnectionWaits() {
    pollfd p{acceptor.native_handle(), POLLIN, 0};
    return ::poll(&p, 1, 0) == 1 && (p.revents & POLLIN) != 0;
  }

  // Serves an accepted connection, or closes it over a connection bound.
  void Admit(tcp::socket socket) {
    std::optional<uint64_t> peer_key;
    bool refuse =
        bounds->connections.load(std::memory_order_relaxed) >= state->options.max_connections;
    if (!refuse && bounds->per_peer.enabled()) {
      peer_key = bounds->per_peer.Admit(socket);
      refuse = !peer_key;
    }
    if (refuse) {
      // Counted before the close, which the client sees: a scrape it makes next must find
      // its refusal counted.
      if (state->options.on_connection_refused) state->options.on_connection_refused();
      beast::error_code ignored;
      socket.close(ignored);  // over a connection bound: refuse, keep serving others
      return;
    }
    auto& list = state->sessions[worker];
    auto session =
        std::make_shared<Session>(std::move(socket), handler, state, worker, bounds, peer_key);
    list.push_front(session);
    session->Start(list.begin());
  }

  tcp::acceptor acceptor;
  asio::steady_timer backoff;
  Handler& handler;
  std::shared_ptr<ServerState> state;
  size_t worker;
  std::shared_ptr<ListenerBounds> bounds;
};

HttpServer::HttpServer(HttpOptions options, size_t threads)
    : options_(options), state_(std::make_shared<ServerState>(options)) {
  threads = std::max<size_t>(threads, 1);
  state_->sessions.resize(threads);
  state_->body_budget.resize(threads);
  state_->body_budget_per_worker = state_->options.max_buffered_body_bytes / threads;
  for (size_t i = 0; i < threads; ++i) contexts_.push_back(std::make_unique<asio::io_context>(1));
}

HttpServer::~HttpServer() {
  Stop();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  if (watchdog_.joinable()) watchdog_.join();
}

boost::system::error_code ListenReusePort(tcp::acceptor& acceptor, const tcp::endpoint& endpoint,
                                          bool first) {
  beast::error_code ec;
  if (first && endpoint.port() != 0) {
    // A socket without SO_REUSEPORT cannot bind where another listens (SO_REUSEADDR lets
    // it past the port's TIME_WAIT connections, as after a restart).
    tcp::acceptor probe(acceptor.get_executor());
    probe.open(endpoint.protocol(), ec);
    if (!ec) probe.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) probe.bind(endpoint, ec);
    if (ec) return ec;
    probe.close(ec);
  }
  acceptor.open(endpoint.protocol(), ec);
  if (!ec) acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) {
    int one = 1;
    if (setsockopt(acceptor.native_handle(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
      ec = beast::error_code(errno, boost::system::system_category());
    }
  }
  if (!ec) acceptor.bind(endpoint, ec);
  if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
  return ec;
}

std::string JoinHostPort(std::string_view host, unsigned port) {
  std::string out;
  bool v6 = host.find(':') != std::string_view::npos;
  out.append(v6 ? "[" : "").append(host).append(v6 ? "]:" : ":").append(std::to_string(port));
  return out;
}

Status HttpServer::Listen(const std::string& host, uint16_t port, Handler& handler,
                          uint16_t* bound_port, bool reserve_descriptor) {
  beast::error_code ec;
  auto address = asio::ip::make_address(host, ec);
  if (ec) return Status::Invalid("bad listen address '" + host + "': " + ec.message());
  tcp::endpoint endpoint(address, port);
  auto bounds =
      std::make_shared<ListenerBounds>(state_->options, contexts_.size(), reserve_descriptor);
  for (size_t i = 0; i < contexts_.size(); ++i) {
    auto l = std::make_shared<Listener>(*contexts_[i], handler, state_, i, bounds);
    ec = ListenReusePort(l->acceptor, endpoint, /*first=*/i == 0);
    if (ec) {
      return Status::Invalid("cannot listen on " + JoinHostPort(host, endpoint.port()) + ": " +
                             ec.message());
    }
    // Port 0 on the first worker picks a free port; the others join that one.
    if (i == 0) endpoint.port(l->acceptor.local_endpoint().port());
    listeners_.push_back(l);
  }
  if (bound_port) *bound_port = endpoint.port();
  return Status::Ok();
}

// One per worker: refreshes the coarse clock and closes connections past their deadline.
struct HttpServer::Ticker : std::enable_shared_from_this<Ticker> {
  Ticker(asio::io_context& ctx, std::shared_ptr<ServerState> s, size_t w)
      : timer(ctx), state(std::move(s)), worker(w) {}
  void Tick() {
    timer.expires_after(kTick);
    timer.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
      if (ec) return;
      t_coarse_now = std::chrono::steady_clock::now();
      auto copy = self->state->sessions[self->worker];  // a close erases from the list
      for (auto& w : copy) {
        if (auto s = w.lock()) s->CheckDeadline(t_coarse_now);
      }
      // While draining, deadlines still hold (a slow client, a refused upload's linger), so
      // a stop takes no longer than its connections' own deadlines; then the loop may end.
      if (self->state->draining.load() && self->state->connections.load() == 0) return;
      self->Tick();
    });
  }
  asio::steady_timer timer;
  std::shared_ptr<ServerState> state;
  size_t worker;
};

void HttpServer::Run() {
  for (auto& l : listeners_) {
    asio::post(l->acceptor.get_executor(), [l] { l->Accept(); });
  }
  for (size_t i = 0; i < contexts_.size(); ++i) {
    if (options_.on_worker_start) {
      asio::post(*contexts_[i],
                 [this, ctx = contexts_[i].get()] { options_.on_worker_start(*ctx); });
    }
    auto t = std::make_shared<Ticker>(*contexts_[i], state_, i);
    tickers_.push_back(t);
    asio::post(*contexts_[i], [t] {
      t_coarse_now = std::chrono::steady_clock::now();
      t->Tick();
    });
  }
  for (size_t i = 1; i < contexts_.size(); ++i) {
    threads_.emplace_back([this, ctx = contexts_[i].get()] {
      t_worker_context = ctx;
      ctx->run();
      if (options_.on_worker_exit) options_.on_worker_exit();
    });
  }
  t_worker_context = contexts_[0].get();
  contexts_[0]->run();
  if (options_.on_worker_exit) options_.on_worker_exit();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
  if (watchdog_.joinable()) watchdog_.join();
}

void HttpServer::Stop(std::function<bool()> others_done, std::chrono::milliseconds others_grace) {
  if (stopping_.exchange(true)) return;
  state_->draining.store(true);
  const auto deadline = std::chrono::steady_clock::now() + options_.drain_timeout;
  for (auto& l : listeners_) {
    asio::post(l->acceptor.get_executor(), [l, deadline] {
      beast::error_code ec;
      l->acceptor.close(ec);
      l->handler.OnDrain(deadline);
    });
  }
  for (size_t i = 0; i < contexts_.size(); ++i) {
    asio::post(*contexts_[i], [state = state_, i] {
      auto copy = state->sessions[i];  // Close() erases from the list
      for (auto& w : copy) {
        if (auto s = w.lock()) s->CloseIfIdle();
      }
    });
  }
  // Connections still in a request get drain_timeout to finish, then the loops stop.
  watchdog_ = std::thread([this, others_done = std::move(others_done), others_grace, deadline] {
    using Clock = std::chrono::steady_clock;
    while (Clock::now() < deadline && state_->connections.load() > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    while (others_done && !others_done() && Clock::now() < deadline + others_grace) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    // Drained (or out of time): stop the loops, whatever timers are still armed.
    for (auto& ctx : contexts_) ctx->stop();
  });
}

}  // namespace sluice::server
