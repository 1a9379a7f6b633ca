// Rls: Envoy's rate limit service (RLS v3, envoy.service.ratelimit.v3.RateLimitService/
// ShouldRateLimit), so Envoy, Istio and the gateways built on Envoy can use Sluice in place
// of envoyproxy/ratelimit, with the same YAML config (rules/envoy_config.h).
//
// Each request descriptor is matched against its domain's descriptor tree; its limits (or
// the limit the request itself gives, `descriptor.limit`) are decided in Sluice's store
// (memory, Redis, or local counts synced with Redis in store mode local_sync), all the
// limits of one descriptor all-or-nothing. Descriptors are decided
// independently of each other, as envoyproxy/ratelimit does (a descriptor over its limit
// does not stop the others from counting). hits_addend comes from the descriptor when set,
// else from the request, else 1; 0 peeks. The answer: per descriptor its code,
// current_limit, limit_remaining and duration_until_reset; overall OVER_LIMIT when any
// descriptor not in shadow mode is over; optionally RateLimit-Limit/-Remaining/-Reset
// headers (of the descriptor with the least remaining) in response_headers_to_add.
//
// Served over gRPC (RlsGrpcServer: on the workers' loops, each call decided on the loop its
// connection lives on, with that loop's Redis connections) and as JSON over HTTP (POST
// /v1/envoy/ratelimit, the proto's JSON mapping) for debugging.
//
// Thread-safety: Decide on a worker's loop; Load from any thread (the config is swapped
// atomically; a config that does not load leaves the running one in place).
#ifndef SLUICE_SERVER_RLS_H_
#define SLUICE_SERVER_RLS_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "envoy/service/ratelimit/v3/rls.pb.h"
#include "rules/envoy_config.h"
#include "server/http_server.h"
#include "server/service.h"
#include "sluice/status.h"

namespace sluice::server {

namespace rlspb = ::envoy::service::ratelimit::v3;

// Why a call was not answered: the caller's mistake, or Sluice cannot answer now.
enum class RlsFailure : uint8_t { kNone, kInvalidArgument, kUnavailable };

struct RlsOptions {
  bool response_headers = false;  // add RateLimit-* to response_headers_to_add
  std::string limit_header = "RateLimit-Limit";
  std::string remaining_header = "RateLimit-Remaining";
  std::string reset_header = "RateLimit-Reset";
  // Every answer's overall_code is OK, whatever the descriptors' codes say (they stay as
  // decided, and are counted as shadow_limited): envoyproxy/ratelimit's SHADOW_MODE, to
  // watch a new config's effect before it enforces anything.
  bool shadow = false;
  // Files of the config directory that name one domain add to it rather than fail the
  // load: envoyproxy/ratelimit's MERGE_DOMAIN_CONFIG.
  bool merge_domains = false;
};

class Rls {
 public:
  // The first Rls of the process routes libprotobuf's log through Sluice's (rate-limited):
  // a client's malformed strings make libprotobuf log from inside a parse.
  Rls(Service& service, RlsOptions options);
  ~Rls();

  // Loads envoyproxy/ratelimit's config from a directory; on error keeps the current one.
  Status Load(const std::string& dir);
  using Done = std::function<void(RlsFailure failure, std::string message)>;
  // Decides `req` into `*resp`, then calls done(kNone, ""), or done(failure, why). `io`: the
  // calling worker's loop (whose Redis connections a Redis store uses). `done` may run inside
  // this call.
  void Decide(const rlspb::RateLimitRequest& req, rlspb::RateLimitResponse* resp,
              boost::asio::io_context& io, Done done);

  size_t domains() const;
  // Each in-memory table the current config decides with, by its limit's name ("envoy:"
  // and the limit's id; the tables of requests' own limits as "envoy:(request limit)"),
  // for /metrics. From any thread.
  void ForEachLimit(const std::function<void(std::string_view name, const Limit&)>& visit) const;

  struct Compiled;  // the config with its limits in the stores
  // One limit as each store decides it: in memory (also the `local` fail mode's), in Redis,
  // or from synced counts (store mode local_sync).
  struct StoreLimits {
    Limit* local = nullptr;
    std::unique_ptr<redis::RemoteLimit> remote;
    std::shared_ptr<sync::SyncLimit> synced;  // held while this config (or a request) is
    size_t metrics_slot = 0;                  // decisions counted as rule "envoy:<limit id>"
  };

 private:
  // One request descriptor's limits, from Decide to the answer. `checks` keeps the
  // elements (and their keys' memory) of earlier calls: the first `used` are this call's.
  struct Item {
    std::vector<StoreCheck> checks;
    size_t used = 0;
    std::vector<const rules::envoy::RateLimitSpec*> specs;  // null for a request's own limit
    std::vector<size_t> metrics_slots;                      // of each limit, as specs
    Policy override_policy;
    rules::envoy::Unit override_unit = rules::envoy::Unit::kUnknown;
    bool shadow = false;
    bool unlimited = false;
    bool decided = false;  // `result` made without the store (an override beyond the bound)
    StoreResult result;

