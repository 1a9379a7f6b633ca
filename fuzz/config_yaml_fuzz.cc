// Fuzzes Sluice's YAML config loader (LoadConfigText: YAML parsing and every validation
// rule), and what a config that loads must then allow: every policy is valid (and exact in
// the Redis script when the store is shared), the rule set compiles, `sluice validate` can
// describe it, and a Service runs it: a few requests resolve and are decided.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz/fuzz_fixture.h"
#include "rules/describe.h"
#include "rules/rule_set.h"
#include "store/redis/script.h"

namespace {

using sluice::fuzz::Fail;
namespace rules = sluice::rules;

class Attributes final : public rules::RequestAttributes {
 public:
  std::optional<std::string_view> Header(std::string_view name) const override {
    // Every header present: the tier one names a tier configs often have.
    return name.find("tier") != std::string_view::npos ? "pro" : "v";
  }
  std::optional<std::string_view> Query(std::string_view) const override { return "q"; }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view yaml(reinterpret_cast<const char*>(data), size);
  rules::Config config;
  sluice::Status st = rules::LoadConfigText(yaml, "fuzz.yaml", &config);
  if (!st.ok()) {
    if (st.message().rfind("fuzz.yaml", 0) != 0)
      Fail("an error not naming its file: " + st.message());
    return 0;
  }

  const bool shared = config.store.shared();
  auto check_limits = [&](const std::vector<rules::LimitSpec>& limits) {
    for (const rules::LimitSpec& l : limits) {
      if (sluice::Status v = l.policy.Validate(); !v.ok()) {
        Fail("a loaded config holds an invalid policy (" + l.name + "): " + v.message());
      }
      if (shared && !sluice::redis::ScriptExact(l.policy)) {
        Fail("a config for Redis holds a policy the script cannot decide exactly: " + l.name);
      }
    }
  };
  auto check_rule = [&](const rules::Rule& r) {
    check_limits(r.limits);
    for (const auto& [tier, limits] : r.tiers) check_limits(limits);
  };
  check_rule(config.default_rule);
  for (const rules::Rule& r : config.endpoints) check_rule(r);
  for (const auto& [tier, limits] : config.tiers) check_limits(limits);
  if (rules::DescribeConfig(config).empty()) Fail("an empty description");

  // The counters live in memory here: a Service on a shared store would connect to it.
  config.store = rules::StoreConfig{};
  sluice::MemoryStore::Options options;
  options.max_keys_per_limit = 64;
  options.shards = 1;
  options.hash_seed = 1;
  sluice::server::Service service(std::move(config), options);
  const sluice::server::ActiveRules& active = service.Active();
  Attributes attrs;
  static const char* const kPaths[] = {"/", "/api/login", "/api/search/x", "/users/7/posts",
                                       "/export"};
  for (const char* method : {"GET", "POST"}) {
    for (const char* raw : kPaths) {
      auto path = rules::NormalizePath(raw, active.rules.config().paths);
      if (!path) Fail("a plain path does not normalize");
      rules::Request req;
      req.method = method;
      req.path = *path;
      req.client_ip = "203.0.113.7";
      req.attributes = &attrs;
      sluice::server::Verdict v = service.Decide(active, req);
      if (v.rule == nullptr) Fail("a request matched no rule, not even the default");
      if (v.limit && active.LimitFor(v.limit) == nullptr) Fail("a limit with no counters");
    }
  }
  return 0;
}
