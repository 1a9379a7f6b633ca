// What the fuzz targets share: the fixed configs they decide against, a Service on the
// in-memory store with the Envoy RLS front and the HTTP front wired as `sluice serve` wires
// them (no upstream: allowed requests are answered by Sluice), and the checks every target
// makes of an HTTP answer.
//
// Each target builds one Fixture on first use and keeps it for the whole run (a fuzzer is
// one thread), so counters carry over from input to input as they do in a server.
#ifndef SLUICE_FUZZ_FUZZ_FIXTURE_H_
#define SLUICE_FUZZ_FUZZ_FIXTURE_H_

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include <boost/beast/http/parser.hpp>
#include <boost/json/parse.hpp>

#include "fuzz/fuzz_fail.h"
#include "rules/config_loader.h"
#include "server/front.h"
#include "server/http_server.h"
#include "server/rls.h"
#include "server/service.h"
#include "server/wire.h"

namespace sluice::fuzz {

// Every key part, path pattern kind, algorithm, tiers and trusted proxies (v4 and v6).
inline constexpr std::string_view kRulesYaml = R"(
rate_limits:
  default:
    requests_per_minute: 60
    requests_per_hour: 1000
  endpoints:
    - name: login
      path: /api/login
      method: POST
      limit: 5
      window: 1m
      key: ip
    - name: search
      path: /api/search/*
      method: [GET, HEAD]
      key: user_id+ip
      limits:
        - {limit: 10, window: 1s, algorithm: token_bucket, burst: 20}
        - {limit: 1000, window: 1h, algorithm: sliding_window_log, name: search-hourly}
    - name: posts
      path: /users/{id}/posts
      limit: 100
      window: 1m
      algorithm: gcra
      burst: 10
      key: [api_key, "header:X-Tenant"]
      cost: 2
      tiers: {pro: 500, enterprise: {limit: 5000, window: 1m}}
    - name: export
      path: /export
      limit: 2
      window: 1s
      algorithm: leaky_queue
      burst: 5
      shadow: true
      key: query:account
    - name: upload
      path: /api/upload
      method: POST
      limit: 10
      window: 1h
      algorithm: fixed_window
      key: user_id
  tiers:
    free: {requests_per_minute: 30, requests_per_day: 1000}
    pro: {requests_per_minute: 100, requests_per_day: 10000}
trusted_proxies: [10.0.0.0/8, "fd00::/8", 127.0.0.1]
ipv6_prefix: 56
)";

// envoyproxy/ratelimit's examples condensed: exact values, key-only, wildcards (shared and
// per value), nested levels, several limits, replaces, unlimited and shadow mode.
inline constexpr std::string_view kEnvoyYaml = R"(
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 5}
  - key: database
    value: users
    rate_limit: {unit: second, requests_per_unit: 500}
  - key: path
    value: "/api/*"
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 20}
  - key: path
    value: "/static*"
    rate_limit: {unit: hour, requests_per_unit: 100, algorithm: token_bucket, burst: 10}
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit: {unit: day, requests_per_unit: 5, name: daily}
      - key: tier
        value: gold
        rate_limits:
          - {unit: second, requests_per_unit: 3, algorithm: gcra, burst: 2}
          - {unit: week, requests_per_unit: 1000, name: weekly, replaces: [{name: daily}]}
  - key: key1
    value: value1
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: internal
    rate_limit: {unlimited: true}
  - key: client_id
    value: "*"
    detailed_metric: true
    rate_limit: {unit: month, requests_per_unit: 30, algorithm: sliding_window_counter}
)";

inline rules::Config MustLoadRules(std::string_view yaml) {
  rules::Config config;
  if (Status st = rules::LoadConfigText(yaml, "fuzz.yaml", &config); !st.ok()) Fail(st.message());
  return config;
}

// Rls::Load reads a directory: the text goes through a private temporary one.
inline void MustLoadEnvoy(server::Rls& rls, std::string_view yaml) {
  namespace fs = std::filesystem;
  fs::path dir = fs::temp_directory_path() / ("sluice_fuzz_envoy_" + std::to_string(getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "edge.yaml") << yaml;
  Status st = rls.Load(dir.string());
  fs::remove_all(dir);
  if (!st.ok()) Fail(st.message());
}

struct Fixture {
  Fixture()
      : service(MustLoadRules(kRulesYaml), StoreOptions()),
        rls(service, RlsOptions()),
        rls_json(rls),
        front(service, nullptr, &rls_json) {
    MustLoadEnvoy(rls, kEnvoyYaml);
  }

  static MemoryStore::Options StoreOptions() {
    MemoryStore::Options o;
    o.max_keys_per_limit = 4096;  // a long run makes many keys: keep memory bounded
    o.shards = 4;
    o.hash_seed = 0x5eed;  // reproducible runs
    return o;
  }
  static server::RlsOptions RlsOptions() {
    server::RlsOptions o;
    o.response_headers = true;
    return o;
  }

  server::Service service;
  server::Rls rls;
  server::RlsJsonHandler rls_json;
  server::Front front;
};

// With the in-memory store and no upstream, every answer is ready when Handle returns
// (the one queue rule above is in shadow mode, which never delays): a handler asking to
// finish later is a bug.
inline server::Completion NoDefer() { Fail("a handler deferred its answer"); }

// The answer as the connection sends it must read back as the same HTTP response (no
// header injection, a length that matches), and a JSON answer must be valid JSON.
inline void CheckAnswer(server::HttpResponse& res, bool head) {
  namespace http = boost::beast::http;
  res.prepare_payload();
  std::string wire;
  server::SerializeResponse(res, head, wire);
  http::response_parser<http::string_body> back;
  back.skip(head);
  back.eager(true);
  boost::system::error_code ec;
  size_t used = back.put(boost::asio::buffer(wire), ec);
  if (!ec && !back.is_done()) back.put_eof(ec);
  if (ec || !back.is_done() || used != wire.size()) {
    Fail("the answer does not read back: " + (ec ? ec.message() : std::string("incomplete")) +
         "\n" + wire);
  }
  const auto& got = back.get();
  // The fields sent: Beast's, and the lines rendered beside them (the rate limit headers).
  auto sent = std::distance(res.begin(), res.end());
  for (size_t at = res.rendered_fields.find("\r\n"); at != std::string::npos;
       at = res.rendered_fields.find("\r\n", at + 2)) {
    ++sent;
  }
  // And the Date line the connection adds when the answer has none.
  if (res.find(http::field::date) == res.end() &&
      !server::RenderedHas(res.rendered_fields, "date")) {
    ++sent;
  }
  if (got.result_int() != res.result_int() || (!head && got.body() != res.body()) ||
      std::distance(got.begin(), got.end()) != sent) {
    Fail("the answer reads back differently:\n" + wire);
  }
  if (res[http::field::content_type] == "application/json" && !head) {
    boost::json::error_code jec;
    (void)boost::json::parse(res.body(), jec);
    if (jec) Fail("a JSON answer is not JSON (" + jec.message() + "): " + res.body());
  }
}

}  // namespace sluice::fuzz

#endif  // SLUICE_FUZZ_FUZZ_FIXTURE_H_
