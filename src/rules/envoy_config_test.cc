#include "rules/envoy_config.h"
#include "rules/config_file.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

namespace sluice::rules::envoy {
namespace {

const std::string kEnvoyDir = std::string(SLUICE_SOURCE_DIR) + "/tests/config/envoy";

// Each fixture in tests/config/envoy/bad and the exact text of its error, after "FILE:".
// When a message changes on purpose, change it here in the same commit.
const std::map<std::string, std::string> kBadConfigs = {
    // clang-format off
    {"bad_unit.yaml", "5:13: descriptors[0].rate_limit.unit: unknown unit 'fortnight' (one of second, minute, hour, day, week, month, year)"},
    {"burst_without_burst_algorithm.yaml", "7:14: descriptors[0].rate_limit.burst: 'burst' needs an algorithm that uses it (token_bucket or gcra); the algorithm is fixed_window"},
    {"descriptor_empty_key.yaml", "3:10: descriptors[0].key: empty key"},
    {"descriptor_id_collision.yaml", "7:9: descriptors[1].descriptors[0]: descriptor id 'x.a.b' is also the id of the descriptor at 3:5 (ids join keys with '.' and values with '_'; rename one)"},
    {"descriptor_key_not_a_string.yaml", "3:10: descriptors[0].key: expected a string"},
    {"descriptor_missing_key.yaml", "3:5: descriptors[0]: missing 'key'"},
    {"descriptors_not_a_list.yaml", "3:3: descriptors: expected a list"},
    {"duplicate_descriptor.yaml", "8:5: descriptors[2]: duplicate descriptor 'database_users' in this list (first at 3:5)"},
    {"duplicate_descriptor_joined.yaml", "7:9: descriptors[0].descriptors[1]: key 'b' with value 'c' collides with key 'b_c' at 6:9 (envoyproxy/ratelimit files both as 'b_c')"},
    {"duplicate_yaml_key.yaml", "4:5: descriptors[0].key: duplicate key 'key'"},
    {"empty.yaml", " empty config"},
    {"empty_domain.yaml", "1:9: domain: empty domain"},
    {"limit_id_collision.yaml", "8:17: descriptors[1].rate_limit: limit id 'x.k[1]' is also the id of the limit at 6:9 (ids join keys with '.' and values with '_'; rename one)"},
    {"map_key_not_a_string.yaml", "3:5: descriptors[0]: expected a string key"},
    {"metadata_not_a_mapping.yaml", "4:15: descriptors[0].metadata: expected a mapping of keys to values"},
    {"misplaced_requests_per_unit.yaml",
     "4:5: descriptors[0].unit: unknown key 'unit' here (it belongs in a descriptor's "
     "'rate_limit:')"},
    {"misplaced_shadow_mode.yaml",
     "6:7: descriptors[0].rate_limit.shadow_mode: unknown key 'shadow_mode' here (it belongs in "
     "a descriptor)"},
    {"missing_domain.yaml", "1:1: missing 'domain'"},
    {"missing_requests_per_unit.yaml", "5:7: descriptors[0].rate_limit: missing 'requests_per_unit' (0 blocks every request)"},
    {"missing_unit.yaml", "5:7: descriptors[0].rate_limit: missing 'unit'"},
    {"negative_burst.yaml", "8:14: descriptors[0].rate_limit.burst: must be >= 0, got -1"},
    {"negative_requests_per_unit.yaml", "6:26: descriptors[0].rate_limit.requests_per_unit: must be between 0 and 4294967295, got -5"},
    {"not_a_mapping.yaml", "1:1: expected a mapping of keys to values"},
    {"quota_mode.yaml", "4:17: descriptors[0].quota_mode: quota_mode (allow over the quota and report it in metadata) is not supported: Sluice would refuse those requests (shadow_mode counts without refusing)"},
    {"rate_limit_and_rate_limits.yaml", "6:7: descriptors[0].rate_limits: give 'rate_limit' or 'rate_limits', not both"},
    {"rate_limit_not_a_mapping.yaml", "4:17: descriptors[0].rate_limit: expected a mapping of keys to values"},
    {"rate_limits_empty.yaml", "4:18: descriptors[0].rate_limits: empty list of limits"},
    {"replaces_empty_name.yaml", "8:17: descriptors[0].rate_limit.replaces[0].name: empty name"},
    {"replaces_itself.yaml", "9:17: descriptors[0].rate_limit.replaces[0].name: a limit cannot replace a limit of its own descriptor ('per_k')"},
    {"replaces_missing_name.yaml", "8:11: descriptors[0].rate_limit.replaces[0]: missing 'name'"},
    {"replaces_not_a_list.yaml", "7:17: descriptors[0].rate_limit.replaces: expected a list"},
    {"requests_per_unit_not_a_number.yaml", "6:26: descriptors[0].rate_limit.requests_per_unit: expected a whole number, got '10.5'"},
    {"requests_per_unit_out_of_range.yaml", "6:26: descriptors[0].rate_limit.requests_per_unit: number out of range: 99999999999999999999"},
    {"burst_beyond_the_clock.yaml", "8:14: descriptors[0].rate_limit.burst: burst 9223372036854775807 at 1/365d takes more than 146,000 years to drain, longer than Sluice's clock can hold"},
    {"shadow_mode_not_bool.yaml", "4:18: descriptors[0].shadow_mode: expected true or false, got 'sometimes'"},
    {"alias_expansion.yaml", "2:1: more than 2000000 YAML nodes once aliases are expanded"},
    {"alias_cycle.yaml", "2:1: nested deeper than 2000 levels once aliases are expanded (an alias inside the node it names never ends)"},
    {"leaky_queue.yaml", "7:18: descriptors[0].rate_limit.algorithm: leaky_queue delays requests, which an RLS answer cannot ask of Envoy (it forwards every OK at once); gcra is the same leaky bucket as a meter: it refuses what the queue would delay"},
    {"share_threshold_without_wildcard.yaml", "5:22: descriptors[0].share_threshold: share_threshold needs a wildcard value (one with '*')"},
    {"unknown_algorithm.yaml", "7:18: descriptors[0].rate_limit.algorithm: unknown algorithm 'sliding' (one of fixed_window, sliding_window_log, sliding_window_counter, token_bucket, gcra)"},
    {"unknown_top_key.yaml", "2:1: descriptor: unknown key 'descriptor'"},
    {"unlimited_in_rate_limits.yaml",
     "5:9: descriptors[0].rate_limits[0].unlimited: unknown key 'unlimited' here (it belongs in "
     "a descriptor's 'rate_limit:')"},
    {"unlimited_not_bool.yaml", "5:18: descriptors[0].rate_limit.unlimited: expected true or false, got 'maybe'"},
    {"unlimited_with_algorithm.yaml", "6:18: descriptors[0].rate_limit.algorithm: no 'algorithm' with 'unlimited: true' (an unlimited limit is never counted)"},
    {"unlimited_with_unit.yaml", "6:13: descriptors[0].rate_limit.unit: no 'unit' with 'unlimited: true' (an unlimited limit is never counted)"},
    {"yaml_syntax_error.yaml", "3:3: illegal block entry"},
    // clang-format on
};

using Entries = std::vector<std::pair<std::string, std::string>>;

std::optional<Match> Find(const EnvoyConfig& c, std::string_view domain, const Entries& e) {
  return MatchDescriptor(c, domain, e);
}

// Loads `yaml` into `c`; for ASSERT_TRUE.
::testing::AssertionResult Load(const std::string& yaml, EnvoyConfig& c) {
  Status st = LoadEnvoyConfigText(yaml, "test.yaml", &c);
  if (st.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << st.message();
}

// The error message of loading `yaml`, after "test.yaml:"; "" if it loads.
std::string LoadError(const std::string& yaml) {
  EnvoyConfig c;
  Status st = LoadEnvoyConfigText(yaml, "test.yaml", &c);
  return st.ok() ? "" : st.message().substr(std::string("test.yaml:").size());
}

// ---- errors ----

TEST(EnvoyConfigLoader, EveryBadFixtureFailsWithItsExactMessage) {
  for (const auto& [file, expected] : kBadConfigs) {
    std::string path = kEnvoyDir + "/bad/" + file;
    EnvoyConfig c;
    c.warnings = {"untouched"};
    Status st = LoadEnvoyConfigFile(path, &c);
    EXPECT_FALSE(st.ok()) << file;
    EXPECT_EQ(st.message(), path + ":" + expected) << file;
    EXPECT_EQ(c.warnings, std::vector<std::string>{"untouched"})
        << file << ": a failed load must leave the config as it was";
  }
}

TEST(EnvoyConfigLoader, EveryBadFixtureHasAnExpectation) {
  std::set<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(kEnvoyDir + "/bad")) {
    files.insert(e.path().filename().string());
  }
  std::set<std::string> expected;
  for (const auto& [file, msg] : kBadConfigs) expected.insert(file);
  EXPECT_EQ(files, expected);
}

// As the rules file: a file of more nodes than the bound is refused before a tree is built.
TEST(EnvoyConfigLoader, TooManyNodesAreRefusedBeforeTheTreeIsBuilt) {
  std::string yaml = "domain: [";
  for (size_t i = 0; i < kMaxYamlNodes; ++i) yaml += "a,";
  yaml += "a]\n";
  EnvoyConfig c;
  EXPECT_EQ(LoadEnvoyConfigText(yaml, "big.yaml", &c).message(),
            "big.yaml:1:" + std::to_string(10 + 2 * (kMaxYamlNodes - 3)) +
                ": more than 2000000 YAML nodes");
}

// Only the first document is read, as envoyproxy/ratelimit reads it: what follows is not
// parsed, even malformed.
TEST(EnvoyConfigLoader, OnlyTheFirstDocumentIsRead) {
  EnvoyConfig c;
  EXPECT_TRUE(LoadEnvoyConfigText("domain: d\ndescriptors:\n  - key: k\n"
                                  "    rate_limit: {unit: second, requests_per_unit: 1}\n---\n]\n",
                                  "t.yaml", &c)
                  .ok());
}

TEST(EnvoyConfigLoader, MissingFileAndDirectory) {
  EnvoyConfig c;
  EXPECT_EQ(LoadEnvoyConfigFile("/nonexistent/rl.yaml", &c).message(),
            "/nonexistent/rl.yaml: cannot read the file (No such file or directory)");
  Status st = LoadEnvoyConfigDir("/nonexistent/config", &c);
  EXPECT_TRUE(st.message().starts_with("/nonexistent/config: cannot read the directory: "))
      << st.message();
}

TEST(EnvoyConfigLoader, DirectoryWithoutConfigFilesIsAnError) {
  std::string dir = std::filesystem::temp_directory_path().string() + "/sluice_envoy_empty_" +
                    std::to_string(::getpid());
  std::filesystem::create_directories(dir + "/.hidden_dir");
  std::ofstream(dir + "/.hidden.yaml") << "domain: h\n";
  EnvoyConfig c;
  EXPECT_EQ(LoadEnvoyConfigDir(dir, &c).message(),
            dir + ": no config files (every file not starting with '.' is one)");
  std::filesystem::remove_all(dir);
}

// As envoyproxy/ratelimit's runtime directory: every file whatever its name, subdirectories
// too; names starting with '.' skipped (a ConfigMap's "..data" holds the same files again).
TEST(EnvoyConfigLoader, EveryFileNotHiddenIsLoadedSubdirectoriesToo) {
  namespace fs = std::filesystem;
  std::string dir =
      fs::temp_directory_path().string() + "/sluice_envoy_names_" + std::to_string(::getpid());
  fs::remove_all(dir);
  fs::create_directories(dir + "/sub/deeper");
  fs::create_directories(dir + "/..2026_11_29/");
  auto domain = [](const std::string& name) {
    return "domain: " + name + "\ndescriptors:\n  - key: k\n";
  };
  std::ofstream(dir + "/ratelimit.conf") << domain("conf");
  std::ofstream(dir + "/noext") << domain("noext");
  std::ofstream(dir + "/sub/a.yaml") << domain("sub");
  std::ofstream(dir + "/sub/deeper/b") << domain("deeper");
  std::ofstream(dir + "/..2026_11_29/config.yaml") << domain("linked");
  fs::create_directories(dir + "/..2026_11_29/items");
  std::ofstream(dir + "/..2026_11_29/items/x.yaml") << domain("item");
  std::ofstream(dir + "/.swp") << "not yaml: [";
  fs::create_directory_symlink(dir + "/..2026_11_29", dir + "/..data");
  fs::create_symlink(dir + "/..data/config.yaml", dir + "/config.yaml");
  // A ConfigMap item at a path with a directory ("items/x.yaml") is a link to a directory.
  fs::create_directory_symlink(dir + "/..data/items", dir + "/items");
  fs::create_directory_symlink(dir, dir + "/sub/loop");  // read once, not again below
  EnvoyConfig c;
  Status st = LoadEnvoyConfigDir(dir, &c);
  ASSERT_TRUE(st.ok()) << st.message();
  std::vector<std::string> names;
  for (const auto& [name, d] : c.domains) names.push_back(name + "@" + d.source_file);
  EXPECT_EQ(names, (std::vector<std::string>{
                       "conf@" + dir + "/ratelimit.conf", "deeper@" + dir + "/sub/deeper/b",
                       "item@" + dir + "/items/x.yaml", "linked@" + dir + "/config.yaml",
                       "noext@" + dir + "/noext", "sub@" + dir + "/sub/a.yaml"}));
  // The watcher's stamp covers the same files.
  std::string stamp = EnvoyConfigDirStamp(dir);
  EXPECT_NE(stamp.find("sub/deeper/b "), std::string::npos) << stamp;
  EXPECT_EQ(stamp.find(".swp"), std::string::npos) << stamp;
  fs::remove_all(dir);
}

// `rate_limit:` with no value: a descriptor without a limit, as envoyproxy/ratelimit loads it.
TEST(EnvoyConfigLoader, EmptyRateLimitIsNoLimit) {
  EnvoyConfig c;
  ASSERT_TRUE(
      Load("domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n"
           "  - key: j\n    rate_limit: ~\n    descriptors:\n"
           "      - key: m\n        rate_limit: {unit: hour, requests_per_unit: 1}\n",
           c));
  const auto& d = c.domains.at("d").descriptors;
  ASSERT_EQ(d.size(), 2u);
  EXPECT_TRUE(d[0].limits.empty());
  EXPECT_TRUE(d[1].limits.empty());
  EXPECT_EQ(d[1].descriptors.at(0).limits.size(), 1u);
  EXPECT_FALSE(Find(c, "d", {{"k", "x"}}));  // matches, limits nothing
}

TEST(EnvoyConfigLoader, DuplicateDomainAcrossFiles) {
  EnvoyConfig c;
  std::string dir = kEnvoyDir + "/dir_duplicate_domain";
  EXPECT_EQ(LoadEnvoyConfigDir(dir, &c).message(),
            dir + "/b.yaml:2:9: domain: duplicate domain 'shared' (also in " + dir +
                "/a.yaml; --envoy-merge-domains merges the files of one domain, as "
                "envoyproxy/ratelimit's MERGE_DOMAIN_CONFIG does)");
  EXPECT_TRUE(c.domains.empty());
}

TEST(EnvoyConfigLoader, MergedDomainAcrossFiles) {
  std::string dir = kEnvoyDir + "/dir_merge_domain";
  EnvoyConfig refused;
  EXPECT_EQ(LoadEnvoyConfigDir(dir, &refused).message(),
            dir + "/b.yaml:1:9: domain: duplicate domain 'shared' (also in " + dir +
                "/a.yaml; --envoy-merge-domains merges the files of one domain, as "
                "envoyproxy/ratelimit's MERGE_DOMAIN_CONFIG does)");
  EnvoyConfig c;
  Status st = LoadEnvoyConfigDir(dir, &c, {.merge_domains = true});
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_EQ(c.domains.size(), 2u);
  const Domain& shared = c.domains.at("shared");
  ASSERT_EQ(shared.descriptors.size(), 2u);  // a.yaml's, then b.yaml's
  EXPECT_EQ(shared.source_file, dir + "/a.yaml");
  EXPECT_EQ(shared.descriptors[1].location, dir + "/b.yaml:3:5");
  // Both files' descriptors match, each with its own limit; the other domain is apart.
  auto k = Find(c, "shared", {{"k", "1"}});
  ASSERT_TRUE(k);
  EXPECT_EQ(k->limits.at(0)->policy, Policy::FixedWindow(1, kSecond));
  auto m = Find(c, "shared", {{"m", "1"}});
  ASSERT_TRUE(m);
  EXPECT_EQ(m->limits.at(0)->policy, Policy::FixedWindow(2, kMinute));
  EXPECT_EQ(Find(c, "other", {{"k", "1"}})->limits.at(0)->policy, Policy::FixedWindow(3, kHour));
  EXPECT_FALSE(Find(c, "other", {{"m", "1"}}));
  // b.yaml's `replaces` names a.yaml's limit: no warning, and a request with both drops it.
  EXPECT_TRUE(c.warnings.empty()) << c.warnings.at(0);
  std::vector<Match> both = {*k, *m};
  ApplyReplaces(both);
  EXPECT_TRUE(both[0].limits.empty());
  EXPECT_EQ(both[1].limits.size(), 1u);
}

TEST(EnvoyConfigLoader, MergedDomainRefusesADescriptorTwoFilesGive) {
  EnvoyConfigSource sources[] = {
      {"one.yaml", "domain: d\ndescriptors:\n  - key: k\n    value: v\n"},
      {"two.yaml", "domain: d\ndescriptors:\n  - key: j\n  - key: k\n    value: v\n"}};
  EnvoyConfig c;
  EXPECT_EQ(LoadEnvoyConfigTexts(sources, &c, {.merge_domains = true}).message(),
            "two.yaml:4:5: descriptors[1]: duplicate descriptor 'k_v' in this list (first at "
            "one.yaml:3:5)");
  EXPECT_TRUE(c.domains.empty());
}

TEST(EnvoyConfigLoader, MergedDomainWarnsOfReplacesNamingNoLimitInAnyOfItsFiles) {
  EnvoyConfigSource sources[] = {
      {"one.yaml", "domain: d\ndescriptors:\n  - key: k\n"},
      {"two.yaml",
       "domain: d\ndescriptors:\n  - key: m\n    rate_limit:\n      unit: second\n"
       "      requests_per_unit: 1\n      replaces: [{name: nowhere}]\n"},
      {"three.yaml", "domain: e\ndescriptors:\n  - key: k\n"}};
  EnvoyConfig c;
  Status st = LoadEnvoyConfigTexts(sources, &c, {.merge_domains = true});
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(c.warnings,
            std::vector<std::string>{"two.yaml:7:25: descriptors[0].rate_limit.replaces[0].name: "
                                     "'nowhere' names no rate limit of domain 'd'"});
}

TEST(EnvoyConfigLoader, DescriptorIdsAreUniqueAcrossFiles) {
  EnvoyConfig c;
  std::string dir = kEnvoyDir + "/dir_id_collision";
  EXPECT_EQ(LoadEnvoyConfigDir(dir, &c).message(),
            dir + "/b.yaml:4:5: descriptors[0]: descriptor id 'a.b.c' is also the id of the " +
                "descriptor at " + dir +
                "/a.yaml:5:9 (ids join keys with '.' and values with '_'; rename one)");
}

TEST(EnvoyConfigLoader, DuplicateDomainInTexts) {
  EnvoyConfigSource sources[] = {{"one.yaml", "domain: d\n"}, {"two.yaml", "domain: d\n"}};
  EnvoyConfig c;
  EXPECT_EQ(LoadEnvoyConfigTexts(sources, &c).message(),
            "two.yaml:1:9: domain: duplicate domain 'd' (also in one.yaml; "
            "--envoy-merge-domains merges the files of one domain, as envoyproxy/ratelimit's "
            "MERGE_DOMAIN_CONFIG does)");
}

TEST(EnvoyConfigLoader, DirectoryLoadsEveryFileButHiddenOnes) {
  EnvoyConfig c;
  std::string dir = kEnvoyDir + "/dir_mixed";
  Status st = LoadEnvoyConfigDir(dir, &c);
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_EQ(c.domains.size(), 3u);  // not the hidden file
  EXPECT_EQ(c.domains.at("first").source_file, dir + "/a_first.yaml");
  EXPECT_EQ(c.domains.at("second").source_file, dir + "/b_second.yml");
  EXPECT_EQ(c.domains.at("third").source_file, dir + "/nested.yaml/c.yaml");
  EXPECT_EQ(c.domains.at("second").descriptors[0].limits[0].policy, Policy::FixedWindow(2, kHour));
}

// ---- envoyproxy/ratelimit's README examples ----

class ReadmeExamples : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    config_ = new EnvoyConfig;
    Status st = LoadEnvoyConfigDir(kEnvoyDir + "/examples", config_);
    ASSERT_TRUE(st.ok()) << st.message();
  }
  static void TearDownTestSuite() {
    delete config_;
    config_ = nullptr;
  }
  static const EnvoyConfig& config() { return *config_; }
  static EnvoyConfig* config_;
};
EnvoyConfig* ReadmeExamples::config_ = nullptr;

