// The sluice command: serve, check, version.
#include <signal.h>
#include <sys/resource.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <charconv>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <type_traits>

#include "core/log.h"
#include "rules/address.h"
#include "rules/config_file.h"
#include "rules/config_loader.h"
#include "rules/describe.h"
#include "rules/envoy_config.h"
#include "rules/http_token.h"
#include "server/admin.h"
#include "server/front.h"
#include "server/http_server.h"
#include "server/reloader.h"
#include "server/rls.h"
#include "server/service.h"
#include "sluice/memory_store.h"
#include "sluice/policy.h"
#include "sluice/time.h"
#include "store/redis/connection.h"

namespace {

using sluice::Log;

std::string FormatDelta(sluice::DurationUs d) {
  if (d == sluice::kNever) return "never";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6fs", static_cast<double>(d) / sluice::kSecond);
  return buf;
}

// A set of files as last tried and as last loaded, for a reload when one changes: the watch
// tries each change once; a signal or POST /v1/reload tries again whatever differs from what
// was loaded (a try that failed for a passing reason, out of descriptors). Used on one
// thread: the watch and the reloads run on the reload thread. With no files, never changed.
class WatchedFiles {
 public:
  explicit WatchedFiles(std::vector<std::string> paths)
      : paths_(std::move(paths)), tried_(Stamp()), loaded_(tried_) {}
  // Differs from the last try (or, `since_loaded`, from the last load).
  bool Changed(bool since_loaded = false) const {
    if (paths_.empty()) return false;
    return Stamp() != (since_loaded ? loaded_ : tried_);
  }
  // A try begins: the files as they are now. Returns the stamp, for Loaded.
  std::string Trying() {
    tried_ = Stamp();
    return tried_;
  }
  void Loaded(std::string stamp) { loaded_ = std::move(stamp); }

 private:
  std::string Stamp() const {
    std::string out;
    for (const auto& p : paths_) out.append(sluice::rules::ConfigFileStamp(p)).append("|");
    return out;
  }
  const std::vector<std::string> paths_;
  std::string tried_, loaded_;
};

// Loads the config (or the embedded default); prints the error and returns false if invalid.
// The store's TLS files loaded as Redis connections load them: a key that does not match
// its certificate, or a PEM file that does not parse, is refused by `validate` and by a
// reload (the store's settings apply at the next start, which would fail) instead of
// stopping that next start.
sluice::Status CheckStoreTls(const std::string& path, const sluice::rules::Config& config) {
  const sluice::rules::StoreConfig& s = config.store;
  if (!s.tls || s.type == sluice::rules::StoreConfig::Type::kMemory) return sluice::Status::Ok();
  try {
    sluice::redis::MakeTlsContext({s.tls_ca_file, s.tls_cert_file, s.tls_key_file});
  } catch (const std::exception& e) {
    return sluice::Status::Invalid(path + ": " + e.what());
  }
  return sluice::Status::Ok();
}

// `rules_optional`: the service's limits are an Envoy config's, so a file may hold only the
// store (rules::LoadConfigFile).
sluice::Status LoadChecked(const std::string& path, sluice::rules::Config* config,
                           bool rules_optional) {
  sluice::Status st = sluice::rules::LoadConfigFile(path, config, rules_optional);
  return st.ok() ? CheckStoreTls(path, *config) : st;
}

bool Load(const std::string& path, sluice::rules::Config* config, bool rules_optional) {
  if (path.empty()) {
    *config = sluice::rules::DefaultConfig();
    return true;
  }
  sluice::Status st = LoadChecked(path, config, rules_optional);
  if (!st.ok()) sluice::LogFatal(st.message());
  return st.ok();
}

// Read as the listener binds it: an IP literal (a name such as "localhost" is refused there),
// loopback in any spelling (127.0.0.0/8, ::1, ::ffff:127.0.0.1).
bool IsLoopback(const std::string& host) {
  boost::system::error_code ec;
  auto a = boost::asio::ip::make_address(host, ec);
  if (ec) return false;
  if (a.is_v6() && a.to_v6().is_v4_mapped()) {
    return boost::asio::ip::make_address_v4(boost::asio::ip::v4_mapped, a.to_v6()).is_loopback();
  }
  return a.is_loopback();
}

struct ServeOptions {
  std::string config;
  std::string listen = "127.0.0.1:8080";
  std::string admin = "127.0.0.1:9090";
  std::string admin_token;
  std::string upstream;
  int64_t upstream_timeout_ms = 30'000;
  int64_t read_timeout_ms = 10'000;
  int64_t idle_timeout_ms = 60'000;
  int64_t drain_timeout_ms = 10'000;
  size_t threads = 0;
  size_t max_keys = 1 << 20;
  size_t max_connections = 10'000;
  size_t max_connections_per_ip = 0;
  size_t max_request_body = size_t{1} << 20;
  size_t max_batch_checks = sluice::server::Front::kDefaultMaxBatchChecks;
  std::string envoy_config;  // a directory of envoyproxy/ratelimit YAML files
  std::string grpc = "127.0.0.1:8081";
  std::string grpc_tls_cert, grpc_tls_key, grpc_tls_client_ca;
  bool rls_headers = false;
  std::string rls_limit_header = "RateLimit-Limit";
  std::string rls_remaining_header = "RateLimit-Remaining";
  std::string rls_reset_header = "RateLimit-Reset";
  bool rls_shadow = false;
  bool envoy_merge_domains = false;
  size_t grpc_max_buffered_mib = 256;
  size_t max_buffered_mib = 256;
  std::string log_format = "text";
  std::set<std::string> given;  // the flags given on the command line, e.g. "--listen"
};

// The config file's server: section, for each setting whose flag was not given. The admin
// token: the flag, then SLUICE_ADMIN_TOKEN, then the file.
void ApplyServerSection(const sluice::rules::ServerSettings& s, ServeOptions* o) {
  const auto take = [o](const char* flag, const auto& from, auto& to) {
    if (from && !o->given.contains(flag)) to = static_cast<std::decay_t<decltype(to)>>(*from);
  };
  take("--listen", s.listen, o->listen);
  take("--admin", s.admin, o->admin);
  const char* env_token = std::getenv("SLUICE_ADMIN_TOKEN");
  if (env_token == nullptr || *env_token == '\0') {  // empty, as Serve reads it: not given
    take("--admin-token", s.admin_token, o->admin_token);
  }
  take("--upstream", s.upstream, o->upstream);
  take("--upstream-timeout", s.upstream_timeout_ms, o->upstream_timeout_ms);
  take("--read-timeout-ms", s.read_timeout_ms, o->read_timeout_ms);
  take("--idle-timeout-ms", s.idle_timeout_ms, o->idle_timeout_ms);
  take("--drain-timeout-ms", s.drain_timeout_ms, o->drain_timeout_ms);
  take("--threads", s.threads, o->threads);
  take("--max-keys", s.max_keys, o->max_keys);
  take("--max-connections", s.max_connections, o->max_connections);
  take("--max-connections-per-ip", s.max_connections_per_ip, o->max_connections_per_ip);
  take("--max-request-body", s.max_request_body, o->max_request_body);
  take("--max-batch-checks", s.max_batch_checks, o->max_batch_checks);
  take("--max-buffered-mib", s.max_buffered_mib, o->max_buffered_mib);
  take("--log-format", s.log_format, o->log_format);
  take("--envoy-config", s.envoy_config, o->envoy_config);
  take("--grpc", s.grpc, o->grpc);
  // The certificate and its key come as a pair, from the flags or from the file.
  if (!o->given.contains("--grpc-tls-cert")) {
    take("--grpc-tls-cert", s.grpc_tls_cert, o->grpc_tls_cert);
    take("--grpc-tls-key", s.grpc_tls_key, o->grpc_tls_key);
  }
  take("--grpc-tls-client-ca", s.grpc_tls_client_ca, o->grpc_tls_client_ca);
  take("--rls-headers", s.rls_headers, o->rls_headers);
  take("--rls-limit-header", s.rls_limit_header, o->rls_limit_header);
  take("--rls-remaining-header", s.rls_remaining_header, o->rls_remaining_header);
  take("--rls-reset-header", s.rls_reset_header, o->rls_reset_header);
  take("--rls-shadow", s.rls_shadow, o->rls_shadow);
  take("--envoy-merge-domains", s.envoy_merge_domains, o->envoy_merge_domains);
  take("--grpc-max-buffered-mib", s.grpc_max_buffered_mib, o->grpc_max_buffered_mib);
}

// Every client, upstream and Redis connection is a file descriptor, and a listener out of
// them accepts nothing, the admin one included. The soft limit (often 1024) goes up to the
// hard one, as Go's runtime and nginx's worker_rlimit_nofile do; a limit still short of
// --max-connections is said at start.
void RaiseOpenFilesLimit(size_t max_connections, size_t listeners) {
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0) return;
  constexpr rlim_t kCap = 1 << 20;  // the kernel's usual nr_open
  const rlim_t want = std::min<rlim_t>(lim.rlim_max, kCap);
  if (lim.rlim_cur < want) {
    rlimit raised = lim;
    raised.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) lim = raised;
  }
  // Room beside the clients: listeners, upstream and Redis connections, config files.
  constexpr size_t kRoom = 256;
  const size_t clients = max_connections * listeners;
  if (lim.rlim_cur != RLIM_INFINITY && lim.rlim_cur < clients + kRoom) {
    Log("WARN", "the open files limit (" + std::to_string(lim.rlim_cur) +
                    ") is below what the listeners may hold (--max-connections " +
                    std::to_string(max_connections) +
                    (listeners > 1 ? " on each of " + std::to_string(listeners) + " listeners"
                                   : std::string()) +
                    ") and " + std::to_string(kRoom) +
                    " more for upstream and Redis connections: past it, new "
                    "connections wait unaccepted (sluice_accept_failures_total); raise it "
                    "(ulimit -n, systemd LimitNOFILE=) or lower --max-connections");
  }
}

