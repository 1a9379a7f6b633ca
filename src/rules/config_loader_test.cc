#include "rules/config_loader.h"

#include <gtest/gtest.h>

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
  EXPECT_EQ(st.message(), "/nonexistent/sluice.yaml: cannot read the file");
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

}  // namespace
}  // namespace sluice::rules
