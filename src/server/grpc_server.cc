#include "server/grpc_server.h"

#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/x509.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <list>
#include <mutex>
#include <optional>

#include <google/protobuf/message_lite.h>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include "core/log.h"
#include "server/http_server.h"
#include "server/idle_reset_filter.h"
#include "server/peer_connections.h"

namespace sluice::server {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using grpc_detail::Connection;
using grpc_detail::Stream;

// Answers counted per loop (only that loop's thread writes its block): by method (the
// methods' order, then one for calls to no known method) and gRPC status code.
struct alignas(64) GrpcLoopStats {
  explicit GrpcLoopStats(size_t methods) : answers((methods + 1) * kGrpcCodes) {}
  static constexpr size_t kGrpcCodes = 17;
  std::vector<std::atomic<uint64_t>> answers;
  std::atomic<uint64_t> protocol_errors{0};
  std::atomic<uint64_t> stalled{0};
  void Count(size_t method, GrpcCode code) {
    auto& n = answers[method * kGrpcCodes + static_cast<size_t>(code)];
    n.store(n.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }
};

struct GrpcServer::State {
  GrpcServerOptions options;
  std::atomic<size_t> buffered{0};  // request bytes all connections hold (max_buffered_bytes)
  struct Method {
    GrpcMethod* method;
    size_t index;
  };
  std::map<std::string, Method, std::less<>> methods;
  std::vector<std::string> method_names;
  std::vector<std::unique_ptr<GrpcLoopStats>> stats;  // per loop
  // Per loop, the TLS context its new connections take (a connection keeps the one it
  // began with); each is touched only by its loop's thread. Empty: cleartext.
  std::vector<std::shared_ptr<asio::ssl::context>> tls;
  std::vector<asio::io_context*> loops;
  std::vector<std::shared_ptr<struct GrpcAcceptor>> acceptors;  // one per loop
  // Per loop, its open connections; each list is touched only by its loop's thread.
  std::vector<std::list<std::weak_ptr<Connection>>> connections;
  std::atomic<size_t> open{0};
  std::unique_ptr<PeerConnections> per_peer;  // by client address, when bounded
  std::atomic<bool> draining{false};
  bool shut_down = false;  // Shutdown's caller only
  std::mutex mu;
  std::condition_variable closed;  // `open` fell
};

namespace grpc_detail {

// One call. Streams are reused: a connection keeps the ones its closed calls left.
struct Stream {
  int32_t id = 0;
  GrpcMethod* method = nullptr;
  size_t method_index = 0;  // in the server's methods; their count for none
  std::string path;         // when no method has it, for the error
  bool post = false;
  bool grpc_content = false;
  std::string encoding;  // grpc-encoding, when not "identity" (cut to 64 bytes)
  std::optional<std::chrono::steady_clock::time_point> deadline;  // from grpc-timeout
  // When its HEADERS came; reset once recycled. With `answered` false, the call's request
  // is still arriving.
  std::optional<std::chrono::steady_clock::time_point> begun;
  size_t header_bytes = 0;
  std::string body;
  bool answered = false;  // an answer is submitted, or the call is given to its method
  bool calling = false;   // a GrpcReply for it is out
  bool closed = false;    // nghttp2 closed it while calling
  std::string out;        // the answer's DATA: prefix and message
  size_t out_sent = 0;
  // A held call (GrpcReply::Hold): open after `out`, until the server drains and sends
  // `at_drain` (framed) to end it.
  bool holding = false;
  std::string at_drain;
};

struct Connection : std::enable_shared_from_this<Connection> {
  Connection(tcp::socket s, std::shared_ptr<GrpcServer::State> st, size_t w,
             std::optional<uint64_t> peer)
      : socket(std::move(s)),
        handshake(socket.get_executor()),
        watchdog(socket.get_executor()),
        state(std::move(st)),
        worker(w),
        peer_key(peer) {
    if (!state->tls.empty()) {
      tls_context = state->tls[w];
      tls.emplace(std::move(socket), *tls_context);
    }
    state->open.fetch_add(1, std::memory_order_relaxed);
  }
  ~Connection() {
    deleting = true;
    if (session) nghttp2_session_del(session);
    if (Charged(buffered) > 0) state->buffered.fetch_sub(Charged(buffered));  // its messages
    if (peer_key) state->per_peer->Release(*peer_key);
    std::lock_guard lock(state->mu);
    state->open.fetch_sub(1, std::memory_order_relaxed);
    state->closed.notify_all();
  }

  void Start();
  void StartHttp2();
  tcp::socket& Lowest() { return tls ? tls->next_layer() : socket; }
  void Read();
  void OnRead(const boost::system::error_code& ec, size_t n);
  void Flush();
  void ScheduleFlush();
  void CloseIfDone();
  void Close();
  void Drain();
  // Arms the watchdog (if it is not): a request not whole, or a write not done, within
  // stall_timeout closes the connection.
  void Watch();
  void CheckStall();

  Stream* NewStream();
  void Recycle(Stream* s);
  void ReleaseHeld(Stream* s);
  void Dispatch(Stream* s);
  // Answers a call whose head refuses it (not a POST, not gRPC, no such method); false when
  // the head is fine.
  bool RefuseByHead(Stream* s);
  void SubmitOk(Stream* s);
  void SubmitError(Stream* s, GrpcCode code, std::string_view message, const char* http_status);
  void NoteProtocolError() {  // once per connection
    if (protocol_error) return;
    protocol_error = true;
    state->stats[worker]->protocol_errors.fetch_add(1, std::memory_order_relaxed);
  }
  bool OutputFull() const { return pending.size() + writing.size() > kMaxOutput; }

  static constexpr size_t kMaxOutput = 1 << 20;  // unsent bytes before reading stops