TEST_F(ReadmeExamples, AllLoadWithoutWarnings) {
  EXPECT_EQ(config().domains.size(), 9u);
  EXPECT_TRUE(config().warnings.empty());
  EXPECT_EQ(config().domains.at("mongo_cps").source_file, kEnvoyDir + "/examples/example1.yaml");
}

TEST_F(ReadmeExamples, Example1ValuesOfOneKey) {
  for (const char* db : {"users", "default"}) {
    auto m = Find(config(), "mongo_cps", {{"database", db}});
    ASSERT_TRUE(m) << db;
    ASSERT_EQ(m->limits.size(), 1u);
    EXPECT_EQ(m->limits[0]->policy, Policy::FixedWindow(500, kSecond));
    EXPECT_EQ(m->limits[0]->unit, Unit::kSecond);
    EXPECT_FALSE(m->limits[0]->unlimited);
    EXPECT_EQ(m->descriptor->id, std::string("mongo_cps.database_") + db);
    EXPECT_EQ(m->cache_key, std::string("mongo_cps|database=") + db);
    EXPECT_EQ(m->metric_key, std::string("mongo_cps.database_") + db);
  }
  EXPECT_FALSE(Find(config(), "mongo_cps", {{"database", "orders"}}));
  EXPECT_FALSE(Find(config(), "mongo_cps", {{"table", "users"}}));
  EXPECT_FALSE(Find(config(), "no_such_domain", {{"database", "users"}}));
  EXPECT_FALSE(Find(config(), "mongo_cps", {}));
}

