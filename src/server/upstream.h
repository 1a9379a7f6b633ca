// Upstream: forwards allowed requests to the protected service (gateway mode).
//
// Each worker thread keeps its own pool of idle keep-alive connections to the upstream, so
// forwarding never takes a lock or crosses threads. A request goes out on a pooled
// connection (or a new one), and if a pooled connection turns out to have been closed by
// the upstream before anything came back, it is retried once on a fresh connection. A
// connection failure answers 502 and a timeout 504, each with a JSON body; nothing that the
// upstream does can crash or wedge a worker.
//
// Bodies are relayed whole (requests are bounded by the listener, responses by
// max_response_body); streaming them through is a follow-up.
//
// Thread-safety: Forward must be called on a worker's io_context thread.
#ifndef SLUICE_SERVER_UPSTREAM_H_
#define SLUICE_SERVER_UPSTREAM_H_

#include <chrono>
#include <cstdint>
#include <functional>
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
  size_t max_response_body = size_t{64} << 20;

  // "http://host:port" (https is not supported yet); nullopt if malformed.
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

  // Sends `req` upstream and fills `res` with the answer (or a 502/504), then calls `done`.
  // `req` and `res` must stay valid until then.
  void Forward(const boost::asio::any_io_executor& executor, HttpRequest& req, HttpResponse& res,
               std::function<void()> done);

  const UpstreamOptions& options() const { return options_; }

 private:
  class Exchange;
  UpstreamOptions options_;
  std::vector<boost::asio::ip::tcp::endpoint> endpoints_;
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_UPSTREAM_H_
