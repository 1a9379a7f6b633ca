#include "rules/describe.h"

#include <sstream>
#include <string_view>
#include <utility>

namespace sluice::rules {
namespace {

std::string DescribeLimits(const std::vector<LimitSpec>& limits) {
  if (limits.empty()) return "not limited";
  std::string out;
  for (const LimitSpec& l : limits) {
    if (!out.empty()) out += ", ";
    out += l.policy.ToString();
  }
  return out;
}

std::string DescribeRule(const Config& c, const Rule& r) {
  std::ostringstream out;
  out << "rule " << r.name << ": ";
  // An unnamed rule's name is already what it matches ("POST /api/login").
  std::string matches;
  for (const std::string& m : r.methods) matches += (matches.empty() ? "" : ",") + m;
  matches += (matches.empty() ? "" : " ") + r.path;
  if (r.name != matches) {
    if (r.methods.empty()) {
      out << "any method";
    } else {
      for (size_t i = 0; i < r.methods.size(); ++i) out << (i ? "|" : "") << r.methods[i];
    }
    out << " " << r.path << ", ";
  }
  out << "key " << DescribeKey(r.key) << ", " << DescribeLimits(r.limits);
  if (r.cost != 1) out << ", cost " << r.cost;
  if (r.shadow) out << ", shadow (never rejects)";
  if (c.store.shared() && c.store.mode == StoreConfig::Mode::kRemote) {
    out << ", fail_mode " << FailModeName(EffectiveFailMode(c, r));
  } else if (r.fail_mode) {
    out << ", fail_mode " << FailModeName(*r.fail_mode) << " (unused: memory store)";
  }
  out << "\n";
  for (const auto& [tier, limits] : r.tiers) {
    out << "  tier " << tier << ": " << DescribeLimits(limits) << "\n";
  }
  return out.str();
}

// "store redis 127.0.0.1:6379, ...": never the password.
std::string DescribeStore(const StoreConfig& s, const std::string& region) {
  std::ostringstream out;
  out << "store " << StoreTypeName(s.type);
  for (size_t i = 0; i < s.addresses.size(); ++i) out << (i ? "," : " ") << s.addresses[i];
  if (s.tls) out << ", tls";
  if (!s.username.empty()) out << ", user " << s.username;
  if (!s.password.empty()) out << ", with password";
  if (s.mode == StoreConfig::Mode::kLocalSync) {
    // The request path never waits for Redis here: no timeout, pool, breaker or fail mode.
    out << ", mode local_sync every " << FormatDuration(s.sync_interval) << " (connect "
        << FormatDuration(s.connect_timeout) << "), key prefix '" << s.key_prefix << "'";
    if (!region.empty()) out << ", region " << region;
    for (size_t i = 0; i < s.peers.size(); ++i) {
      out << (i ? ", " : ", publishes to ") << s.peers[i].region << " " << s.peers[i].address;
    }
    out << "\n";
    return out.str();
  }
  out << ", timeout " << FormatDuration(s.timeout) << " (connect "
      << FormatDuration(s.connect_timeout) << "), pool " << s.pool_size << ", key prefix '"
      << s.key_prefix << "', fail_mode " << FailModeName(s.fail_mode) << ", breaker after "
      << s.breaker_failures << " failures for " << FormatDuration(s.breaker_open_for) << "\n";
  return out.str();
}

}  // namespace

std::string DescribeKey(const std::vector<KeyPart>& key) {
  std::string out;
  for (const KeyPart& p : key) {
    if (!out.empty()) out += "+";
    switch (p.kind) {
      case KeyPart::Kind::kIp:
        out += "ip";
        break;
      case KeyPart::Kind::kUserId:
        out += "user_id";
        break;
      case KeyPart::Kind::kApiKey:
        out += "api_key";
        break;
      case KeyPart::Kind::kHeader:
        out += "header:" + p.name;
        break;
      case KeyPart::Kind::kQuery:
        out += "query:" + p.name;
        break;
    }
  }
  return out;
}

std::string DescribeServer(const ServerSettings& s) {
  std::string out;
  const auto add = [&out](std::string_view name, const std::string& value) {
    out.append(out.empty() ? "server " : ", ").append(name).append(" ").append(value);
  };
  const auto ms = [](int64_t v) { return FormatDuration(v * kMillisecond); };
  if (s.listen) add("listen", *s.listen);
  if (s.admin) add("admin", *s.admin);
  if (s.admin_token) add("admin token", "set");
  if (s.upstream) add("upstream", *s.upstream);
  if (s.upstream_timeout_ms) add("upstream_timeout", ms(*s.upstream_timeout_ms));
  if (s.read_timeout_ms) add("read_timeout", ms(*s.read_timeout_ms));
  if (s.idle_timeout_ms) add("idle_timeout", ms(*s.idle_timeout_ms));
  if (s.drain_timeout_ms) add("drain_timeout", *s.drain_timeout_ms ? ms(*s.drain_timeout_ms) : "0");
  for (const auto& [name, value] :
       {std::pair{"threads", s.threads}, std::pair{"max_connections", s.max_connections},
        std::pair{"max_connections_per_ip", s.max_connections_per_ip},
        std::pair{"max_request_body", s.max_request_body},
        std::pair{"max_batch_checks", s.max_batch_checks},
        std::pair{"max_buffered_mib", s.max_buffered_mib}, std::pair{"max_keys", s.max_keys}}) {
    if (value) add(name, std::to_string(*value));
  }
  if (s.log_format) add("log_format", *s.log_format);
  for (const auto& [name, value] :
       {std::pair{"envoy_config", &s.envoy_config}, std::pair{"grpc", &s.grpc},
        std::pair{"grpc_tls_cert", &s.grpc_tls_cert}, std::pair{"grpc_tls_key", &s.grpc_tls_key},
        std::pair{"grpc_tls_client_ca", &s.grpc_tls_client_ca},
        std::pair{"rls_limit_header", &s.rls_limit_header},
        std::pair{"rls_remaining_header", &s.rls_remaining_header},
        std::pair{"rls_reset_header", &s.rls_reset_header}}) {
    if (*value) add(name, **value);
  }
  for (const auto& [name, value] :
       {std::pair{"rls_headers", s.rls_headers}, std::pair{"rls_shadow", s.rls_shadow},
        std::pair{"envoy_merge_domains", s.envoy_merge_domains}}) {
    if (value) add(name, *value ? "true" : "false");
  }
  if (s.grpc_max_buffered_mib)
    add("grpc_max_buffered_mib", std::to_string(*s.grpc_max_buffered_mib));
  if (!out.empty()) out += "\n";
  return out;
}

std::string DescribeConfig(const Config& c) {
  std::ostringstream out;
  if (c.store.shared()) out << DescribeStore(c.store, c.region);
  for (const Rule& r : c.endpoints) out << DescribeRule(c, r);
  out << DescribeRule(c, c.default_rule);
  // As RuleSet keys them: by the user, or by the default rule's key when it names the user.
  const std::string tier_key =
      KeyNamesUser(c.default_rule.key) ? DescribeKey(c.default_rule.key) : "user_id";
  for (const auto& [tier, limits] : c.tiers) {
    out << "  tier " << tier << " (key " << tier_key << "): " << DescribeLimits(limits) << "\n";
  }
  return out.str();
}

}  // namespace sluice::rules