TEST_F(ReadmeExamples, Example2NestedKeyOnlyCountsEachNumber) {
  auto a =
      Find(config(), "messaging", {{"message_type", "marketing"}, {"to_number", "2061111111"}});
  auto b =
      Find(config(), "messaging", {{"message_type", "marketing"}, {"to_number", "2062222222"}});
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->limits[0]->policy, Policy::FixedWindow(5, kDay));
  EXPECT_EQ(a->descriptor, b->descriptor);
  EXPECT_EQ(a->descriptor->id, "messaging.message_type_marketing.to_number");
  EXPECT_EQ(a->cache_key, "messaging|message_type=marketing|to_number=2061111111");
  EXPECT_EQ(b->cache_key, "messaging|message_type=marketing|to_number=2062222222");
  EXPECT_EQ(a->metric_key, "messaging.message_type_marketing.to_number");  // values rolled up

  auto any = Find(config(), "messaging", {{"to_number", "2061111111"}});
  ASSERT_TRUE(any);
  EXPECT_EQ(any->limits[0]->policy, Policy::FixedWindow(100, kDay));
  EXPECT_EQ(any->cache_key, "messaging|to_number=2061111111");
  EXPECT_NE(any->cache_key, a->cache_key);

  // The placeholder has no limit of its own; other message types match nothing.
  EXPECT_FALSE(Find(config(), "messaging", {{"message_type", "marketing"}}));
  EXPECT_FALSE(Find(config(), "messaging", {{"message_type", "alert"}, {"to_number", "1"}}));
}

