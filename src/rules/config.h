// Config: the rate limit rules as written by an operator, validated but not yet compiled.
//
// The YAML in the seed design (rate_limits: default / endpoints / tiers) loads unchanged;
// Sluice adds an algorithm, burst, cost, shadow mode and several limits per rule, keys made
// of several parts, per-tier overrides on endpoints, and where key parts come from. A
// Config is a plain value produced by LoadConfig (config_loader.h) and consumed by RuleSet
// (rule_set.h); it is never mutated after loading.
#ifndef SLUICE_RULES_CONFIG_H_
#define SLUICE_RULES_CONFIG_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "rules/client_ip.h"
#include "rules/path.h"
#include "sluice/policy.h"

namespace sluice::rules {

// What a rule does when the shared store (Redis) fails: a call errs or misses its deadline,
// or the circuit breaker is open.
enum class FailMode : uint8_t {
  kOpen,    // admit the request (availability over enforcement)
  kClosed,  // reject the request (enforcement over availability)
  kLocal,   // decide on this process' own in-memory counters until the store is back
};

// The config name of a fail mode ("open", "closed", "local"), and back.
std::string_view FailModeName(FailMode m);
std::optional<FailMode> ParseFailMode(std::string_view name);

// Where the counters live: in this process, or shared by every Sluice process in Redis.
// The fields past `type` other than `fail_mode` matter only for kRedis and kRedisCluster.
struct StoreConfig {
  enum class Type : uint8_t { kMemory, kRedis, kRedisCluster };
  // How a shared store is used: every decision in Redis (kRemote), or decided from local
  // counts that a syncer exchanges with Redis every `sync_interval` (kLocalSync, the
  // hybrid mode: no network on the request path, a bounded over-admission across nodes).
  enum class Mode : uint8_t { kRemote, kLocalSync };
  // Another region's Redis, where this region publishes its totals (async aggregation).
  struct Peer {
    std::string region;
    std::string address;
    friend bool operator==(const Peer&, const Peer&) = default;
  };
  Type type = Type::kMemory;
  Mode mode = Mode::kRemote;
  DurationUs sync_interval = 100 * kMillisecond;  // kLocalSync: 1ms..1m
  std::vector<Peer> peers;                        // kLocalSync with a top-level `region:` only
  // "host:port" (IPv6 as "[::1]:6379"). kRedis: exactly one; kRedisCluster: the seed nodes
  // (at least one); kMemory: none.
  std::vector<std::string> addresses;
  std::string username;  // ACL user; empty: the default user
  std::string password;  // empty: no AUTH (`password:`, or read from `password_env:` at load)
  // TLS to Redis (`tls: true`, or `tls: {ca_file, cert_file, key_file, server_name, verify}`).
  bool tls = false;
  std::string tls_ca_file;    // CA bundle to verify Redis with; empty: the system's
  std::string tls_cert_file;  // client certificate (Redis' tls-auth-clients), with key_file
  std::string tls_key_file;
  std::string tls_server_name;  // name checked in Redis' certificate (and SNI); empty: host
  bool tls_verify = true;       // false only for tests: accepts any certificate
  DurationUs connect_timeout = 200 * kMillisecond;  // 1ms..60s
  DurationUs timeout = 5 * kMillisecond;            // deadline of every call, 1ms..10s
  int pool_size = 1;                          // connections per worker thread per Redis node, 1..64
  std::string key_prefix = "sluice:";         // never holds '{' or '}' (Redis Cluster hash tags)
  FailMode fail_mode = FailMode::kLocal;      // for rules that do not set their own
  int breaker_failures = 5;                   // consecutive failures that open the breaker, >= 1
  DurationUs breaker_open_for = 1 * kSecond;  // open this long before a probe, 1ms..1h

  bool shared() const { return type != Type::kMemory; }  // kRedis or kRedisCluster
};

// The config name of a store type ("memory", "redis", "redis-cluster"), and back.
std::string_view StoreTypeName(StoreConfig::Type t);
// Why a local_sync limit whose window is `period` cannot run with rounds every `interval`
// (period <= interval): its nodes would learn each other's hits only once it is over.
std::string SyncIntervalTooLong(DurationUs period, DurationUs interval);
std::optional<StoreConfig::Type> ParseStoreType(std::string_view name);
// The config name of a store mode ("remote", "local_sync"), and back.
std::string_view StoreModeName(StoreConfig::Mode m);
std::optional<StoreConfig::Mode> ParseStoreMode(std::string_view name);

// One part of a rate limit key.
struct KeyPart {
  enum class Kind { kIp, kUserId, kApiKey, kHeader, kQuery };
  Kind kind = Kind::kIp;
  std::string name;  // header or query parameter name (kHeader, kQuery)

