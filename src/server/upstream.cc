#include "server/upstream.h"

#include "core/log.h"
#include "rules/address.h"
#include "server/body_piece.h"
#include "server/response_head.h"
#include "server/wire.h"

#include <sys/socket.h>
#include <algorithm>
#include <array>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http/buffer_body.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/container/small_vector.hpp>

#include <cerrno>
#include <charconv>
#include <deque>
#include <span>

namespace sluice::server {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

// Bodies announced at most this long are read whole and sent in one write; longer ones,
// chunked ones and those the connection's end delimits are streamed in pieces of kPiece.
constexpr size_t kWholeBody = 64 * 1024;
constexpr size_t kPiece = 64 * 1024;
// The first read of an answer: a plain one's head and small body come in one.
constexpr size_t kFirstRead = 4 * 1024;

// What a connection's buffer may hold: a plain answer read whole, or a streamed body's
// read plus one chunk line or trailer section of up to 80 KiB, the bound the listener puts
// on clients. An upstream that sends an endless chunk line is cut off there, not buffered.
constexpr size_t kBufferBound = kPiece + 80 * 1024;
// An upstream answer's head may be this large (a long Content-Security-Policy, several
// large Set-Cookie fields): Beast's default of 8 KiB is below what upstreams send, and
// Envoy's own default bound is 60 KiB. Past it the client gets a 502.
constexpr uint32_t kUpstreamHeadBound = 64 * 1024;
static_assert(kBufferBound >= kUpstreamHeadBound);
// UpstreamOptions::on_failure's kind for an answer cut short after its head.
constexpr size_t kBodyCut = 4;
static_assert(kBufferBound >= kMaxSimpleHead + kWholeBody);

struct Pooled {
  explicit Pooled(tcp::socket s) : socket(std::move(s)), buffer(kBufferBound) {}
  tcp::socket socket;
  beast::flat_buffer buffer;
};

// Deadlines of this thread's exchanges in flight, checked by one coarse timer (kWatchTick)
// while any is in flight: a deadline per read and write (Beast's tcp_stream) cost a timer
// queue insert and cancel for each, a tenth of a gateway request's instructions. An
// exchange is watched only while it waits on the upstream.
constexpr auto kWatchTick = std::chrono::milliseconds(10);

class Watched {
 public:
  // The upstream took too long: close its connection (the pending operation ends).
  virtual void TimeOut() = 0;

  std::chrono::steady_clock::time_point deadline;
  Watched* prev = nullptr;
  Watched* next = nullptr;
  bool linked = false;