TEST_F(ReadmeExamples, Example2OneRequestTwoDescriptors) {
  // "the client could send this complete request": both descriptors are limited.
  std::vector<std::optional<Match>> request = {
      Find(config(), "messaging", {{"message_type", "marketing"}, {"to_number", "2061111111"}}),
      Find(config(), "messaging", {{"to_number", "2061111111"}}),
  };
  ApplyReplaces(request);
  ASSERT_TRUE(request[0] && request[1]);
  EXPECT_EQ(request[0]->limits[0]->policy.limit, 5);
  EXPECT_EQ(request[1]->limits[0]->policy.limit, 100);
}

TEST_F(ReadmeExamples, Example3ValueBeforeKeyOnly) {
  auto any = Find(config(), "edge_proxy_per_ip", {{"remote_address", "50.0.0.1"}});
  ASSERT_TRUE(any);
  EXPECT_EQ(any->limits[0]->policy, Policy::FixedWindow(10, kSecond));
  EXPECT_EQ(any->descriptor->id, "edge_proxy_per_ip.remote_address");
  auto banned = Find(config(), "edge_proxy_per_ip", {{"remote_address", "50.0.0.5"}});
  ASSERT_TRUE(banned);
  EXPECT_EQ(banned->limits[0]->policy, Policy::FixedWindow(0, kSecond));
  EXPECT_EQ(banned->descriptor->id, "edge_proxy_per_ip.remote_address_50.0.0.5");
}

