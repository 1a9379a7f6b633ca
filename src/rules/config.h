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
#include <string>
#include <vector>

#include "rules/client_ip.h"
#include "rules/path.h"
#include "sluice/policy.h"

namespace sluice::rules {

// One part of a rate limit key.
struct KeyPart {
  enum class Kind { kIp, kUserId, kApiKey, kHeader, kQuery };
  Kind kind = Kind::kIp;
  std::string name;  // header or query parameter name (kHeader, kQuery)

  friend bool operator==(const KeyPart&, const KeyPart&) = default;
};

// One limit of a rule: a policy, under a name that is unique in the config.
struct LimitSpec {
  std::string name;  // e.g. "endpoints[0].limits[1]" or "default.per_minute"
  Policy policy;

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
};

// Where the parts of a key come from in an HTTP request.
struct KeySources {
  std::string user_id_header = "X-User-Id";
  std::string api_key_header = "X-API-Key";
  std::string tier_header = "X-User-Tier";
};

struct Config {
  std::string source;           // file name the config came from
  Rule default_rule;            // for requests no endpoint matches
  std::vector<Rule> endpoints;  // first match wins, in file order
  // tier -> limits replacing the default rule's limits for requests of that tier
  std::map<std::string, std::vector<LimitSpec>> tiers;
  KeySources keys;
  std::vector<Cidr> trusted_proxies;
  int ipv6_prefix = 64;
  PathOptions paths;
  // Also send the IETF draft's RateLimit-Policy and RateLimit headers (besides X-RateLimit-*).
  bool ietf_headers = true;
};

// The embedded default: 60 requests per minute per client IP (sliding window counter).
Config DefaultConfig();

}  // namespace sluice::rules

#endif  // SLUICE_RULES_CONFIG_H_
