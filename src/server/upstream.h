// Upstream: forwards allowed requests to the protected service (gateway mode).
//
// Each worker thread keeps its own pool of idle keep-alive connections to the upstream, so
// forwarding never takes a lock or crosses threads. A request goes out on a pooled
// connection (or a new one), and if a pooled connection turns out to have been closed by
// the upstream before anything came back, it is retried once on a fresh connection. A
// connection failure answers 502 and a timeout 504, each with a JSON body; nothing that the
// upstream does can crash or wedge a worker. The deadlines (connect, and the answer's, while
// Sluice waits on the upstream) are checked by one coarse timer per thread, so one fires up
// to 10 ms late.
//
// A plain answer (server/response_head.h) is read in place and its lines relayed as they
// came; any other goes through Beast's parser.
//
// A response body announced as small (Content-Length up to 64 KiB) is read whole and
// sent in one write; any other is streamed to the client piece by piece as it arrives, one
// 64 KiB piece at a time (memory stays bounded, the client gets the first bytes at once,
// and a slow client slows the upstream's connection instead of filling Sluice). Request
// bodies are read whole by the listener (bounded by its max_body_bytes) before the decision,
// except those the front streams (large or chunked ones): they go up piece by piece.
//
// Thread-safety: Forward must be called on a worker's io_context thread.
#ifndef SLUICE_SERVER_UPSTREAM_H_
#define SLUICE_SERVER_UPSTREAM_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <boost/asio/any_io_executor.hpp>

#include "server/http_server.h"

namespace sluice::server {

struct UpstreamOptions {
  std::string host;  // numeric address or name, resolved once at startup
  uint16_t port = 80;
  std::chrono::milliseconds connect_timeout{2'000};
  std::chrono::milliseconds response_timeout{30'000};
  size_t max_idle_per_worker = 256;
  // Told of each request answered 502/504 because of the upstream (not because its client
  // left): 0 no connection, 1 timed out, 2 the connection broke, 3 an answer not relayed;
  // and 4 for a streamed answer the upstream broke off after its head was relayed.
  std::function<void(size_t kind)> on_failure;

  // "http://host[:port]" as the config file reads it (rules::ParseUpstreamUrl; https is
  // not supported); nullopt if malformed.
  static std::optional<UpstreamOptions> ParseUrl(std::string_view url);
};

// Closes this thread's idle upstream connections; run on each worker thread before its
// io_context goes away (HttpOptions::on_worker_exit).
void ReleaseIdleUpstreamConnections();

class Upstream {
 public:
  explicit Upstream(UpstreamOptions options);
  // Resolves the upstream's address; call once before serving.
  Status Resolve();

  // Sends `req` upstream and fills `res` with the answer (or a 502/504), then calls `done`
  // with null, or with the source of a body to stream after res's head. `req` and `res`
  // must stay valid until then (with a source, until it is done or dropped).
  // `request_body`, if given, is the request's body to stream after its head (req.body()
  // is then empty): sent on a fresh connection (a pooled one the upstream closed could not
  // be retried once the body is partly read), with the client's Content-Length, or chunked.
  // Returns what to call if the client leaves before `done`: it closes the upstream
  // connection, and `done` then runs with a 502 that no one reads.
  using Done = std::function<void(std::unique_ptr<BodySource> body)>;
  std::function<void()> Forward(const boost::asio::any_io_executor& executor, HttpRequest& req,
                                HttpResponse& res, Done done,
                                std::shared_ptr<BodySource> request_body = nullptr);

  const UpstreamOptions& options() const { return options_; }

 private:
  class Exchange;
  UpstreamOptions options_;
  std::vector<boost::asio::ip::tcp::endpoint> endpoints_;
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_UPSTREAM_H_