  // The context `tls` began with, kept while it lives: a certificate reload swaps the loop's.
  std::shared_ptr<asio::ssl::context> tls_context;
  tcp::socket socket;                                 // cleartext; moved into tls with TLS
  std::optional<asio::ssl::stream<tcp::socket>> tls;  // TLS
  asio::steady_timer handshake;                       // until the client's first frame
  asio::steady_timer watchdog;                        // while a request or a write is pending
  bool watching = false;
  std::chrono::steady_clock::time_point write_since;  // of the write in flight
  bool greeted = false;
  std::shared_ptr<GrpcServer::State> state;
  size_t worker;
  std::optional<uint64_t> peer_key;  // counted in state->per_peer until destroyed
  std::list<std::weak_ptr<Connection>>::iterator self;
  nghttp2_session* session = nullptr;
  IdleResetFilter resets;  // between the socket and the session
  std::array<uint8_t, 16 * 1024> in;
  std::string pending;  // from nghttp2, not yet being written
  std::string writing;  // being written
  size_t buffered = 0;  // request bytes held in streams
  // Calls handed to their method and not yet answered, those of streams the client reset
  // (or made the server reset) included: a reset frees the stream's slot in
  // max_concurrent_streams, not the call's work, so without this bound one connection
  // could keep any number of store calls in flight.
  size_t calls_out = 0;
  // The part of `buffered` charged to the server's budget (State::buffered): what is past
  // a connection's first kOwn bytes. An ordinary call, a few hundred bytes, so never
  // touches the counter the workers share.
  static constexpr size_t kOwn = 16 * 1024;
  static size_t Charged(size_t bytes) { return bytes > kOwn ? bytes - kOwn : 0; }
  bool reading = false, write_busy = false, read_paused = false;
  bool in_recv = false, flush_posted = false, closed = false, deleting = false;
  bool protocol_error = false;
  std::vector<std::unique_ptr<Stream>> streams;  // every stream this connection made
  std::vector<Stream*> spare;                    // the ones free to reuse
};

}  // namespace grpc_detail

namespace {

constexpr char kContentType[] = "application/grpc";

nghttp2_nv Nv(std::string_view name, std::string_view value, uint8_t flags = NGHTTP2_NV_FLAG_NONE) {
  // nghttp2 does not write through these pointers; it copies them unless told not to.
  return nghttp2_nv{reinterpret_cast<uint8_t*>(const_cast<char*>(name.data())),
                    reinterpret_cast<uint8_t*>(const_cast<char*>(value.data())), name.size(),
                    value.size(), flags};
}
constexpr uint8_t kStatic = NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE;

// grpc-message is percent-encoded (gRPC over HTTP/2): bytes outside printable ASCII, and %.
std::string PercentEncode(std::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (char ch : s) {
    auto u = static_cast<unsigned char>(ch);
    if (u < 0x20 || u > 0x7e || ch == '%') {
      out += '%';
      out += kHex[u >> 4];
      out += kHex[u & 15];
    } else {
      out += ch;
    }
  }
  return out;
}

Connection* Conn(void* user_data) { return static_cast<Connection*>(user_data); }

int OnBeginHeaders(nghttp2_session* session, const nghttp2_frame* frame, void* user_data) {
  if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  Connection* c = Conn(user_data);
  Stream* s = c->NewStream();
  s->id = frame->hd.stream_id;
  s->begun = std::chrono::steady_clock::now();
  nghttp2_session_set_stream_user_data(session, s->id, s);
  c->Watch();
  return 0;
}

// grpc-timeout: at most 8 digits and a unit (H, M, S, m, u, n), as gRPC over HTTP/2
// defines it. Anything else, or over a day (no deadline worth keeping), is ignored: the call
// then has no deadline.
std::optional<std::chrono::nanoseconds> ParseGrpcTimeout(std::string_view v) {
  if (v.size() < 2 || v.size() > 9) return std::nullopt;
  int64_t n = 0;
  for (char c : v.substr(0, v.size() - 1)) {
    if (c < '0' || c > '9') return std::nullopt;
    n = n * 10 + (c - '0');
  }
  int64_t unit_ns = 0;
  switch (v.back()) {
    case 'H':
      unit_ns = 3'600'000'000'000;
      break;
    case 'M':
      unit_ns = 60'000'000'000;
      break;
    case 'S':
      unit_ns = 1'000'000'000;
      break;
    case 'm':
      unit_ns = 1'000'000;
      break;
    case 'u':
      unit_ns = 1'000;
      break;
    case 'n':
      unit_ns = 1;
      break;
    default:
      return std::nullopt;
  }
  constexpr int64_t kDayNs = 86'400'000'000'000;
  if (n > kDayNs / unit_ns) return std::nullopt;  // also keeps n * unit_ns in range
  return std::chrono::nanoseconds(n * unit_ns);
}

int OnHeader(nghttp2_session* session, const nghttp2_frame* frame, const uint8_t* name_bytes,
             size_t name_len, const uint8_t* value_bytes, size_t value_len, uint8_t /*flags*/,
             void* user_data) {
  auto* s =
      static_cast<Stream*>(nghttp2_session_get_stream_user_data(session, frame->hd.stream_id));
  if (!s) return 0;
  Connection* c = Conn(user_data);
  s->header_bytes += name_len + value_len + 32;  // as SETTINGS_MAX_HEADER_LIST_SIZE counts
  if (s->header_bytes > c->state->options.max_header_bytes) {
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;  // resets this stream only
  }
  if (frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;  // a client's trailers
  std::string_view name(reinterpret_cast<const char*>(name_bytes), name_len);
  std::string_view value(reinterpret_cast<const char*>(value_bytes), value_len);
  if (name == ":path") {
    auto it = c->state->methods.find(value);
    if (it != c->state->methods.end()) {
      s->method = it->second.method;
      s->method_index = it->second.index;
    } else {
      s->path.assign(value.substr(0, 256));
    }
  } else if (name == ":method") {
    s->post = value == "POST";
  } else if (name == "grpc-encoding") {
    if (value != "identity") s->encoding.assign(value.substr(0, 64));
  } else if (name == "grpc-timeout") {
    if (auto t = ParseGrpcTimeout(value)) s->deadline = std::chrono::steady_clock::now() + *t;
  } else if (name == "content-type") {
    // application/grpc, application/grpc+proto, application/grpc;charset=...
    s->grpc_content = value.starts_with(kContentType) && (value.size() == sizeof kContentType - 1 ||
                                                          value[sizeof kContentType - 1] == '+' ||
                                                          value[sizeof kContentType - 1] == ';');
  }
  return 0;
}

int OnDataChunk(nghttp2_session* session, uint8_t /*flags*/, int32_t stream_id, const uint8_t* data,
                size_t len, void* user_data) {
  auto* s = static_cast<Stream*>(nghttp2_session_get_stream_user_data(session, stream_id));
  if (!s || s->answered) return 0;  // after an early answer the rest is dropped
  Connection* c = Conn(user_data);
  const auto& o = c->state->options;
  // Too large once more bytes than a message may have come, or as soon as its prefix says
  // so: a client announcing a huge message is answered at once, not after it has sent
  // (and this server held) the bound's worth of it.
  const auto announced = [&] {
    if (s->body.size() + len < 5) return uint64_t{0};
    uint8_t prefix[5];
    const size_t held = std::min<size_t>(s->body.size(), 5);
    std::memcpy(prefix, s->body.data(), held);
    std::memcpy(prefix + held, data, 5 - held);
    return uint64_t{prefix[1]} << 24 | uint64_t{prefix[2]} << 16 | uint64_t{prefix[3]} << 8 |
           uint64_t{prefix[4]};
  };
  if (s->body.size() + len > o.max_message_bytes + 5 ||
      (s->body.size() < 5 && announced() > o.max_message_bytes)) {
    c->SubmitError(s, GrpcCode::kResourceExhausted,
                   "request message larger than " + std::to_string(o.max_message_bytes) + " bytes",
                   "200");
    return 0;
  }
  // All streams of a connection together hold at most a few messages' worth, so many
  // concurrent uploads cannot add up to gigabytes.
  if (c->buffered + len > 2 * o.max_message_bytes + 64 * 1024) {
    c->SubmitError(s, GrpcCode::kResourceExhausted,
                   "too many request bytes in flight on this connection", "200");
    return 0;
  }
  // And all connections together: many clients each at their bound must not add up to
  // more memory than the process may take.
  const size_t more = Connection::Charged(c->buffered + len) - Connection::Charged(c->buffered);
  if (more > 0) {
    if (c->state->buffered.load(std::memory_order_relaxed) + more > o.max_buffered_bytes) {
      c->SubmitError(s, GrpcCode::kResourceExhausted,
                     "the server holds too many request bytes in flight; retry later", "200");
      return 0;
    }
    c->state->buffered.fetch_add(more, std::memory_order_relaxed);
  }
  s->body.append(reinterpret_cast<const char*>(data), len);
  c->buffered += len;
  return 0;
}

int OnFrameRecv(nghttp2_session* session, const nghttp2_frame* frame, void* user_data) {
  Conn(user_data)->greeted = true;
  if ((frame->hd.type == NGHTTP2_HEADERS || frame->hd.type == NGHTTP2_DATA) &&
      (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
    auto* s =
        static_cast<Stream*>(nghttp2_session_get_stream_user_data(session, frame->hd.stream_id));
    if (s && !s->answered) Conn(user_data)->Dispatch(s);
  } else if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
    // A call its head already refuses is answered before its message: its bytes are then
    // dropped as they come, not held until the whole message is in.
    auto* s =
        static_cast<Stream*>(nghttp2_session_get_stream_user_data(session, frame->hd.stream_id));
    if (s && !s->answered) Conn(user_data)->RefuseByHead(s);
  }
  return 0;
}

int OnStreamClose(nghttp2_session* session, int32_t stream_id, uint32_t /*error_code*/,
                  void* user_data) {
  Connection* c = Conn(user_data);
  if (c->deleting) return 0;
  auto* s = static_cast<Stream*>(nghttp2_session_get_stream_user_data(session, stream_id));
  if (!s) return 0;
  if (s->calling) {
    s->closed = true;  // its reply recycles it
  } else {
    c->Recycle(s);
  }
  return 0;
}

// nghttp2 ends a connection on most protocol errors itself, with a GOAWAY that says why.
int OnFrameSend(nghttp2_session*, const nghttp2_frame* frame, void* user_data) {
  if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR) {
    Conn(user_data)->NoteProtocolError();
  }
  return 0;
}

// The answer's message, then the trailers that end the call.
ssize_t ReadAnswer(nghttp2_session* session, int32_t stream_id, uint8_t* buf, size_t length,
                   uint32_t* data_flags, nghttp2_data_source* source, void* /*user_data*/) {
  auto* s = static_cast<Stream*>(source->ptr);
  size_t n = std::min(length, s->out.size() - s->out_sent);
  if (n == 0 && s->holding) return NGHTTP2_ERR_DEFERRED;  // until Drain resumes it
  std::memcpy(buf, s->out.data() + s->out_sent, n);
  s->out_sent += n;
  if (s->out_sent == s->out.size() && !s->holding) {
    *data_flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
    nghttp2_nv trailers[] = {Nv("grpc-status", "0", kStatic)};
    if (nghttp2_submit_trailer(session, stream_id, trailers, 1) != 0) {
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
  }
  return static_cast<ssize_t>(n);
}

nghttp2_session_callbacks* Callbacks() {
  static nghttp2_session_callbacks* callbacks = [] {
    nghttp2_session_callbacks* cb = nullptr;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, OnBeginHeaders);
    nghttp2_session_callbacks_set_on_header_callback(cb, OnHeader);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, OnDataChunk);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, OnFrameRecv);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, OnStreamClose);
    nghttp2_session_callbacks_set_on_frame_send_callback(cb, OnFrameSend);
    return cb;
  }();
  return callbacks;
}

