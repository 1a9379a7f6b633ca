// HttpServer: HTTP/1.1 with keep-alive on one event loop per worker thread.
//
// Each worker owns an io_context and its own listening socket on the same port
// (SO_REUSEPORT), so the kernel spreads connections across workers and a connection lives
// on one thread from accept to close: no locks or queues between threads on the request
// path. Requests are parsed with Beast under bounded header and body sizes and a read
// deadline (slow clients cannot hold a worker), and handed to a Handler that answers
// inline. Stop() drains: listeners close, each connection finishes the request it is in
// and closes, and Run() returns once all are done (or the drain deadline passes).
//
// Thread-safety: Listen before Run; Stop from any thread or a signal handler's strand.
#ifndef SLUICE_SERVER_HTTP_SERVER_H_
#define SLUICE_SERVER_HTTP_SERVER_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>

#include "sluice/status.h"

namespace sluice::server {

using HttpRequest = boost::beast::http::request<boost::beast::http::string_body>;
// A response as handlers fill it in: Beast's message, and header lines already rendered
// ("Name: value\r\n" each) that go out after the message's own fields. The rate limit
// headers, on every answer, are written there: each Beast field costs an allocation and a
// tree insert, and these are five.
struct HttpResponse : boost::beast::http::response<boost::beast::http::string_body> {
  std::string rendered_fields;