TEST_F(ReadmeExamples, Example4LevelsMustMatchEntries) {
  Entries two = {{"key", "value"}, {"subkey", "subvalue"}};
  auto m = Find(config(), "example4", two);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->limits[0]->policy, Policy::FixedWindow(300, kSecond));
  EXPECT_EQ(m->cache_key, "example4|key=value|subkey=subvalue");

  // The README's first configuration: the same request has one entry too many for it.
  EnvoyConfig flat;
  ASSERT_TRUE(Load(R"(
domain: example4
descriptors:
  - key: key
    value: value
    rate_limit:
      requests_per_unit: 300
      unit: second
)",
                   flat));
  EXPECT_FALSE(Find(flat, "example4", two));
  EXPECT_TRUE(Find(flat, "example4", {{"key", "value"}}));
}

TEST_F(ReadmeExamples, Example5Unlimited) {
  auto ldap = Find(config(), "internal", {{"ldap", "anything"}});
  ASSERT_TRUE(ldap);
  ASSERT_EQ(ldap->limits.size(), 1u);
  EXPECT_TRUE(ldap->limits[0]->unlimited);
  EXPECT_EQ(ldap->limits[0]->unit, Unit::kUnknown);
  auto azure = Find(config(), "internal", {{"azure", "x"}});
  ASSERT_TRUE(azure);
  EXPECT_FALSE(azure->limits[0]->unlimited);
  EXPECT_EQ(azure->limits[0]->policy, Policy::FixedWindow(100, kMinute));
}

TEST_F(ReadmeExamples, Example6ShadowMode) {
  auto a = Find(config(), "example6", {{"service", "auth-service"}, {"user", "user-a"}});
  ASSERT_TRUE(a);
  EXPECT_TRUE(a->descriptor->shadow_mode);
  EXPECT_EQ(a->limits[0]->policy, Policy::FixedWindow(10, kSecond));
  auto b = Find(config(), "example6", {{"service", "auth-service"}, {"user", "user-b"}});
  ASSERT_TRUE(b);
  EXPECT_FALSE(b->descriptor->shadow_mode);
  EXPECT_EQ(b->limits[0]->policy, Policy::FixedWindow(20, kSecond));
  EXPECT_FALSE(Find(config(), "example6", {{"service", "auth-service"}, {"user", "user-c"}}));
}

TEST_F(ReadmeExamples, Example7Replaces) {
  Entries first = {{"key_1", "value_1"}, {"user", "bkthomps"}};
  Entries second = {{"key_2", "value_2"}, {"user", "bkthomps"}};
  {  // each alone keeps its own limit
    std::vector<Match> one = {*Find(config(), "example7", first)};
    ApplyReplaces(one);
    ASSERT_EQ(one[0].limits.size(), 1u);
    EXPECT_EQ(one[0].limits[0]->policy.limit, 5);
    EXPECT_EQ(one[0].limits[0]->name, "specific_limit");
    std::vector<Match> two = {*Find(config(), "example7", second)};
    ApplyReplaces(two);
    ASSERT_EQ(two[0].limits.size(), 1u);
    EXPECT_EQ(two[0].limits[0]->policy.limit, 10);
  }
  // Both in one request: 10 per second, the 5 per second limit neither checked nor counted.
  std::vector<Match> both = {*Find(config(), "example7", first),
                             *Find(config(), "example7", second)};
  ApplyReplaces(both);
  ASSERT_EQ(both.size(), 2u);
  EXPECT_TRUE(both[0].limits.empty());
  ASSERT_EQ(both[1].limits.size(), 1u);
  EXPECT_EQ(both[1].limits[0]->policy.limit, 10);
  EXPECT_EQ(both[1].limits[0]->replaces, std::vector<std::string>{"specific_limit"});
}

TEST_F(ReadmeExamples, Example8DetailedMetric) {
  auto a = Find(config(), "example8", {{"key1", "unspecified_value"}});
  auto b = Find(config(), "example8", {{"key1", "unspecified_value2"}});
  auto v = Find(config(), "example8", {{"key1", "value1"}});
  ASSERT_TRUE(a && b && v);
  EXPECT_EQ(a->limits[0]->policy, Policy::FixedWindow(10, kMinute));
  EXPECT_EQ(v->limits[0]->policy, Policy::FixedWindow(20, kMinute));
  EXPECT_EQ(a->metric_key, "example8.key1_unspecified_value");
  EXPECT_EQ(b->metric_key, "example8.key1_unspecified_value2");
  EXPECT_EQ(v->metric_key, "example8.key1_value1");
  EXPECT_EQ(a->descriptor->id, "example8.key1");
  EXPECT_NE(a->cache_key, b->cache_key);
}

TEST_F(ReadmeExamples, Example9Wildcard) {
  auto one = Find(config(), "example9", {{"key1", "value1"}});
  auto two = Find(config(), "example9", {{"key1", "value2"}});
  ASSERT_TRUE(one && two);
  EXPECT_EQ(one->descriptor, two->descriptor);
  EXPECT_EQ(one->descriptor->id, "example9.key1_value*");
  EXPECT_EQ(one->limits[0]->policy, Policy::FixedWindow(20, kMinute));
  // Each value matching the wildcard has its own counter (no share_threshold).
  EXPECT_EQ(one->cache_key, "example9|key1=value1");
  EXPECT_EQ(two->cache_key, "example9|key1=value2");
  EXPECT_EQ(one->metric_key, "example9.key1_value*");
  EXPECT_TRUE(Find(config(), "example9", {{"key1", "value"}}));  // '*' may stand for nothing
  EXPECT_FALSE(Find(config(), "example9", {{"key1", "valu"}}));
  EXPECT_FALSE(Find(config(), "example9", {{"key1", "other"}}));
}

// ---- matching ----

constexpr const char* kOrder = R"(
domain: order
descriptors:
  - key: path
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: path
    value: /api/*
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: path
    value: /api/v1/*
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: path
    value: /api/v1/login
    rate_limit: {unit: second, requests_per_unit: 4}
  - key: path
    value: '*.png'
    rate_limit: {unit: second, requests_per_unit: 5}
  - key: path
    value: /img/*/thumb*.jpg
    rate_limit: {unit: second, requests_per_unit: 6}
)";

int64_t LimitOf(const EnvoyConfig& c, std::string_view domain, const Entries& e) {
  auto m = Find(c, domain, e);
  return m ? m->limits.at(0)->policy.limit : -1;
}