int Serve(const ServeOptions& flags) {
  ServeOptions o = flags;  // with the config file's server: section added once it is read
  // SIGTERM, SIGINT and SIGHUP are taken on the main loop's thread only: every thread made
  // from here on (workers, the reload thread) starts with them blocked, and the main thread
  // unblocks them once its loop runs (a signal that came before is then delivered). A
  // signal the kernel gave a thread asleep on a condition would otherwise wait there,
  // under ThreadSanitizer's deferred delivery for good.
  // A log line written to a pipe whose reader went away (`| tee`, a restarted log
  // collector) would raise SIGPIPE and end the process; the write fails instead. Sockets
  // never raise it (they send with MSG_NOSIGNAL).
  std::signal(SIGPIPE, SIG_IGN);
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&stop_signals, sig);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  namespace srv = sluice::server;
  sluice::rules::Config config;
  // Before the load: a change made while it reads is then seen on the first tick.
  std::string stamp = sluice::rules::ConfigFileStamp(o.config);
  // The flag's format, for an error in the file: the file's own log_format is not read yet.
  sluice::SetLogFormat(*sluice::ParseLogFormat(o.log_format));
  if (!Load(o.config, &config, !o.envoy_config.empty())) return 2;
  ApplyServerSection(config.server, &o);
  sluice::SetLogFormat(*sluice::ParseLogFormat(o.log_format));
  for (const std::string& w : config.warnings) Log("WARN", w);
  const sluice::rules::ServerSettings started_server = config.server;
  const auto listen = sluice::rules::ParseListenAddress(o.listen);
  if (!listen) {
    sluice::LogFatal("sluice serve: bad --listen '" + o.listen + "' (IP:PORT; IPv6 as [::1]:PORT)");
    return 2;
  }
  const auto admin_address = sluice::rules::ParseListenAddress(o.admin);
  if (!admin_address) {
    sluice::LogFatal("sluice serve: bad --admin '" + o.admin + "' (IP:PORT; IPv6 as [::1]:PORT)");
    return 2;
  }
  const std::string& host = listen->ip;
  const std::string& admin_host = admin_address->ip;
  const uint16_t port = listen->port, admin_port = admin_address->port;
  // The RLS flags mean nothing without an Envoy config, the flag's or the file's: given
  // alone, they are refused rather than ignored (a port never opened, headers never added).
  // The file refuses its own such settings at load.
  if (o.envoy_config.empty()) {
    for (const char* flag :
         {"--grpc", "--grpc-tls-cert", "--grpc-tls-key", "--grpc-tls-client-ca", "--rls-headers",
          "--rls-limit-header", "--rls-remaining-header", "--rls-reset-header",
          "--envoy-merge-domains", "--rls-shadow", "--grpc-max-buffered-mib"}) {
      if (o.given.contains(flag)) {
        sluice::LogFatal("sluice serve: " + std::string(flag) +
                         " needs --envoy-config (or server.envoy_config in the config file)");
        return 2;
      }
    }
  }
  if (!o.grpc_tls_client_ca.empty() && o.grpc_tls_cert.empty()) {
    sluice::LogFatal(
        "sluice serve: --grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key (or "
        "server.grpc_tls_cert and server.grpc_tls_key)");
    return 2;
  }
  std::string token = o.admin_token;
  if (token.empty()) {
    if (const char* env = std::getenv("SLUICE_ADMIN_TOKEN")) token = env;
  }
  // A client's Authorization header cannot carry what HTTP strips or forbids (spaces and
  // tabs at its ends, control bytes), so such a token would lock every client out.
  if (std::any_of(token.begin(), token.end(),
                  [](char c) { return static_cast<unsigned char>(c) <= ' ' || c == '\x7f'; })) {
    sluice::LogFatal(
        "sluice serve: the admin token holds a space or control character, which no "
        "Authorization header can carry");
    return 2;
  }
  if (!IsLoopback(admin_host) && token.empty()) {
    sluice::LogFatal("sluice serve: the admin listener on " + admin_host +
                     " needs a token (--admin-token, SLUICE_ADMIN_TOKEN or server.admin_token) "
                     "when not bound to loopback");
    return 2;
  }

  sluice::MemoryStore::Options store_options;
  store_options.max_keys_per_limit = o.max_keys;
  std::vector<std::string> store_tls_paths;  // watched for rotation (WatchedFiles)
  if (config.store.tls && config.store.type != sluice::rules::StoreConfig::Type::kMemory) {
    store_tls_paths = {config.store.tls_ca_file, config.store.tls_cert_file,
                       config.store.tls_key_file};
  }
  std::unique_ptr<srv::Service> service_owner;
  try {
    service_owner = std::make_unique<srv::Service>(std::move(config), store_options);
  } catch (const std::exception& e) {  // e.g. TLS files that do not load
    sluice::LogFatal("sluice serve: " + std::string(e.what()));
    return 1;
  }
  srv::Service& service = *service_owner;
  // Runs on the reload thread only (the Reloader below): one reload at a time, each reading
  // the file afresh, so the last one asked for applies the newest file.
  // Set by SIGTERM: reloads still queued then are not run, and one running then is not
  // applied (a drain is no time to read and compile a large file, and its result would
  // never serve).
  std::atomic<bool> stopping{false};
  // `stamp`, the config file as last read, is read and written on the reload thread (by a
  // reload and the watch) once the server runs: the watch reloads a change it has not seen
  // read.
  auto reload = [&]() -> sluice::Status {
    if (o.config.empty()) {
      Log("WARN", "reload: no config file to read (running on the embedded default)");
      return sluice::Status::Invalid("no config file (embedded default)");
    }
    stamp = sluice::rules::ConfigFileStamp(o.config);
    sluice::rules::Config next;
    sluice::Status st = LoadChecked(o.config, &next, !o.envoy_config.empty());
    if (!st.ok()) {
      service.CountReloadFailure(srv::Service::ReloadPart::kRules);
      Log("WARN", "reload failed, keeping the current rules: " + st.message());
      return st;
    }
    if (stopping) return sluice::Status::Unavailable("shutting down: the reload was not applied");
    for (const std::string& w : next.warnings) Log("WARN", w);
    if (next.server != started_server) {
      // Listeners, threads and bounds are set up once: the rules of the new file apply.
      Log("WARN",
          "the server section changed; the new rules apply, the server settings "
          "need a restart");
    }
    if (st = service.Reload(std::move(next)); !st.ok()) {
      service.CountReloadFailure(srv::Service::ReloadPart::kRules);
      Log("WARN", "reload refused, keeping the current rules: " + st.message());
      return st;
    }
    Log("INFO", "reloaded " + o.config);
    return st;
  };

  size_t threads = o.threads ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  srv::HttpOptions http_options;
  http_options.read_timeout = std::chrono::milliseconds(o.read_timeout_ms);
  http_options.idle_timeout = std::chrono::milliseconds(o.idle_timeout_ms);
  http_options.drain_timeout = std::chrono::milliseconds(o.drain_timeout_ms);
  http_options.max_buffered_body_bytes = o.max_buffered_mib << 20;
  http_options.max_connections = o.max_connections;
  http_options.max_connections_per_peer = o.max_connections_per_ip;
  http_options.max_body_bytes = o.max_request_body;
  http_options.on_worker_start = [&service](boost::asio::io_context& io) {
    service.ConnectThread(io);
  };
  http_options.on_worker_exit = [&service] {
    srv::ReleaseIdleUpstreamConnections();
    service.CloseThread();
  };
  // Refusals under overload are counted each and logged at most once a second.
  const auto counted_warning = [&service](void (srv::Metrics::*count)(), const char* message) {
    return [&service, count, message, log = std::make_shared<sluice::LogLimiter>()] {
      (service.metrics().*count)();
      log->Warn(message);
    };
  };
  http_options.on_connection_refused = counted_warning(
      &srv::Metrics::CountConnectionRefused,
      "a connection was closed at accept, over --max-connections or --max-connections-per-ip "
      "(sluice_connections_refused_total)");
  http_options.on_body_refused = counted_warning(
      &srv::Metrics::CountBodyRefused,
      "a request was answered 503 unread: request bodies in flight are at --max-buffered-mib "
      "(sluice_bodies_refused_total)");
  http_options.on_request_refused = [&service](unsigned status) {
    service.metrics().CountRequestRefused(status);
  };
  http_options.on_accept_failed = [&service](const boost::system::error_code& ec) {
    service.metrics().CountAcceptFailure();
    static sluice::LogLimiter log;
    log.Warn("accept failed: " + ec.message() +
             "; new connections wait in the kernel's queue (raise the open files limit or lower "
             "--max-connections)");
  };
  // --max-connections bounds each listener: the gRPC port's clients come on top.
  RaiseOpenFilesLimit(o.max_connections, o.envoy_config.empty() ? 1 : 2);
  srv::HttpServer server(http_options, threads);
  auto& ctx = server.main_context();
  // Taken before any port opens: once a port answers, a supervisor may signal at once, and
  // a SIGHUP's default action would end the process. Asio keeps a signal that comes before
  // the first wait for it.
  boost::asio::signal_set signals(ctx, SIGTERM, SIGINT, SIGHUP);
  std::unique_ptr<srv::Upstream> upstream;
  if (!o.upstream.empty()) {
    auto uo = srv::UpstreamOptions::ParseUrl(o.upstream);
    if (!uo) {
      sluice::LogFatal("sluice serve: bad --upstream '" + o.upstream + "' (http://HOST:PORT)");
      return 2;
    }
    uo->response_timeout = std::chrono::milliseconds(o.upstream_timeout_ms);
    uo->on_failure = [&service](size_t kind) { service.metrics().CountUpstreamFailure(kind); };
    upstream = std::make_unique<srv::Upstream>(*uo);
    if (auto st = upstream->Resolve(); !st.ok()) {
      sluice::LogFatal("sluice serve: " + st.message());
      return 2;
    }
  }
  std::unique_ptr<srv::Rls> rls;
  std::unique_ptr<srv::RlsGrpcServer> grpc_server;
  // The envoy config directory as last loaded (or tried): a change is reloaded by the watch.
  // Read and written on the reload thread once the server runs.
  std::string envoy_stamp;
  int grpc_bound = 0;
  if (!o.envoy_config.empty()) {
    srv::RlsOptions ro;
    ro.response_headers = o.rls_headers;
    ro.limit_header = o.rls_limit_header;
    ro.remaining_header = o.rls_remaining_header;
    ro.reset_header = o.rls_reset_header;
    ro.shadow = o.rls_shadow;
    ro.merge_domains = o.envoy_merge_domains;
    rls = std::make_unique<srv::Rls>(service, ro);
    // Before the load: a change made while it reads is then seen on the first tick.
    envoy_stamp = sluice::rules::envoy::EnvoyConfigDirStamp(o.envoy_config);
    if (auto st = rls->Load(o.envoy_config); !st.ok()) {
      sluice::LogFatal(st.message());
      return 2;
    }
    std::string error;
    srv::RlsGrpcOptions go;
    go.address = o.grpc;
    go.tls_cert_file = o.grpc_tls_cert;
    go.tls_key_file = o.grpc_tls_key;
    go.tls_client_ca_file = o.grpc_tls_client_ca;
    go.max_connections = o.max_connections;
    go.max_connections_per_peer = o.max_connections_per_ip;
    go.max_buffered_bytes = o.grpc_max_buffered_mib << 20;
    // As an HTTP request must arrive whole within the read timeout, so must a gRPC call.
    go.stall_timeout = std::chrono::milliseconds(o.read_timeout_ms);
    go.drain_timeout = std::chrono::milliseconds(o.drain_timeout_ms);  // as HTTP requests
    grpc_server = srv::RlsGrpcServer::Start(*rls, server.loops(), go, &grpc_bound, &error);
    if (!grpc_server) {
      sluice::LogFatal("sluice serve: " + error);
      return 1;
    }
  }
  auto reload_envoy = [&]() -> sluice::Status {
    if (stopping) return sluice::Status::Unavailable("shutting down: the reload was not run");
    envoy_stamp = sluice::rules::envoy::EnvoyConfigDirStamp(o.envoy_config);
    if (auto es = rls->Load(o.envoy_config); !es.ok()) {
      service.CountReloadFailure(srv::Service::ReloadPart::kEnvoy);
      Log("WARN", "envoy config reload failed, keeping the current one: " + es.message());
      return es;
    }
    service.CountReload(srv::Service::ReloadPart::kEnvoy);
    Log("INFO", "reloaded " + o.envoy_config);
    return sluice::Status::Ok();
  };
  // TLS files as last loaded (or tried): a certificate rotated in place (cert-manager, a
  // Kubernetes Secret's symlink swap) is loaded on the tick, and by SIGHUP or POST
  // /v1/reload, for the connections that come after: the gRPC listener's, and the store's
  // (its paths as at start: a reload that changes them applies at the next start).
  WatchedFiles grpc_tls_files(
      grpc_server && !o.grpc_tls_cert.empty()
          ? std::vector<std::string>{o.grpc_tls_cert, o.grpc_tls_key, o.grpc_tls_client_ca}
          : std::vector<std::string>{});
  WatchedFiles store_tls_files(store_tls_paths);
  const auto reload_tls = [&](WatchedFiles& files, srv::Service::ReloadPart part,
                              std::string_view what,
                              const std::function<bool(std::string*)>& load) -> sluice::Status {
    if (stopping) return sluice::Status::Unavailable("shutting down: the reload was not run");
    std::string tried = files.Trying();
    std::string error;
    if (!load(&error)) {
      service.CountReloadFailure(part);
      Log("WARN", "reload failed, keeping the current certificate: " + error);
      return sluice::Status::Invalid(error);
    }
    files.Loaded(std::move(tried));
    service.CountReload(part);
    Log("INFO", "reloaded the " + std::string(what));
    return sluice::Status::Ok();
  };
  const auto reload_grpc_tls = [&] {
    return reload_tls(grpc_tls_files, srv::Service::ReloadPart::kGrpcTls,
                      "gRPC TLS certificate " + o.grpc_tls_cert,
                      [&](std::string* error) { return grpc_server->ReloadTls(error); });
  };
  const auto reload_store_tls = [&] {
    return reload_tls(store_tls_files, srv::Service::ReloadPart::kStoreTls, "store's TLS files",
                      [&](std::string* error) { return service.ReloadStoreTls(error); });
  };
  // Each part is reloaded whatever another's outcome; the answer is the first failure, the
  // rules' first. Certificates are read again where they differ from what was loaded.
  auto reload_all = [&, reload_rules = reload]() -> sluice::Status {
    const sluice::Status parts[] = {
        o.config.empty() && rls ? sluice::Status::Ok() : reload_rules(),
        rls ? reload_envoy() : sluice::Status::Ok(),
        grpc_tls_files.Changed(/*since_loaded=*/true) ? reload_grpc_tls() : sluice::Status::Ok(),
        store_tls_files.Changed(/*since_loaded=*/true) ? reload_store_tls() : sluice::Status::Ok()};
    for (const sluice::Status& st : parts) {
      if (!st.ok()) return st;
    }
    return sluice::Status::Ok();
  };
  std::unique_ptr<srv::RlsJsonHandler> rls_json;
  if (rls) rls_json = std::make_unique<srv::RlsJsonHandler>(*rls);
  srv::Front front(service, upstream.get(), rls_json.get(), o.max_batch_checks);
  // Every reload (the tick's, SIGHUP's, POST /v1/reload's) runs there, off the workers.
  // Destroyed before everything above, which its work uses.
  std::atomic<bool> hup_queued{false};  // a SIGHUP's reload waits on the reloader
  srv::Reloader reloader;
  srv::Admin admin(
      service,
      [&](std::function<void(sluice::Status)> done) {
        reloader.Post([&reload_all, &stopping, &service, done = std::move(done)] {
          sluice::Status st;
          try {
            st = stopping ? sluice::Status::Unavailable("shutting down: the reload was not run")
                          : reload_all();
          } catch (const std::exception& e) {  // the caller is answered whatever happens
            service.CountReloadFailure(srv::Service::ReloadPart::kRules);
            st = sluice::Status::Invalid(std::string("the reload failed: ") + e.what());
          }
          done(st);
        });
      },
      token);
  if (grpc_server) {
    admin.AddMetrics([&grpc_server](std::string& out) { grpc_server->RenderMetrics(out); });
  }
  if (rls) {
    admin.AddTables([&rls](const srv::Admin::TableVisitor& visit) { rls->ForEachLimit(visit); });
  }
  uint16_t bound = 0, admin_bound = 0;
  if (auto st = server.Listen(host, port, front, &bound); !st.ok()) {
    sluice::LogFatal("sluice serve: " + st.message());
    return 1;
  }
  if (auto st = server.Listen(admin_host, admin_port, admin, &admin_bound,
                              /*reserve_descriptor=*/true);
      !st.ok()) {
    sluice::LogFatal("sluice serve: " + st.message());
    return 1;
  }

  boost::asio::steady_timer tick(ctx);
  std::thread grpc_stopper;
  std::function<void()> wait_signal = [&] {
    signals.async_wait([&](const boost::system::error_code& ec, int sig) {
      if (ec) return;
      if (sig == SIGHUP) {
        // Signals that come while a reload waits its turn join it: that reload reads the
        // file as it is when it starts. (Queued one each, a burst of them would hold the
        // reload thread for a burst of full reads of a large file.) The flag is cleared as
        // the reload starts, so a signal during a reload still gets one after it.
        if (!hup_queued.exchange(true)) {
          reloader.Post([&] {
            hup_queued = false;
            if (!stopping) (void)reload_all();  // logged and counted there
          });
        }
        wait_signal();
        return;
      }
      stopping = true;
      // A second SIGTERM or SIGINT takes its default action and ends the process at once:
      // whoever asked twice does not mean to wait out the drain. (A SIGHUP stays taken.)
      boost::system::error_code ignored;
      signals.remove(SIGTERM, ignored);
      signals.remove(SIGINT, ignored);
      Log("INFO",
          "shutting down: finishing in-flight requests (a second SIGTERM or SIGINT ends the "
          "process now)");
      auto stop_http = [&](std::function<bool()> others_done) {
        // gRPC's own stop takes up to its drain and 1 s to close what is left: the loops
        // it needs run until it is done, up to 2 s past the drain.
        server.Stop(std::move(others_done), std::chrono::seconds(2));
        signals.cancel();
        tick.cancel();  // the main loop may then run out of work and return
      };
      if (!grpc_server) return stop_http(nullptr);
      // Both listeners drain at once, against one deadline (a grace period sized to
      // --drain-timeout-ms covers the whole stop). The HTTP side keeps the workers' loops
      // running until gRPC is done: its calls in flight may be waiting on them (Redis).
      // Shutdown blocks, so it gets its own thread.
      auto grpc_done = std::make_shared<std::atomic<bool>>(false);
      grpc_stopper = std::thread([&, grpc_done] {
        grpc_server->Shutdown();
        grpc_done->store(true);
      });
      stop_http([grpc_done] { return grpc_done->load(); });
    });
  };
  wait_signal();
  // Reload when the config file changes; drop keys that are back to fresh.
  std::string settling_file = stamp;  // as seen on the last tick
  std::string settling_stamp;
  int ticks = 0;
  // Keys back to fresh are dropped every 10 s, one shard per loop turn: this loop is also a
  // worker's, and a whole store's sweep at once (about 9 ms per million keys) would hold
  // its requests for all of it.
  bool sweeping = false;
  std::function<void()> sweep_step = [&] {
    bool done = false;
    service.store().SweepStep(sluice::SystemClock::Instance().Now(), &done);
    if (done) {
      sweeping = false;
    } else {
      boost::asio::post(ctx, sweep_step);
    }
  };
  int missing_ticks = 0;  // ticks in a row the config file was not there
  // Looks for changed files and reloads them, on the reload thread (posted by the tick
  // below), so each reload it starts runs at once, in order with SIGHUP's and POST's.
  std::atomic<bool> watch_queued{false};
  const auto watch_files = [&] {
    // A change is loaded once the file has stopped changing for a tick: a file caught
    // mid-write can be valid YAML and still be short of its last rules.
    std::string now_file = sluice::rules::ConfigFileStamp(o.config);
    // A file gone for two ticks (not an editor's delete and write) is said once: the
    // running rules stay, but a restart would find no config.
    missing_ticks = now_file.empty() && !o.config.empty() ? missing_ticks + 1 : 0;
    if (missing_ticks == 2) {
      Log("WARN", "the config file " + o.config +
                      " is gone or unreadable: the running rules stay, and a restart would "
                      "fail until it is back");
    }
    if (std::string now = std::move(now_file); !now.empty()) {
      if (now != stamp) {
        if (now == settling_file) {
          stamp = now;
          (void)reload();  // logged and counted there
        }
        settling_file = std::move(now);
      }
    }
    // As envoyproxy/ratelimit watches its runtime directory: an edited, added or removed
    // file, or a ConfigMap update, is loaded without a signal.
    if (rls) {
      std::string now_stamp = sluice::rules::envoy::EnvoyConfigDirStamp(o.envoy_config);
      const bool changed = now_stamp != envoy_stamp;
      if (changed && now_stamp == settling_stamp) (void)reload_envoy();  // settled, as above
      settling_stamp = std::move(now_stamp);
    }
    // A rotation writes two or three files, not at once: a pair caught half-written
    // fails (the key does not match the certificate), keeps the current one, and loads
    // once the last file is written, as that changes the stamp again.
    if (grpc_tls_files.Changed()) (void)reload_grpc_tls();
    if (store_tls_files.Changed()) (void)reload_store_tls();
  };
  std::function<void()> schedule = [&] {
    tick.expires_after(std::chrono::seconds(1));
    tick.async_wait([&](const boost::system::error_code& ec) {
      if (ec) return;
      // The files are looked at on the reload thread, not here: this loop is also a
      // worker's, and a stat on a hung filesystem (an NFS or FUSE mount) would hold its
      // requests. At most one look waits there; a long reload delays the next.
      if (!watch_queued.exchange(true)) {
        reloader.Post([&] {
          watch_queued = false;
          if (!stopping) watch_files();
        });
      }
      if (++ticks % 10 == 0 && !sweeping) {
        sweeping = true;
        sweep_step();
      }
      if (ticks % 5 == 0) service.ReportFullTables();
      schedule();
    });
  };
  schedule();

  std::string store_type, store_state;
  service.StoreReady(&store_type, &store_state);
  std::printf("sluice %s: listening on %s (admin %s), %zu thread%s, store %s, config %s%s%s\n",
              SLUICE_VERSION, srv::JoinHostPort(host, bound).c_str(),
              srv::JoinHostPort(admin_host, admin_bound).c_str(), threads, threads == 1 ? "" : "s",
              store_type.c_str(), service.rules()->rules.config().source.c_str(),
              upstream ? ", upstream " : "", o.upstream.c_str());
  std::printf("%s", sluice::rules::DescribeConfig(service.rules()->rules.config()).c_str());
  if (rls) {
    std::printf("envoy rate limit service (RLS v3) on %s (port %d%s): %zu domains from %s\n",
                o.grpc.c_str(), grpc_bound,
                o.grpc_tls_cert.empty()        ? ""
                : o.grpc_tls_client_ca.empty() ? ", TLS"
                                               : ", mutual TLS",
                rls->domains(), o.envoy_config.c_str());
  }
  std::fflush(stdout);
  // The first handler of the main loop, before any Run posts.
  boost::asio::post(ctx, [stop_signals] { pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr); });
  server.Run();
  if (grpc_stopper.joinable()) grpc_stopper.join();
  // A reload running now is finished, not applied, before "stopped"; and before the gRPC
  // server goes, whose certificate a reload may be reading.
  reloader.Stop();
  grpc_server.reset();
  Log("INFO", "stopped");
  return 0;
}