  // Back to an empty response; rendered_fields keeps its buffer for the next one.
  void Reset() {
    static_cast<boost::beast::http::response<boost::beast::http::string_body>&>(*this) = {};
    rendered_fields.clear();
  }
};

struct HttpOptions {
  size_t max_header_bytes = 16 * 1024;
  size_t max_body_bytes = 1 << 20;
  // Bytes of request bodies read whole (before the decision) that the listener's
  // connections may hold at once, split evenly between its workers: each body counts its
  // Content-Length (max_body_bytes if chunked) from its head until it is read. A body past
  // it is answered 503 unread, so slow clients cannot make the process hold
  // max_connections x max_body_bytes.
  size_t max_buffered_body_bytes = size_t{256} << 20;
  std::chrono::milliseconds read_timeout{10'000};   // to receive a whole request
  std::chrono::milliseconds idle_timeout{60'000};   // between requests on a connection
  std::chrono::milliseconds drain_timeout{10'000};  // for in-flight requests on Stop
  size_t max_connections = 10'000;                  // beyond it new connections are closed
  // Connections one client address (IPv4, or IPv6 /64) may hold; 0: no bound. Leave it 0
  // behind a proxy or load balancer, whose one address carries every client.
  size_t max_connections_per_peer = 0;
  // Runs on each worker thread, on its loop, before the loop's first event (e.g. to open
  // per-thread connection pools ahead of the first request).
  std::function<void(boost::asio::io_context&)> on_worker_start;
  // Runs on each worker thread after its loop ends, while its io_context still exists
  // (e.g. to close per-thread connection pools).
  std::function<void()> on_worker_exit;
  // Runs (on the accepting worker) for each connection closed over a connection bound.
  std::function<void()> on_connection_refused;
  // Runs (on the request's worker) for each request answered 503 unread because its body
  // would take the bodies in flight past max_buffered_body_bytes.
  std::function<void()> on_body_refused;
  // Runs (on the request's worker) for each request answered with an error and not read
  // on, the connection closed after: malformed (400), over a size bound (413, 414, 431),
  // a transfer coding not taken (501), an HTTP version not spoken (505), the 503 above;
  // with its status. Not for a client that left in the middle of a request.
  std::function<void(unsigned)> on_request_refused;
  // Runs (on the accepting worker) when accepting fails (out of file descriptors, mostly):
  // the connection stays in the kernel's queue and accepting resumes after 100 ms.
  std::function<void(const boost::system::error_code&)> on_accept_failed;
};

// A response body that arrives in pieces: gateway mode relays the upstream's as it comes
// instead of holding it whole. The connection writes the response's head, then asks for
// one piece at a time and writes it before asking for the next, so a slow client slows the
// source rather than filling memory.
class BodySource {
 public:
  virtual ~BodySource() = default;
  // `got` runs once, later (never inside Read), on the worker's loop: ok=false when the
  // source failed (the connection is then closed, as its head is already out); otherwise
  // the next `piece` (valid until the next Read) and whether it is the last.
  using Got = std::function<void(bool ok, std::string_view piece, bool last)>;
  virtual void Read(Got got) = 0;
  // The connection is gone: stop any read in progress (its `got` still runs, ok=false).
  virtual void Cancel() = 0;
  // Why the last Read failed, when the source can tell what was wrong with what it read
  // (a client's malformed chunk); "" when it just ended (the peer left or stalled).
  virtual std::string Failure() const { return {}; }
};

// Finishes a request a Handler answered later (after upstream I/O or a queue delay).
// Move-only; calling it sends the response the handler filled in, with `body` (if any)
// streamed after its head in place of res.body(). Must be called once, on the worker thread
// that handed it out.
class Completion {
 public:
  using Resume = void (*)(void* session, std::unique_ptr<BodySource> body);
  using Gone = bool (*)(void* session);
  using Watch = void (*)(void* session, std::function<void()> on_gone);
  explicit Completion(std::shared_ptr<void> session, Resume resume, Gone gone = nullptr,
                      Watch watch = nullptr)
      : session_(std::move(session)), resume_(resume), gone_(gone), watch_(watch) {}
  Completion(Completion&&) = default;
  Completion& operator=(Completion&&) = default;
  void operator()(std::unique_ptr<BodySource> body = nullptr) {
    auto s = std::move(session_);
    if (s) resume_(s.get(), std::move(body));
  }
  // Whether the client has closed or reset its connection since: a request that waited
  // (a leaky_queue turn) need not be served to nobody. Looks without reading, so a request
  // the client pipelined behind this one stays where it is.
  bool ClientGone() const { return session_ && gone_ && gone_(session_.get()); }
  // Runs `on_gone` (once, on the worker's loop) if the client closes or resets its
  // connection before this completes, and closes it: the work done for it can stop. Not
  // while the request's body is still being read, and not after the client sent more (a
  // pipelined request): a close is then no longer what the connection's next bytes show.
  void OnClientGone(std::function<void()> on_gone) {
    if (session_ && watch_) watch_(session_.get(), std::move(on_gone));
  }

 private:
  std::shared_ptr<void> session_;
  Resume resume_;
  Gone gone_ = nullptr;
  Watch watch_ = nullptr;
};

class Handler {
 public:
  virtual ~Handler() = default;
  // Answers `req` from `peer` into `res`. Called on a worker thread; must not block.
  // Returns true when `res` is ready now; false when the handler keeps `res` and will call
  // `later()` (made on demand by `defer`) once it is filled. `req` and `res` stay valid
  // until then.
  virtual bool Handle(HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
                      HttpResponse& res, const std::function<Completion()>& defer) = 0;

  // Whether the body of `head` (a request of which only the head is read) should reach
  // HandleStream piece by piece rather than Handle whole. Streamed bodies are not bounded
  // by max_body_bytes (their reader is).
  virtual bool StreamsBody(const HttpRequest& /*head*/) { return false; }
  // Called on each worker's thread when the server starts draining: requests held past
  // `deadline` (their connections are closed then) are to be answered now.
  virtual void OnDrain(std::chrono::steady_clock::time_point /*deadline*/) {}
  // As Handle, for a request whose body (req.body() is empty) is read from `body`. A client
  // that sent "Expect: 100-continue" is told to go on at the first Read. A body left unread
  // closes the connection after the answer, so a refusal never waits for an upload.
  virtual bool HandleStream(HttpRequest& req, std::unique_ptr<BodySource> /*body*/,
                            const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
                            const std::function<Completion()>& defer) {
    return Handle(req, peer, res, defer);
  }
};

// The io_context of the worker thread this is called on (handlers use it for timers and
// upstream I/O that must stay on the connection's thread).
boost::asio::io_context& WorkerContext();
// The same, or null when called off the workers.
boost::asio::io_context* CurrentWorkerContext();

// What a connection does with the bytes it reads and writes, without the socket (so the
// parsing and the answers to malformed requests can be exercised on their own):
using HttpRequestParser = boost::beast::http::request_parser<boost::beast::http::string_body>;
// The body length a message's Content-Length announces; nullopt when there is none or it
// is not one number.
std::optional<uint64_t> AnnouncedLength(const boost::beast::http::fields& fields);
// Whether a message has no Content-Length or one field of decimal digits: a repeated one
// (two fields, or a list such as "3, 3", which Beast accepts) is refused either way.
bool ContentLengthIsPlain(const boost::beast::http::fields& fields);
// The answer to a message whose Transfer-Encoding cannot be relayed: codings that do not
// end with chunked (400), or any but chunked (501); nullopt when it has none or only
// chunked. `chunked`: the parser's reading (the final coding is chunked).
std::optional<std::pair<boost::beast::http::status, std::string_view>> TransferEncodingFault(
    const boost::beast::http::fields& fields, bool chunked);
// Rewrites an absolute-form request target ("http://host:port/p?q", as clients of a proxy
// send it) to the origin form that rules match and the upstream is sent ("/p?q"), and sets
// Host to the target's authority, which wins over any Host field (RFC 9112 3.2.2). Returns
// the reason an absolute-form target is refused (no host, or user information); any other
// target is left as it is.
std::optional<std::string_view> ToOriginForm(HttpRequest& req);
// "host:port" as an operator writes it: an IPv6 address in brackets ("[::1]:8080").
std::string JoinHostPort(std::string_view host, unsigned port);
// Bounds a fresh parser by the options' header and body sizes.
void LimitRequestParser(HttpRequestParser& parser, const HttpOptions& options);
// Fills `res` with the answer to a request the parser refused with `ec`: 414 (the head
// bound was met before the request line ended: `line_parsed` false), 431, 413 or 400, with
// a JSON body.
void RejectUnparsedRequest(HttpResponse& res, boost::system::error_code ec, bool line_parsed);
// Writes `res` (after prepare_payload) as one buffer into `out`, without the body for HEAD.
void SerializeResponse(const HttpResponse& res, bool head, std::string& out);

// Opens, binds and listens `acceptor` on `endpoint` with SO_REUSEPORT, so that each worker
// can hold its own listening socket on one port. The first of a port's sockets (`first`)
// fails with "address in use" when any other socket listens there: SO_REUSEPORT alone
// would let a second process of the same user, or another of Sluice's own listeners, share
// the port silently and take part of its connections.
boost::system::error_code ListenReusePort(boost::asio::ip::tcp::acceptor& acceptor,
                                          const boost::asio::ip::tcp::endpoint& endpoint,
                                          bool first);

struct ServerState;  // shared with connections, which may outlive a listener

class HttpServer {
 public:
  HttpServer(HttpOptions options, size_t threads);
  ~HttpServer();

  // Binds `host:port` (port 0: any free port) with `handler`, on every worker. The first
  // listener added is the main one; more (e.g. admin) may follow. `reserve_descriptor`:
  // each worker's listener holds a file descriptor in reserve, given up to accept a
  // connection when the process has run out (so the admin port still answers /metrics
  // and the probes), and taken again once one is free.
  Status Listen(const std::string& host, uint16_t port, Handler& handler, uint16_t* bound_port,
                bool reserve_descriptor = false);
  // Runs the workers; returns after Stop() once connections have drained.
  void Run();
  // Stops accepting, closes idle connections and gives the others drain_timeout to finish;
  // then stops the loops. `others_done` (optional) holds the loops running, past the
  // drain but at most `others_grace` after its deadline, until it says true: another
  // server draining on the same loops at the same time (gRPC) may be waiting on them.
  void Stop(std::function<bool()> others_done = nullptr,
            std::chrono::milliseconds others_grace = std::chrono::seconds(1));
  // The io_context of worker 0, for timers and signals.
  boost::asio::io_context& main_context() { return *contexts_[0]; }
  // Every worker's io_context (for work handed to a worker from another thread).
  std::vector<boost::asio::io_context*> loops() const {
    std::vector<boost::asio::io_context*> out;
    for (const auto& c : contexts_) out.push_back(c.get());
    return out;
  }

 private:
  struct Listener;
  struct Ticker;
  HttpOptions options_;
  std::vector<std::unique_ptr<boost::asio::io_context>> contexts_;
  std::vector<std::shared_ptr<Listener>> listeners_;
  std::vector<std::shared_ptr<Ticker>> tickers_;
  std::atomic<bool> stopping_{false};
  std::shared_ptr<ServerState> state_;
  std::vector<std::thread> threads_;
  std::thread watchdog_;  // ends the drain at its deadline
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_HTTP_SERVER_H_