 protected:
  virtual ~Watched();
};

struct Watch {
  Watched* first = nullptr;
  std::unique_ptr<asio::steady_timer> timer;
  bool armed = false;
};
thread_local Watch t_watch;

void Unwatch(Watched* w) {
  if (!w->linked) return;
  (w->prev ? w->prev->next : t_watch.first) = w->next;
  if (w->next) w->next->prev = w->prev;
  w->prev = w->next = nullptr;
  w->linked = false;
}

Watched::~Watched() { Unwatch(this); }

void ArmWatch(const asio::any_io_executor& ex) {
  if (t_watch.armed) return;
  if (!t_watch.timer) t_watch.timer = std::make_unique<asio::steady_timer>(ex);
  t_watch.armed = true;
  t_watch.timer->expires_after(kWatchTick);
  t_watch.timer->async_wait([ex](const boost::system::error_code& ec) {
    t_watch.armed = false;
    if (ec) return;  // the thread's loop is ending
    const auto now = std::chrono::steady_clock::now();
    for (Watched* w = t_watch.first; w != nullptr;) {
      Watched* next = w->next;  // TimeOut only closes a socket: no handler runs in it
      if (w->deadline <= now) {
        Unwatch(w);
        w->TimeOut();
      }
      w = next;
    }
    if (t_watch.first != nullptr) ArmWatch(ex);
  });
}

void WatchFor(Watched* w, std::chrono::steady_clock::duration d, const asio::any_io_executor& ex) {
  w->deadline = std::chrono::steady_clock::now() + d;
  if (!w->linked) {
    w->next = t_watch.first;
    if (w->next) w->next->prev = w;
    w->prev = nullptr;
    t_watch.first = w;
    w->linked = true;
  }
  ArmWatch(ex);
}

// Idle connections of this thread, per upstream.
using Pool = std::deque<std::unique_ptr<Pooled>>;
thread_local std::vector<std::pair<const Upstream*, std::unique_ptr<Pool>>> t_pools;

Pool& IdlePool(const Upstream* owner) {
  for (auto& [o, pool] : t_pools) {
    if (o == owner) return *pool;
  }
  t_pools.emplace_back(owner, std::make_unique<Pool>());
  return *t_pools.back().second;
}

// An idle connection is reused only when nothing is left to read on it. Bytes past the
// answer (a body on a HEAD or 204 answer, more than its length) or sent while it idled
// (a 408 before closing) would otherwise be read as the next client's answer, and every
// answer after it would go to the client after the one it was for.
bool Quiet(Pooled& conn) {
  if (conn.buffer.size() > 0) return false;
  char byte;
  ssize_t n = ::recv(conn.socket.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

// What an upstream said while the request's body was still going up. An interim (1xx)
// answer, a 103 Early Hints or a 100 Continue sent unasked, is no early answer: the body
// goes on. A whole one is taken off the socket here, as Receive would drop it; of one not
// yet whole (or too few bytes to tell) the rest is looked for again shortly. A 101 is
// final: Receive refuses it.
enum class Spoken { kFinal, kInterimTaken, kInterimPartial };
Spoken TakeInterimAnswer(Pooled& conn) {
  std::array<char, 4096> buf;
  const int fd = conn.socket.native_handle();
  ssize_t n = ::recv(fd, buf.data(), buf.size(), MSG_PEEK | MSG_DONTWAIT);
  if (n <= 0) return Spoken::kFinal;  // closed (or failed): the body stops
  std::string_view seen(buf.data(), static_cast<size_t>(n));
  if (seen.size() < 10) return Spoken::kInterimPartial;  // its status is yet to come
  if (!seen.starts_with("HTTP/1.") || seen[9] != '1' || seen.substr(9, 3) == "101") {
    return Spoken::kFinal;
  }
  size_t end = seen.find("\r\n\r\n");
  if (end == std::string_view::npos) return Spoken::kInterimPartial;
  ssize_t taken = ::recv(fd, buf.data(), end + 4, MSG_DONTWAIT);
  return taken == static_cast<ssize_t>(end + 4) ? Spoken::kInterimTaken : Spoken::kFinal;
}

// The idle pools are swept once a second while any holds a connection: one the upstream
// closed (its keep-alive timeout) is closed here too, instead of sitting in CLOSE_WAIT
// with its descriptor until the thread's next forward.
constexpr auto kSweepTick = std::chrono::seconds(1);
struct Sweep {
  std::unique_ptr<asio::steady_timer> timer;
  bool armed = false;
};
thread_local Sweep t_sweep;

void ArmSweep(const asio::any_io_executor& ex) {
  if (t_sweep.armed) return;
  if (!t_sweep.timer) t_sweep.timer = std::make_unique<asio::steady_timer>(ex);
  t_sweep.armed = true;
  t_sweep.timer->expires_after(kSweepTick);
  t_sweep.timer->async_wait([ex](const boost::system::error_code& ec) {
    t_sweep.armed = false;
    if (ec) return;  // the thread's loop is ending
    bool any = false;
    for (auto& entry : t_pools) {
      Pool& pool = *entry.second;
      std::erase_if(pool, [](const std::unique_ptr<Pooled>& c) { return !Quiet(*c); });
      any = any || !pool.empty();
    }
    if (any) ArmSweep(ex);
  });
}

LogLimiter upstream_log;

void GatewayError(HttpResponse& res, http::status status, const std::string& message) {
  res.result(status);
  res.set(http::field::content_type, "application/json");
  res.body() = "{\"error\":\"" +
               std::string(status == http::status::gateway_timeout ? "upstream_timeout"
                                                                   : "upstream_unavailable") +
               "\",\"message\":\"" + message + "\"}";
}

// Hop-by-hop headers are for one connection only and are not forwarded (RFC 9110 7.6.1);
// nor is Expect: Sluice already holds the whole body, and a 100 Continue from the upstream
// must not be taken for its answer.
// Nor are names with '_', as nginx drops them: CGI and WSGI upstreams read "X_User_Id" and
// "X-User-Id" as one variable, so a client could send one beside the other that Sluice keys
// on or that a proxy before it set.
// The fields a Connection header names are hop-by-hop too (RFC 9110 7.6.1), in requests
// and answers alike, except the ones that frame the message or name its host: a client
// cannot have those taken out of what the other side reads.
bool KeptWhenNamed(std::string_view name) {
  // X-Forwarded-For is Sluice's own, set before this: a client cannot have it dropped.
  return SameFieldName(name, "host") || SameFieldName(name, "content-length") ||
         SameFieldName(name, "transfer-encoding") || SameFieldName(name, "x-forwarded-for");
}

template <class Fields>
void StripConnectionNamed(Fields& h) {
  auto [begin, end] = h.equal_range(http::field::connection);
  if (begin == end) return;
  boost::container::small_vector<std::string, 4> named;
  for (auto it = begin; it != end; ++it) {
    std::string_view v = it->value();
    while (!v.empty()) {
      size_t comma = v.find(',');
      std::string_view token = v.substr(0, comma);
      while (!token.empty() && (token.front() == ' ' || token.front() == '\t'))
        token.remove_prefix(1);
      while (!token.empty() && (token.back() == ' ' || token.back() == '\t'))
        token.remove_suffix(1);
      if (!token.empty()) named.emplace_back(token);
      if (comma == std::string_view::npos) break;
      v.remove_prefix(comma + 1);
    }
  }
  for (const std::string& name : named) {
    if (!KeptWhenNamed(name)) h.erase(name);
  }
}

// The fields of one connection's framing, in requests and answers alike.
// The same, by name (for lines not parsed into Beast's fields).
bool ConnectionScopedName(std::string_view name) {
  return SameFieldName(name, "connection") || SameFieldName(name, "keep-alive") ||
         SameFieldName(name, "proxy-connection") || SameFieldName(name, "upgrade");
}

bool ConnectionScoped(http::field f) {
  return f == http::field::connection || f == http::field::keep_alive ||
         f == http::field::proxy_connection || f == http::field::upgrade;
}

void StripHopByHop(HttpRequest& req) {
  StripConnectionNamed(req);
  EraseFieldsIf(req, [](const auto& f) {
    const http::field name = f.name();
    return ConnectionScoped(name) || name == http::field::te || name == http::field::trailer ||
           name == http::field::proxy_authorization || name == http::field::expect ||
           f.name_string().find('_') != std::string_view::npos;
  });
}

}  // namespace

std::optional<UpstreamOptions> UpstreamOptions::ParseUrl(std::string_view url) {
  auto u = rules::ParseUpstreamUrl(url);
  if (!u) return std::nullopt;
  UpstreamOptions o;
  o.host = std::move(u->host);
  o.port = u->port;
  return o;
}

Upstream::Upstream(UpstreamOptions options) : options_(std::move(options)) {}

Status Upstream::Resolve() {
  asio::io_context ctx;
  tcp::resolver resolver(ctx);
  boost::system::error_code ec;
  auto results = resolver.resolve(options_.host, std::to_string(options_.port), ec);
  if (ec) return Status::Invalid("cannot resolve upstream " + options_.host + ": " + ec.message());
  for (const auto& r : results) endpoints_.push_back(r.endpoint());
  if (endpoints_.empty()) return Status::Invalid("upstream " + options_.host + " has no address");
  return Status::Ok();
}

class Upstream::Exchange : public std::enable_shared_from_this<Exchange>, private Watched {
 public:
  Exchange(Upstream& up, asio::any_io_executor ex, HttpRequest& req, HttpResponse& res, Done done,
           std::shared_ptr<BodySource> request_body)
      : up_(up),
        ex_(std::move(ex)),
        req_(req),
        res_(res),
        done_(std::move(done)),
        request_body_(std::move(request_body)) {}

  // The client left: the connection is closed, so the upstream sees the request abandoned
  // (as behind nginx) and Sluice holds nothing for it; the pending operation ends the
  // exchange, with nothing retried.
  void Cancel() {
    cancelled_ = true;
    if (!conn_) return;
    beast::error_code ec;
    conn_->socket.shutdown(tcp::socket::shutdown_both, ec);
    conn_->socket.close(ec);
  }

  void Start() {
    auto& pool = IdlePool(&up_);
    while (!pool.empty() && !request_body_) {
      conn_ = std::move(pool.back());
      pool.pop_back();
      if (!Quiet(*conn_)) {  // closed, or sent something unasked while idle: not reused
        conn_.reset();
        continue;
      }
      reused_ = true;
      return Send();
    }
    Connect();
  }

 private:
  // The upstream has `d` to finish what is pending on it (the thread's watch checks).
  void Deadline(std::chrono::steady_clock::duration d) { WatchFor(this, d, ex_); }

  // The answer (or its head, with the source of its body) goes to the listener. The
  // exchange waits on the upstream no more: a streamed body's pieces are watched as read.
  void Hand(std::unique_ptr<BodySource> body) {
    Unwatch(this);
    done_(std::move(body));
  }

  // An operation the watch ended reads as a timeout.
  beast::error_code Timed(beast::error_code ec) const {
    return ec && timed_out_ ? beast::error_code(beast::error::timeout) : ec;
  }

  void TimeOut() override {
    if (!conn_) return;
    timed_out_ = true;
    beast::error_code ignored;
    conn_->socket.close(ignored);
  }

  // Asio's ranged connect reports a socket it could not open (no file descriptor left) as
  // an aborted operation: the log would blame the upstream. Opening one says why.
  beast::error_code WhyAborted(beast::error_code ec) const {
    if (ec != asio::error::operation_aborted || timed_out_ || cancelled_) return ec;
    tcp::socket probe(ex_);
    beast::error_code open_ec;
    probe.open(up_.endpoints_.front().protocol(), open_ec);
    return open_ec ? open_ec : ec;
  }

  void Connect() {
    reused_ = false;
    conn_ = std::make_unique<Pooled>(tcp::socket(ex_));
    Deadline(up_.options_.connect_timeout);
    asio::async_connect(conn_->socket, up_.endpoints_,
                        [self = shared_from_this()](beast::error_code ec, auto) {
                          if (ec) return self->Fail(self->Timed(self->WhyAborted(ec)), "connect");
                          beast::error_code ignored;
                          self->conn_->socket.set_option(tcp::no_delay(true), ignored);
                          self->Send();
                        });
  }

  void Send() {
    if (wire_.empty()) Serialize();
    Deadline(up_.options_.response_timeout);
    asio::async_write(conn_->socket, asio::buffer(wire_),
                      [self = shared_from_this()](beast::error_code ec, size_t) {
                        if (ec) return self->SendFailed(self->Timed(ec));
                        if (self->request_body_) {
                          self->WatchForEarlyAnswer();
                          return self->SendBodyPiece();
                        }
                        self->Receive();
                      });
  }

  // An upstream may answer before the body is whole (its 413 for a body it will not read)
  // and then stop reading without closing. A write that waits on it would wait out the
  // response timeout and turn its answer into a 504: once it speaks, the body stops and
  // its answer is read. What is pending then is a write upstream or a read of the client's
  // next piece: either is cancelled (the wait is done).
  void WatchForEarlyAnswer() {
    conn_->socket.async_wait(
        tcp::socket::wait_read, [self = shared_from_this()](beast::error_code ec) {
          if (ec || !self->request_body_ || !self->conn_) return;
          switch (TakeInterimAnswer(*self->conn_)) {
            case Spoken::kInterimTaken:
              return self->WatchForEarlyAnswer();
            case Spoken::kInterimPartial: {
              // A wait now would wake at once on the bytes there.
              auto later =
                  std::make_shared<asio::steady_timer>(self->ex_, std::chrono::milliseconds(5));
              later->async_wait([self, later](const beast::error_code&) {
                if (self->request_body_ && self->conn_) {
                  self->WatchForEarlyAnswer();
                }
              });
              return;
            }
            case Spoken::kFinal:
              break;
          }
          self->upstream_spoke_ = true;
          beast::error_code ignored;
          if (self->writing_) {
            self->conn_->socket.cancel(ignored);
          } else {
            // Waiting on the client's next piece, which may be long in coming (or never
            // come): the answer goes to the client now.
            self->request_body_->Cancel();
          }
        });
  }

  // Relays the request's body: one piece from the client, then its write upstream.
  void SendBodyPiece() {
    Unwatch(this);  // the client's connection has deadlines of its own
    request_body_->Read([self = shared_from_this()](bool ok, std::string_view piece, bool last) {
      // (An upstream that answered early cancels the read: its answer, not a 400.)
      if (self->upstream_spoke_) return self->SendFailed(http::error::end_of_stream);
      if (!ok) return self->ClientBodyFailed();
      self->SendPiece(piece, last);
    });
  }

  void SendPiece(std::string_view piece, bool last) {
    Deadline(up_.options_.response_timeout);
    writing_ = true;
    asio::async_write(conn_->socket, frame_.Frame(piece, last, req_.chunked()),
                      [self = shared_from_this(), last](beast::error_code ec, size_t) {
                        self->writing_ = false;
                        if (self->upstream_spoke_) {
                          return self->SendFailed(http::error::end_of_stream);
                        }
                        if (ec) return self->SendFailed(self->Timed(ec));
                        if (!last) return self->SendBodyPiece();
                        self->request_body_.reset();  // it holds the client's connection
                        beast::error_code ignored;
                        self->conn_->socket.cancel(ignored);  // the early answer's watch
                        self->Receive();
                      });
  }

  // The upstream stopped taking the request: it may have answered early (its own 413 for a
  // body it will not read, a 401 before the upload) and closed. Its answer, if one came, is
  // the client's; the connection is not reused. An answer is already here or close behind,
  // so the wait for it is short.
  void SendFailed(beast::error_code ec) {
    request_body_.reset();
    send_error_ = ec;
    Deadline(std::min<std::chrono::steady_clock::duration>(up_.options_.response_timeout,
                                                           std::chrono::seconds(1)));
    Receive();
  }

  // The client's body broke off (it left, or stalled past the read timeout): the upstream
  // got part of a request, so its connection goes too.
  void ClientBodyFailed() {
    std::string why = request_body_->Failure();
    if (why.empty()) why = "the request body did not arrive whole";
    res_.result(http::status::bad_request);
    res_.set(http::field::content_type, "application/json");
    res_.body() = R"({"error":"bad_request","message":")" + why + R"("})";
    res_.keep_alive(false);
    conn_.reset();
    request_body_.reset();
    Hand(nullptr);
  }

  // The request in one buffer: cheaper than Beast's serializer for small requests, and one
  // send. (The same reasoning as the listener's responses.)
  void Serialize() {
    wire_.reserve(256 + req_.body().size());
    wire_ += req_.method_string();
    wire_ += ' ';
    wire_ += req_.target();
    wire_ += " HTTP/1.1\r\n";
    // What goes up is HTTP/1.1, which must name a host; an HTTP/1.0 client's may have none.
    if (req_.find(http::field::host) == req_.end()) {
      wire_ += "Host: ";
      bool v6 = up_.options_.host.find(':') != std::string::npos;
      if (v6) wire_ += '[';
      wire_ += up_.options_.host;
      if (v6) wire_ += ']';
      if (up_.options_.port != 80) {
        wire_ += ':';
        wire_ += std::to_string(up_.options_.port);
      }
      wire_ += "\r\n";
    }
    AppendHeaderLines(wire_, req_);
    wire_ += req_.body();
  }

  // The answer. A plain one (ResponseHead: HTTP/1.1, a Content-Length of at most
  // kWholeBody, ...) is read in place and relayed without Beast's parser; any other goes to
  // Beast's (ReceiveWithParser) with the bytes read so far still in the buffer.
  void Receive() {
    if (req_.method() == http::verb::head) return ReceiveWithParser();  // a body may be named
    ReadPlain(kFirstRead);
  }

  void ReadPlain(size_t want) {
    conn_->socket.async_read_some(conn_->buffer.prepare(want),
                                  [self = shared_from_this()](beast::error_code ec, size_t n) {
                                    self->conn_->buffer.commit(n);
                                    if (ec) return self->ReceiveFailed(ec);
                                    self->OnPlainBytes();
                                  });
  }

  void OnPlainBytes() {
    auto data = conn_->buffer.data();
    std::string_view bytes(static_cast<const char*>(data.data()), data.size());
    // Parsed again after each read: the buffer may have moved, and this is a handful of
    // lines (a body comes in a read or two).
    switch (ParseSimpleResponseHead(bytes, plain_)) {
      case HeadParse::kIncomplete:
        return ReadPlain(kFirstRead);
      case HeadParse::kNotSimple:
        return ReceiveWithParser();
      case HeadParse::kSimple:
        break;
    }
    if (plain_.content_length > kWholeBody) return ReceiveWithParser();  // streamed
    const size_t whole = plain_.size + plain_.content_length;
    if (bytes.size() < whole) return ReadPlain(whole - bytes.size());
    DeliverPlain(bytes.substr(plain_.size, plain_.content_length));
  }

  // The plain answer to the client: its status and reason, Sluice's fields, then the
  // upstream's lines as they came, less those MergeHead drops (and the length, which the
  // listener writes for the body it sends).
  void DeliverPlain(std::string_view body) {
    res_.result(plain_.status);
    if (plain_.reason != http::obsolete_reason(res_.result())) res_.reason(plain_.reason);
    // The names of the lines Sluice rendered, read once for all the upstream's lines. The
    // room for those is made first, so that appending them moves nothing `mine` points to
    // (and the buffer, kept from answer to answer, rarely grows).
    res_.rendered_fields.reserve(res_.rendered_fields.size() + plain_.size);
    boost::container::small_vector<std::string_view, 8> mine;
    AnyRenderedName(res_.rendered_fields, [&mine](std::string_view name) {
      mine.push_back(name);
      return false;
    });
    for (const ResponseHead::Line& line : plain_.lines) {
      if (PassesOn(line.name, mine)) res_.rendered_fields += line.raw;
    }
    res_.body().assign(body.data(), body.size());
    conn_->buffer.consume(plain_.size + body.size());
    if (!plain_.close && Reusable()) Pool();
    conn_.reset();
    Hand(nullptr);
  }

  // Whether an upstream field of a plain answer goes on to the client (as MergeHead
  // decides for the others): not the connection's own, nor one Sluice sets itself. (The
  // length is the listener's to write, for the body it sends.)
  bool PassesOn(std::string_view name, std::span<const std::string_view> mine) const {
    if (ConnectionScopedName(name) || SameFieldName(name, "content-length")) return false;
    for (std::string_view named : plain_.connection_named) {
      if (SameFieldName(named, name) && !KeptWhenNamed(name)) return false;
    }
    for (const auto& field : res_) {
      if (SameFieldName(field.name_string(), name)) return false;
    }
    for (std::string_view own : mine) {
      if (SameFieldName(own, name)) return false;
    }
    return true;
  }

  // The head first: a body announced as small is read whole (one write to the client), any
  // other (chunked, large, or delimited by the connection's end) is streamed through.
  void ReceiveWithParser() {
    head_parser_.emplace();
    head_parser_->header_limit(kUpstreamHeadBound);
    head_parser_->body_limit(boost::none);
    if (req_.method() == http::verb::head) head_parser_->skip(true);  // no body follows
    http::async_read_header(conn_->socket, conn_->buffer, *head_parser_,
                            [self = shared_from_this()](beast::error_code ec, size_t) {
                              if (ec) return self->ReceiveFailed(ec);
                              unsigned status = self->head_parser_->get().result_int();
                              if (status == 101) return self->Refuse101();
                              if (status >= 100 && status < 200) {
                                // An interim answer: the real one follows.
                                return self->ReceiveWithParser();
                              }
                              if (auto fault = self->FramingFault()) {
                                return self->RefuseAnswer(*fault);
                              }
                              if (self->head_parser_->is_done() || self->SmallBody()) {
                                return self->ReadWhole();
                              }
                              self->Stream();
                            });
  }

  // Whether the head announces a body of at most kWholeBody (the parser checked the field;
  // read from it rather than from the parser's boost::optional, which GCC's
  // -Wmaybe-uninitialized misreads under ASan). Anything unread here is streamed instead.
  bool SmallBody() const {
    if (head_parser_->chunked()) return false;
    const auto& head = head_parser_->get();
    auto it = head.find(http::field::content_length);
    if (it == head.end()) return false;
    std::string_view v = it->value();
    uint64_t length = 0;
    auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), length);
    return ec == std::errc() && end == v.data() + v.size() && length <= kWholeBody;
  }