// Checks a config file, an Envoy config directory, or both as `serve` would load them
// together (the directory's limits against the file's store), without opening a port or a
// connection.
// The Envoy config directory is the flag's, else the config file's (server.envoy_config),
// as `serve` takes it; so is merging its domains.
int Validate(const std::string& path, const std::string& envoy_flag, bool merge_flag) {
  sluice::rules::Config config;
  if (!Load(path, &config, !envoy_flag.empty())) return 1;
  for (const std::string& w : config.warnings) Log("WARN", w);
  if (!path.empty()) {
    std::printf("%s: ok\n%s%s", path.c_str(), sluice::rules::DescribeServer(config.server).c_str(),
                sluice::rules::DescribeConfig(config).c_str());
  }
  const std::string envoy_dir =
      envoy_flag.empty() ? config.server.envoy_config.value_or("") : envoy_flag;
  if (envoy_dir.empty()) {
    if (!merge_flag) return 0;
    std::fprintf(stderr,
                 "sluice validate: --envoy-merge-domains needs --envoy-config (or "
                 "server.envoy_config in the config file)\n");
    return 2;
  }
  sluice::server::Service service(config, {}, /*start_sync=*/false);
  sluice::server::RlsOptions ro;
  ro.merge_domains = merge_flag || config.server.envoy_merge_domains.value_or(false);
  sluice::server::Rls rls(service, ro);
  if (sluice::Status st = rls.Load(envoy_dir); !st.ok()) {
    std::fprintf(stderr, "%s\n", st.message().c_str());
    return 1;
  }
  std::printf("%s: ok (%zu domains)\n", envoy_dir.c_str(), rls.domains());
  return 0;
}