// nghttp2's guard against "rapid reset" floods (CVE-2023-44487) ends a connection once its
// client has reset more streams than a token bucket allows: by default a burst of 1000 and
// 33 a second. Envoy resets every rate limit call that outlives its timeout (20 ms by
// default), so a busy Envoy on a slow moment resets hundreds a second, and at 33 its
// connection would be torn down, failing every call on it. A flood runs at tens of
// thousands a second; this bound still ends it.
nghttp2_option* Options() {
  static nghttp2_option* options = [] {
    nghttp2_option* o = nullptr;
    nghttp2_option_new(&o);
    nghttp2_option_set_stream_reset_rate_limit(o, 10'000, 2'000);
    // No priority tree (unary calls have nothing to schedule against each other), so no
    // closed streams kept for it: nghttp2 otherwise keeps up to max_concurrent_streams of
    // them per connection in its stream map, and its lookups went to memory.
    nghttp2_option_set_no_closed_streams(o, 1);
    return o;
  }();
  return options;
}

LogLimiter protocol_log;
LogLimiter handshake_log;
LogLimiter stall_log;

}  // namespace

namespace grpc_detail {

void Connection::Start() {
  boost::system::error_code ec;
  Lowest().set_option(tcp::no_delay(true), ec);
  // A connection that never speaks HTTP/2 would hold its place among max_connections (the
  // TLS handshake, if any, included).
  handshake.expires_after(state->options.handshake_timeout);
  handshake.async_wait([self = shared_from_this()](const boost::system::error_code& error) {
    if (!error && !self->greeted) self->Close();
  });
  if (!tls) return StartHttp2();
  tls->async_handshake(asio::ssl::stream_base::server,
                       [self = shared_from_this()](const boost::system::error_code& error) {
                         if (self->closed) return;
                         if (error) {
                           if (handshake_log.Allow()) {
                             Log("WARN", "grpc: TLS handshake failed: " + error.message());
                           }
                           return self->Close();
                         }
                         self->StartHttp2();
                       });
}

void Connection::StartHttp2() {
  nghttp2_session_server_new2(&session, Callbacks(), this, Options());
  const auto& o = state->options;
  nghttp2_settings_entry settings[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, o.max_concurrent_streams},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, static_cast<uint32_t>(o.max_header_bytes)},
      // RFC 9218: the client's RFC 7540 priority signals are not read (a client that does
      // not know the setting ignores it, RFC 9113 6.5.2).
      {NGHTTP2_SETTINGS_NO_RFC7540_PRIORITIES, 1},
  };
  nghttp2_submit_settings(session, NGHTTP2_FLAG_NONE, settings, std::size(settings));
  // A connection-wide receive window beyond the default 64 KiB, so many concurrent calls'
  // messages are not held back waiting for WINDOW_UPDATEs.
  nghttp2_session_set_local_window_size(session, NGHTTP2_FLAG_NONE, 0, 1 << 20);
  Flush();
  Read();
}