  friend bool operator==(const KeyPart&, const KeyPart&) = default;
};

// Whether a key has a user_id part. A request with a top-level tier is keyed by its user,
// or by the default rule's key when that already names the user (`user_id+ip`).
bool KeyNamesUser(const std::vector<KeyPart>& key);

// One limit of a rule: a policy, under a name that is unique in the config.
struct LimitSpec {
  std::string name;  // e.g. "endpoints[0].limits[1]" or "default.per_minute"
  Policy policy;
  // Where a shared store keeps its counts apart from other nodes': "@REGION" for a
  // region's share of a partitioned limit (two regions with equal shares on one Redis must
  // not count together), empty otherwise.
  std::string store_scope = {};

  friend bool operator==(const LimitSpec&, const LimitSpec&) = default;
};

struct Rule {
  std::string name;                  // "default", "endpoints[2]", or its `name:`
  std::string path;                  // pattern: "/api/login", "/api/*", "/users/{id}/posts"
  std::vector<std::string> methods;  // upper case; empty: any method
  std::vector<KeyPart> key;          // the key is these parts joined; empty only for `global`
  std::vector<LimitSpec> limits;     // all must admit (all-or-nothing)
  // tier -> limits that replace `limits` for requests of that tier
  std::map<std::string, std::vector<LimitSpec>> tiers;
  int64_t cost = 1;     // units each request spends
  bool shadow = false;  // decide and count, never reject
  // When the shared store fails; nullopt: the store's `fail_mode`. See EffectiveFailMode.
  std::optional<FailMode> fail_mode;
};

// Where the parts of a key come from in an HTTP request.
struct KeySources {
  std::string user_id_header = "X-User-Id";
  std::string api_key_header = "X-API-Key";
  std::string tier_header = "X-User-Tier";
  // The three headers above are an identity some layer in front vouches for. When true,
  // they are read only from a peer in trusted_proxies; other requests are their address.
  bool from_trusted_proxies_only = false;
};

// The `server:` section: settings of `sluice serve` that its flags give too (a flag given
// on the command line wins over the file). Read at start; a reload that changes them keeps
// the running ones and says so. Unset: the flag's default.
struct ServerSettings {
  std::optional<std::string> listen, admin, admin_token, upstream, log_format;
  std::optional<int64_t> upstream_timeout_ms, read_timeout_ms, idle_timeout_ms, drain_timeout_ms;
  std::optional<int64_t> threads, max_keys, max_connections, max_connections_per_ip,
      max_request_body, max_batch_checks, max_buffered_mib;
  // Envoy's rate limit service (--envoy-config and the flags that go with it). The loader
  // refuses the others without envoy_config, a TLS key without its certificate and the
  // reverse, and a client CA without a certificate.
  std::optional<std::string> envoy_config, grpc, grpc_tls_cert, grpc_tls_key, grpc_tls_client_ca,
      rls_limit_header, rls_remaining_header, rls_reset_header;
  std::optional<bool> rls_headers, rls_shadow, envoy_merge_domains;
  std::optional<int64_t> grpc_max_buffered_mib;

  friend bool operator==(const ServerSettings&, const ServerSettings&) = default;
};

struct Config {
  std::string source;           // file name the config came from
  Rule default_rule;            // for requests no endpoint matches
  std::vector<Rule> endpoints;  // first match wins, in file order
  // tier -> limits replacing the default rule's limits for requests of that tier
  std::map<std::string, std::vector<LimitSpec>> tiers;
  KeySources keys;
  std::vector<Cidr> trusted_proxies;
  // The one header the trusted proxies write the client's address in. The other is not
  // read: a proxy passes it on from the client as it came, so reading it would let the
  // client name its own address.
  enum class ForwardingHeader { kXForwardedFor, kForwarded };
  ForwardingHeader forwarding_header = ForwardingHeader::kXForwardedFor;
  int ipv6_prefix = 64;
  PathOptions paths;
  // Also send the IETF draft's RateLimit-Policy and RateLimit headers (besides X-RateLimit-*).
  bool ietf_headers = true;
  // The decision API takes a stated client address ("ip") from callers it trusts: those in
  // trusted_proxies, and loopback ones unless this is off. Any other caller could spend
  // another client's limits by naming its address.
  bool decision_api_trusts_loopback = true;
  StoreConfig store;  // default: the in-memory store
  // This node's region (multi-region): picks each limit's share from its `regions:` and
  // names this region's totals for the peers of store.peers. Empty: no regions.
  std::string region;
  ServerSettings server;
  // "file:line:col: key: message" of what is valid but likely not meant; logged at load.
  std::vector<std::string> warnings;
};

// What `rule` (of `config`) does when the shared store fails: its own `fail_mode`, else the
// store's.
FailMode EffectiveFailMode(const Config& config, const Rule& rule);

// The embedded default: 60 requests per minute per client IP (sliding window counter).
Config DefaultConfig();

}  // namespace sluice::rules

#endif  // SLUICE_RULES_CONFIG_H_