// Runs `times` requests of `cost` for one key through an in-memory limit and prints each
// decision: a way to see what a policy does before putting it in a config.
int Check(const std::string& algorithm, int64_t limit, const std::string& period, int64_t burst,
          const std::string& key, int64_t cost, int times) {
  auto algo = sluice::ParseAlgorithm(algorithm);
  if (!algo) {
    std::fprintf(stderr, "sluice check: unknown algorithm '%s'\n", algorithm.c_str());
    return 2;
  }
  auto per = sluice::ParseDuration(period);
  if (!per) {
    std::fprintf(stderr, "sluice check: bad period '%s' (examples: 1s, 250ms, 1m, 1h, 1d)\n",
                 period.c_str());
    return 2;
  }
  sluice::Policy policy{*algo, limit, *per, burst};
  if (auto st = policy.ValidateStrict(); !st.ok()) {
    std::fprintf(stderr, "sluice check: %s\n", st.message().c_str());
    return 2;
  }
  sluice::MemoryStore store;
  sluice::Limit* l = store.AddLimit("check", policy);
  sluice::TimeUs now = sluice::SystemClock::Instance().Now();
  int rejected = 0;
  for (int i = 0; i < times; ++i) {
    sluice::Decision d = l->Check(key, now, cost);
    rejected += d.allowed ? 0 : 1;
    std::printf("%d %s limit=%lld remaining=%lld reset_after=%s retry_after=%s delay=%s\n", i + 1,
                d.allowed ? "allowed" : "rejected", static_cast<long long>(d.limit),
                static_cast<long long>(d.remaining), FormatDelta(d.reset_after).c_str(),
                FormatDelta(d.retry_after).c_str(), FormatDelta(d.delay).c_str());
  }
  return rejected > 0 ? 1 : 0;
}