void Connection::Read() {
  if (closed || reading) return;
  if (OutputFull()) {
    read_paused = true;  // a client that does not read its answers gets no more calls in
    return;
  }
  reading = true;
  auto done = [self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
    self->reading = false;
    self->OnRead(ec, n);
  };
  if (tls) {
    tls->async_read_some(asio::buffer(in), std::move(done));
  } else {
    socket.async_read_some(asio::buffer(in), std::move(done));
  }
}

void Connection::OnRead(const boost::system::error_code& ec, size_t n) {
  if (closed) return;
  if (ec) return Close();
  in_recv = true;
  ssize_t rv = 0;
  resets.Pass(in.data(), n, [&](const uint8_t* data, size_t size) {
    rv = nghttp2_session_mem_recv(session, data, size);
    return rv >= 0;
  });
  in_recv = false;
  if (rv < 0) {
    NoteProtocolError();
    if (protocol_log.Allow()) {
      Log("WARN",
          std::string("grpc: closing a connection: ") + nghttp2_strerror(static_cast<int>(rv)));
    }
    nghttp2_session_terminate_session(session, NGHTTP2_PROTOCOL_ERROR);
  }
  Flush();
  if (closed) return;
  if (nghttp2_session_want_read(session)) {
    Read();
  } else {
    CloseIfDone();
  }
}

void Connection::Flush() {
  if (closed || !session) return;
  for (;;) {
    const uint8_t* data = nullptr;
    ssize_t n = nghttp2_session_mem_send(session, &data);
    if (n < 0) return Close();
    if (n == 0) break;
    pending.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
  }
  if (write_busy) return;
  if (pending.empty()) return CloseIfDone();
  writing.swap(pending);
  write_busy = true;
  write_since = std::chrono::steady_clock::now();
  Watch();
  auto done = [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
    self->write_busy = false;
    self->writing.clear();
    if (self->closed) return;
    if (ec) return self->Close();
    self->Flush();
    if (self->read_paused && !self->OutputFull()) {
      self->read_paused = false;
      self->Read();
    }
  };
  if (tls) {
    asio::async_write(*tls, asio::buffer(writing), std::move(done));
  } else {
    asio::async_write(socket, asio::buffer(writing), std::move(done));
  }
}

// Answers that come later (from Redis) are flushed once per turn of the loop, so those that
// arrive together go out in one write.
void Connection::ScheduleFlush() {
  if (in_recv || flush_posted || closed) return;
  flush_posted = true;
  asio::post(Lowest().get_executor(), [self = shared_from_this()] {
    self->flush_posted = false;
    self->Flush();
  });
}

