#include "rules/config_loader.h"
#include "rules/config_file.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <map>
#include <set>

namespace sluice::rules {
namespace {

const std::string kConfigDir = std::string(SLUICE_SOURCE_DIR) + "/tests/config";

// One fixture per error message, each with its exact text (file:line:col: key: message).
const std::map<std::string, std::string> kBadConfigs = {
#include "rules/config_loader_test_expectations.inc"
};

TEST(ConfigLoader, EveryBadFixtureFailsWithItsExactMessage) {
  for (const auto& [file, expected] : kBadConfigs) {
    std::string path = kConfigDir + "/bad/" + file;
    Config c;
    c.source = "untouched";
    Status st = LoadConfigFile(path, &c);
    EXPECT_FALSE(st.ok()) << file;
    EXPECT_EQ(st.message(), path + ":" + expected) << file;
    EXPECT_EQ(c.source, "untouched") << file << ": a failed load must leave the config as it was";
  }
}

TEST(ConfigLoader, EveryBadFixtureHasAnExpectation) {
  std::set<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(kConfigDir + "/bad")) {
    files.insert(e.path().filename().string());
  }
  std::set<std::string> expected;
  for (const auto& [file, msg] : kBadConfigs) expected.insert(file);
  EXPECT_EQ(files, expected);
}

TEST(ConfigLoader, MissingFile) {
  Config c;
  Status st = LoadConfigFile("/nonexistent/sluice.yaml", &c);
  EXPECT_EQ(st.message(),
            "/nonexistent/sluice.yaml: cannot read the file (No such file or directory)");
}

TEST(ConfigLoader, LoadsTheSeedConfigAsItIs) {
  Config c;
  Status st = LoadConfigFile(kConfigDir + "/seed.yaml", &c);
  ASSERT_TRUE(st.ok()) << st.message();
  // default: 60 per minute and 1000 per hour, by IP, sliding window counter
  ASSERT_EQ(c.default_rule.limits.size(), 2u);
  EXPECT_EQ(c.default_rule.limits[0].policy, Policy::SlidingWindowCounter(60, kMinute));
  EXPECT_EQ(c.default_rule.limits[1].policy, Policy::SlidingWindowCounter(1000, kHour));
  EXPECT_EQ(c.default_rule.key, (std::vector<KeyPart>{{KeyPart::Kind::kIp, ""}}));
  ASSERT_EQ(c.endpoints.size(), 3u);
  const Rule& login = c.endpoints[0];
  EXPECT_EQ(login.path, "/api/login");
  EXPECT_EQ(login.methods, std::vector<std::string>{"POST"});
  ASSERT_EQ(login.limits.size(), 1u);
  EXPECT_EQ(login.limits[0].policy, Policy::SlidingWindowCounter(5, kMinute));
  EXPECT_EQ(login.key, (std::vector<KeyPart>{{KeyPart::Kind::kIp, ""}}));
  EXPECT_EQ(c.endpoints[1].path, "/api/search");
  EXPECT_EQ(c.endpoints[1].methods, std::vector<std::string>{"GET"});
  EXPECT_EQ(c.endpoints[1].limits[0].policy, Policy::SlidingWindowCounter(30, kMinute));
  EXPECT_EQ(c.endpoints[1].key, (std::vector<KeyPart>{{KeyPart::Kind::kUserId, ""}}));
  EXPECT_EQ(c.endpoints[2].limits[0].policy, Policy::SlidingWindowCounter(10, kHour));
  ASSERT_EQ(c.tiers.size(), 3u);
  ASSERT_EQ(c.tiers.at("free").size(), 2u);
  EXPECT_EQ(c.tiers.at("free")[0].policy, Policy::SlidingWindowCounter(30, kMinute));
  EXPECT_EQ(c.tiers.at("free")[1].policy, Policy::SlidingWindowCounter(1000, kDay));
  EXPECT_EQ(c.tiers.at("pro")[0].policy.limit, 100);
  EXPECT_EQ(c.tiers.at("enterprise")[1].policy.limit, 100000);
}

TEST(ConfigLoader, LoadsEveryExtension) {
  Config c;
  Status st = LoadConfigFile(kConfigDir + "/full.yaml", &c);
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_EQ(c.endpoints.size(), 4u);
  EXPECT_EQ(c.endpoints[0].name, "login");
  EXPECT_EQ(c.endpoints[0].limits[0].policy, Policy::FixedWindow(5, kMinute));
  const Rule& search = c.endpoints[1];
  EXPECT_EQ(search.methods, (std::vector<std::string>{"GET", "HEAD"}));
  EXPECT_EQ(search.key,
            (std::vector<KeyPart>{{KeyPart::Kind::kUserId, ""}, {KeyPart::Kind::kIp, ""}}));
  ASSERT_EQ(search.limits.size(), 2u);
  EXPECT_EQ(search.limits[0].policy, Policy::TokenBucket(20, 10, kSecond));
  EXPECT_EQ(search.limits[1].name, "search-hourly");
  const Rule& posts = c.endpoints[2];
  EXPECT_EQ(posts.key, (std::vector<KeyPart>{{KeyPart::Kind::kApiKey, ""},
                                             {KeyPart::Kind::kHeader, "x-tenant"}}));
  EXPECT_EQ(posts.cost, 2);
  EXPECT_EQ(posts.tiers.at("pro")[0].policy.limit, 500);
  EXPECT_EQ(posts.tiers.at("enterprise")[0].policy.limit, 5000);
  const Rule& exp = c.endpoints[3];
  EXPECT_TRUE(exp.shadow);
  EXPECT_EQ(exp.limits[0].policy, Policy::LeakyQueue(2, kSecond, 5));
  EXPECT_EQ(exp.key, (std::vector<KeyPart>{{KeyPart::Kind::kQuery, "account"}}));
  EXPECT_EQ(c.keys.user_id_header, "X-Auth-User");
  EXPECT_EQ(c.keys.tier_header, "X-Plan");
  EXPECT_EQ(c.keys.api_key_header, "X-API-Key");
  EXPECT_EQ(c.trusted_proxies.size(), 2u);
  EXPECT_EQ(c.ipv6_prefix, 56);
  EXPECT_FALSE(c.paths.case_insensitive);
  EXPECT_FALSE(c.ietf_headers);
  EXPECT_EQ(c.endpoints[0].fail_mode, FailMode::kClosed);  // accepted, unused by memory
  EXPECT_EQ(c.endpoints[1].fail_mode, std::nullopt);
  EXPECT_EQ(c.store.type, StoreConfig::Type::kMemory);
}

// Loads `yaml` into `c`; for ASSERT_TRUE.
::testing::AssertionResult Load(const std::string& yaml, Config& c) {
  Status st = LoadConfigText(yaml, "test.yaml", &c);
  if (st.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << st.message();
}

// The error message of loading `yaml`, after "test.yaml:"; "" if it loads.
std::string LoadError(const std::string& yaml) {
  Config c;
  Status st = LoadConfigText(yaml, "test.yaml", &c);
  return st.ok() ? "" : st.message().substr(std::string("test.yaml:").size());
}

constexpr const char* kRules = "rate_limits: {default: {requests_per_minute: 60}}\n";

TEST(ConfigLoader, ServerSectionGivesTheServeSettingsInTheFlagsUnits) {
  ::setenv("SLUICE_TEST_ADMIN_TOKEN", "from-the-env", 1);
  Config c;
  ASSERT_TRUE(Load(std::string(kRules) + "server:\n"
                                         "  listen: '[::1]:8080'\n"
                                         "  admin: 0.0.0.0:0\n"
                                         "  admin_token_env: SLUICE_TEST_ADMIN_TOKEN\n"
                                         "  upstream: http://api.internal\n"
                                         "  upstream_timeout: 2s\n"
                                         "  read_timeout: 250ms\n"
                                         "  idle_timeout: 5m\n"
                                         "  drain_timeout: 0\n"
                                         "  threads: 4\n"
                                         "  max_keys: 1000\n"
                                         "  max_connections: 20000\n"
                                         "  max_connections_per_ip: 64\n"
                                         "  max_request_body: 65536\n"
                                         "  max_batch_checks: 100\n"
                                         "  max_buffered_mib: 32\n"
                                         "  log_format: json\n",
                   c));
  ::unsetenv("SLUICE_TEST_ADMIN_TOKEN");
  const ServerSettings& s = c.server;
  EXPECT_EQ(s.listen, "[::1]:8080");
  EXPECT_EQ(s.admin, "0.0.0.0:0");
  EXPECT_EQ(s.admin_token, "from-the-env");
  EXPECT_EQ(s.upstream, "http://api.internal");
  EXPECT_EQ(s.upstream_timeout_ms, 2000);
  EXPECT_EQ(s.read_timeout_ms, 250);
  EXPECT_EQ(s.idle_timeout_ms, 300'000);
  EXPECT_EQ(s.drain_timeout_ms, 0);
  EXPECT_EQ(s.threads, 4);
  EXPECT_EQ(s.max_keys, 1000);
  EXPECT_EQ(s.max_connections, 20'000);
  EXPECT_EQ(s.max_connections_per_ip, 64);
  EXPECT_EQ(s.max_request_body, 65'536);
  EXPECT_EQ(s.max_batch_checks, 100);
  EXPECT_EQ(s.max_buffered_mib, 32);
  EXPECT_EQ(s.log_format, "json");

  // Left out, a setting stays unset: the flag's default applies.
  Config plain;
  ASSERT_TRUE(Load(std::string(kRules) + "server: {listen: 127.0.0.1:8081}\n", plain));
  EXPECT_EQ(plain.server.listen, "127.0.0.1:8081");
  EXPECT_EQ(plain.server.admin, std::nullopt);
  EXPECT_EQ(plain.server.threads, std::nullopt);
  EXPECT_EQ(plain.server.log_format, std::nullopt);
}

TEST(ConfigLoader, ServerSectionGivesTheEnvoyRateLimitServiceSettings) {
  // PEM files as the TLS setup reads them (the loader checks what each holds).
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "sluice-rls-pem";
  std::filesystem::create_directories(dir);
  const auto write = [&](const char* name, const char* text) {
    const std::string path = (dir / name).string();
    FILE* f = std::fopen(path.c_str(), "w");
    std::fputs(text, f);
    std::fclose(f);
    return path;
  };
  const std::string cert =
      write("rls.crt", "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n");
  const std::string key =
      write("rls.key", "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n");
  Config c;
  // No rate_limits: the Envoy config's descriptors are the limits, as with --envoy-config.
  ASSERT_TRUE(
      Load("server:\n"
           "  envoy_config: /etc/ratelimit/config\n"
           "  grpc: '[::]:8081'\n"
           "  grpc_tls_cert: " +
               cert +
               "\n"
               "  grpc_tls_key: " +
               key +
               "\n"
               "  grpc_tls_client_ca: " +
               cert +
               "\n"
               "  rls_headers: true\n"
               "  rls_limit_header: X-RateLimit-Limit\n"
               "  rls_remaining_header: X-RateLimit-Remaining\n"
               "  rls_reset_header: X-RateLimit-Reset\n"
               "  rls_shadow: false\n"
               "  envoy_merge_domains: true\n"
               "  grpc_max_buffered_mib: 64\n",
           c));
  const ServerSettings& s = c.server;
  EXPECT_EQ(s.envoy_config, "/etc/ratelimit/config");
  EXPECT_EQ(s.grpc, "[::]:8081");
  EXPECT_EQ(s.grpc_tls_cert, cert);
  EXPECT_EQ(s.grpc_tls_key, key);
  EXPECT_EQ(s.grpc_tls_client_ca, cert);
  EXPECT_EQ(s.rls_headers, true);
  EXPECT_EQ(s.rls_limit_header, "X-RateLimit-Limit");
  EXPECT_EQ(s.rls_remaining_header, "X-RateLimit-Remaining");
  EXPECT_EQ(s.rls_reset_header, "X-RateLimit-Reset");
  EXPECT_EQ(s.rls_shadow, false);  // given: false, not unset
  EXPECT_EQ(s.envoy_merge_domains, true);
  EXPECT_EQ(s.grpc_max_buffered_mib, 64);

  Config plain;
  ASSERT_TRUE(Load("server: {envoy_config: envoy}\n", plain));
  EXPECT_EQ(plain.server.envoy_config, "envoy");
  EXPECT_EQ(plain.server.grpc, std::nullopt);
  EXPECT_EQ(plain.server.rls_headers, std::nullopt);
  EXPECT_EQ(plain.server.grpc_max_buffered_mib, std::nullopt);
  EXPECT_EQ(LoadError("server: {envoy_config: envoy, grpc: 'localhost:8081'}\n"),
            "1:37: server.grpc: bad address 'localhost:8081' (IP:PORT; IPv6 as [::1]:PORT)");
  EXPECT_EQ(LoadError("server: {envoy_config: envoy, grpc_max_buffered_mib: 0}\n"),
            "1:54: server.grpc_max_buffered_mib: must be between 1 and 1048576, got 0");
  std::filesystem::remove_all(dir);
}

// kRules with a server: section of one setting, `key: 'value'`.
std::string WithServerSetting(std::string_view key, std::string_view value) {
  std::string yaml(kRules);
  yaml.append("server: {").append(key).append(": '").append(value).append("'}\n");
  return yaml;
}

TEST(ConfigLoader, ServerAddressesAreCheckedAsTheListenersAndTheGatewayReadThem) {
  for (std::string_view good : {"127.0.0.1:1", "[::]:65535", "0.0.0.0:0"}) {
    EXPECT_EQ(LoadError(WithServerSetting("listen", good)), "") << good;
  }
  for (std::string_view bad : {"127.0.0.1", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:80x",
                               "010.0.0.1:80", ":8080", "[127.0.0.1]:80"}) {
    std::string expected("2:18: server.listen: bad address '");
    expected.append(bad).append("' (IP:PORT; IPv6 as [::1]:PORT)");
    EXPECT_EQ(LoadError(WithServerSetting("listen", bad)), expected) << bad;
  }
  for (std::string_view good : {"http://127.0.0.1:9000", "http://api:80/", "http://[::1]:9000",
                                "http://[::1]", "http://backend.svc.cluster.local"}) {
    EXPECT_EQ(LoadError(WithServerSetting("upstream", good)), "") << good;
  }
  for (std::string_view bad : {"127.0.0.1:9000", "http://", "http://:80", "http://a:0",
                               "http://a/path", "http://a b:80"}) {
    EXPECT_NE(LoadError(WithServerSetting("upstream", bad)), "") << bad;
  }
}

TEST(ConfigLoader, IdentityFromTrustedProxiesWithNoneTrustedIsWarnedOf) {
  Config c;
  ASSERT_TRUE(Load(std::string(kRules) +
                       "keys: {user_id: {header: X-Auth-User}, from_trusted_proxies_only: true}\n",
                   c));
  EXPECT_EQ(c.warnings,
            std::vector<std::string>{
                "test.yaml:2:67: keys.from_trusted_proxies_only: no trusted_proxies are set, so "
                "the gateway reads X-Auth-User, X-API-Key and X-User-Tier from no one (rules "
                "keyed on them count by client address) and the decision API takes them from "
                "loopback callers only"});
  Config no_loopback;
  ASSERT_TRUE(Load(std::string(kRules) + "keys: {from_trusted_proxies_only: true}\n"
                                         "decision_api: {trust_loopback: false}\n",
                   no_loopback));
  ASSERT_EQ(no_loopback.warnings.size(), 1u);
  EXPECT_TRUE(no_loopback.warnings[0].ends_with("and the decision API from no caller"))
      << no_loopback.warnings[0];
  Config trusted;
  ASSERT_TRUE(Load(std::string(kRules) +
                       "keys: {from_trusted_proxies_only: true}\ntrusted_proxies: [10.0.0.0/8]\n",
                   trusted));
  EXPECT_TRUE(trusted.warnings.empty()) << trusted.warnings.at(0);
  Config seed;
  ASSERT_TRUE(LoadConfigFile(kConfigDir + "/seed.yaml", &seed).ok());
  EXPECT_TRUE(seed.warnings.empty());
}

TEST(ConfigLoader, AnEscapedSlashInAPatternIsAllowedByPathsWhereverItIsInTheFile) {
  // paths: after the rules in the file still decides whether their patterns can match.
  Config c;
  Status st = LoadConfigText(
      "rate_limits:\n  endpoints:\n    - {path: /files/a%2Fb, limit: 1, window: 1m}\n"
      "paths: {allow_encoded_slashes: true}\n",
      "t.yaml", &c);
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_EQ(c.endpoints.size(), 1u);
  EXPECT_TRUE(c.paths.allow_encoded_slashes);
}

TEST(ConfigLoader, ACostUpToEveryLimitsCapacityIsAllowed) {
  // The bound is each limit's capacity: a window's limit, a bucket's burst (not its rate),
  // a tier's own limit; a limit of 0 refuses everything on purpose whatever the cost.
  Config c;
  Status st = LoadConfigText(
      "rate_limits:\n  default: {limit: 2, window: 1s, algorithm: gcra, burst: 6, cost: 6}\n"
      "  endpoints:\n"
      "    - {path: /a, limit: 3, window: 1m, cost: 3, tiers: {free: 3, blocked: 0}}\n",
      "t.yaml", &c);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(c.default_rule.cost, 6);
  ASSERT_EQ(c.endpoints.size(), 1u);
  EXPECT_EQ(c.endpoints[0].cost, 3);
}

TEST(ConfigLoader, AnEndpointTierTakesTheRulesAlgorithmAndBurstUnlessItSetsItsOwn) {
  Config c;
  Status st = LoadConfigText(
      "rate_limits:\n  endpoints:\n"
      "    - path: /a\n      algorithm: token_bucket\n      burst: 20\n"
      "      limit: 10\n      window: 1s\n"
      "      tiers:\n"
      "        pro: {limit: 100, window: 1s}\n"
      "        team: {limit: 100, window: 1s, burst: 200}\n"
      "        flat: {limit: 100, window: 1m, algorithm: fixed_window}\n"
      "        bucket: {limit: 100, window: 1s, algorithm: gcra}\n"
      "        one: 50\n",
      "t.yaml", &c);
  ASSERT_TRUE(st.ok()) << st.message();
  const auto& tiers = c.endpoints.at(0).tiers;
  EXPECT_EQ(tiers.at("pro")[0].policy, Policy::TokenBucket(20, 100, kSecond));
  EXPECT_EQ(tiers.at("team")[0].policy, Policy::TokenBucket(200, 100, kSecond));
  EXPECT_EQ(tiers.at("flat")[0].policy, Policy::FixedWindow(100, kMinute));
  EXPECT_EQ(tiers.at("bucket")[0].policy, Policy::Gcra(100, kSecond));  // not the rule's burst
  EXPECT_EQ(tiers.at("one")[0].policy, Policy::TokenBucket(20, 50, kSecond));
}

TEST(ConfigLoader, StoreDefaultsToMemoryAndFailModeToLocal) {
  for (const char* f : {"/seed.yaml", "/full.yaml"}) {
    Config c;
    ASSERT_TRUE(LoadConfigFile(kConfigDir + f, &c).ok());
    const StoreConfig defaults;
    EXPECT_EQ(c.store.type, StoreConfig::Type::kMemory);
    EXPECT_FALSE(c.store.shared());
    EXPECT_TRUE(c.store.addresses.empty());
    EXPECT_EQ(c.store.fail_mode, FailMode::kLocal);
    EXPECT_EQ(c.store.timeout, defaults.timeout);
    EXPECT_EQ(c.store.key_prefix, "sluice:");
    EXPECT_EQ(c.default_rule.fail_mode, std::nullopt);
    EXPECT_EQ(EffectiveFailMode(c, c.default_rule), FailMode::kLocal);
  }
  EXPECT_EQ(DefaultConfig().store.type, StoreConfig::Type::kMemory);
  EXPECT_EQ(EffectiveFailMode(DefaultConfig(), DefaultConfig().default_rule), FailMode::kLocal);
}

TEST(ConfigLoader, FullRedisStoreSection) {
  Config c;
  ASSERT_TRUE(Load(std::string(kRules) + R"(
store:
  type: redis
  address: redis.internal:6380
  username: sluice
  password: "s3cr3t: yes"
  tls: true
  connect_timeout: 1s
  timeout: 20ms
  pool_size: 64
  key_prefix: "rl:"
  fail_mode: open
  circuit_breaker: {failures: 1, open_for: 250ms}
)",
                   c));
  EXPECT_EQ(c.store.type, StoreConfig::Type::kRedis);
  EXPECT_TRUE(c.store.shared());
  EXPECT_EQ(c.store.addresses, std::vector<std::string>{"redis.internal:6380"});
  EXPECT_EQ(c.store.username, "sluice");
  EXPECT_EQ(c.store.password, "s3cr3t: yes");
  EXPECT_TRUE(c.store.tls);
  EXPECT_EQ(c.store.connect_timeout, kSecond);
  EXPECT_EQ(c.store.timeout, 20 * kMillisecond);
  EXPECT_EQ(c.store.pool_size, 64);
  EXPECT_EQ(c.store.key_prefix, "rl:");
  EXPECT_EQ(c.store.fail_mode, FailMode::kOpen);
  EXPECT_EQ(c.store.breaker_failures, 1);
  EXPECT_EQ(c.store.breaker_open_for, 250 * kMillisecond);
  EXPECT_EQ(EffectiveFailMode(c, c.default_rule), FailMode::kOpen);
}

TEST(ConfigLoader, StoreSectionDefaults) {
  Config c;
  ASSERT_TRUE(Load(std::string(kRules) + "store: {type: redis, address: 127.0.0.1:6379}\n", c));
  const StoreConfig d;
  EXPECT_EQ(c.store.addresses, std::vector<std::string>{"127.0.0.1:6379"});
  EXPECT_EQ(c.store.username, "");
  EXPECT_EQ(c.store.password, "");
  EXPECT_FALSE(c.store.tls);
  EXPECT_EQ(c.store.connect_timeout, 200 * kMillisecond);
  EXPECT_EQ(c.store.timeout, 5 * kMillisecond);
  EXPECT_EQ(c.store.pool_size, 1);
  EXPECT_EQ(c.store.key_prefix, "sluice:");
  EXPECT_EQ(c.store.fail_mode, FailMode::kLocal);
  EXPECT_EQ(c.store.breaker_failures, 5);
  EXPECT_EQ(c.store.breaker_open_for, kSecond);
  EXPECT_EQ(d.connect_timeout, c.store.connect_timeout);
}

TEST(ConfigLoader, LoadsTheRedisExample) {
  Config c;
  Status st = LoadConfigFile(kConfigDir + "/redis.yaml", &c);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(c.store.type, StoreConfig::Type::kRedis);
  EXPECT_EQ(c.store.addresses, std::vector<std::string>{"127.0.0.1:6379"});
  EXPECT_EQ(c.store.fail_mode, FailMode::kLocal);
  ASSERT_EQ(c.endpoints.size(), 2u);
  EXPECT_EQ(EffectiveFailMode(c, c.endpoints[0]), FailMode::kClosed);
  EXPECT_EQ(EffectiveFailMode(c, c.endpoints[1]), FailMode::kOpen);
  EXPECT_EQ(EffectiveFailMode(c, c.default_rule), FailMode::kLocal);
}

TEST(ConfigLoader, RedisClusterWithSeeds) {
  Config c;
  ASSERT_TRUE(Load(std::string(kRules) + R"(
store:
  type: redis-cluster
  addresses: [10.0.0.1:7000, "[2001:db8::7]:7001", redis-0.redis.svc:7002]
)",
                   c));
  EXPECT_EQ(c.store.type, StoreConfig::Type::kRedisCluster);
  EXPECT_EQ(c.store.addresses, (std::vector<std::string>{"10.0.0.1:7000", "[2001:db8::7]:7001",
                                                         "redis-0.redis.svc:7002"}));
  // One seed is enough; `addresses` of one also does for a single Redis.
  ASSERT_TRUE(
      Load(std::string(kRules) + "store: {type: redis-cluster, addresses: [127.0.0.1:7000]}\n", c));
  EXPECT_EQ(c.store.addresses.size(), 1u);
  ASSERT_TRUE(Load(std::string(kRules) + "store: {type: redis, addresses: [127.0.0.1:6379]}\n", c));
  EXPECT_EQ(c.store.type, StoreConfig::Type::kRedis);
  EXPECT_EQ(c.store.addresses, std::vector<std::string>{"127.0.0.1:6379"});
}

TEST(ConfigLoader, PerRuleFailModeOverridesTheStore) {
  Config c;
  ASSERT_TRUE(Load(R"(
store: {type: redis, address: "[::1]:6379", fail_mode: closed}
rate_limits:
  default: {requests_per_minute: 60, fail_mode: local}
  endpoints:
    - {path: /a, limit: 1, window: 1s, fail_mode: open}
    - {path: /b, limit: 1, window: 1s}
)",
                   c));
  EXPECT_EQ(c.store.fail_mode, FailMode::kClosed);
  EXPECT_EQ(c.default_rule.fail_mode, FailMode::kLocal);
  EXPECT_EQ(EffectiveFailMode(c, c.default_rule), FailMode::kLocal);
  EXPECT_EQ(EffectiveFailMode(c, c.endpoints[0]), FailMode::kOpen);
  EXPECT_EQ(c.endpoints[1].fail_mode, std::nullopt);
  EXPECT_EQ(EffectiveFailMode(c, c.endpoints[1]), FailMode::kClosed);
}

TEST(ConfigLoader, FailModeNames) {
  for (FailMode m : {FailMode::kOpen, FailMode::kClosed, FailMode::kLocal}) {
    EXPECT_EQ(ParseFailMode(FailModeName(m)), m);
  }
  EXPECT_EQ(FailModeName(FailMode::kLocal), "local");
  EXPECT_EQ(ParseFailMode("Open"), std::nullopt);
  EXPECT_EQ(StoreTypeName(StoreConfig::Type::kRedisCluster), "redis-cluster");
  EXPECT_EQ(ParseStoreType("redis-cluster"), StoreConfig::Type::kRedisCluster);
  EXPECT_EQ(ParseStoreType("cluster"), std::nullopt);
}

TEST(ConfigLoader, PasswordFromTheEnvironment) {
  const char* var = "SLUICE_CONFIG_LOADER_TEST_PASSWORD";
  const std::string yaml = std::string(kRules) +
                           "store: {type: redis, address: 127.0.0.1:6379, password_env: " + var +
                           "}\n";
  ASSERT_EQ(setenv(var, "from env", 1), 0);
  Config c;
  ASSERT_TRUE(Load(yaml, c));
  EXPECT_EQ(c.store.password, "from env");
  ASSERT_EQ(setenv(var, "", 1), 0);  // set but empty: no AUTH
  ASSERT_TRUE(Load(yaml, c));
  EXPECT_EQ(c.store.password, "");
  ASSERT_EQ(unsetenv(var), 0);
  EXPECT_EQ(LoadError(yaml),
            "2:61: store.password_env: environment variable "
            "'SLUICE_CONFIG_LOADER_TEST_PASSWORD' is not set");
}

TEST(ConfigLoader, StoreAddresses) {
  auto with = [](const std::string& address) {
    return LoadError(std::string(kRules) + "store: {type: redis, address: \"" + address + "\"}\n");
  };
  for (const char* good : {"127.0.0.1:6379", "localhost:1", "redis:65535", "[::1]:6379",
                           "[2001:db8::1]:7000", "my-redis_0.example.com:6379"}) {
    EXPECT_EQ(with(good), "") << good;
  }
  for (const char* bad :
       {"127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:+80",
        "127.0.0.1:80x", ":6379", "::1:6379", "[::1]", "[::1]6379", "[]:6379", "[127.0.0.1]:6379",
        "[::1:6379", "300.1.2.3:6379", "host name:6379", "a..b:6379", ".a:6379", "redis:6379/0",
        "redis://h:6379"}) {
    EXPECT_NE(with(bad).find("bad address '" + std::string(bad) + "'"), std::string::npos)
        << bad << ": " << with(bad);
  }
}

TEST(ConfigLoader, RedisKeepsEveryLimitExactInDoubles) {
  // Every number the Redis script computes must stay exact in doubles (redis::ScriptExact).
  auto rules = [](const std::string& limit) {
    return "rate_limits:\n  endpoints:\n    - {path: /a, " + limit + "}\n";
  };
  const std::string redis = "store: {type: redis, address: 127.0.0.1:6379}\n";
  // 2^53 - 1 = 9007199254740991 = 104249 days and a bit, in microseconds.
  EXPECT_EQ(LoadError(redis + rules("limit: 104249, window: 1d")), "");
  EXPECT_NE(LoadError(redis + rules("limit: 104250, window: 1d")), "");
  EXPECT_EQ(LoadError(redis + rules("limit: 9007199254740, window: 1ms")), "");
  EXPECT_NE(LoadError(redis + rules("limit: 9007199254741, window: 1ms")), "");
  EXPECT_EQ(LoadError(redis + rules("limit: 1, window: 3650d")), "");
  // GCRA: burst x (window / limit) below 2^52 (an interval of 100000us here).
  EXPECT_EQ(LoadError(redis + rules("limit: 10, window: 1s, algorithm: gcra, burst: 45035996273")),
            "");
  EXPECT_EQ(
      LoadError(redis + rules("limit: 10, window: 1s, algorithm: gcra, burst: 45035996274")),
      "4:65: rate_limits.endpoints[0].burst: too large for the redis store: burst x (window / "
      "limit) must be below 2^52 microseconds (at most 45035996273 with 10 per 1s); use a "
      "shorter window or the memory store");
  // Fixed windows and logs compute no products: only the count is bounded.
  EXPECT_EQ(LoadError(redis + rules("limit: 1000000000, window: 1d, algorithm: fixed_window")), "");
  EXPECT_NE(LoadError(redis + rules("requests_per_day: 104250")), "");
  EXPECT_EQ(LoadError(redis + rules("requests_per_day: 104249")), "");
  // Huge numbers stay fine in memory.
  EXPECT_EQ(LoadError(rules("limit: 9223372036854775807, window: 3650d")), "");
  // Global tiers and the default rule are checked too, wherever the store section is.
  EXPECT_EQ(LoadError("rate_limits: {tiers: {free: {requests_per_day: 200000}}}\n" + redis),
            "1:48: rate_limits.tiers.free.requests_per_day: too large for the redis store: limit "
            "x window must be below 2^53 microseconds (at most 104249 per 1d); use a shorter "
            "window or the memory store");
  EXPECT_NE(LoadError("rate_limits: {default: {limit: 200000, window: 1d}}\n" + redis), "");
}

TEST(ConfigLoader, LocalSyncMode) {
  Config c;
  ASSERT_TRUE(LoadConfigFile(kConfigDir + "/hybrid.yaml", &c).ok());
  EXPECT_EQ(c.store.type, StoreConfig::Type::kRedis);
  EXPECT_EQ(c.store.mode, StoreConfig::Mode::kLocalSync);
  EXPECT_EQ(c.store.sync_interval, 100 * kMillisecond);
  EXPECT_TRUE(c.store.peers.empty());
  ASSERT_TRUE(Load(std::string(kRules) +
                       "store: {type: redis, address: 127.0.0.1:6379, mode: local_sync, "
                       "sync_interval: 250ms}\n",
                   c));
  EXPECT_EQ(c.store.sync_interval, 250 * kMillisecond);
  ASSERT_TRUE(Load(std::string(kRules) + "store: {type: redis, address: 127.0.0.1:6379}\n", c));
  EXPECT_EQ(c.store.mode, StoreConfig::Mode::kRemote);
  EXPECT_EQ(StoreModeName(StoreConfig::Mode::kLocalSync), "local_sync");
  EXPECT_EQ(ParseStoreMode("remote"), StoreConfig::Mode::kRemote);
  EXPECT_EQ(ParseStoreMode("hybrid"), std::nullopt);
}

TEST(ConfigLoader, RegionalSharesPickThisNodesRegion) {
  Config c;
  ASSERT_TRUE(LoadConfigFile(kConfigDir + "/multiregion.yaml", &c).ok());
  EXPECT_EQ(c.region, "us-east");
  EXPECT_EQ(c.default_rule.limits[0].policy, Policy::SlidingWindowCounter(400, kMinute));
  EXPECT_EQ(c.endpoints[0].limits[0].policy, Policy::FixedWindow(50, kSecond));
  const std::string rules =
      "rate_limits: {default: {limit: 1000, window: 1m, "
      "regions: {us-east: 400, eu-west: 400, ap-south: 200}}}\n";
  ASSERT_TRUE(Load("region: ap-south\n" + rules, c));
  EXPECT_EQ(c.default_rule.limits[0].policy.limit, 200);
}

TEST(ConfigLoader, PeersForAsyncAggregation) {
  Config c;
  ASSERT_TRUE(Load("region: us-east\n" + std::string(kRules) +
                       "store: {type: redis, address: 127.0.0.1:6379, mode: local_sync, peers: "
                       "[{region: eu-west, address: 127.0.0.1:6380}, "
                       "{region: ap-south, address: '[::1]:6381'}]}\n",
                   c));
  ASSERT_EQ(c.store.peers.size(), 2u);
  EXPECT_EQ(c.store.peers[0], (StoreConfig::Peer{"eu-west", "127.0.0.1:6380"}));
  EXPECT_EQ(c.store.peers[1], (StoreConfig::Peer{"ap-south", "[::1]:6381"}));
  EXPECT_EQ(c.default_rule.limits[0].policy.limit, 60);  // the whole limit: no shares
}

TEST(ConfigLoader, LimitNamesAreUnique) {
  for (const char* f : {"/seed.yaml", "/full.yaml"}) {
    Config c;
    ASSERT_TRUE(LoadConfigFile(kConfigDir + f, &c).ok());
    std::set<std::string> names;
    auto add = [&](const std::vector<LimitSpec>& ls) {
      for (const auto& l : ls) EXPECT_TRUE(names.insert(l.name).second) << l.name;
    };
    add(c.default_rule.limits);
    for (const auto& [t, ls] : c.tiers) add(ls);
    for (const auto& r : c.endpoints) {
      add(r.limits);
      for (const auto& [t, ls] : r.tiers) add(ls);
    }
  }
}

// A file that ends with "---" has an empty second document: nothing is lost, so it loads.
TEST(ConfigLoader, ATrailingDocumentMarkerIsNotASecondDocument) {
  Config c;
  EXPECT_TRUE(
      LoadConfigText("rate_limits:\n  default: {limit: 60, window: 1m}\n---\n", "inline", &c).ok());
}

// A later document with content, even after empty ones, would be read by nothing: refused.
// Empty documents alone are not.
TEST(ConfigLoader, EveryLaterDocumentIsChecked) {
  Config c;
  const std::string first = "rate_limits:\n  default: {limit: 60, window: 1m}\n";
  EXPECT_TRUE(LoadConfigText(first + "---\n---\n---\n", "inline", &c).ok());
  EXPECT_EQ(LoadConfigText(first + "---\n---\n--- x\n", "inline", &c).message(),
            "inline:5:5: a config file holds one YAML document; this is a later one ('---')");
}

// A file of more nodes than the bound is refused by counting its events, before a tree of
// them (hundreds of bytes each) is built: 2,000,001 one-letter scalars are 4 MB of text,
// and would take about a gigabyte as a tree.
TEST(ConfigLoader, TooManyNodesAreRefusedBeforeTheTreeIsBuilt) {
  std::string yaml = "x: [";
  for (size_t i = 0; i < kMaxYamlNodes; ++i) yaml += "a,";
  yaml += "a]\n";
  Config c;
  EXPECT_EQ(LoadConfigText(yaml, "big.yaml", &c).message(),
            // (the map, "x" and the sequence, then scalar 1,999,998, at column 5 + 2 * 1,999,997)
            "big.yaml:1:" + std::to_string(5 + 2 * (kMaxYamlNodes - 3)) +
                ": more than 2000000 YAML nodes");
}

// An escaped brace inside a segment stays a literal; a segment that decodes to "{name}"
// would be a parameter matching any segment, and is refused.
TEST(ConfigLoader, AnEscapedBraceIsALiteralUnlessItMakesAParameter) {
  Config c;
  EXPECT_TRUE(LoadConfigText("rate_limits:\n  endpoints:\n"
                             "    - {path: '/files/a%7Bx', limit: 1, window: 1s}\n",
                             "inline", &c)
                  .ok());
  EXPECT_EQ(LoadConfigText("rate_limits:\n  endpoints:\n"
                           "    - {path: '/f/%7bid%7d/x', limit: 1, window: 1s}\n",
                           "inline", &c)
                .message(),
            "inline:3:14: rate_limits.endpoints[0].path: the segment '%7bid%7d' decodes to a "
            "parameter ('{name}'), which matches any segment; got '/f/%7bid%7d/x'");
}

// A rule an earlier one shadows (every method and path it matches, the earlier matches
// first) would never decide a request: refused, naming both. Narrower rules first are fine.
TEST(ConfigLoader, ARuleAnEarlierOneShadowsIsRefused) {
  auto error = [](const std::string& endpoints, const std::string& paths = "") {
    Config c;
    return LoadConfigText("rate_limits:\n  endpoints:\n" + endpoints + paths, "inline", &c)
        .message();
  };
  const std::string tail =
      "' before it matches every request it would (rules match in file "
      "order: put the narrower rule first, or remove it)";
  EXPECT_EQ(error("    - {path: /search, method: GET, limit: 1, window: 1s}\n"
                  "    - {path: /search, method: GET, limit: 2, window: 1h}\n"),
            "inline:4:7: rate_limits.endpoints[1]: rule 'GET /search #2' can never match: rule "
            "'GET /search" +
                tail);
  EXPECT_EQ(
      error("    - {name: api, path: /api/*, limit: 1, window: 1s}\n"
            "    - {name: search, path: /api/search, method: GET, limit: 2, window: 1s}\n"),
      "inline:4:7: rate_limits.endpoints[1]: rule 'search' can never match: rule 'api" + tail);
  EXPECT_EQ(error("    - {name: users, path: /users/*, limit: 1, window: 1s}\n"
                  "    - {name: one, path: '/users/{id}', limit: 2, window: 1s}\n"),
            "inline:4:7: rate_limits.endpoints[1]: rule 'one' can never match: rule 'users" + tail);
  EXPECT_EQ(error("    - {name: any, path: '/u/{id}/*', limit: 1, window: 1s}\n"
                  "    - {name: deep, path: '/u/{x}/files/{f}', method: HEAD, limit: 2, window: "
                  "1s}\n"),
            "inline:4:7: rate_limits.endpoints[1]: rule 'deep' can never match: rule 'any" + tail);
  EXPECT_EQ(error("    - {name: get, path: /a, method: GET, limit: 1, window: 1s}\n"
                  "    - {name: head, path: /a/, method: HEAD, limit: 2, window: 1s}\n"),
            "inline:4:7: rate_limits.endpoints[1]: rule 'head' can never match: rule 'get" + tail);
  // Each of these reaches requests the earlier one does not.
  for (const char* ok : {
           "    - {path: /api/search, method: GET, limit: 2, window: 1s}\n"
           "    - {path: /api/*, limit: 1, window: 1s}\n",
           "    - {path: /a, method: GET, limit: 1, window: 1s}\n"
           "    - {path: /a, limit: 1, window: 1s}\n",
           "    - {path: /a, method: HEAD, limit: 1, window: 1s}\n"
           "    - {path: /a, method: GET, limit: 1, window: 1s}\n",
           "    - {path: '/users/{id}', limit: 1, window: 1s}\n"
           "    - {path: /users/*, limit: 1, window: 1s}\n",
           "    - {path: '/u/{id}/x', limit: 1, window: 1s}\n"
           "    - {path: '/u/y/{id}', limit: 1, window: 1s}\n",
           "    - {path: /u/*, limit: 1, window: 1s}\n"
           "    - {path: /ux, limit: 1, window: 1s}\n",
       }) {
    EXPECT_EQ(error(ok), "") << ok;
  }
  // With trailing slashes kept, "/a/" is another path than "/a".
  EXPECT_EQ(
      error("    - {path: /a, limit: 1, window: 1s}\n    - {path: /a/, limit: 1, window: 1s}\n",
            "paths: {strip_trailing_slash: false}\n"),
      "");
}

// An unnamed rule is named by what it matches, not by its place in the list: adding or
// moving rules leaves every other rule's name (and so its counters) as it was.
TEST(ConfigLoader, UnnamedRulesAreNamedByWhatTheyMatch) {
  Config c;
  ASSERT_TRUE(LoadConfigText("rate_limits:\n  endpoints:\n"
                             "    - {path: /new, limit: 1, window: 1s}\n"
                             "    - {path: /login, method: [post, PUT], limit: 1, window: 1s}\n"
                             "    - {path: /search, method: GET, limit: 1, window: 1s}\n"
                             "    - {name: GET /x, path: /y, limit: 1, window: 1s}\n"
                             "    - {path: /x, method: GET, limit: 1, window: 1s}\n",
                             "inline", &c)
                  .ok());
  std::vector<std::string> names;
  for (const auto& r : c.endpoints) names.push_back(r.name);
  EXPECT_EQ(names, (std::vector<std::string>{"/new", "POST,PUT /login", "GET /search", "GET /x",
                                             "GET /x #2"}));
  EXPECT_EQ(c.endpoints[1].limits[0].name, "POST,PUT /login/limit");
}

}  // namespace
}  // namespace sluice::rules
