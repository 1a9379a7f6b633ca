// GrpcServer: gRPC unary calls (and held ones, GrpcReply::Hold) over HTTP/2, cleartext (prior
// knowledge, as Envoy and gRPC clients connect) or over TLS, served on Sluice's own worker loops.
//
// Each worker holds a listening socket on the port (SO_REUSEPORT), and a connection lives on
// the worker that accepted it: a call is read, decided and answered on that loop, and the
// calls that one read brings in share the write that answers them. HTTP/2 itself (framing,
// HPACK, flow control, SETTINGS and PING) is nghttp2's; this file adds gRPC's part: the
// method by :path, the 5-byte message prefix, and the status in trailers. See
// docs/design.md for why Sluice does not use grpc++'s server.
//
// Bounds: a message over max_message_bytes is refused (RESOURCE_EXHAUSTED) without being
// read on; a request's header block over max_header_bytes resets its stream; at most
// max_concurrent_streams calls per connection (SETTINGS); at most max_connections connections
// (and max_connections_per_peer from one client address), each closed if it has not sent its
// first HTTP/2 frame within handshake_timeout, or if a request stays incomplete, or a write
// undone, for stall_timeout.
// Compressed messages are refused (UNIMPLEMENTED; Envoy's RLS client sends none). A call
// whose grpc-timeout has passed by the time its message is whole is answered
// DEADLINE_EXCEEDED without being given to its method: its client has stopped waiting, and
// a decision made now would only spend counts.
//
// Thread-safety: Start before or while the loops run; a GrpcMethod is called on a worker's
// loop and answers on it; Shutdown from any thread but the workers'. Destroy the server once
// its loops have stopped and before they are destroyed.
#ifndef SLUICE_SERVER_GRPC_SERVER_H_
#define SLUICE_SERVER_GRPC_SERVER_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/io_context.hpp>

namespace google::protobuf {
class MessageLite;
}

namespace sluice::server {

// gRPC status codes (grpc/include/grpc/impl/codegen/status.h), the ones Sluice answers.
enum class GrpcCode : int {
  kOk = 0,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  kResourceExhausted = 8,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
};

struct GrpcServerOptions {
  size_t max_message_bytes = 4 << 20;  // gRPC's default receive bound
  size_t max_header_bytes = 16 * 1024;
  uint32_t max_concurrent_streams = 1024;
  // Request bytes held in messages not yet whole, over all connections (each one's first
  // 16 KiB aside, so ordinary calls share no counter): past it, a call whose message would
  // add more is answered RESOURCE_EXHAUSTED. (Each connection holds at most about two
  // messages' worth; this bounds what many connections hold together.)
  size_t max_buffered_bytes = size_t{256} << 20;
  size_t max_connections = 10'000;
  // Connections one client address (IPv4, or IPv6 /64) may hold; 0: no bound. As the HTTP
  // listener's: over it, a new connection is closed at once.
  size_t max_connections_per_peer = 0;
  std::chrono::milliseconds drain_timeout{2'000};  // for calls in flight on Shutdown
  // For the client's first HTTP/2 frame (after the preface): a connection that sends none
  // is closed. Connections that have spoken may stay idle (Envoy keeps them for later calls).
  std::chrono::milliseconds handshake_timeout{10'000};
  // A connection with a call still open this long after it began (its request not whole,
  // or its answer not taken: the client's flow-control window or reads), or a write its
  // client does not take for this long, is closed: neither may hold memory and a connection
  // slot for good. Calls waiting on their method, held calls and idle connections are not
  // bounded by it.
  std::chrono::milliseconds stall_timeout{10'000};
  // HTTP/2 over TLS (ALPN h2) when set: the server's certificate chain and key (PEM). With
  // tls_client_ca_file, clients must present a certificate that CA signed (mutual TLS).
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
};

namespace grpc_detail {
struct Connection;
struct Stream;
}  // namespace grpc_detail

// The answer to one call. Move-only; answer once (Ok or Fail), on the loop the call came in
// on. A reply dropped unanswered answers INTERNAL. A call whose client went away is answered
// into nothing.
class GrpcReply {
 public:
  GrpcReply(std::shared_ptr<grpc_detail::Connection> conn, grpc_detail::Stream* stream);
  GrpcReply(GrpcReply&&) noexcept;
  GrpcReply& operator=(GrpcReply&&) = delete;
  GrpcReply(const GrpcReply&) = delete;
  ~GrpcReply();

  void Ok(const google::protobuf::MessageLite& message);
  void Fail(GrpcCode code, std::string_view message);
  // A server-streaming answer that lasts as long as the server serves (a health Watch):
  // sends `now` and keeps the call open; when the server drains (Shutdown), sends
  // `at_drain` and ends the call with OK. A client may cancel it at any time.
  void Hold(const google::protobuf::MessageLite& now,
            const google::protobuf::MessageLite& at_drain);

 private:
  grpc_detail::Stream* Take(std::shared_ptr<grpc_detail::Connection>* conn);
  std::shared_ptr<grpc_detail::Connection> conn_;
  grpc_detail::Stream* stream_;
};

class GrpcMethod {
 public:
  virtual ~GrpcMethod() = default;
  // One call: `request` is its message (valid during this call only); answer by `reply`, now
  // or later on `io` (the worker's loop).
  virtual void Call(std::string_view request, boost::asio::io_context& io, GrpcReply reply) = 0;
};

class GrpcServer {
 public:
  // Listens on host:port (port 0: a free one, in *bound_port) on every loop of `loops` and
  // serves `methods` by their path ("/package.Service/Method"), which must outlive the
  // server. Returns null (and *error) when it cannot listen.
  static std::unique_ptr<GrpcServer> Start(const std::vector<boost::asio::io_context*>& loops,
                                           const std::string& host, uint16_t port,
                                           std::map<std::string, GrpcMethod*> methods,
                                           GrpcServerOptions options, uint16_t* bound_port,
                                           std::string* error);
  ~GrpcServer();
  // Stops accepting, sends GOAWAY on every connection, lets calls in flight finish (up to
  // drain_timeout) and closes. Blocks until done; the loops must be running.
  void Shutdown();
  // Appends the server's metrics in Prometheus text: calls by method and status code,
  // connections closed for HTTP/2 errors, open connections. From any thread.
  void RenderMetrics(std::string& out) const;
  // Reads the TLS files again (certificate rotation): connections accepted from here on
  // use them, those open keep theirs. On an error (*error) the current ones stay. Without
  // TLS, does nothing. From any thread; one call at a time.
  bool ReloadTls(std::string* error);

  struct State;  // shared with the connections, which may outlive the server

 private:
  explicit GrpcServer(std::shared_ptr<State> state) : state_(std::move(state)) {}
  std::shared_ptr<State> state_;
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_GRPC_SERVER_H_