void Connection::CloseIfDone() {
  if (closed || !session || write_busy || !pending.empty()) return;
  if (!nghttp2_session_want_read(session) && !nghttp2_session_want_write(session)) Close();
}

void Connection::Close() {
  if (closed) return;
  closed = true;
  handshake.cancel();
  watchdog.cancel();
  boost::system::error_code ignored;
  Lowest().close(ignored);
  state->connections[worker].erase(self);
}

void Connection::Watch() {
  if (watching || closed) return;
  watching = true;
  // Checked a few times per stall_timeout: a stalled connection goes within 1.25 of it.
  watchdog.expires_after(state->options.stall_timeout / 4);
  watchdog.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    self->watching = false;
    if (!ec && !self->closed) self->CheckStall();
  });
}

void Connection::CheckStall() {
  const auto now = std::chrono::steady_clock::now();
  const auto limit = state->options.stall_timeout;
  const char* stalled = nullptr;
  bool watched = false;
  if (write_busy) {
    watched = true;
    if (now - write_since > limit) stalled = "its client does not read its answers";
  }
  // A call waiting on its method (a Redis round trip) is the server's to finish; a held
  // one stays open on purpose. Any other still open has waited on its client: for the rest
  // of its request, or to take its answer (its flow-control window, or its reads).
  bool reset = false;
  for (const auto& s : streams) {
    if (!s->begun || s->calling || s->holding) continue;
    watched = true;
    if (now - *s->begun <= limit) continue;
    if (s->answered && nghttp2_session_get_stream_local_close(session, s->id) == 1) {
      // Answered in full (an early answer: an unknown method, a refused head) while its
      // client still has not ended its request: that stream alone is reset, as RFC 9113
      // 8.1 allows once a response is complete. The connection's other calls go on.
      nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_NO_ERROR);
      reset = true;
      continue;
    }
    stalled =
        s->answered ? "its client does not take its answers" : "a request it began is not whole";
  }
  if (reset && !stalled) Flush();
  if (stalled) {
    state->stats[worker]->stalled.fetch_add(1, std::memory_order_relaxed);
    if (stall_log.Allow()) Log("WARN", std::string("grpc: closing a connection: ") + stalled);
    return Close();
  }
  if (watched) Watch();
}

void Connection::Drain() {
  if (closed) return;
  if (!session) return Close();  // still in its TLS handshake
  // Held calls end now, with their last message.
  for (auto& s : streams) {
    if (s->holding) ReleaseHeld(s.get());
  }
  // Calls already begun are answered; later ones the client retries elsewhere.
  nghttp2_submit_goaway(session, NGHTTP2_FLAG_NONE,
                        nghttp2_session_get_last_proc_stream_id(session), NGHTTP2_NO_ERROR, nullptr,
                        0);
  Flush();
}

Stream* Connection::NewStream() {
  if (spare.empty()) {
    streams.push_back(std::make_unique<Stream>());
    streams.back()->method_index = state->method_names.size();
    return streams.back().get();
  }
  Stream* s = spare.back();
  spare.pop_back();
  return s;
}

void Connection::ReleaseHeld(Stream* s) {
  s->holding = false;
  s->out += s->at_drain;
  nghttp2_session_resume_data(session, s->id);
  ScheduleFlush();
}

void Connection::Recycle(Stream* s) {
  const size_t freed = std::min(buffered, s->body.size());
  const size_t less = Charged(buffered) - Charged(buffered - freed);
  buffered -= freed;
  if (less > 0) state->buffered.fetch_sub(less, std::memory_order_relaxed);
  s->method = nullptr;
  s->method_index = state->method_names.size();
  s->path.clear();
  s->post = s->grpc_content = false;
  s->encoding.clear();
  s->header_bytes = 0;
  // A spare stream keeps small buffers only: an RLS call is a few hundred bytes, and a
  // client that once filled many streams with large messages must not leave each of them
  // holding that much for the rest of the connection.
  constexpr size_t kKeep = 4 * 1024;
  s->body.clear();
  if (s->body.capacity() > kKeep) std::string().swap(s->body);
  s->answered = s->calling = s->closed = false;
  s->deadline.reset();
  s->begun.reset();
  s->out.clear();
  if (s->out.capacity() > kKeep) std::string().swap(s->out);
  s->out_sent = 0;
  s->holding = false;
  s->at_drain.clear();
  spare.push_back(s);
}

bool Connection::RefuseByHead(Stream* s) {
  if (!s->post) {
    SubmitError(s, GrpcCode::kInternal, "gRPC calls are POST", "405");
  } else if (!s->grpc_content) {
    SubmitError(s, GrpcCode::kInternal, "content-type must be application/grpc", "415");
  } else if (!s->method) {
    SubmitError(s, GrpcCode::kUnimplemented, "unknown method " + s->path, "200");
  } else {
    return false;
  }
  return true;
}