TEST(EnvoyMatch, ExactThenFirstWildcardInFileOrderThenKeyOnly) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(kOrder, c));
  EXPECT_EQ(LimitOf(c, "order", {{"path", "/api/v1/login"}}), 4);  // exact beats wildcards
  EXPECT_EQ(LimitOf(c, "order", {{"path", "/api/v1/users"}}), 2);  // first wildcard written
  EXPECT_EQ(LimitOf(c, "order", {{"path", "/api/x"}}), 2);
  EXPECT_EQ(LimitOf(c, "order", {{"path", "/static/a.png"}}), 5);  // '*' at the start
  EXPECT_EQ(LimitOf(c, "order", {{"path", "/img/a/b/thumb-1.jpg"}}), 6);
  EXPECT_EQ(LimitOf(c, "order", {{"path", "/img/thumb.jpg"}}), 1);  // needs two '/'s around '*'
  EXPECT_EQ(LimitOf(c, "order", {{"path", "/img/x/thumb.jpeg"}}), 1);
  EXPECT_EQ(LimitOf(c, "order", {{"path", "/other"}}), 1);  // key only: any other value
  EXPECT_EQ(LimitOf(c, "order", {{"path", ""}}), 1);
  EXPECT_EQ(LimitOf(c, "order", {{"path", "/api/*"}}), 2);  // a literal '*' is exact
  EXPECT_EQ(LimitOf(c, "order", {{"method", "GET"}}), -1);
}

TEST(EnvoyMatch, OnlyTheLastLevelsLimitApplies) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 1}
    descriptors:
      - key: b
        value: x
        rate_limit: {unit: second, requests_per_unit: 2}
      - key: c
        descriptors:
          - key: e
            rate_limit: {unit: second, requests_per_unit: 3}
  - key: leaf
    rate_limit: {unit: second, requests_per_unit: 4}
)",
                   c));
  EXPECT_EQ(LimitOf(c, "d", {{"a", "1"}}), 1);
  EXPECT_EQ(LimitOf(c, "d", {{"a", "1"}, {"b", "x"}}), 2);
  // b=y matches nothing at the second level: a's limit does not apply instead.
  EXPECT_EQ(LimitOf(c, "d", {{"a", "1"}, {"b", "y"}}), -1);
  // c has no limit of its own; e below it has.
  EXPECT_EQ(LimitOf(c, "d", {{"a", "1"}, {"c", "2"}}), -1);
  EXPECT_EQ(LimitOf(c, "d", {{"a", "1"}, {"c", "2"}, {"e", "3"}}), 3);
  // More entries than levels: nothing.
  EXPECT_EQ(LimitOf(c, "d", {{"a", "1"}, {"c", "2"}, {"e", "3"}, {"f", "4"}}), -1);
  EXPECT_EQ(LimitOf(c, "d", {{"leaf", "1"}, {"b", "x"}}), -1);
  // Order matters: entries are levels.
  EXPECT_EQ(LimitOf(c, "d", {{"b", "x"}, {"a", "1"}}), -1);
}