// A whole number that fits 64 bits, checked on the text: the conversion behind an option
// would turn 99999999999999999999 into the largest value without a word.
const CLI::Validator kWholeNumber(
    [](std::string& text) -> std::string {
      int64_t v = 0;
      auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
      if (ec != std::errc() || end != text.data() + text.size()) {
        return "'" + text + "' is not a whole number between " +
               std::to_string(std::numeric_limits<int64_t>::min()) + " and " +
               std::to_string(std::numeric_limits<int64_t>::max());
      }
      return "";
    },
    "INT64", "whole number");

// A number of units: a negative one would be taken as 0 (a peek) without a word.
const CLI::Validator kNotNegative(
    [](std::string& text) -> std::string {
      return !text.empty() && text[0] == '-' ? "'" + text + "' is negative (0 peeks)" : "";
    },
    "", "not negative");

// An HTTP header name (RFC 9110 token): Envoy adds the name as it is to its answer.
const CLI::Validator kHeaderName(
    [](std::string& text) -> std::string {
      return sluice::rules::IsToken(text) ? "" : "'" + text + "' is not a header name";
    },
    "NAME", "header name");

constexpr const char* kMergeDomainsHelp =
    "Files of --envoy-config that name the same domain add their descriptors to it, rather "
    "than fail the load (envoyproxy/ratelimit's MERGE_DOMAIN_CONFIG)";

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Sluice: a rate limiting service"};
  app.require_subcommand(0, 1);
  bool version = false;
  app.add_flag("--version", version, "Print the version and exit");

  auto* serve = app.add_subcommand("serve", "Run the rate limiting service");
  ServeOptions serve_options;
  // An empty path is refused, not read as "no --config": `--config "$UNSET"` would
  // otherwise run the embedded default's rules where the operator meant their own.
  const CLI::Validator non_empty_path(
      [](std::string& path) { return path.empty() ? std::string("an empty path") : ""; }, "PATH");
  serve
      ->add_option("--config", serve_options.config,
                   "YAML config file (default: the embedded default); its server: section "
                   "sets what the flags below do not")
      ->check(non_empty_path);
  serve->add_option("--listen", serve_options.listen, "IP:PORT for requests (IPv6 as [::1]:PORT)")
      ->capture_default_str();
  serve->add_option("--admin", serve_options.admin, "IP:PORT for the admin listener")
      ->capture_default_str();
  serve->add_option("--admin-token", serve_options.admin_token,
                    "Bearer token for the admin listener (or SLUICE_ADMIN_TOKEN)");
  serve->add_option("--upstream", serve_options.upstream,
                    "http://HOST:PORT to forward allowed requests to (gateway mode)");
  serve
      ->add_option("--upstream-timeout", serve_options.upstream_timeout_ms,
                   "Milliseconds to wait for the upstream's answer (then 504)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{3'600'000}));
  serve
      ->add_option(
          "--read-timeout-ms", serve_options.read_timeout_ms,
          "A request's head, and a body read whole (a gRPC call's too), must arrive within "
          "this; a streamed upload, each of its pieces (as nginx's "
          "client_body_timeout)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{100}, int64_t{3'600'000}));
  serve
      ->add_option("--idle-timeout-ms", serve_options.idle_timeout_ms,
                   "Keep-alive connections idle longer are closed")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{100}, int64_t{3'600'000}));
  serve
      ->add_option("--drain-timeout-ms", serve_options.drain_timeout_ms,
                   "On SIGTERM, requests in flight get this long to finish (set it above "
                   "--upstream-timeout for a gateway whose upstream may be slow)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{3'600'000}));
  serve->add_option("--threads", serve_options.threads, "Worker threads (default: one per core)")
      ->check(CLI::Range(size_t{0}, size_t{1024}));
  serve->add_option("--envoy-config", serve_options.envoy_config,
                    "Directory of envoyproxy/ratelimit YAML files: serve Envoy's RLS v3 (gRPC)");
  // The RLS settings below mean nothing without it (the flag's or the config file's): Serve
  // refuses them alone.
  serve->add_option("--grpc", serve_options.grpc, "IP:PORT for the RLS gRPC service")
      ->capture_default_str();
  auto* tls_cert = serve
                       ->add_option("--grpc-tls-cert", serve_options.grpc_tls_cert,
                                    "PEM certificate chain: serve RLS gRPC over TLS")
                       ->check(CLI::ExistingFile);
  auto* tls_key = serve
                      ->add_option("--grpc-tls-key", serve_options.grpc_tls_key,
                                   "PEM private key of --grpc-tls-cert")
                      ->check(CLI::ExistingFile);
  tls_cert->needs(tls_key);
  tls_key->needs(tls_cert);
  serve
      ->add_option("--grpc-tls-client-ca", serve_options.grpc_tls_client_ca,
                   "PEM CA: RLS gRPC clients must present a certificate it signed (mutual TLS)")
      ->check(CLI::ExistingFile);
  serve->add_flag("--rls-headers", serve_options.rls_headers,
                  "Add RateLimit-Limit/-Remaining/-Reset to RLS answers (response_headers_to_add)");
  // envoyproxy/ratelimit's LIMIT_LIMIT_HEADER, LIMIT_REMAINING_HEADER, LIMIT_RESET_HEADER.
  for (auto [flag, target, what] :
       {std::tuple{"--rls-limit-header", &serve_options.rls_limit_header, "limit"},
        std::tuple{"--rls-remaining-header", &serve_options.rls_remaining_header, "remaining"},
        std::tuple{"--rls-reset-header", &serve_options.rls_reset_header, "reset"}}) {
    serve
        ->add_option(flag, *target,
                     std::string("Name of the ") + what + " header --rls-headers adds")
        ->capture_default_str()
        ->check(kHeaderName);
  }
  serve->add_flag("--envoy-merge-domains", serve_options.envoy_merge_domains, kMergeDomainsHelp);
  serve->add_flag("--rls-shadow", serve_options.rls_shadow,
                  "Answer every RLS call OK, counting what would be over its limit as "
                  "shadow_limited (envoyproxy/ratelimit's SHADOW_MODE)");
  serve
      ->add_option("--max-buffered-mib", serve_options.max_buffered_mib,
                   "MiB of request bodies read whole (the decision API's, small uploads) that "
                   "the listener's connections may hold at once; past it a request is "
                   "answered 503 unread")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1} << 20));
  serve
      ->add_option("--grpc-max-buffered-mib", serve_options.grpc_max_buffered_mib,
                   "MiB of request messages not yet whole all gRPC connections may hold; past "
                   "it a call is answered RESOURCE_EXHAUSTED")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1} << 20));
  serve
      ->add_option("--log-format", serve_options.log_format,
                   "Log lines as text, or as one JSON object each (time, level, message)")
      ->capture_default_str()
      ->check(CLI::IsMember({"text", "json"}));
  serve->add_option("--max-keys", serve_options.max_keys, "Keys held per limit at most")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1} << 40));
  serve
      ->add_option("--max-connections", serve_options.max_connections,
                   "Client connections held at most (on each listener: HTTP, gRPC); more are "
                   "closed at once")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1'000'000}));
  serve
      ->add_option("--max-connections-per-ip", serve_options.max_connections_per_ip,
                   "Connections one client address (IPv6: /64) may hold on each listener; 0: no "
                   "bound (the setting behind a load balancer)")
      ->capture_default_str()
      ->check(CLI::Range(size_t{0}, size_t{1'000'000}));
  serve
      ->add_option("--max-request-body", serve_options.max_request_body,
                   "Bytes of a request body at most (read whole before the decision); more "
                   "get 413")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1} << 32));
  serve
      ->add_option("--max-batch-checks", serve_options.max_batch_checks,
                   "Checks in one POST /v1/check/batch at most; more get 400 (a worker decides "
                   "a batch in one go)")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1'000'000}));

  auto* check = app.add_subcommand("check", "Decide requests for one key with one policy");
  std::string algorithm = "sliding_window_counter", period = "1m", key = "cli";
  int64_t limit = 60, burst = 0, cost = 1;
  int times = 1;
  check
      ->add_option("--algorithm", algorithm,
                   "fixed_window, sliding_window_log, "
                   "sliding_window_counter, token_bucket, gcra, leaky_queue")
      ->capture_default_str();
  check->add_option("--limit", limit, "Requests (or tokens) per period")
      ->capture_default_str()
      ->check(kWholeNumber);
  check->add_option("--period", period, "Window or refill period")->capture_default_str();
  check->add_option("--burst", burst, "Capacity (token bucket), burst (gcra, leaky_queue)")
      ->check(kWholeNumber);
  check->add_option("--key", key, "Client key")->capture_default_str();
  check->add_option("--cost", cost, "Units per request (0 peeks)")
      ->capture_default_str()
      ->check(kWholeNumber & kNotNegative);
  check->add_option("--times", times, "Requests to send at the same instant")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000000));

  auto* validate = app.add_subcommand(
      "validate", "Check a config file or an Envoy config directory; errors name file:line:col");
  std::string validate_path, validate_envoy;
  std::string validate_config_flag;
  // What to check: a file, a directory, or both.
  auto* inputs = validate->add_option_group("inputs");
  auto* validate_positional =
      inputs->add_option("config", validate_path, "YAML config file")->check(non_empty_path);
  inputs
      ->add_option("--config", validate_config_flag,
                   "YAML config file, as `serve --config` takes it")
      ->check(non_empty_path)
      ->excludes(validate_positional);
  inputs
      ->add_option("--envoy-config", validate_envoy,
                   "Directory of envoyproxy/ratelimit YAML files, checked as `serve "
                   "--envoy-config` loads it (with the config file's store, if given)")
      ->check(non_empty_path);
  inputs->require_option(1, 2);
  bool validate_merge = false;
  validate->add_flag("--envoy-merge-domains", validate_merge, kMergeDomainsHelp);

  auto* ver = app.add_subcommand("version", "Print the version");

  CLI11_PARSE(app, argc, argv);
  for (const CLI::Option* option : serve->get_options()) {
    if (option->count() > 0) serve_options.given.insert(option->get_name());
  }
  if (version || ver->parsed()) {
    std::printf("sluice %s\n", SLUICE_VERSION);
    return 0;
  }
  if (serve->parsed()) {
    // What the system refuses while the server is built (file descriptors, threads, memory)
    // is an error message, not an abort.
    try {
      return Serve(serve_options);
    } catch (const std::exception& e) {
      sluice::LogFatal("sluice serve: " + std::string(e.what()));
      return 1;
    }
  }
  if (validate->parsed()) {
    return Validate(validate_path.empty() ? validate_config_flag : validate_path, validate_envoy,
                    validate_merge);
  }
  if (check->parsed()) return Check(algorithm, limit, period, burst, key, cost, times);
  std::printf("%s", app.help().c_str());
  return 0;
}