void Connection::Dispatch(Stream* s) {
  if (RefuseByHead(s)) return;
  const std::string& b = s->body;
  if (b.size() < 5) {
    return SubmitError(
        s, GrpcCode::kInternal,
        b.empty() ? "a unary call needs one request message" : "request message prefix cut short",
        "200");
  }
  auto u = [&b](size_t i) { return static_cast<uint32_t>(static_cast<unsigned char>(b[i])); };
  uint32_t length = u(1) << 24 | u(2) << 16 | u(3) << 8 | u(4);
  if (u(0) == 1) {
    // As gRPC's compression spec asks: a codec Sluice lacks is UNIMPLEMENTED (a client may
    // name one and still send its messages as they are, which are taken); a compressed
    // message with no codec named is INTERNAL.
    if (s->encoding.empty()) {
      return SubmitError(s, GrpcCode::kInternal, "a compressed message without a grpc-encoding",
                         "200");
    }
    return SubmitError(s, GrpcCode::kUnimplemented,
                       "grpc-encoding " + s->encoding + " is not accepted (identity only)", "200");
  }
  if (u(0) != 0) return SubmitError(s, GrpcCode::kInternal, "bad message flags", "200");
  if (length != b.size() - 5) {
    return SubmitError(s, GrpcCode::kInternal,
                       length > b.size() - 5 ? "request message cut short"
                                             : "a unary call takes one request message",
                       "200");
  }
  if (s->deadline && std::chrono::steady_clock::now() >= *s->deadline) {
    return SubmitError(s, GrpcCode::kDeadlineExceeded,
                       "the call's deadline passed before it "
                       "was decided",
                       "200");
  }
  if (calls_out >= state->options.max_concurrent_streams) {
    return SubmitError(s, GrpcCode::kResourceExhausted,
                       "too many calls in flight on this connection (reset streams' included)",
                       "200");
  }
  s->answered = true;
  s->calling = true;
  ++calls_out;
  auto& io = static_cast<asio::io_context&>(Lowest().get_executor().context());
  s->method->Call(std::string_view(b).substr(5), io, GrpcReply(shared_from_this(), s));
}

void Connection::SubmitOk(Stream* s) {
  state->stats[worker]->Count(s->method_index, GrpcCode::kOk);
  nghttp2_nv head[] = {Nv(":status", "200", kStatic), Nv("content-type", kContentType, kStatic)};
  nghttp2_data_provider body;
  body.source.ptr = s;
  body.read_callback = ReadAnswer;
  nghttp2_submit_response(session, s->id, head, std::size(head), &body);
  ScheduleFlush();
}

// A trailers-only answer: status and message in the one HEADERS frame that ends the call.
void Connection::SubmitError(Stream* s, GrpcCode code, std::string_view message,
                             const char* http_status) {
  s->answered = true;
  state->stats[worker]->Count(s->method_index, code);
  std::string status = std::to_string(static_cast<int>(code));
  std::string encoded = PercentEncode(message);
  // grpc-accept-encoding tells a client that compressed its call what to send instead.
  nghttp2_nv head[] = {Nv(":status", http_status), Nv("content-type", kContentType, kStatic),
                       Nv("grpc-status", status), Nv("grpc-message", encoded),
                       Nv("grpc-accept-encoding", "identity", kStatic)};
  nghttp2_submit_response(session, s->id, head, std::size(head), nullptr);
  ScheduleFlush();
}

}  // namespace grpc_detail

GrpcReply::GrpcReply(std::shared_ptr<Connection> conn, Stream* stream)
    : conn_(std::move(conn)), stream_(stream) {}

GrpcReply::GrpcReply(GrpcReply&& other) noexcept
    : conn_(std::move(other.conn_)), stream_(other.stream_) {}

GrpcReply::~GrpcReply() {
  if (conn_) Fail(GrpcCode::kInternal, "the call was dropped unanswered");
}

namespace {

// Appends a message as gRPC frames it: not compressed, its length, its bytes.
void AppendMessage(std::string& out, const google::protobuf::MessageLite& message) {
  size_t n = message.ByteSizeLong();
  size_t at = out.size();
  out.resize(at + 5 + n);
  out[at] = 0;
  out[at + 1] = static_cast<char>(n >> 24);
  out[at + 2] = static_cast<char>(n >> 16);
  out[at + 3] = static_cast<char>(n >> 8);
  out[at + 4] = static_cast<char>(n);
  message.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(out.data() + at + 5));
}

}  // namespace

// The call's stream, to answer now, and its connection in *conn; null when there is nothing
// to answer: answered already, or the client went away.
Stream* GrpcReply::Take(std::shared_ptr<Connection>* conn) {
  if (!conn_) return nullptr;
  *conn = std::move(conn_);
  Stream* s = stream_;
  s->calling = false;
  --(*conn)->calls_out;
  if ((*conn)->closed) return nullptr;  // the connection's streams go with it
  if (s->closed) {
    (*conn)->Recycle(s);
    return nullptr;
  }
  return s;
}

void GrpcReply::Ok(const google::protobuf::MessageLite& message) {
  std::shared_ptr<Connection> conn;
  Stream* s = Take(&conn);
  if (!s) return;
  AppendMessage(s->out, message);
  conn->SubmitOk(s);
}

void GrpcReply::Hold(const google::protobuf::MessageLite& now,
                     const google::protobuf::MessageLite& at_drain) {
  std::shared_ptr<Connection> conn;
  Stream* s = Take(&conn);
  if (!s) return;
  AppendMessage(s->out, now);
  AppendMessage(s->at_drain, at_drain);
  s->holding = true;
  conn->SubmitOk(s);
  if (conn->state->draining.load(std::memory_order_relaxed)) conn->ReleaseHeld(s);
}

void GrpcReply::Fail(GrpcCode code, std::string_view message) {
  std::shared_ptr<Connection> conn;
  Stream* s = Take(&conn);
  if (!s) return;
  conn->SubmitError(s, code, message, "200");
}

// One per loop: accepts onto its loop.
struct GrpcAcceptor : std::enable_shared_from_this<GrpcAcceptor> {
  GrpcAcceptor(asio::io_context& io, GrpcServer::State* s, size_t w)
      : acceptor(io), backoff(io), state(s), worker(w) {}

