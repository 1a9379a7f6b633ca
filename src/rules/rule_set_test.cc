#include "rules/rule_set.h"

#include <gtest/gtest.h>

#include <map>
#include <random>

#include "rules/config_loader.h"

namespace sluice::rules {
namespace {

const std::string kConfigDir = std::string(SLUICE_SOURCE_DIR) + "/tests/config";

class Attributes : public RequestAttributes {
 public:
  std::map<std::string, std::string, std::less<>> headers, query;
  std::optional<std::string_view> Header(std::string_view name) const override {
    auto it = headers.find(name);
    return it == headers.end() ? std::nullopt : std::optional<std::string_view>(it->second);
  }
  std::optional<std::string_view> Query(std::string_view name) const override {
    auto it = query.find(name);
    return it == query.end() ? std::nullopt : std::optional<std::string_view>(it->second);
  }
};

RuleSet Load(const std::string& file) {
  Config c;
  Status st = LoadConfigFile(kConfigDir + "/" + file, &c);
  EXPECT_TRUE(st.ok()) << st.message();
  return RuleSet(std::move(c));
}

struct Resolved {
  std::string rule;
  std::vector<std::string> limits;
  std::string key;
};

Resolved Resolve(const RuleSet& rs, std::string_view method, std::string_view path,
                 const Attributes& attrs = {}, std::string_view ip = "203.0.113.7") {
  Request req;
  req.method = method;
  req.path = path;
  req.client_ip = ip;
  req.attributes = &attrs;
  Resolution r;
  rs.Resolve(req, r);
  Resolved out;
  out.rule = r.rule->name;
  for (const auto& c : r.checks) {
    out.limits.push_back(c.limit->policy.ToString());
    out.key = c.key;
  }
  return out;
}

TEST(RuleSet, SeedEndpointsMatchByPathAndMethod) {
  RuleSet rs = Load("seed.yaml");
  Resolved login = Resolve(rs, "POST", "/api/login");
  EXPECT_EQ(login.rule, "POST /api/login");
  EXPECT_EQ(login.limits, std::vector<std::string>{"sliding_window_counter 5/1m"});
  EXPECT_EQ(login.key, "ip=203.0.113.7");
  EXPECT_EQ(Resolve(rs, "GET", "/api/login").rule, "default");  // method differs
  Resolved d = Resolve(rs, "GET", "/anything");
  EXPECT_EQ(d.rule, "default");
  EXPECT_EQ(d.limits, (std::vector<std::string>{"sliding_window_counter 60/1m",
                                                "sliding_window_counter 1000/1h"}));
}

TEST(RuleSet, UserKeysFallBackToTheClientIp) {
  RuleSet rs = Load("seed.yaml");
  Attributes with_user;
  with_user.headers["x-user-id"] = "42";
  EXPECT_EQ(Resolve(rs, "GET", "/api/search", with_user).key, "user_id=42");
  // Leaving the header out does not escape the limit: the request is keyed by its IP.
  EXPECT_EQ(Resolve(rs, "GET", "/api/search").key, "ip=203.0.113.7");
  Attributes empty_user;
  empty_user.headers["x-user-id"] = "";
  EXPECT_EQ(Resolve(rs, "GET", "/api/search", empty_user).key, "ip=203.0.113.7");
}

TEST(RuleSet, SeedTiersReplaceTheDefaultLimits) {
  RuleSet rs = Load("seed.yaml");
  Attributes pro;
  pro.headers["x-user-tier"] = "pro";
  pro.headers["x-user-id"] = "7";
  Resolved r = Resolve(rs, "GET", "/anything", pro);
  EXPECT_EQ(r.limits, (std::vector<std::string>{"sliding_window_counter 100/1m",
                                                "sliding_window_counter 10000/1d"}));
  EXPECT_EQ(r.key, "user_id=7");
  Attributes unknown;
  unknown.headers["x-user-tier"] = "platinum";
  EXPECT_EQ(Resolve(rs, "GET", "/x", unknown).limits.size(), 2u);
  EXPECT_EQ(Resolve(rs, "GET", "/x", unknown).limits[0], "sliding_window_counter 60/1m");
  // Endpoint rules are not changed by the default rule's tiers.
  EXPECT_EQ(Resolve(rs, "POST", "/api/login", pro).limits,
            std::vector<std::string>{"sliding_window_counter 5/1m"});
}

TEST(RuleSet, PatternsPrefixAndParameters) {
  RuleSet rs = Load("full.yaml");
  EXPECT_EQ(Resolve(rs, "GET", "/api/search").rule, "search");
  EXPECT_EQ(Resolve(rs, "GET", "/api/search/x/y").rule, "search");
  EXPECT_EQ(Resolve(rs, "HEAD", "/api/search/x").rule, "search");
  EXPECT_EQ(Resolve(rs, "POST", "/api/search/x").rule, "default");
  EXPECT_EQ(Resolve(rs, "GET", "/api/searchx").rule, "default");
  EXPECT_EQ(Resolve(rs, "GET", "/users/7/posts").rule, "posts");
  EXPECT_EQ(Resolve(rs, "GET", "/users/abc-def/posts").rule, "posts");
  EXPECT_EQ(Resolve(rs, "GET", "/users/7/posts/1").rule, "default");
  EXPECT_EQ(Resolve(rs, "GET", "/users/posts").rule, "default");
}

TEST(RuleSet, CompositeHeaderAndQueryKeys) {
  RuleSet rs = Load("full.yaml");
  Attributes a;
  a.headers["x-auth-user"] = "u1";  // keys.user_id.header in full.yaml
  EXPECT_EQ(Resolve(rs, "GET", "/api/search", a).key, "user_id=u1|ip=203.0.113.7");
  a.headers["x-api-key"] = "k9";
  a.headers["x-tenant"] = "acme";
  EXPECT_EQ(Resolve(rs, "GET", "/users/1/posts", a).key, "api_key=k9|header:x-tenant=acme");
  Attributes q;
  q.query["account"] = "A-1";
  EXPECT_EQ(Resolve(rs, "GET", "/export", q).key, "query:account=A-1");
  EXPECT_EQ(Resolve(rs, "GET", "/export").key, "ip=203.0.113.7");
  // Values cannot spell other parts: "a|ip=x" as a user id is not user "a" from address x.
  Attributes forged;
  forged.headers["x-auth-user"] = "a|ip=203.0.113.7";
  EXPECT_EQ(Resolve(rs, "GET", "/api/search", forged).key,
            "user_id=a%7Cip%3D203.0.113.7|ip=203.0.113.7");
  forged.headers["x-auth-user"] = "100%";
  EXPECT_EQ(Resolve(rs, "GET", "/api/search", forged).key, "user_id=100%25|ip=203.0.113.7");
}

TEST(RuleSet, EndpointTierOverridesAndRuleSettings) {
  RuleSet rs = Load("full.yaml");
  Attributes pro;
  pro.headers["x-plan"] = "pro";  // keys.tier.header in full.yaml
  Request req;
  req.method = "GET";
  req.path = "/users/1/posts";
  req.client_ip = "198.51.100.1";
  req.attributes = &pro;
  Resolution r;
  rs.Resolve(req, r);
  ASSERT_EQ(r.checks.size(), 1u);
  EXPECT_EQ(r.checks[0].limit->policy.limit, 500);
  EXPECT_EQ(r.cost, 2);
  req.path = "/export";
  rs.Resolve(req, r);
  EXPECT_TRUE(r.shadow);
  // The decision API states the tier itself.
  req.path = "/users/1/posts";
  req.tier = "enterprise";
  rs.Resolve(req, r);
  EXPECT_EQ(r.checks[0].limit->policy.limit, 5000);
}

TEST(RuleSet, PatternsAreNormalizedLikePaths) {
  Config c;
  ASSERT_TRUE(LoadConfigText("rate_limits:\n  endpoints:\n    - path: /API//Login/\n"
                             "      limit: 1\n      window: 1s\n",
                             "inline", &c)
                  .ok());
  RuleSet rs(std::move(c));
  EXPECT_EQ(Resolve(rs, "GET", *NormalizePath("/api/login")).rule, "/API//Login/");
  EXPECT_EQ(Resolve(rs, "GET", *NormalizePath("/api/x/../LOGIN/")).rule, "/API//Login/");
}

// A prefix holds whole segments below it whether or not trailing slashes are kept, a
// prefix may start with parameters, and a GET rule holds HEAD (servers answer HEAD with
// their GET handler).
TEST(RuleSet, PrefixesWithEitherSlashSettingWithParametersAndHeadForGet) {
  for (std::string strip : {"true", "false"}) {
    Config c;
    ASSERT_TRUE(LoadConfigText("rate_limits:\n  endpoints:\n"
                               "    - {path: /api/search/*, method: GET, limit: 1, window: 1s}\n"
                               "    - {path: '/users/{id}/*', limit: 1, window: 1s}\n"
                               "paths: {strip_trailing_slash: " +
                                   strip + "}\n",
                               "inline", &c)
                    .ok());
    RuleSet rs(std::move(c));
    PathOptions o = rs.config().paths;
    for (std::string_view p : {"/api/search", "/api/search/", "/api/search/q", "/api/search/q/r"}) {
      EXPECT_EQ(Resolve(rs, "GET", *NormalizePath(p, o)).rule, "GET /api/search/*") << p << strip;
      EXPECT_EQ(Resolve(rs, "HEAD", *NormalizePath(p, o)).rule, "GET /api/search/*") << p << strip;
      EXPECT_EQ(Resolve(rs, "POST", *NormalizePath(p, o)).rule, "default") << p << strip;
    }
    EXPECT_EQ(Resolve(rs, "GET", *NormalizePath("/api/searchx", o)).rule, "default");
    for (std::string_view p : {"/users/42", "/users/42/files", "/users/42/files/9/"}) {
      EXPECT_EQ(Resolve(rs, "GET", *NormalizePath(p, o)).rule, "/users/{id}/*") << p << strip;
    }
    EXPECT_EQ(Resolve(rs, "GET", *NormalizePath("/users", o)).rule, "default") << strip;
  }
}

// With trailing slashes kept, a parameter pattern that ends in "/" holds the paths that do,
// and one that does not, those that do not: as exact patterns do.
TEST(RuleSet, ParameterPatternsKeepTheirTrailingSlashWhenPathsDo) {
  Config c;
  ASSERT_TRUE(LoadConfigText("rate_limits:\n  endpoints:\n"
                             "    - {name: slash, path: '/users/{id}/', limit: 1, window: 1s}\n"
                             "    - {name: bare, path: '/users/{id}', limit: 1, window: 1s}\n"
                             "    - {name: exact, path: /a/, limit: 1, window: 1s}\n"
                             "paths: {strip_trailing_slash: false}\n",
                             "inline", &c)
                  .ok());
  RuleSet rs(std::move(c));
  PathOptions o = rs.config().paths;
  EXPECT_EQ(Resolve(rs, "GET", *NormalizePath("/users/5/", o)).rule, "slash");
  EXPECT_EQ(Resolve(rs, "GET", *NormalizePath("/users/5", o)).rule, "bare");
  EXPECT_EQ(Resolve(rs, "GET", *NormalizePath("/users/5/x", o)).rule, "default");
  EXPECT_EQ(Resolve(rs, "GET", *NormalizePath("/a/", o)).rule, "exact");
  EXPECT_EQ(Resolve(rs, "GET", *NormalizePath("/a", o)).rule, "default");
}

TEST(RuleSet, AllLimitsListsEveryLimit) {
  RuleSet rs = Load("seed.yaml");
  EXPECT_EQ(rs.AllLimits().size(), 2u + 6u + 3u);
}

TEST(RuleSet, EmbeddedDefault) {
  RuleSet rs(DefaultConfig());
  Resolved r = Resolve(rs, "DELETE", "/whatever");
  EXPECT_EQ(r.rule, "default");
  EXPECT_EQ(r.limits, std::vector<std::string>{"sliding_window_counter 60/1m"});
  EXPECT_EQ(r.key, "ip=203.0.113.7");
}

// FirstUnreachable for rules with only a path, any method each.
std::optional<std::pair<size_t, size_t>> Unreachable(const std::vector<std::string>& paths) {
  Config c;
  for (const std::string& path : paths) {
    Rule r;
    r.name = path;
    r.path = path;
    c.endpoints.push_back(std::move(r));
  }
  return RuleSet(std::move(c)).FirstUnreachable();
}

using Pair = std::pair<size_t, size_t>;

TEST(RuleSet, AShadowedRuleIsFoundWhateverItsCoverBeginsWith) {
  EXPECT_EQ(Unreachable({"/*", "/anything/{x}"}), Pair(1, 0));
  EXPECT_EQ(Unreachable({"/a/*", "/b", "/a/b/{c}"}), Pair(2, 0));
  EXPECT_EQ(Unreachable({"/a/{id}", "/a/b"}), Pair(1, 0));
  EXPECT_EQ(Unreachable({"/{t}/*", "/a/b/c"}), Pair(1, 0));
  EXPECT_EQ(Unreachable({"/a/b/*", "/a/b"}), Pair(1, 0));
  // Several cover it: the first in file order is named, whichever path it begins with.
  EXPECT_EQ(Unreachable({"/x/{id}/*", "/{a}/*", "/x/y/z"}), Pair(2, 0));
  EXPECT_EQ(Unreachable({"/{a}/*", "/x/{id}/*"}), Pair(1, 0));
  // Not covers: a path that only begins with the same letters, a narrower earlier rule.
  EXPECT_EQ(Unreachable({"/ab/*", "/abc", "/a/{x}", "/a"}), std::nullopt);
  EXPECT_EQ(Unreachable({"/a/b/{c}", "/a/*", "/{x}/b/c"}), std::nullopt);
}

TEST(RuleSet, ThousandsOfRulesAreCheckedAndALateShadowedOneFound) {
  std::vector<std::string> paths;
  for (int i = 0; i < 20000; ++i) paths.push_back("/api/r" + std::to_string(i) + "/*");
  EXPECT_EQ(Unreachable(paths), std::nullopt);
  paths.push_back("/api/r12345/{id}/x");
  EXPECT_EQ(Unreachable(paths), Pair(20000, 12345));
}

// Many rules are matched through an index; it must pick what trying each rule in file order
// picks. The reference: one single-rule set per rule (too small for an index), the first
// that takes the request.
TEST(RuleSet, ManyRulesMatchAsTryingEachInTurnDoes) {
  const std::vector<std::string> segments = {"a", "b", "ab", "c"};
  const std::vector<std::vector<std::string>> methods = {{}, {"GET"}, {"POST"}, {"GET", "POST"}};
  std::mt19937 rng(7);
  auto pick = [&rng](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); };
  int to_default = 0, to_rule = 0;
  for (int config = 0; config < 20; ++config) {
    Config c;
    c.default_rule.name = "default";
    for (int i = 0; i < 40; ++i) {
      std::string path;
      size_t depth = 1 + pick(3);  // no "/*": then some requests reach the default rule
      for (size_t d = 0; d < depth; ++d) path += "/" + (pick(4) == 0 ? "{p}" : segments[pick(4)]);
      if (pick(3) == 0) path += "/*";
      Rule r;
      r.name = "r" + std::to_string(i);
      r.path = path;
      r.methods = methods[pick(methods.size())];
      c.endpoints.push_back(std::move(r));
    }
    std::vector<RuleSet> each;
    for (const Rule& r : c.endpoints) {
      Config one;
      one.endpoints.push_back(r);
      each.emplace_back(std::move(one));
    }
    RuleSet all(c);
    for (int q = 0; q < 300; ++q) {
      std::string path;
      size_t depth = pick(5);
      for (size_t d = 0; d < depth; ++d) path += "/" + (pick(5) == 0 ? "x" : segments[pick(4)]);
      if (path.empty()) path = "/";
      const char* method = pick(3) == 0 ? "POST" : (pick(2) == 0 ? "GET" : "HEAD");
      std::string want = "default";
      for (const RuleSet& one : each) {
        const Rule& r = one.Match(method, path);
        if (&r != &one.config().default_rule) {
          want = r.name;
          break;
        }
      }
      EXPECT_EQ(all.Match(method, path).name, want) << method << " " << path;
      ++(want == "default" ? to_default : to_rule);
    }
  }
  EXPECT_GT(to_default, 100);  // both outcomes were tried
  EXPECT_GT(to_rule, 100);
}

}  // namespace
}  // namespace sluice::rules