TEST(EnvoyMatch, WildcardsAtNestedLevels) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: tenant
    value: acme-*
    descriptors:
      - key: path
        value: /v2/*
        rate_limit: {unit: minute, requests_per_unit: 7}
)",
                   c));
  auto m = Find(c, "d", {{"tenant", "acme-eu"}, {"path", "/v2/items"}});
  ASSERT_TRUE(m);
  EXPECT_EQ(m->limits[0]->policy.limit, 7);
  EXPECT_EQ(m->descriptor->id, "d.tenant_acme-*.path_/v2/*");
  EXPECT_EQ(m->cache_key, "d|tenant=acme-eu|path=/v2/items");
  EXPECT_FALSE(Find(c, "d", {{"tenant", "acme-eu"}, {"path", "/v1/items"}}));
  EXPECT_FALSE(Find(c, "d", {{"tenant", "other"}, {"path", "/v2/items"}}));
}

TEST(EnvoyMatch, ShareThresholdWildcardSharesOneCounter) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 100}
  - key: models
    value: m-*
    share_threshold: true
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 10}
  - key: apart
    value: a*
    rate_limit: {unit: hour, requests_per_unit: 1}
)",
                   c));
  auto a = Find(c, "d", {{"files", "files/a.pdf"}});
  auto b = Find(c, "d", {{"files", "files/b.csv"}});
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->cache_key, "d|files=files/*");
  EXPECT_EQ(a->cache_key, b->cache_key);
  EXPECT_EQ(a->metric_key, "d.files_files/*");
  // Below a shared wildcard, the wildcard level is shared and the user level is not.
  auto u1 = Find(c, "d", {{"models", "m-1"}, {"user", "u1"}});
  auto u2 = Find(c, "d", {{"models", "m-2"}, {"user", "u1"}});
  auto u3 = Find(c, "d", {{"models", "m-2"}, {"user", "u3"}});
  ASSERT_TRUE(u1 && u2 && u3);
  EXPECT_EQ(u1->cache_key, "d|models=m-*|user=u1");
  EXPECT_EQ(u1->cache_key, u2->cache_key);
  EXPECT_NE(u2->cache_key, u3->cache_key);
  EXPECT_NE(Find(c, "d", {{"apart", "a1"}})->cache_key, Find(c, "d", {{"apart", "a2"}})->cache_key);
}

TEST(EnvoyMatch, MetricKeys) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: route
    value_to_metric: true
    descriptors:
      - key: user
        rate_limit: {unit: second, requests_per_unit: 1}
  - key: host
    value: api.*
    value_to_metric: true
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: svc
    descriptors:
      - key: user
        detailed_metric: true
        rate_limit: {unit: second, requests_per_unit: 1}
)",
                   c));
  EXPECT_EQ(Find(c, "d", {{"route", "r1"}, {"user", "u1"}})->metric_key, "d.route_r1.user");
  EXPECT_EQ(Find(c, "d", {{"host", "api.example.com"}})->metric_key, "d.host_api.example.com");
  EXPECT_EQ(Find(c, "d", {{"svc", "s"}, {"user", "u"}})->metric_key, "d.svc_s.user_u");
  EXPECT_EQ(Find(c, "d", {{"svc", ""}, {"user", "u"}})->metric_key, "d.svc_.user_u");
}

TEST(EnvoyMatch, AMatchReusedForAnotherDescriptorHoldsOnlyThatOnesMatch) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: a
    rate_limits:
      - {unit: second, requests_per_unit: 1}
      - {unit: hour, requests_per_unit: 100}
    descriptors:
      - key: b
        detailed_metric: true
        rate_limit: {unit: minute, requests_per_unit: 5}
  - key: c
    rate_limit: {unit: day, requests_per_unit: 7}
)",
                   c));
  // A server matches every call into the Match of an earlier one: nothing may be left over.
  using Views = std::vector<std::pair<std::string_view, std::string_view>>;
  Match m;
  for (const Views& e : {Views{{"a", "a-long-value-beyond-small-strings"}, {"b", "y|z"}},
                         Views{{"a", "x"}}, Views{{"c", "v"}}, Views{{"a", "x"}, {"b", "y"}}}) {
    ASSERT_TRUE(MatchDescriptor(c, "d", e, &m));
    auto fresh = MatchDescriptor(c, "d", e);
    ASSERT_TRUE(fresh);
    EXPECT_EQ(m.descriptor, fresh->descriptor);
    EXPECT_EQ(m.limits, fresh->limits);
    EXPECT_EQ(m.cache_key, fresh->cache_key);
    EXPECT_EQ(m.metric_key, fresh->metric_key);
  }
  EXPECT_FALSE(MatchDescriptor(c, "d", Views{{"nope", "x"}}, &m));
  EXPECT_FALSE(MatchDescriptor(c, "other", Views{{"a", "x"}}, &m));
  // More entries than the walk keeps on the stack: no match here, and no crash.
  Views nine(9, {"a", "x"});
  EXPECT_FALSE(MatchDescriptor(c, "d", nine, &m));
}

TEST(EnvoyMatch, CacheKeysAreUnambiguous) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 1}
    descriptors:
      - key: b
        rate_limit: {unit: second, requests_per_unit: 1}
)",
                   c));
  auto one = Find(c, "d", {{"a", "x|b=y"}});
  auto two = Find(c, "d", {{"a", "x"}, {"b", "y"}});
  ASSERT_TRUE(one && two);
  EXPECT_EQ(one->cache_key, "d|a=x%7Cb%3Dy");
  EXPECT_EQ(two->cache_key, "d|a=x|b=y");
  EXPECT_EQ(Find(c, "d", {{"a", "{tag}%"}})->cache_key, "d|a=%7Btag%7D%25");
  // Separate counters for a value and no value.
  EXPECT_NE(Find(c, "d", {{"a", ""}})->cache_key, Find(c, "d", {{"a", "="}})->cache_key);
}

TEST(EnvoyMatch, StringViewEntriesAndCopiesOfTheConfig) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(kOrder, c));
  EnvoyConfig copy = c;  // the index holds positions, not pointers
  std::vector<std::pair<std::string_view, std::string_view>> e = {{"path", "/api/v1/login"}};
  auto m = MatchDescriptor(copy, "order", e);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->limits[0]->policy.limit, 4);
  EXPECT_EQ(m->descriptor, &copy.domains.at("order").descriptors[3]);
}

TEST(EnvoyMatch, DescriptorWithoutLimitOrChildrenMatchesNothing) {
  EnvoyConfig c;
  ASSERT_TRUE(Load("domain: d\ndescriptors:\n  - key: allow\n", c));
  EXPECT_FALSE(Find(c, "d", {{"allow", "x"}}));
}

// ---- replaces ----

TEST(EnvoyReplaces, UnlimitedLimitsReplaceButAreNotReplaced) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: general
    rate_limit: {name: general, unit: second, requests_per_unit: 1}
  - key: vip
    rate_limit:
      unlimited: true
      replaces: [{name: general}]
  - key: free
    rate_limit: {name: vip_free, unlimited: true}
  - key: override
    rate_limit: {replaces: [{name: vip_free}], unit: second, requests_per_unit: 9}
)",
                   c));
  std::vector<std::optional<Match>> r = {
      Find(c, "d", {{"general", "1"}}), std::nullopt, Find(c, "d", {{"vip", "1"}}),
      Find(c, "d", {{"free", "1"}}), Find(c, "d", {{"override", "1"}})};
  ApplyReplaces(r);
  ASSERT_EQ(r.size(), 5u);
  EXPECT_TRUE(r[0]->limits.empty());  // replaced by an unlimited limit
  EXPECT_FALSE(r[1]);
  EXPECT_TRUE(r[2]->limits[0]->unlimited);
  ASSERT_EQ(r[3]->limits.size(), 1u);  // unlimited ones stay, as in envoyproxy/ratelimit
  EXPECT_TRUE(r[3]->limits[0]->unlimited);
  EXPECT_EQ(r[4]->limits.size(), 1u);
}

TEST(EnvoyReplaces, MutualReplacementDropsBoth) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: a
    rate_limit: {name: a, replaces: [{name: b}], unit: second, requests_per_unit: 1}
  - key: b
    rate_limit: {name: b, replaces: [{name: a}], unit: second, requests_per_unit: 1}
)",
                   c));
  std::vector<Match> r = {*Find(c, "d", {{"a", "1"}}), *Find(c, "d", {{"b", "1"}})};
  ApplyReplaces(r);
  EXPECT_TRUE(r[0].limits.empty());
  EXPECT_TRUE(r[1].limits.empty());
}

TEST(EnvoyReplaces, NamingNoLimitIsAWarning) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(domain: d
descriptors:
  - key: a
    rate_limit:
      unit: second
      requests_per_unit: 1
      replaces:
        - name: nowhere
)",
                   c));
  EXPECT_EQ(c.warnings,
            std::vector<std::string>{"test.yaml:8:17: descriptors[0].rate_limit.replaces[0].name: "
                                     "'nowhere' names no rate limit of domain 'd'"});
}

// ---- Sluice extensions ----

TEST(EnvoyExtensions, AlgorithmAndBurst) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: tb
    rate_limit: {unit: second, requests_per_unit: 10, algorithm: token_bucket, burst: 50}
  - key: gcra
    rate_limit: {unit: minute, requests_per_unit: 60, algorithm: gcra}
  - key: swc
    rate_limit: {unit: hour, requests_per_unit: 1000, algorithm: sliding_window_counter}
)",
                   c));
  EXPECT_EQ(Find(c, "d", {{"tb", "1"}})->limits[0]->policy, Policy::TokenBucket(50, 10, kSecond));
  EXPECT_EQ(Find(c, "d", {{"gcra", "1"}})->limits[0]->policy, Policy::Gcra(60, kMinute));
  EXPECT_EQ(Find(c, "d", {{"swc", "1"}})->limits[0]->policy,
            Policy::SlidingWindowCounter(1000, kHour));
}

TEST(EnvoyExtensions, SeveralLimitsOnOneDescriptor) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: package
    value: free
    descriptors:
      - key: account_id
        rate_limits:
          - {unit: second, requests_per_unit: 10, algorithm: token_bucket, burst: 20}
          - {unit: day, requests_per_unit: 250, name: free_daily}
  - key: promo
    rate_limit: {unit: day, requests_per_unit: 1000, replaces: [{name: free_daily}]}
)",
                   c));
  auto m = Find(c, "d", {{"package", "free"}, {"account_id", "42"}});
  ASSERT_TRUE(m);
  ASSERT_EQ(m->limits.size(), 2u);
  EXPECT_EQ(m->limits[0]->policy, Policy::TokenBucket(20, 10, kSecond));
  EXPECT_EQ(m->limits[1]->policy, Policy::FixedWindow(250, kDay));
  EXPECT_EQ(m->limits[0]->id, "d.package_free.account_id[0]");
  EXPECT_EQ(m->limits[1]->id, "d.package_free.account_id[1]");
  EXPECT_EQ(m->cache_key, "d|package=free|account_id=42");
  // A replaces drops only the named limit of the list.
  std::vector<Match> r = {*m, *Find(c, "d", {{"promo", "x"}})};
  ApplyReplaces(r);
  ASSERT_EQ(r[0].limits.size(), 1u);
  EXPECT_EQ(r[0].limits[0]->policy.limit, 10);
  EXPECT_EQ(Find(c, "d", {{"promo", "x"}})->limits[0]->id, "d.promo");
}

// ---- what loads ----

TEST(EnvoyConfigLoader, UnitsInAnyCase) {
  const std::pair<const char*, DurationUs> cases[] = {
      {"second", kSecond}, {"Minute", kMinute},  {"HOUR", kHour},      {"day", kDay},
      {"week", 7 * kDay},  {"month", 30 * kDay}, {"Year", 365 * kDay},
  };
  for (const auto& [unit, period] : cases) {
    EnvoyConfig c;
    ASSERT_TRUE(Load(std::string("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: ") +
                         unit + ", requests_per_unit: 3}\n",
                     c))
        << unit;
    const RateLimitSpec& l = c.domains.at("d").descriptors[0].limits[0];
    EXPECT_EQ(l.policy, Policy::FixedWindow(3, period)) << unit;
    EXPECT_EQ(UnitDuration(l.unit), period);
    EXPECT_EQ(ParseUnit(UnitName(l.unit)), l.unit);
  }
  EXPECT_EQ(static_cast<int>(Unit::kWeek), 7);  // the RLS proto's numbering
  EXPECT_EQ(ParseUnit("unknown"), std::nullopt);
  EXPECT_EQ(UnitName(Unit::kUnknown), "unknown");
}

TEST(EnvoyConfigLoader, FormsEnvoyproxyAccepts) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: empty
    value: ""
    shadow_mode: yes
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: number
    value: 1234
    detailed_metric: False
    rate_limit: {unit: second, requests_per_unit: 4294967295}
  - key: nothing
    value:
    descriptors:
  - key: lax
    rate_limit:
      unlimited: true
      requests_per_unit: 5
      name: ""
)",
                   c));
  const auto& ds = c.domains.at("d").descriptors;
  EXPECT_EQ(ds[0].value, std::nullopt);  // value "" is no value
  EXPECT_TRUE(ds[0].shadow_mode);
  EXPECT_EQ(ds[1].value, "1234");
  EXPECT_EQ(ds[1].limits[0].policy.limit, 4294967295);
  EXPECT_EQ(ds[2].value, std::nullopt);
  EXPECT_TRUE(ds[2].descriptors.empty());
  EXPECT_TRUE(ds[3].limits[0].unlimited);  // requests_per_unit ignored, as envoyproxy does
  EXPECT_EQ(LimitOf(c, "d", {{"empty", "anything"}}), 1);
  EXPECT_EQ(LimitOf(c, "d", {{"number", "1234"}}), 4294967295);
  EXPECT_EQ(LimitOf(c, "d", {{"number", "12345"}}), -1);
  EXPECT_TRUE(c.warnings.empty());
  EXPECT_TRUE(Load("domain: only_a_name\n", c));
  EXPECT_TRUE(c.domains.at("only_a_name").descriptors.empty());
}

// envoyproxy/ratelimit reads its files with go-yaml v2, whose booleans are YAML 1.1's.
TEST(EnvoyConfigLoader, YamlOneOneBooleans) {
  const std::pair<const char*, bool> kCases[] = {
      {"y", true},  {"Y", true},  {"yes", true}, {"On", true},   {"TRUE", true},
      {"n", false}, {"N", false}, {"NO", false}, {"off", false}, {"False", false},
  };
  for (const auto& [text, expected] : kCases) {
    EnvoyConfig c;
    ASSERT_TRUE(Load(std::string("domain: d\ndescriptors:\n  - key: k\n    shadow_mode: ") + text +
                         "\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
                     c))
        << text;
    EXPECT_EQ(c.domains.at("d").descriptors[0].shadow_mode, expected) << text;
  }
  EXPECT_EQ(LoadError("domain: d\ndescriptors:\n  - key: k\n    shadow_mode: yep\n"),
            "4:18: descriptors[0].shadow_mode: expected true or false, got 'yep'");
}

TEST(EnvoyConfigLoader, NewerEnvoyproxyKeys) {
  EnvoyConfig c;
  ASSERT_TRUE(Load(R"(
domain: d
descriptors:
  - key: model
    value: gpt-*
    quota_mode: false
    value_to_metric: true
    share_threshold: false
    metadata:
      backend: "pool-a"
      tags: [x, "y\"z"]
    rate_limit: {unit: minute, requests_per_unit: 60}
)",
                   c));
  const Descriptor& d = c.domains.at("d").descriptors[0];
  EXPECT_TRUE(d.value_to_metric);
  EXPECT_FALSE(d.share_threshold);
  // Loaded, but Sluice sends no dynamic_metadata: the log says so.
  EXPECT_EQ(c.warnings, std::vector<std::string>{
                            "test.yaml:10:7: descriptors[0].metadata: not sent to Envoy: Sluice "
                            "answers no dynamic_metadata (the descriptor matches and counts as "
                            "usual)"});
}

TEST(EnvoyConfigLoader, ErrorsInline) {
  EXPECT_EQ(LoadError("domain: d\ndescriptors:\n  - key: k\n    value: [1]\n"),
            "4:12: descriptors[0].value: expected a string");
  EXPECT_EQ(LoadError("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, "
                      "requests_per_unit: 4294967296}\n"),
            "4:48: descriptors[0].rate_limit.requests_per_unit: must be between 0 and "
            "4294967295, got 4294967296");
  EXPECT_EQ(LoadError("domain: d\ndescriptors:\n  - key: k\n    rate_limits:\n      - {unit: "
                      "day, requests_per_unit: 1, name: a}\n      - {unit: day, "
                      "requests_per_unit: 2, replaces: [{name: a}]}\n"),
            "6:61: descriptors[0].rate_limits[1].replaces[0].name: a limit cannot replace a "
            "limit of its own descriptor ('a')");
}

}  // namespace
}  // namespace sluice::rules::envoy