    StoreCheck& NextCheck() {
      if (used == checks.size()) checks.emplace_back();
      return checks[used++];
    }
    std::span<const StoreCheck> Checks() const { return {checks.data(), used}; }
  };
  // One call from Decide to its answer. Taken from a per-thread pool and given back once
  // answered, with its memory: on the memory store a warm worker decides without
  // allocating. The first `n` items and matches are this call's.
  struct Join {
    Rls* rls = nullptr;
    std::vector<Item> items;
    std::vector<std::optional<rules::envoy::Match>> matches;
    std::vector<std::pair<std::string_view, std::string_view>> entries;  // a descriptor's
    size_t n = 0;
    size_t left = 0;
    std::shared_ptr<const Compiled> config;
    Done done;
    rlspb::RateLimitResponse* resp = nullptr;
    int64_t start = 0;  // for the latency histogram (Metrics::LatencyNowUs)

    std::span<Item> Items() { return {items.data(), n}; }
  };
  static std::vector<std::unique_ptr<Join>>& JoinPool();  // this thread's spare calls
  static Join* TakeJoin(size_t descriptors);
  static void GiveBackJoin(Join* join);
  void Answer(Join& j);  // fills *j.resp from the items' results, then calls j.done

  std::shared_ptr<const Compiled> Current() const;

  Service& service_;
  RlsOptions options_;
  std::mutex load_mu_;  // one Load at a time
  // The config: swapped under current_mu_, then generation_ bumped; each thread keeps its own
  // reference and takes the lock only when the generation moved (as Service::Active does).
  // libstdc++ 12's atomic<shared_ptr> unlocks after a load with a relaxed store, which leaves
  // a load and the next store unordered (ThreadSanitizer reports it).
  mutable std::mutex current_mu_;
  std::shared_ptr<const Compiled> current_;
  std::atomic<uint64_t> generation_{0};
  static inline std::atomic<uint64_t> next_id_{1};
  const uint64_t id_ = next_id_.fetch_add(1, std::memory_order_relaxed);  // names it per thread
  // Limits that requests bring themselves (descriptor.limit), by (requests_per_unit, unit):
  // bounded, since any client can name new ones. One beyond the bound has no counters: it
  // is decided by the store's fail mode, open or else closed (OverrideBeyondBound).
  static constexpr size_t kMaxOverrides = 1024;
  mutable std::mutex overrides_mu_;
  std::map<std::pair<uint32_t, int>, StoreLimits> overrides_;
  std::once_flag overrides_slot_once_;
  size_t overrides_metrics_slot_ = 0;    // set once, before any entry of overrides_
  void OverrideBeyondBound(Item& item);  // item.override_policy beyond kMaxOverrides
};

// POST /v1/envoy/ratelimit: a RateLimitRequest as JSON (the proto's JSON mapping) in, the
// RateLimitResponse as JSON out; 400 with the reason for a malformed or invalid request.
// At /json, envoyproxy/ratelimit's path for the same, 429 when the answer is OVER_LIMIT.
class RlsJsonHandler final : public Handler {
 public:
  explicit RlsJsonHandler(Rls& rls) : rls_(rls) {}
  bool Handle(HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
              const std::function<Completion()>& defer) override;

 private:
  Rls& rls_;
};

struct RlsGrpcOptions {
  std::string address = "127.0.0.1:8081";  // host:port, [v6]:port
  // TLS (GrpcServerOptions): certificate chain and key; a client CA for mutual TLS.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  // Connection bounds (GrpcServerOptions): in all, and per client address (0: none).
  size_t max_connections = 10'000;
  size_t max_connections_per_peer = 0;
  // Request bytes held in messages not yet whole, over all connections
  // (GrpcServerOptions::max_buffered_bytes).
  size_t max_buffered_bytes = size_t{256} << 20;
  // A call's request not whole, or a write not taken, for this long closes its connection
  // (GrpcServerOptions::stall_timeout).
  std::chrono::milliseconds stall_timeout{10'000};
  // Calls in flight at a stop get this long to be answered (GrpcServerOptions).
  std::chrono::milliseconds drain_timeout{10'000};
};

// ShouldRateLimit over gRPC for `rls` (and gRPC health checking), served on `loops` (the
// workers'; GrpcServer). Returns null (and *error) on failure.
class RlsGrpcServer {
 public:
  static std::unique_ptr<RlsGrpcServer> Start(Rls& rls,
                                              const std::vector<boost::asio::io_context*>& loops,
                                              const RlsGrpcOptions& options, int* bound_port,
                                              std::string* error);
  ~RlsGrpcServer();
  // Graceful: GOAWAY, calls in flight answered, then closed. Blocks; call it from a thread
  // other than the workers', while they run.
  void Shutdown();
  // The gRPC server's metrics (GrpcServer::RenderMetrics). From any thread.
  void RenderMetrics(std::string& out) const;
  // GrpcServer::ReloadTls.
  bool ReloadTls(std::string* error);

 private:
  struct Impl;
  explicit RlsGrpcServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_RLS_H_