  void ReadWhole() {
    parser_.emplace(std::move(*head_parser_));
    head_parser_.reset();
    if (parser_->is_done()) return Deliver();  // no body: 204, 304, HEAD, length 0
    http::async_read(conn_->socket, conn_->buffer, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       if (ec) return self->Fail(self->Timed(ec), "receive");
                       self->Deliver();
                     });
  }

  // No answer: the request's own failure to go out, if it had one, is the cause.
  void ReceiveFailed(beast::error_code ec) {
    if (send_error_) return RetryOrFail(send_error_, "send");
    RetryOrFail(Timed(ec), "receive");
  }

  // A pooled connection the upstream closed while idle fails at once; try a fresh one.
  void RetryOrFail(beast::error_code ec, const char* stage) {
    bool nothing_received =
        head_parser_ ? !head_parser_->got_some() : conn_ && conn_->buffer.size() == 0;
    // Once the request went out, only an idempotent one may be sent again: the upstream may
    // have acted on it before the connection dropped.
    auto m = req_.method();
    bool may_resend = std::string_view(stage) == "send" || m == http::verb::get ||
                      m == http::verb::head || m == http::verb::put || m == http::verb::delete_ ||
                      m == http::verb::options;
    if (reused_ && nothing_received && may_resend && !cancelled_ &&
        (ec == http::error::end_of_stream || ec == asio::error::connection_reset ||
         ec == asio::error::broken_pipe || ec == asio::error::eof)) {
      head_parser_.reset();
      send_error_ = {};
      return Connect();
    }
    Fail(ec, stage);
  }

  // Sluice forwards no Upgrade, so a switch of protocols is not the answer to what it sent;
  // what follows on that connection is not HTTP either.
  void Refuse101() {
    RefuseAnswer("upstream switched protocols (101), which Sluice does not relay");
  }

  // An answer framed so that Sluice cannot relay it as it means, refused as nginx does: a
  // transfer coding other than chunked (Sluice decodes none, and re-frames the body in
  // chunks of its own, which would hand the client coded bytes as the body), or a repeated
  // Content-Length (forwarded, the client might read either).
  std::optional<std::string_view> FramingFault() const {
    const auto& head = head_parser_->get();
    if (TransferEncodingFault(head, head_parser_->chunked())) {
      return "upstream answered with a transfer coding other than chunked";
    }
    if (!ContentLengthIsPlain(head)) return "upstream answered with a repeated Content-Length";
    return std::nullopt;
  }

  // Counted and logged (at most once a second): the client sees only a 502 or 504, or an
  // answer whose connection closes before its end.
  void Failed(size_t kind, std::string_view why) {
    if (up_.options_.on_failure) up_.options_.on_failure(kind);
    if (upstream_log.Allow()) {
      Log("WARN", std::string(why) + " (" + up_.options_.host + ":" +
                      std::to_string(up_.options_.port) + "); " +
                      (kind == kBodyCut ? "the client's connection is closed"
                       : kind == 1      ? "the client is answered 504"
                                        : "the client is answered 502"));
    }
  }

  // A streamed answer the upstream broke off after its head went to the client: it stopped
  // sending (timeout), closed early, or framed the rest so that it cannot be relayed.
  void BodyCut(beast::error_code ec) {
    std::string why = "upstream answer cut short after its head: ";
    if (timed_out_) {
      why += "no piece within the response timeout";
    } else if (ec == http::error::buffer_overflow) {
      why += "a chunk line or trailers over 80 KiB";
    } else {
      why += ec ? ec.message() : "connection closed";
    }
    Failed(kBodyCut, why);
  }

  // A 502 for an answer not relayed; its connection goes, as what follows is unknown.
  void RefuseAnswer(std::string_view why) {
    Failed(3, why);
    request_body_.reset();
    GatewayError(res_, http::status::bad_gateway, std::string(why));
    conn_.reset();
    Hand(nullptr);
  }

  void Fail(beast::error_code ec, const char* stage) {
    request_body_.reset();
    bool timeout = ec == beast::error::timeout;
    std::string why = std::string("upstream ") + stage + (timeout ? " timed out" : " failed: ") +
                      (timeout ? "" : ec.message());
    if (!cancelled_) Failed(timeout ? 1 : std::string_view(stage) == "connect" ? 0 : 2, why);
    GatewayError(res_, timeout ? http::status::gateway_timeout : http::status::bad_gateway, why);
    conn_.reset();
    Hand(nullptr);
  }

  // The upstream's status and headers, with Sluice's rate limit headers kept, for the
  // client's HTTP version and keep-alive.
  HttpResponse MergeHead(http::response_header<> up) {
    HttpResponse out;
    out.base() = std::move(up);
    StripConnectionNamed(out);
    EraseFieldsIf(out, [this](const auto& f) {
      if (ConnectionScoped(f.name())) return true;
      // Sluice's rate limit headers describe its decision: an upstream's own of the same
      // name (its limits, not these) give way.
      for (const auto& mine : res_) {
        if (beast::iequals(mine.name_string(), f.name_string())) return true;
      }
      return RenderedHas(res_.rendered_fields, f.name_string());
    });
    for (const auto& f : res_) {
      // insert by the field's own enum: set() would look the name up again, twice.
      out.insert(f.name(), f.name_string(), f.value());
    }
    out.rendered_fields = std::move(res_.rendered_fields);
    out.version(res_.version());
    out.keep_alive(res_.keep_alive());
    // RFC 9112 6.1: no Transfer-Encoding to an HTTP/1.0 client, which cannot read it (the
    // upstream's, on an answer without a body: HEAD, 304).
    if (out.version() < 11) out.erase(http::field::transfer_encoding);
    return out;
  }

  void Deliver() {
    auto& up = parser_->get();
    bool keep = parser_->keep_alive();  // the parser's own reading of the head
    std::string body = std::move(up.body());
    res_ = MergeHead(std::move(up.base()));
    res_.body() = std::move(body);
    if (keep && Reusable()) Pool();
    conn_.reset();
    Hand(nullptr);
  }

  // Whether this connection may serve another request, its answer being whole: the request
  // went out whole, and neither the watch nor a leaving client closed it meanwhile.
  bool Reusable() const { return !send_error_ && !timed_out_ && !cancelled_; }

  void Pool() {
    auto& pool = IdlePool(&up_);
    if (conn_->buffer.size() > 0) return;  // more than the answer came: not reused
    if (conn_->buffer.capacity() > kFirstRead) conn_->buffer.shrink_to_fit();
    if (pool.size() < up_.options_.max_idle_per_worker) {
      pool.push_back(std::move(conn_));
      ArmSweep(ex_);
    }
  }

  class Source;
  void Stream();
  // Reads the next piece of a streamed body into piece_; `got` as BodySource::Read.
  void ReadPiece(BodySource::Got got) {
    if (!conn_) return asio::post(ex_, [got] { got(false, {}, false); });
    auto& body = body_parser_->get().body();
    body.data = piece_->data();
    body.size = piece_->size();
    Deadline(up_.options_.response_timeout);  // between pieces
    AsyncReadBodyPiece(
        conn_->socket, conn_->buffer, *body_parser_,
        [self = shared_from_this(), got = std::move(got)](beast::error_code ec) mutable {
          Unwatch(self.get());  // until the client asks for the next piece
          if (ec || !self->conn_) {
            self->conn_.reset();  // a broken body: the connection is not reused
            if (!self->cancelled_) self->BodyCut(ec);
            return got(false, {}, false);
          }
          size_t n = self->piece_->size() - self->body_parser_->get().body().size;
          bool last = self->body_parser_->is_done();
          if (last) {
            if (self->body_parser_->keep_alive() && self->Reusable()) self->Pool();
            self->conn_.reset();
          }
          got(true, std::string_view(self->piece_->data(), n), last);
        });
  }

  Upstream& up_;
  asio::any_io_executor ex_;
  HttpRequest& req_;
  HttpResponse& res_;
  Done done_;
  std::shared_ptr<BodySource> request_body_;  // streamed after the head, if any
  PieceFrame frame_;                          // the request body's piece being written
  std::unique_ptr<Pooled> conn_;
  std::string wire_;
  ResponseHead plain_;  // a plain answer's head, read in place
  std::optional<http::response_parser<http::empty_body>> head_parser_;
  std::optional<http::response_parser<http::string_body>> parser_;       // a small body
  std::optional<http::response_parser<http::buffer_body>> body_parser_;  // a streamed one
  std::unique_ptr<std::array<char, kPiece>> piece_;
  beast::error_code send_error_;  // the request did not go out whole: no reuse
  bool reused_ = false;
  bool cancelled_ = false;       // the client left (Cancel)
  bool timed_out_ = false;       // the watch closed the connection
  bool writing_ = false;         // a piece of the request's body is being written
  bool upstream_spoke_ = false;  // it sent something before the request's body was whole
};