  void Accept() {
    acceptor.async_accept([self = shared_from_this()](const boost::system::error_code& ec,
                                                      tcp::socket socket) {
      if (ec == asio::error::operation_aborted || !self->acceptor.is_open()) return;
      if (ec) {  // out of descriptors or similar: the connection stays queued; back off
        self->backoff.expires_after(std::chrono::milliseconds(100));
        self->backoff.async_wait([self](const boost::system::error_code&) { self->Accept(); });
        return;
      }
      GrpcServer::State& st = *self->state;
      bool refuse = st.draining.load() ||
                    st.open.load(std::memory_order_relaxed) >= st.options.max_connections;
      std::optional<uint64_t> peer_key;
      if (!refuse && st.per_peer) {
        peer_key = st.per_peer->Admit(socket);
        refuse = !peer_key;
      }
      if (refuse) {
        boost::system::error_code ignored;
        socket.close(ignored);
      } else {
        // The connection holds the state; the state holds only weak references back.
        auto held = self->owner.lock();
        if (!held) {
          if (peer_key) st.per_peer->Release(*peer_key);
        } else {
          auto c = std::make_shared<Connection>(std::move(socket), held, self->worker, peer_key);
          auto& list = st.connections[self->worker];
          list.push_front(c);
          c->self = list.begin();
          c->Start();
        }
      }
      self->Accept();
    });
  }

  tcp::acceptor acceptor;
  asio::steady_timer backoff;
  GrpcServer::State* state;
  std::weak_ptr<GrpcServer::State> owner;
  size_t worker;
};

namespace {

// ALPN: gRPC over TLS is HTTP/2, "h2"; a client that does not offer it is refused.
int SelectH2(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in,
             unsigned int inlen, void*) {
  static const unsigned char kH2[] = {2, 'h', '2'};
  unsigned char* selected = nullptr;
  if (SSL_select_next_proto(&selected, outlen, kH2, sizeof kH2, in, inlen) !=
      OPENSSL_NPN_NEGOTIATED) {
    return SSL_TLSEXT_ERR_ALERT_FATAL;
  }
  *out = selected;
  return SSL_TLSEXT_ERR_OK;
}

std::shared_ptr<asio::ssl::context> MakeServerTls(const GrpcServerOptions& o, std::string* error) {
  auto tls = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_server);
  tls->set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                   asio::ssl::context::no_sslv3 | asio::ssl::context::no_tlsv1 |
                   asio::ssl::context::no_tlsv1_1 | asio::ssl::context::single_dh_use);
  // An encrypted key would have OpenSSL ask for its passphrase on the terminal, if any, and
  // wait there with the process' signals taken.
  bool encrypted = false;
  tls->set_password_callback([&encrypted](size_t, asio::ssl::context::password_purpose) {
    encrypted = true;
    return std::string();
  });
  // Each step names its flag and file, for an operator to find.
  const std::string mismatch = "not the key of --grpc-tls-cert " + o.tls_cert_file;
  const auto step = [&](std::string_view flag, const std::string& file, auto&& load) {
    try {
      load();
      return true;
    } catch (const boost::system::system_error& e) {
      // A rotation caught between writing the certificate and the key reads a pair that
      // does not match.
      const bool mismatched = e.code().category() == asio::error::get_ssl_category() &&
                              ERR_GET_REASON(static_cast<unsigned long>(e.code().value())) ==
                                  X509_R_KEY_VALUES_MISMATCH;
      *error = "gRPC TLS: " + std::string(flag) + " " + file + ": " +
               (encrypted    ? "the key is encrypted (Sluice reads unencrypted PEM keys only; "
                               "decrypt it with `openssl pkey`)"
                : mismatched ? mismatch
                             : e.code().message());
      return false;
    }
  };
  if (!step("--grpc-tls-cert", o.tls_cert_file,
            [&] { tls->use_certificate_chain_file(o.tls_cert_file); }) ||
      !step("--grpc-tls-key", o.tls_key_file,
            [&] { tls->use_private_key_file(o.tls_key_file, asio::ssl::context::pem); })) {
    return nullptr;
  }
  if (SSL_CTX_check_private_key(tls->native_handle()) != 1) {  // (OpenSSL 3 checks in the step)
    ERR_clear_error();  // this thread's queue: a later OpenSSL call must not read it
    *error = "gRPC TLS: --grpc-tls-key " + o.tls_key_file + ": " + mismatch;
    return nullptr;
  }
  if (!o.tls_client_ca_file.empty()) {
    if (!step("--grpc-tls-client-ca", o.tls_client_ca_file,
              [&] { tls->load_verify_file(o.tls_client_ca_file); })) {
      return nullptr;
    }
    tls->set_verify_mode(asio::ssl::verify_peer | asio::ssl::verify_fail_if_no_peer_cert);
    // A session verified with a client certificate may be resumed only under a session id
    // context (OpenSSL refuses it otherwise, failing every resumption with an internal
    // error): Envoy and gRPC clients resume the sessions they cached on reconnect.
    static constexpr unsigned char kContext[] = "sluice-grpc";
    SSL_CTX_set_session_id_context(tls->native_handle(), kContext, sizeof(kContext) - 1);
  }
  SSL_CTX_set_alpn_select_cb(tls->native_handle(), SelectH2, nullptr);
  return tls;
}

}  // namespace

