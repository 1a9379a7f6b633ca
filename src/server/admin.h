// Admin: the operators' listener.
//   GET /healthz           200 while the process runs
//   GET /readyz            200 when the store is usable (JSON with the store's state)
//   GET /metrics           Prometheus text: decisions by rule and outcome, decision latency,
//                          keys held and evictions per limit, reloads
//   GET /v1/keys?limit=L&key=K     one key's state (a peek: nothing is spent), in memory or
//                                  in Redis (503 while Redis cannot answer)
//   DELETE /v1/keys?limit=L&key=K  forget one key (in Redis, and the local fail mode's count)
//   POST /v1/reload        reload the config file; a bad config keeps the current rules
// Bound to 127.0.0.1 by default; bound anywhere else it requires "Authorization: Bearer
// TOKEN" on every request.
//
// Thread-safety: Handle runs on any worker thread.
#ifndef SLUICE_SERVER_ADMIN_H_
#define SLUICE_SERVER_ADMIN_H_

#include <functional>
#include <string>

#include "server/http_server.h"
#include "server/service.h"

namespace sluice::server {

class Admin final : public Handler {
 public:
  // `reload` starts a reload of the config off the workers and calls its argument with the
  // status once done, on any thread; null when there is nothing to reload. `token`: empty
  // for no token.
  using Reload = std::function<void(std::function<void(Status)> done)>;
  Admin(Service& service, Reload reload, std::string token)
      : service_(service), reload_(std::move(reload)), token_(std::move(token)) {}

  bool Handle(HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
              const std::function<Completion()>& defer) override;

  // More metrics for /metrics (e.g. the gRPC server's), appended to the text. Set before
  // the server runs; called on scrapes, from a worker thread.
  void AddMetrics(std::function<void(std::string&)> render) { more_metrics_ = std::move(render); }
  // More in-memory tables for the per-limit series (sluice_keys, ...): `tables` calls its
  // argument with each one's limit name (e.g. the Envoy config's). Set as AddMetrics.
  using TableVisitor = std::function<void(std::string_view name, const Limit&)>;
  void AddTables(std::function<void(const TableVisitor&)> tables) {
    more_tables_ = std::move(tables);
  }

 private:
  // GET or DELETE /v1/keys; false when the answer comes later (from Redis).
  bool Keys(const HttpRequest& req, HttpResponse& res, const std::function<Completion()>& defer);

  Service& service_;
  Reload reload_;
  std::string token_;
  std::function<void(std::string&)> more_metrics_;
  std::function<void(const TableVisitor&)> more_tables_;
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_ADMIN_H_