// The upstream's body as it arrives; owns the exchange (and so its connection) until the
// last piece, or until the client's connection goes.
class Upstream::Exchange::Source final : public BodySource {
 public:
  explicit Source(std::shared_ptr<Exchange> ex) : ex_(std::move(ex)) {}
  void Read(Got got) override { ex_->ReadPiece(std::move(got)); }
  void Cancel() override {
    ex_->cancelled_ = true;  // the client left: the upstream broke nothing
    if (ex_->conn_) {
      beast::error_code ignored;
      ex_->conn_->socket.close(ignored);  // the read in progress ends aborted
    }
  }

 private:
  std::shared_ptr<Exchange> ex_;
};

void Upstream::Exchange::Stream() {
  body_parser_.emplace(std::move(*head_parser_));
  head_parser_.reset();
  body_parser_->body_limit(boost::none);
  // Each read parses all the chunks it brought, up to a piece: one by one, a body sent in
  // 1-byte chunks cost a system call and a loop turn per byte (10,000 sends for 60 KB).
  body_parser_->eager(true);
  // Beast reads into the room the buffer has: the head's few KiB would read a large body
  // a few KiB per system call. (Pool gives the room back.)
  conn_->buffer.reserve(kPiece);
  piece_ = std::make_unique<std::array<char, kPiece>>();
  auto& up = body_parser_->get();
  res_ = MergeHead(up.base());
  // Sluice frames the body itself (the client's connection is not the upstream's).
  res_.erase(http::field::transfer_encoding);
  Hand(std::make_unique<Source>(shared_from_this()));
}