std::unique_ptr<GrpcServer> GrpcServer::Start(const std::vector<asio::io_context*>& loops,
                                              const std::string& host, uint16_t port,
                                              std::map<std::string, GrpcMethod*> methods,
                                              GrpcServerOptions options, uint16_t* bound_port,
                                              std::string* error) {
  boost::system::error_code ec;
  auto address = asio::ip::make_address(host, ec);
  if (ec) {
    *error = "bad gRPC listen address '" + host + "': " + ec.message();
    return nullptr;
  }
  auto state = std::make_shared<State>();
  state->options = options;
  if (options.max_connections_per_peer != 0) {
    state->per_peer = std::make_unique<PeerConnections>(options.max_connections_per_peer);
  }
  if (!options.tls_cert_file.empty()) {
    auto tls = MakeServerTls(options, error);
    if (!tls) return nullptr;
    state->tls.assign(loops.size(), tls);
  }
  for (const auto& [path, method] : methods) {
    state->methods.emplace(path, State::Method{method, state->method_names.size()});
    state->method_names.push_back(path);
  }
  for (size_t i = 0; i < loops.size(); ++i) {
    state->stats.push_back(std::make_unique<GrpcLoopStats>(methods.size()));
  }
  state->loops = loops;
  state->connections.resize(loops.size());
  tcp::endpoint endpoint(address, port);
  for (size_t i = 0; i < loops.size(); ++i) {
    auto a = std::make_shared<GrpcAcceptor>(*loops[i], state.get(), i);
    a->owner = state;
    if (auto e = ListenReusePort(a->acceptor, endpoint, /*first=*/i == 0)) {
      *error = "cannot listen for gRPC on " + host + ":" + std::to_string(endpoint.port()) + ": " +
               e.message();
      for (auto& done : state->acceptors) done->acceptor.close(ec);
      return nullptr;
    }
    if (i == 0) endpoint.port(a->acceptor.local_endpoint().port());  // port 0: one for all
    state->acceptors.push_back(a);
  }
  for (auto& a : state->acceptors) asio::post(a->acceptor.get_executor(), [a] { a->Accept(); });
  *bound_port = endpoint.port();
  return std::unique_ptr<GrpcServer>(new GrpcServer(std::move(state)));
}

bool GrpcServer::ReloadTls(std::string* error) {
  if (state_->tls.empty()) return true;
  auto tls = MakeServerTls(state_->options, error);
  if (!tls) return false;
  for (size_t i = 0; i < state_->loops.size(); ++i) {
    asio::post(*state_->loops[i], [st = state_, i, tls] { st->tls[i] = tls; });
  }
  return true;
}

GrpcServer::~GrpcServer() {
  // The loops are not running (stopped, or never run), so nothing races. The state may
  // outlive the server, held by a handler still queued on some loop (a connection's, or
  // Shutdown's); it must then not hold the acceptors, whose sockets and timers belong to
  // every loop: loops are destroyed one by one, and a handler destroyed with the last one
  // would take down an acceptor of a loop already gone.
  boost::system::error_code ignored;
  for (auto& a : state_->acceptors) a->acceptor.close(ignored);
  state_->acceptors.clear();
}

void GrpcServer::Shutdown() {
  if (state_->shut_down) return;
  state_->shut_down = true;
  state_->draining = true;
  auto on_each_loop = [this](auto what) {
    for (size_t i = 0; i < state_->loops.size(); ++i) {
      asio::post(*state_->loops[i], [st = state_, i, what] {
        boost::system::error_code ignored;
        if (i < st->acceptors.size()) st->acceptors[i]->acceptor.close(ignored);
        auto copy = st->connections[i];  // a close erases from the list
        for (auto& weak : copy) {
          if (auto c = weak.lock()) what(*c);
        }
      });
    }
  };
  auto wait_closed = [this](std::chrono::milliseconds timeout) {
    std::unique_lock lock(state_->mu);
    return state_->closed.wait_for(lock, timeout, [this] { return state_->open.load() == 0; });
  };
  on_each_loop([](Connection& c) { c.Drain(); });
  if (wait_closed(state_->options.drain_timeout)) return;
  Log("WARN", "grpc: closing connections with calls still in flight at the drain deadline");
  on_each_loop([](Connection& c) { c.Close(); });
  wait_closed(std::chrono::milliseconds(1'000));
}

void GrpcServer::RenderMetrics(std::string& out) const {
  static constexpr std::pair<GrpcCode, const char*> kCodes[] = {
      {GrpcCode::kOk, "OK"},
      {GrpcCode::kInvalidArgument, "INVALID_ARGUMENT"},
      {GrpcCode::kDeadlineExceeded, "DEADLINE_EXCEEDED"},
      {GrpcCode::kNotFound, "NOT_FOUND"},
      {GrpcCode::kResourceExhausted, "RESOURCE_EXHAUSTED"},
      {GrpcCode::kUnimplemented, "UNIMPLEMENTED"},
      {GrpcCode::kInternal, "INTERNAL"},
      {GrpcCode::kUnavailable, "UNAVAILABLE"},
  };
  const State& st = *state_;
  out +=
      "# HELP sluice_grpc_calls_total gRPC calls answered, by method and status code.\n"
      "# TYPE sluice_grpc_calls_total counter\n";
  for (size_t m = 0; m <= st.method_names.size(); ++m) {
    const std::string name = m < st.method_names.size() ? st.method_names[m] : "(unknown)";
    for (const auto& [code, code_name] : kCodes) {
      uint64_t n = 0;
      for (const auto& loop : st.stats) {
        n += loop->answers[m * GrpcLoopStats::kGrpcCodes + static_cast<size_t>(code)].load(
            std::memory_order_relaxed);
      }
      out += "sluice_grpc_calls_total{method=\"" + name + "\",code=\"" + code_name + "\"} " +
             std::to_string(n) + "\n";
    }
  }
  uint64_t protocol_errors = 0, stalled = 0;
  for (const auto& loop : st.stats) {
    protocol_errors += loop->protocol_errors.load();
    stalled += loop->stalled.load();
  }
  out +=
      "# HELP sluice_grpc_protocol_errors_total gRPC connections closed for an HTTP/2 error.\n"
      "# TYPE sluice_grpc_protocol_errors_total counter\nsluice_grpc_protocol_errors_total " +
      std::to_string(protocol_errors) +
      "\n# HELP sluice_grpc_stalled_total gRPC connections closed for holding a request not "
      "whole, or an answer unread, beyond the stall timeout.\n"
      "# TYPE sluice_grpc_stalled_total counter\nsluice_grpc_stalled_total " +
      std::to_string(stalled) +
      "\n# HELP sluice_grpc_connections Open gRPC connections.\n"
      "# TYPE sluice_grpc_connections gauge\nsluice_grpc_connections " +
      std::to_string(st.open.load(std::memory_order_relaxed)) + "\n";
}

}  // namespace sluice::server