void ReleaseIdleUpstreamConnections() {
  t_pools.clear();
  t_sweep.timer.reset();
  t_sweep.armed = false;
  // Exchanges still in flight are destroyed with the loop's handlers, maybe elsewhere: the
  // list forgets them, and the timer goes while its loop exists.
  while (t_watch.first != nullptr) Unwatch(t_watch.first);
  t_watch.timer.reset();
  t_watch.armed = false;
}

std::function<void()> Upstream::Forward(const asio::any_io_executor& executor, HttpRequest& req,
                                        HttpResponse& res, Done done,
                                        std::shared_ptr<BodySource> request_body) {
  StripHopByHop(req);
  req.keep_alive(true);
  if (!request_body) {
    req.prepare_payload();
  } else if (!AnnouncedLength(req)) {
    // The body is sent as it comes, in chunks Sluice frames: the header says exactly that,
    // not the client's spelling of it ("CHUNKED", ",chunked").
    req.erase(http::field::transfer_encoding);
    req.chunked(true);
  }
  auto exchange = std::make_shared<Exchange>(*this, executor, req, res, std::move(done),
                                             std::move(request_body));
  exchange->Start();
  return [weak = std::weak_ptr<Exchange>(exchange)] {
    if (auto e = weak.lock()) e->Cancel();
  };
}

}  // namespace sluice::server
