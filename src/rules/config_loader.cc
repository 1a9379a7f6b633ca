#include "rules/config_loader.h"

#include "rules/config_file.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <new>
#include <optional>
#include <set>
#include <sstream>
#include <utility>

#include "algo/saturating.h"
#include "core/log.h"
#include "rules/address.h"
#include "rules/http_token.h"
#include "rules/path.h"
#include "rules/rule_set.h"
#include "store/redis/script.h"
#include "store/sync/sync_store.h"

namespace sluice::rules {
namespace {

// The first error found while reading; reading stops at it.
struct LoadError {
  YAML::Mark mark;
  std::string key;
  std::string message;
};

// A YAML node with the key path that led to it, for error messages.
class Node {
 public:
  Node(YAML::Node node, std::string key) : node_(std::move(node)), key_(std::move(key)) {}

  const YAML::Node& yaml() const { return node_; }
  const std::string& key() const { return key_; }

  [[noreturn]] void Fail(const std::string& message) const {
    if (empty_at_) throw LoadError{*empty_at_, key_, message + " (the value is empty, or null)"};
    throw LoadError{node_.Mark(), key_, message};
  }

  void ExpectMap() const {
    if (!node_.IsMap()) Fail("expected a mapping of keys to values");
  }
  void ExpectSequence() const {
    if (!node_.IsSequence()) Fail("expected a list");
  }
  // Fails on any key not in `allowed`.
  // Also refuses a key given twice: YAML parsers disagree on which one wins (yaml-cpp takes
  // the first), so a second `limit:` below the first would silently do nothing.
  void OnlyKeys(std::initializer_list<std::string_view> allowed) const {
    UniqueKeys();  // (and every key a string)
    for (const auto& kv : node_) {
      std::string k = kv.first.as<std::string>();
      if (std::find(allowed.begin(), allowed.end(), k) == allowed.end()) {
        throw LoadError{kv.first.Mark(), Join(k), "unknown key '" + k + "'"};
      }
    }
  }
  // A mapping whose keys are the config's own (tier names, regions): each once.
  void UniqueKeys() const {
    ExpectMap();
    std::set<std::string> seen;
    for (const auto& kv : node_) {
      if (!kv.first.IsScalar()) {
        throw LoadError{kv.first.Mark(), key_, "expected a string key, not a list or mapping"};
      }
      std::string k = kv.first.as<std::string>();
      if (!seen.insert(k).second) {
        throw LoadError{kv.first.Mark(), Join(k), "duplicate key '" + k + "'"};
      }
    }
  }
  // Lookups go through a const node: yaml-cpp's non-const operator[] may add the key.
  bool Has(std::string_view k) const {
    const YAML::Node& n = node_;
    return n.IsMap() && n[std::string(k)];
  }
  Node operator[](std::string_view k) const {
    const YAML::Node& n = node_;
    Node out{n[std::string(k)], Join(k)};
    // `k:` with no value: yaml-cpp marks an empty value with the token after it (the next
    // line's key, or past the end of the file); an error about it names the key's place.
    if (out.node_.IsDefined() && out.node_.IsNull() && n.IsMap()) {
      for (const auto& kv : n) {
        if (kv.first.IsScalar() && kv.first.Scalar() == k) {
          out.empty_at_ = kv.first.Mark();
          break;
        }
      }
    }
    return out;
  }
  Node at(size_t i) const {
    const YAML::Node& n = node_;
    return {n[i], key_ + "[" + std::to_string(i) + "]"};
  }

  // Control characters are refused in every string: in a name they reach /metrics labels
  // and log lines as they are, and a NUL cut every message that quoted the string short.
  std::string String() const {
    if (!node_.IsScalar()) Fail("expected a string");
    const std::string& s = node_.Scalar();
    if (std::any_of(s.begin(), s.end(), [](char c) {
          auto u = static_cast<unsigned char>(c);
          return u < 0x20 || u == 0x7f;
        })) {
      Fail("a control character in a string");
    }
    // The file's bytes are checked before parsing, but not what yaml-cpp decodes from
    // UTF-16 or UTF-32 (a lone surrogate comes out as invalid UTF-8).
    if (FirstNonUtf8(s) != std::string_view::npos) Fail("a string that is not valid Unicode");
    return s;
  }
  int64_t Integer(int64_t min) const {
    if (!node_.IsScalar()) Fail("expected a whole number");
    const std::string& s = node_.Scalar();
    int64_t v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec == std::errc::result_out_of_range) Fail("number out of range: " + s);
    if (ec != std::errc() || end != s.data() + s.size())
      Fail("expected a whole number, got '" + s + "'");
    if (v < min) Fail("must be >= " + std::to_string(min) + ", got " + s);
    return v;
  }
  int64_t Integer(int64_t min, int64_t max) const {
    int64_t v = Integer(std::numeric_limits<int64_t>::min());
    if (v < min || v > max) {
      Fail("must be between " + std::to_string(min) + " and " + std::to_string(max) + ", got " +
           node_.Scalar());
    }
    return v;
  }
  bool Bool() const {
    if (!node_.IsScalar()) Fail("expected true or false");
    const std::string& s = node_.Scalar();
    if (s == "true") return true;
    if (s == "false") return false;
    Fail("expected true or false, got '" + s + "'");
  }
  DurationUs Duration(DurationUs min = kMillisecond, DurationUs max = 3650 * kDay) const {
    std::string s = String();
    auto d = ParseDuration(s);
    if (!d || *d <= 0) Fail("bad duration '" + s + "' (examples: 250ms, 1s, 1m, 1h, 1d)");
    if (*d < min || *d > max) {
      Fail("must be between " + FormatDuration(min) + " and " + FormatDuration(max) + ", got " + s);
    }
    return *d;
  }

 private:
  std::string Join(std::string_view k) const {
    return key_.empty() ? std::string(k) : key_ + "." + std::string(k);
  }
  YAML::Node node_;
  std::string key_;
  std::optional<YAML::Mark> empty_at_;  // where the key of an empty value is
};

struct Shorthand {
  std::string_view key;
  DurationUs period;
};
// The seed's way of writing limits: requests_per_minute: 60.
constexpr Shorthand kShorthands[] = {
    {"requests_per_second", kSecond},
    {"requests_per_minute", kMinute},
    {"requests_per_hour", kHour},
    {"requests_per_day", kDay},
};

// Settings a rule passes down to its limits unless a limit sets its own, and what every
// limit is checked against.
struct LimitDefaults {
  Algorithm algorithm = Algorithm::kSlidingWindowCounter;
  int64_t burst = 0;
  std::optional<Node> burst_node;       // where `burst` was set, if it was
  const StoreConfig* store = nullptr;   // the config's store (read before any limit)
  const std::string* region = nullptr;  // the config's region (read before any limit)
};

Algorithm ReadAlgorithm(const Node& n) {
  std::string s = n.String();
  auto a = ParseAlgorithm(s);
  if (!a) {
    n.Fail("unknown algorithm '" + s +
           "' (one of fixed_window, sliding_window_log, sliding_window_counter, token_bucket, "
           "gcra, leaky_queue)");
  }
  return *a;
}

// A config's policy: valid, and without a setting its algorithm would read and ignore.
// An error about the burst points at `burst_at` (see BurstNode), any other at `n`.
void CheckPolicy(const Node& n, const Policy& p, const std::optional<Node>& burst_at = {}) {
  if (Status st = p.ValidateStrict(); !st.ok()) {
    (burst_at && st.message().starts_with("burst") ? *burst_at : n).Fail(st.message());
  }
}

// A shared store keeps counters in Redis, whose Lua script computes in IEEE doubles: the
// numbers a policy leads to must stay exact there (redis::ScriptExact says which). The
// message names the number to change. `limit_at` and `burst_at` are where it points.
void CheckFitsStore(const Node& limit_at, const Node& burst_at, const Policy& p,
                    const LimitDefaults& d) {
  if (d.store != nullptr && d.store->mode == StoreConfig::Mode::kLocalSync) {
    // Decided from counts per window that the syncer adds up in Redis (sync/sync_store.h).
    if (p.algorithm != Algorithm::kFixedWindow && p.algorithm != Algorithm::kSlidingWindowCounter) {
      limit_at.Fail("algorithm " + std::string(AlgorithmName(p.algorithm)) +
                    " cannot run with store mode local_sync, which adds up counts per window "
                    "(use fixed_window or sliding_window_counter, or mode remote)");
    }
    if (p.limit > sync::kMaxLimit) {
      limit_at.Fail("too large for store mode local_sync: the limit must be at most " +
                    std::to_string(sync::kMaxLimit));
    }
    if (p.period <= d.store->sync_interval) {
      limit_at.Fail(SyncIntervalTooLong(p.period, d.store->sync_interval));
    }
    return;
  }
  if (d.store == nullptr || !d.store->shared() || redis::ScriptExact(p)) return;
  constexpr int64_t kTwo53 = int64_t{1} << 53, kTwo52 = int64_t{1} << 52;
  const std::string store =
      "too large for the " + std::string(StoreTypeName(d.store->type)) + " store: ";
  const std::string hint = "; use a shorter window or the memory store";
  const std::string window = FormatDuration(p.period);
  const int64_t most = (kTwo53 - 1) / p.period;  // the largest count whose product fits
  switch (p.algorithm) {
    case Algorithm::kFixedWindow:
    case Algorithm::kSlidingWindowLog:
      limit_at.Fail(store + "limit must be below 2^52" + hint);
    case Algorithm::kSlidingWindowCounter:
    case Algorithm::kTokenBucket:
      if (p.limit > most) {
        limit_at.Fail(store + "limit x window must be below 2^53 microseconds (at most " +
                      std::to_string(most) + " per " + window + ")" + hint);
      }
      if (p.algorithm == Algorithm::kTokenBucket) {
        // Filling an empty bucket takes capacity x window / refill, plus a window of slack.
        auto cap = static_cast<int64_t>(
            algo::Div(algo::i128{kTwo52 - 1 - p.period} * p.limit, algo::i128{p.period}));
        burst_at.Fail(store + "a token bucket must fill within 2^52 microseconds (at most " +
                      std::to_string(std::max<int64_t>(cap, 0)) + " with " +
                      std::to_string(p.limit) + " per " + window + ")" + hint);
      }
      break;
    case Algorithm::kGcra:
    case Algorithm::kLeakyQueue: {
      auto interval =
          static_cast<int64_t>(algo::CeilDiv(algo::i128{p.period}, algo::i128{p.limit}));
      burst_at.Fail(store + "burst x (window / limit) must be below 2^52 microseconds (at most " +
                    std::to_string((kTwo52 - 1) / interval) + " with " + std::to_string(p.limit) +
                    " per " + window + ")" + hint);
    }
  }
  limit_at.Fail(store + "the limit's numbers are too large for exact arithmetic" + hint);
}

// Where an error about a limit's burst points: its own `burst`, else the rule's, else
// `fallback` (a burst of 0 is the limit, which is checked first).
Node BurstNode(const Node& n, const LimitDefaults& d, const Node& fallback) {
  if (n.Has("burst")) return n["burst"];
  return d.burst_node ? *d.burst_node : fallback;
}

std::string ReadRegion(const Node& n);

// This region's share of a global limit (partitioned limits): `regions: {us-east: 400, ...}`
// beside the limit, read with the config's top-level `region:`.
int64_t RegionalShare(const Node& n, int64_t global, const LimitDefaults& d) {
  n.UniqueKeys();
  if (d.store != nullptr && !d.store->peers.empty()) {
    n.Fail("regional shares and store peers both split a global limit; use one of them");
  }
  if (d.region == nullptr || d.region->empty()) {
    n.Fail("regional shares need a top-level 'region:' naming this node's region");
  }
  if (n.yaml().size() == 0) n.Fail("no regions: give each region its share of the limit");
  int64_t sum = 0, mine = -1;
  std::string names;
  for (const auto& kv : n.yaml()) {
    std::string region = kv.first.as<std::string>();
    // The same names as the top-level region's: a share of a name no node can have is
    // never enforced.
    ReadRegion(Node(kv.first, n[region].key()));
    int64_t share = n[region].Integer(1);
    sum = algo::SatAdd(sum, share);
    names += (names.empty() ? "" : ", ") + region;
    if (region == *d.region) mine = share;
  }
  if (sum > global) {
    n.Fail("the regions' shares add up to " + std::to_string(sum) + ", more than the limit " +
           std::to_string(global));
  }
  if (mine < 0)
    n.Fail("no share for this node's region '" + *d.region + "' (regions: " + names + ")");
  return mine;
}

// LimitSpec::store_scope of a limit written beside `n`: its region when it is a share.
std::string StoreScope(const Node& n, const LimitDefaults& d) {
  return n.Has("regions") ? "@" + *d.region : std::string();
}

// A limit written as a mapping: {limit, window, algorithm, burst, name, regions}.
LimitSpec ReadLimit(const Node& n, const std::string& name, const LimitDefaults& d) {
  n.OnlyKeys({"limit", "window", "algorithm", "burst", "name", "regions"});
  if (!n.Has("limit")) n.Fail("missing 'limit'");
  if (!n.Has("window")) n.Fail("missing 'window'");
  Policy p;
  p.limit = n["limit"].Integer(0);
  if (n.Has("regions")) p.limit = RegionalShare(n["regions"], p.limit, d);
  p.period = n["window"].Duration();
  p.algorithm = n.Has("algorithm") ? ReadAlgorithm(n["algorithm"]) : d.algorithm;
  p.burst = n.Has("burst") ? n["burst"].Integer(0) : d.burst;
  CheckPolicy(n, p, BurstNode(n, d, n["limit"]));
  CheckFitsStore(n["limit"], BurstNode(n, d, n["limit"]), p, d);
  return {n.Has("name") ? n["name"].String() : name, p, StoreScope(n, d)};
}

// The limits written directly in a rule or tier: limit+window, requests_per_*, limits: [...].
std::vector<LimitSpec> ReadLimits(const Node& n, const std::string& prefix,
                                  const LimitDefaults& d) {
  std::vector<LimitSpec> out;
  if (n.Has("regions")) {
    // Shares are of one limit: beside `limit` and `window` alone, or in each list entry.
    bool others = n.Has("limits");
    for (const auto& s : kShorthands) others = others || n.Has(s.key);
    if (!n.Has("limit") || others) {
      n["regions"].Fail(
          "regional shares go beside 'limit' and 'window' as the rule's only limit, or in "
          "each entry of 'limits'");
    }
  }
  if (n.Has("limit") || n.Has("window")) {
    if (!n.Has("limit")) n.Fail("'window' without 'limit'");
    if (!n.Has("window")) n.Fail("missing 'window' for 'limit'");
    Policy p;
    p.limit = n["limit"].Integer(0);
    if (n.Has("regions")) p.limit = RegionalShare(n["regions"], p.limit, d);
    p.period = n["window"].Duration();
    p.algorithm = d.algorithm;
    p.burst = d.burst;
    CheckPolicy(n, p, d.burst_node.value_or(n["limit"]));
    CheckFitsStore(n["limit"], d.burst_node.value_or(n["limit"]), p, d);
    out.push_back({prefix + "/limit", p, StoreScope(n, d)});
  }
  for (const auto& s : kShorthands) {
    if (!n.Has(s.key)) continue;
    Policy p{d.algorithm, n[s.key].Integer(0), s.period, d.burst};
    CheckPolicy(n, p, d.burst_node.value_or(n[s.key]));
    CheckFitsStore(n[s.key], d.burst_node.value_or(n[s.key]), p, d);
    out.push_back({prefix + "/" + std::string(s.key), p});
  }
  if (n.Has("limits")) {
    Node list = n["limits"];
    list.ExpectSequence();
    if (list.yaml().size() == 0) list.Fail("empty list of limits");
    std::set<std::string> names;
    for (const LimitSpec& l : out) names.insert(l.name);
    for (size_t i = 0; i < list.yaml().size(); ++i) {
      Node entry = list.at(i);
      LimitSpec spec = ReadLimit(entry, prefix + "/limits[" + std::to_string(i) + "]", d);
      // One name is one set of counters: twice in a rule, each request would spend twice.
      if (!names.insert(spec.name).second) {
        (entry.Has("name") ? entry["name"] : entry)
            .Fail("limit name '" + spec.name + "' is used twice in this rule");
      }
      out.push_back(std::move(spec));
    }
  }
  return out;
}

LimitDefaults ReadDefaults(const Node& n, const Config& config) {
  LimitDefaults d;
  d.store = &config.store;
  d.region = &config.region;
  if (n.Has("algorithm")) d.algorithm = ReadAlgorithm(n["algorithm"]);
  if (n.Has("burst")) {
    d.burst = n["burst"].Integer(0);
    d.burst_node.emplace(n["burst"]);  // not `=`: assigning a YAML::Node writes through it
  }
  return d;
}

// A rule's fail_mode, refused where it would do nothing.
void CheckRuleFailMode(const Node& n, const Config& config) {
  if (n.Has("fail_mode") && config.store.mode == StoreConfig::Mode::kLocalSync) {
    n["fail_mode"].Fail(
        "'fail_mode' does nothing with store mode local_sync: when Redis fails, decisions go "
        "on from local counts");
  }
}

FailMode ReadFailMode(const Node& n) {
  std::string s = n.String();
  auto m = ParseFailMode(s);
  if (!m) n.Fail("unknown fail_mode '" + s + "' (one of open, closed, local)");
  return *m;
}

// A header name is an HTTP token (RFC 9110 5.1): one with a space or a colon could never
// come in a request, and a key on it would always fall back to the address.
void CheckHeaderName(const Node& n, std::string_view name) {
  static constexpr std::string_view kTokenPunct = "!#$%&'*+-.^_`|~";
  for (char c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) &&
        kTokenPunct.find(c) == std::string_view::npos) {
      n.Fail("'" + std::string(name) +
             "' is not a header name (letters, digits and !#$%&'*+-.^_`|~)");
    }
  }
}

KeyPart ReadKeyPart(const Node& n, std::string_view text) {
  auto lower = [](std::string_view s) {
    std::string r(s);
    for (char& c : r) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return r;
  };
  if (text == "ip") return {KeyPart::Kind::kIp, ""};
  if (text == "user_id" || text == "user") return {KeyPart::Kind::kUserId, ""};
  if (text == "api_key") return {KeyPart::Kind::kApiKey, ""};
  if (text.starts_with("header:") && text.size() > 7) {
    CheckHeaderName(n, text.substr(7));
    return {KeyPart::Kind::kHeader, lower(text.substr(7))};
  }
  if (text.starts_with("query:") && text.size() > 6) {
    return {KeyPart::Kind::kQuery, std::string(text.substr(6))};
  }
  n.Fail("unknown key part '" + std::string(text) +
         "' (one of ip, user_id, api_key, header:NAME, query:NAME)");
}

// "ip", "user_id+ip", or a list of parts.
std::vector<KeyPart> ReadKey(const Node& n) {
  std::vector<KeyPart> parts;
  if (n.yaml().IsSequence()) {
    for (size_t i = 0; i < n.yaml().size(); ++i) {
      Node item = n.at(i);
      parts.push_back(ReadKeyPart(item, item.String()));
    }
  } else {
    std::string s = n.String();
    size_t start = 0;
    while (true) {
      size_t plus = s.find('+', start);
      parts.push_back(ReadKeyPart(n, std::string_view(s).substr(start, plus - start)));
      if (plus == std::string::npos) break;
      start = plus + 1;
    }
  }
  if (parts.empty()) n.Fail("empty key");
  return parts;
}

std::vector<std::string> ReadMethods(const Node& n) {
  std::vector<std::string> out;
  const bool many = n.yaml().IsSequence() && n.yaml().size() > 1;
  auto add = [&](const Node& item) {
    std::string m = item.String();
    for (char& c : m) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    if (m == "*" || m == "ANY") {
      // Beside other methods it would read as one more of them, while it means them all.
      if (many) {
        item.Fail("'" + item.String() +
                  "' stands for every method: give it alone, or list the methods");
      }
      return;
    }
    if (m.empty() || m.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZ") != std::string::npos) {
      item.Fail("bad method '" + item.String() + "'");
    }
    out.push_back(m);
  };
  if (n.yaml().IsSequence()) {
    if (n.yaml().size() == 0) n.Fail("an empty list matches no method: leave 'method' out for all");
    for (size_t i = 0; i < n.yaml().size(); ++i) add(n.at(i));
  } else {
    add(n);
  }
  return out;
}

void CheckPath(const Node& n, const std::string& path, const PathOptions& paths) {
  if (path.empty() || path[0] != '/') n.Fail("path must start with '/', got '" + path + "'");
  // Rules match the path alone: the rest would be dropped, and the rule would hold every
  // query of the path (key: query:NAME keys by a parameter).
  if (path.find_first_of("?#") != std::string::npos) {
    n.Fail("a path pattern holds no query or fragment, got '" + path +
           "' (rules match the path alone; key: query:NAME keys by a parameter)");
  }
  size_t star = path.find('*');
  if (star != std::string::npos && star + 1 != path.size()) {
    n.Fail("'*' may only end a path pattern, got '" + path + "'");
  }
  if (star != std::string::npos && path[star - 1] != '/') {
    n.Fail(
        "'*' must be a whole last segment ('/files/*' holds '/files' and every path below "
        "it), got '" +
        path + "'");
  }
  // A parameter is a whole segment, "{name}": "{id}.json" or "{id" would be taken as
  // text, which no request path holds (a raw brace is no URI character), and the rule
  // would never match. And patterns are normalized like request paths, which decodes "%7B"
  // and "%7D": a segment escaped as "%7Bid%7D" would become the parameter "{id}", matching
  // any segment (a brace within a segment, "a%7Bx", stays a literal).
  auto escaped = [](std::string_view s, char upper) {
    return s.size() >= 3 && s[0] == '%' && s[1] == '7' && (s[2] == upper || s[2] == upper + 32);
  };
  for (size_t start = 1; start <= path.size();) {
    const size_t end = std::min(path.find('/', start), path.size());
    const std::string_view seg = std::string_view(path).substr(start, end - start);
    const bool param = seg.size() >= 3 && seg.front() == '{' && seg.back() == '}' &&
                       seg.substr(1, seg.size() - 2).find_first_of("{}") == std::string::npos;
    if (!param && seg.find_first_of("{}") != std::string_view::npos) {
      n.Fail("a path parameter is a whole segment, '{name}'; got '" + std::string(seg) + "' in '" +
             path + "'");
    }
    if (!param && escaped(seg, 'B') && seg.size() >= 6 &&
        escaped(seg.substr(seg.size() - 3), 'D')) {
      n.Fail("the segment '" + std::string(seg) +
             "' decodes to a parameter ('{name}'), which matches any segment; got '" + path + "'");
    }
    start = end + 1;
  }
  // A pattern no request path could normalize to would never match: a bad %-escape, a
  // control character, an encoded NUL, an escaped '/' or '\\' that `paths:` refuses.
  if (!paths.allow_encoded_slashes && HasAmbiguousSlash(path)) {
    n.Fail("no request path can match '" + path +
           "' (a '\\', an escaped '/' or '\\', or a leading '//' gets 400 unless "
           "paths.allow_encoded_slashes)");
  }
  if (!NormalizePath(path.substr(0, star == std::string::npos ? path.size() : star),
                     PathOptions{.allow_encoded_slashes = true})) {
    n.Fail("no request path can match '" + path + "' (a bad %-escape or a control character)");
  }
}

// A tier's name, a key of `tiers`: a string as any other (no control characters: it
// reaches logs and /metrics), and not empty (an empty X-User-Tier names no tier).
std::string TierName(const YAML::Node& key, const Node& tiers) {
  std::string name = Node(key, tiers.key()).String();
  if (name.empty()) {
    throw LoadError{key.Mark(), tiers.key(),
                    "an empty tier name (a request naming no tier has none)"};
  }
  return name;
}

// Tier overrides on an endpoint: {pro: 100} (the rule's one limit, another number) or
// {pro: {limit: 100, window: 1m}} / {pro: {limits: [...]}}.
std::map<std::string, std::vector<LimitSpec>> ReadRuleTiers(const Node& n, const Rule& rule,
                                                            const LimitDefaults& d) {
  n.UniqueKeys();
  std::map<std::string, std::vector<LimitSpec>> out;
  for (const auto& kv : n.yaml()) {
    std::string tier = TierName(kv.first, n);
    Node t = n[tier];
    std::string prefix = rule.name + "/tiers." + tier;
    if (t.yaml().IsScalar()) {
      if (rule.limits.size() != 1) {
        t.Fail("a tier given as a number overrides a rule's single limit; this rule has " +
               std::to_string(rule.limits.size()) + " (give the tier its limits instead)");
      }
      LimitSpec l = rule.limits[0];
      // The number is the tier's whole limit; beside regional shares it would be this
      // region's alone, and every region would run the whole of it.
      if (!l.store_scope.empty()) {
        t.Fail(
            "a tier given as a number overrides the whole limit, and this rule's limit is "
            "split into regional shares (give the tier its limits, with their own 'regions')");
      }
      l.name = prefix;
      l.policy.limit = t.Integer(0);
      CheckPolicy(t, l.policy, t);
      CheckFitsStore(t, t, l.policy, d);
      out[tier] = {l};
    } else {
      t.OnlyKeys({"limit", "window", "limits", "requests_per_second", "requests_per_minute",
                  "requests_per_hour", "requests_per_day", "algorithm", "burst"});
      // The tier's own algorithm and burst, else the rule's: a pro tier with ten times the
      // limit would otherwise keep the burst sized for the rule's. A tier naming another
      // algorithm does not take the rule's burst along (it was set for the rule's).
      LimitDefaults td = d;
      if (t.Has("algorithm")) {
        td.algorithm = ReadAlgorithm(t["algorithm"]);
        td.burst = 0;
        td.burst_node.reset();
      }
      if (t.Has("burst")) {
        td.burst = t["burst"].Integer(0);
        td.burst_node.emplace(t["burst"]);
      }
      out[tier] = ReadLimits(t, prefix, td);
      if (out[tier].empty()) t.Fail("no limits for tier '" + tier + "'");
    }
  }
  return out;
}

void ReadRuleCommon(const Node& n, Rule& rule) {
  if (n.Has("key")) rule.key = ReadKey(n["key"]);
  // A cost of 0 would count nothing and refuse nothing: the rule's limits would do nothing.
  // (The decision API's cost 0, a peek, is a request's, not a rule's.)
  if (n.Has("cost")) rule.cost = n["cost"].Integer(1);
  if (n.Has("shadow")) rule.shadow = n["shadow"].Bool();
  if (n.Has("fail_mode")) rule.fail_mode = ReadFailMode(n["fail_mode"]);
}

// A cost above what one of the rule's limits admits at once (a window's limit, a bucket's
// burst) refuses every request the rule matches, forever: a mistake to report, not a rule
// to run. A limit of 0 refuses everything on purpose and is left alone.
void CheckCostFits(const Node& n, int64_t cost, const std::vector<LimitSpec>& limits) {
  if (!n.Has("cost")) return;
  for (const LimitSpec& l : limits) {
    int64_t most = l.policy.Capacity();
    if (most > 0 && cost > most) {
      n["cost"].Fail("cost " + std::to_string(cost) + " is more than limit '" + l.name +
                     "' admits at once (" + std::to_string(most) +
                     "): every request would be refused");
    }
  }
}

void CheckCostFits(const Node& n, const Rule& rule) {
  CheckCostFits(n, rule.cost, rule.limits);
  for (const auto& [tier, limits] : rule.tiers) CheckCostFits(n, rule.cost, limits);
}

// The name of a rule the config leaves unnamed: what it matches ("POST /api/login", or
// "/api/search" for any method), so it stays the same when rules are added or moved, and
// the rule keeps its counters across a reload (and across the nodes of a rolling change
// sharing one Redis), where a name by position would hand them to another rule. A second
// unnamed rule on the same method and path gets " #2", and so on; names the config gives
// explicitly are never taken.
struct RuleNames {
  std::set<std::string> taken;             // in use, the config's explicit ones included
  std::map<std::string, int> next_suffix;  // per unnamed base, the next " #N" to try
};
std::string UnnamedRuleName(const Rule& rule, RuleNames& names) {
  std::string base;
  for (const std::string& m : rule.methods) base += (base.empty() ? "" : ",") + m;
  base += (base.empty() ? "" : " ") + rule.path;
  std::string name = base;
  // Each base resumes where its last rule stopped: many rules on one path stay linear.
  int& i = names.next_suffix.try_emplace(base, 2).first->second;
  for (; names.taken.contains(name); ++i) name = base + " #" + std::to_string(i);
  return name;
}

// `names`: the rule's name is added to those taken.
Rule ReadEndpoint(const Node& n, const Config& config, RuleNames& names) {
  n.OnlyKeys({"name", "path", "method", "limit", "window", "limits", "requests_per_second",
              "requests_per_minute", "requests_per_hour", "requests_per_day", "key", "algorithm",
              "burst", "cost", "shadow", "fail_mode", "tiers", "regions"});
  Rule rule;
  if (!n.Has("path")) n.Fail("missing 'path'");
  rule.path = n["path"].String();
  CheckPath(n["path"], rule.path, config.paths);
  if (n.Has("method")) rule.methods = ReadMethods(n["method"]);
  rule.name = n.Has("name") ? n["name"].String() : UnnamedRuleName(rule, names);
  names.taken.insert(rule.name);
  CheckRuleFailMode(n, config);
  LimitDefaults d = ReadDefaults(n, config);
  rule.limits = ReadLimits(n, rule.name, d);
  if (rule.limits.empty()) n.Fail("missing 'limit' (or 'limits', or requests_per_*)");
  rule.key = {KeyPart{KeyPart::Kind::kIp, ""}};
  ReadRuleCommon(n, rule);
  if (n.Has("tiers")) rule.tiers = ReadRuleTiers(n["tiers"], rule, d);
  CheckCostFits(n, rule);
  return rule;
}

Rule ReadDefault(const Node& n, const Config& config) {
  n.OnlyKeys({"limit", "window", "limits", "requests_per_second", "requests_per_minute",
              "requests_per_hour", "requests_per_day", "key", "algorithm", "burst", "cost",
              "shadow", "fail_mode", "regions"});
  Rule rule;
  rule.name = "default";
  rule.path = "/*";
  rule.key = {KeyPart{KeyPart::Kind::kIp, ""}};
  CheckRuleFailMode(n, config);
  rule.limits = ReadLimits(n, "default", ReadDefaults(n, config));
  // With no limit the default rule limits nothing, and what it sets would do nothing: most
  // likely the limit was left out.
  if (rule.limits.empty()) {
    for (const char* key : {"key", "algorithm", "burst", "cost", "shadow", "fail_mode"}) {
      if (n.Has(key)) {
        n[key].Fail(std::string("'") + key +
                    "' on a default rule without limits does nothing (give it 'limit' and "
                    "'window', or 'limits')");
      }
    }
  }
  ReadRuleCommon(n, rule);
  CheckCostFits(n, rule);
  return rule;
}

void ReadKeySources(const Node& n, KeySources& k) {
  n.OnlyKeys({"user_id", "api_key", "tier", "from_trusted_proxies_only"});
  if (n.Has("from_trusted_proxies_only")) {
    k.from_trusted_proxies_only = n["from_trusted_proxies_only"].Bool();
  }
  auto header = [](const Node& part) {
    part.OnlyKeys({"header"});
    if (!part.Has("header")) part.Fail("missing 'header'");
    std::string h = part["header"].String();
    if (h.empty()) part["header"].Fail("empty header name");
    CheckHeaderName(part["header"], h);
    return h;
  };
  if (n.Has("user_id")) k.user_id_header = header(n["user_id"]);
  if (n.Has("api_key")) k.api_key_header = header(n["api_key"]);
  if (n.Has("tier")) k.tier_header = header(n["tier"]);
}

// The value of the environment variable a `*_env` key names (a secret kept out of the file).
std::string ReadEnvValue(const Node& env) {
  std::string var = env.String();
  if (var.empty()) env.Fail("empty variable name");
  const char* value = std::getenv(var.c_str());
  if (value == nullptr) env.Fail("environment variable '" + var + "' is not set");
  return value;
}

std::string ReadAddress(const Node& n) {
  std::string s = n.String();
  if (!IsHostPort(s)) {
    n.Fail("bad address '" + s +
           "' (expected host:port with a port in 1..65535; IPv6 as [::1]:6379)");
  }
  return s;
}

// A region's name: part of Redis keys, so plain characters only; and lowercase, because
// one region's nodes find another's totals by the name the other wrote: "US-East" beside
// "us-east" would be two regions that never see each other.
std::string ReadRegion(const Node& n) {
  std::string r = n.String();
  if (r.empty() ||
      r.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789-_.") != std::string::npos) {
    n.Fail("bad region name '" + r + "' (lowercase letters, digits, '-', '_' and '.')");
  }
  return r;
}

// mode, sync_interval and peers: the hybrid (local + sync) mode and multi-region.
void ReadSyncMode(const Node& n, StoreConfig& s) {
  if (n.Has("mode")) {
    Node m = n["mode"];
    std::string name = m.String();
    auto mode = ParseStoreMode(name);
    if (!mode) m.Fail("unknown store mode '" + name + "' (one of remote, local_sync)");
    s.mode = *mode;
    if (s.mode == StoreConfig::Mode::kLocalSync && s.type == StoreConfig::Type::kMemory) {
      m.Fail("mode local_sync needs type redis or redis-cluster (the store type is " +
             std::string(StoreTypeName(s.type)) + ")");
    }
  }
  const bool local_sync = s.mode == StoreConfig::Mode::kLocalSync;
  if (n.Has("sync_interval")) {
    Node i = n["sync_interval"];
    if (!local_sync) i.Fail("sync_interval needs mode local_sync");
    s.sync_interval = i.Duration(kMillisecond, kMinute);
  }
  if (n.Has("peers")) {
    Node list = n["peers"];
    if (!local_sync) list.Fail("peers need mode local_sync");
    list.ExpectSequence();
    for (size_t i = 0; i < list.yaml().size(); ++i) {
      Node p = list.at(i);
      p.OnlyKeys({"region", "address"});
      if (!p.Has("region")) p.Fail("missing 'region'");
      if (!p.Has("address")) p.Fail("missing 'address'");
      StoreConfig::Peer peer{ReadRegion(p["region"]), ReadAddress(p["address"])};
      for (const auto& other : s.peers) {
        if (other.region == peer.region)
          p["region"].Fail("duplicate peer region '" + peer.region + "'");
      }
      s.peers.push_back(std::move(peer));
    }
  }
}

// A PEM file as the TLS setup will read it: a regular file of bounded size (as a config
// file is read, so that /dev/zero or a FIFO named here fails the load rather than the
// process or the reload thread), holding what its key names, so that `sluice validate`
// refuses what `serve` would fail on.
std::string ReadPemFile(const Node& n, std::string_view pem_end, std::string_view what) {
  std::string path = n.String();
  std::string text;
  if (Status st = ReadConfigFile(path, &text); !st.ok()) {
    std::string_view why = st.message();  // "<path>: <reason>"
    why.remove_prefix(std::min(why.size(), path.size() + 2));
    n.Fail("cannot read '" + path + "': " + std::string(why));
  }
  if (text.find(pem_end) == std::string::npos) {
    n.Fail("'" + path + "' holds no PEM " + std::string(what));
  }
  return path;
}

StoreConfig ReadStore(const Node& n) {
  n.OnlyKeys({"type", "address", "addresses", "username", "password", "password_env", "tls",
              "connect_timeout", "timeout", "pool_size", "key_prefix", "fail_mode",
              "circuit_breaker", "mode", "sync_interval", "peers"});
  StoreConfig s;
  if (n.Has("type")) {
    Node t = n["type"];
    std::string name = t.String();
    auto type = ParseStoreType(name);
    if (!type) t.Fail("unknown store type '" + name + "' (one of memory, redis, redis-cluster)");
    s.type = *type;
  }
  if (n.Has("address") && n.Has("addresses")) {
    n["addresses"].Fail("give 'address' or 'addresses', not both");
  }
  // Errors about the number of addresses point at what gave them, else at the section.
  Node where = n.Has("address") ? n["address"] : n.Has("addresses") ? n["addresses"] : n;
  if (!s.shared() && (n.Has("address") || n.Has("addresses"))) {
    where.Fail("addresses need type redis or redis-cluster (the store type is memory)");
  }
  if (n.Has("address")) s.addresses.push_back(ReadAddress(n["address"]));
  if (n.Has("addresses")) {
    Node list = n["addresses"];
    list.ExpectSequence();
    for (size_t i = 0; i < list.yaml().size(); ++i) s.addresses.push_back(ReadAddress(list.at(i)));
  }
  if (s.type == StoreConfig::Type::kRedis && s.addresses.empty()) {
    where.Fail("type redis needs an 'address'");
  }
  if (s.type == StoreConfig::Type::kRedis && s.addresses.size() > 1) {
    where.Fail("type redis takes one address, got " + std::to_string(s.addresses.size()) +
               " (for several nodes use type redis-cluster)");
  }
  if (s.type == StoreConfig::Type::kRedisCluster && s.addresses.empty()) {
    where.Fail("type redis-cluster needs at least one seed address in 'addresses'");
  }
  if (n.Has("username")) s.username = n["username"].String();
  if (n.Has("password")) s.password = n["password"].String();
  if (n.Has("password_env")) {
    Node env = n["password_env"];
    if (n.Has("password")) env.Fail("give 'password' or 'password_env', not both");
    s.password = ReadEnvValue(env);
  }
  if (n.Has("tls")) {
    Node t = n["tls"];
    if (t.yaml().IsMap()) {
      t.OnlyKeys({"ca_file", "cert_file", "key_file", "server_name", "verify"});
      s.tls = true;
      auto file = [&](std::string_view key, std::string* out, std::string_view pem_end,
                      std::string_view what) {
        if (t.Has(key)) *out = ReadPemFile(t[key], pem_end, what);
      };
      if (t.Has("cert_file") != t.Has("key_file")) {
        t.Fail("'cert_file' and 'key_file' go together");
      }
      file("ca_file", &s.tls_ca_file, "CERTIFICATE-----", "certificate");
      file("cert_file", &s.tls_cert_file, "CERTIFICATE-----", "certificate");
      file("key_file", &s.tls_key_file, "PRIVATE KEY-----", "private key");
      if (t.Has("server_name")) s.tls_server_name = t["server_name"].String();
      if (t.Has("verify")) s.tls_verify = t["verify"].Bool();
    } else {
      s.tls = t.Bool();
    }
  }
  if (n.Has("connect_timeout")) {
    s.connect_timeout = n["connect_timeout"].Duration(kMillisecond, kMinute);
  }
  if (n.Has("timeout")) s.timeout = n["timeout"].Duration(kMillisecond, 10 * kSecond);
  if (n.Has("pool_size")) s.pool_size = static_cast<int>(n["pool_size"].Integer(1, 64));
  if (n.Has("key_prefix")) {
    s.key_prefix = n["key_prefix"].String();
    if (s.key_prefix.find_first_of("{}") != std::string::npos) {
      n["key_prefix"].Fail("must not contain '{' or '}' (they choose Redis Cluster hash slots)");
    }
  }
  if (n.Has("fail_mode")) s.fail_mode = ReadFailMode(n["fail_mode"]);
  if (n.Has("circuit_breaker")) {
    Node b = n["circuit_breaker"];
    b.OnlyKeys({"failures", "open_for"});
    if (b.Has("failures")) s.breaker_failures = static_cast<int>(b["failures"].Integer(1, 1000000));
    if (b.Has("open_for")) s.breaker_open_for = b["open_for"].Duration(kMillisecond, kHour);
  }
  ReadSyncMode(n, s);
  // What only the remote mode's request-path calls read would do nothing with local_sync,
  // whose decisions never wait for Redis: the user should hear it rather than trust it.
  if (s.mode == StoreConfig::Mode::kLocalSync) {
    static constexpr std::pair<std::string_view, std::string_view> kUnused[] = {
        {"timeout", "no decision waits for Redis (a sync round's deadline is sync_interval)"},
        {"pool_size", "the syncer has one connection per Redis node"},
        {"fail_mode", "when Redis fails, decisions go on from local counts"},
        {"circuit_breaker", "a failed sync round is retried the next sync_interval"},
    };
    for (const auto& [key, why] : kUnused) {
      if (n.Has(key)) {
        n[key].Fail("'" + std::string(key) +
                    "' does nothing with mode local_sync: " + std::string(why));
      }
    }
  }
  // What only a shared store reads would do nothing with the memory store: most likely
  // `type: redis` was forgotten, and the user should hear it rather than run unshared.
  if (!s.shared()) {
    for (std::string_view key :
         {"username", "password", "password_env", "tls", "connect_timeout", "timeout", "pool_size",
          "key_prefix", "fail_mode", "circuit_breaker"}) {
      if (n.Has(key)) {
        n[key].Fail("'" + std::string(key) +
                    "' needs type redis or redis-cluster (the store type is memory)");
      }
    }
  }
  return s;
}

// "IP:PORT" as the listeners bind it (ParseListenAddress).
std::string ReadListenAddress(const Node& n) {
  std::string s = n.String();
  if (!ParseListenAddress(s)) n.Fail("bad address '" + s + "' (IP:PORT; IPv6 as [::1]:PORT)");
  return s;
}

// As gateway mode's --upstream (ParseUpstreamUrl).
std::string ReadUpstreamUrl(const Node& n) {
  std::string s = n.String();
  if (!ParseUpstreamUrl(s))
    n.Fail("bad upstream '" + s + "' (http://HOST:PORT; https is not supported)");
  return s;
}

// The server section's settings of Envoy's rate limit service, as its flags give them.
void ReadRlsSettings(const Node& n, ServerSettings* s) {
  if (!n.Has("envoy_config")) {
    // Without it no gRPC port opens and no RLS answer is made: such a setting would do
    // nothing, so it is refused rather than ignored (as its flag is).
    for (std::string_view key :
         {"grpc", "grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca", "rls_headers",
          "rls_limit_header", "rls_remaining_header", "rls_reset_header", "rls_shadow",
          "envoy_merge_domains", "grpc_max_buffered_mib"}) {
      if (n.Has(key)) {
        n[key].Fail("'" + std::string(key) +
                    "' needs 'envoy_config' (the directory of Envoy rate limit configs)");
      }
    }
    return;
  }
  Node dir = n["envoy_config"];
  s->envoy_config = dir.String();
  if (s->envoy_config->empty()) dir.Fail("an empty path");
  if (n.Has("grpc")) s->grpc = ReadListenAddress(n["grpc"]);
  if (n.Has("grpc_tls_cert") != n.Has("grpc_tls_key")) {
    n[n.Has("grpc_tls_cert") ? "grpc_tls_cert" : "grpc_tls_key"].Fail(
        "'grpc_tls_cert' and 'grpc_tls_key' go together");
  }
  if (n.Has("grpc_tls_client_ca") && !n.Has("grpc_tls_cert")) {
    n["grpc_tls_client_ca"].Fail(
        "'grpc_tls_client_ca' needs 'grpc_tls_cert' and 'grpc_tls_key' (mutual TLS is TLS)");
  }
  if (n.Has("grpc_tls_cert")) {
    s->grpc_tls_cert = ReadPemFile(n["grpc_tls_cert"], "CERTIFICATE-----", "certificate");
    s->grpc_tls_key = ReadPemFile(n["grpc_tls_key"], "PRIVATE KEY-----", "private key");
  }
  if (n.Has("grpc_tls_client_ca")) {
    s->grpc_tls_client_ca = ReadPemFile(n["grpc_tls_client_ca"], "CERTIFICATE-----", "certificate");
  }
  for (auto [key, out] : {std::pair{"rls_limit_header", &s->rls_limit_header},
                          std::pair{"rls_remaining_header", &s->rls_remaining_header},
                          std::pair{"rls_reset_header", &s->rls_reset_header}}) {
    if (!n.Has(key)) continue;
    Node h = n[key];
    std::string name = h.String();
    if (!IsToken(name)) h.Fail("'" + name + "' is not a header name");
    *out = name;
  }
  for (auto [key, out] :
       {std::pair{"rls_headers", &s->rls_headers}, std::pair{"rls_shadow", &s->rls_shadow},
        std::pair{"envoy_merge_domains", &s->envoy_merge_domains}}) {
    if (n.Has(key)) *out = n[key].Bool();
  }
  if (n.Has("grpc_max_buffered_mib")) {
    s->grpc_max_buffered_mib = n["grpc_max_buffered_mib"].Integer(1, 1 << 20);
  }
}

ServerSettings ReadServer(const Node& n) {
  n.OnlyKeys({"listen",
              "admin",
              "admin_token",
              "admin_token_env",
              "upstream",
              "upstream_timeout",
              "read_timeout",
              "idle_timeout",
              "drain_timeout",
              "threads",
              "max_keys",
              "max_connections",
              "max_connections_per_ip",
              "max_request_body",
              "max_batch_checks",
              "max_buffered_mib",
              "log_format",
              "envoy_config",
              "grpc",
              "grpc_tls_cert",
              "grpc_tls_key",
              "grpc_tls_client_ca",
              "rls_headers",
              "rls_limit_header",
              "rls_remaining_header",
              "rls_reset_header",
              "rls_shadow",
              "envoy_merge_domains",
              "grpc_max_buffered_mib"});
  ServerSettings s;
  if (n.Has("listen")) s.listen = ReadListenAddress(n["listen"]);
  if (n.Has("admin")) s.admin = ReadListenAddress(n["admin"]);
  if (n.Has("admin_token") || n.Has("admin_token_env")) {
    Node at = n.Has("admin_token_env") ? n["admin_token_env"] : n["admin_token"];
    if (n.Has("admin_token") && n.Has("admin_token_env")) {
      at.Fail("give 'admin_token' or 'admin_token_env', not both");
    }
    const std::string token = n.Has("admin_token_env") ? ReadEnvValue(at) : at.String();
    // An Authorization header cannot carry what HTTP strips or forbids at a value's ends.
    if (token.empty() || std::any_of(token.begin(), token.end(), [](char c) {
          return static_cast<unsigned char>(c) <= ' ' || c == '\x7f';
        })) {
      at.Fail(
          "the admin token is empty or holds a space or control character, which no "
          "Authorization header can carry");
    }
    s.admin_token = token;
  }
  if (n.Has("upstream")) s.upstream = ReadUpstreamUrl(n["upstream"]);
  // The flags' bounds, in the file's units.
  const auto millis = [&](std::string_view key, DurationUs min) {
    return n[key].Duration(min, 3600 * kSecond) / kMillisecond;
  };
  if (n.Has("upstream_timeout")) s.upstream_timeout_ms = millis("upstream_timeout", kMillisecond);
  if (n.Has("read_timeout")) s.read_timeout_ms = millis("read_timeout", 100 * kMillisecond);
  if (n.Has("idle_timeout")) s.idle_timeout_ms = millis("idle_timeout", 100 * kMillisecond);
  if (n.Has("drain_timeout")) {
    // 0 stops at once, as --drain-timeout-ms 0 does.
    Node d = n["drain_timeout"];
    s.drain_timeout_ms = d.String() == "0" || ParseDuration(d.String()) == 0
                             ? 0
                             : millis("drain_timeout", kMillisecond);
  }
  const auto count = [&](std::string_view key, int64_t min, int64_t max) -> std::optional<int64_t> {
    if (!n.Has(key)) return std::nullopt;
    return n[key].Integer(min, max);
  };
  s.threads = count("threads", 0, 1024);
  s.max_keys = count("max_keys", 1, int64_t{1} << 40);
  s.max_connections = count("max_connections", 1, 1'000'000);
  s.max_connections_per_ip = count("max_connections_per_ip", 0, 1'000'000);
  s.max_request_body = count("max_request_body", 1, int64_t{1} << 32);
  s.max_batch_checks = count("max_batch_checks", 1, 1'000'000);
  s.max_buffered_mib = count("max_buffered_mib", 1, 1 << 20);
  if (n.Has("log_format")) {
    Node f = n["log_format"];
    std::string name = f.String();
    if (!ParseLogFormat(name)) f.Fail("unknown log format '" + name + "' (text or json)");
    s.log_format = name;
  }
  ReadRlsSettings(n, &s);
  return s;
}

Config ReadConfig(const YAML::Node& root, const std::string& source, bool rules_optional) {
  Node top(root, "");
  if (!root.IsDefined() || root.IsNull()) top.Fail("empty config");
  top.OnlyKeys({"rate_limits", "keys", "trusted_proxies", "forwarding_header", "ipv6_prefix",
                "paths", "response_headers", "store", "region", "decision_api", "server"});
  // The file's own Envoy config makes its rules optional too, as --envoy-config does.
  if (!top.Has("rate_limits") && !rules_optional &&
      !(top.Has("server") && top["server"].yaml().IsMap() && top["server"].Has("envoy_config"))) {
    top.Fail(
        "missing 'rate_limits' (a file with only the store: section goes with --envoy-config or "
        "server.envoy_config)");
  }
  Config c;
  c.source = source;
  // Read first, wherever it is in the file: a shared store bounds every limit.
  if (top.Has("store")) c.store = ReadStore(top["store"]);
  if (top.Has("region")) c.region = ReadRegion(top["region"]);
  if (top.Has("server")) c.server = ReadServer(top["server"]);
  // Before the rules too: whether a path pattern can match depends on it.
  if (top.Has("paths")) {
    Node p = top["paths"];
    p.OnlyKeys({"case_insensitive", "strip_trailing_slash", "strip_path_parameters",
                "allow_encoded_slashes"});
    if (p.Has("case_insensitive")) c.paths.case_insensitive = p["case_insensitive"].Bool();
    if (p.Has("strip_trailing_slash")) {
      c.paths.strip_trailing_slash = p["strip_trailing_slash"].Bool();
    }
    if (p.Has("allow_encoded_slashes")) {
      c.paths.allow_encoded_slashes = p["allow_encoded_slashes"].Bool();
    }
    if (p.Has("strip_path_parameters")) {
      c.paths.strip_path_parameters = p["strip_path_parameters"].Bool();
    }
  }
  if (!c.store.peers.empty()) {
    if (c.region.empty())
      top["store"]["peers"].Fail("peers need a top-level 'region:' naming this node's region");
    for (size_t i = 0; i < c.store.peers.size(); ++i) {
      if (c.store.peers[i].region == c.region) {
        top["store"]["peers"].at(i)["region"].Fail("peer region '" + c.region +
                                                   "' is this node's own region");
      }
      // This region's totals written into its own Redis under another name: nothing reads
      // them, and the peer region never hears of this one.
      for (const std::string& own : c.store.addresses) {
        const std::string& peer = c.store.peers[i].address;
        if (peer.size() == own.size() &&
            std::equal(peer.begin(), peer.end(), own.begin(), [](char a, char b) {
              return std::tolower(static_cast<unsigned char>(a)) ==
                     std::tolower(static_cast<unsigned char>(b));
            })) {
          top["store"]["peers"].at(i)["address"].Fail(
              own + " is this region's own Redis (store.address); a peer is another region's");
        }
      }
    }
  }
  if (!top.Has("rate_limits")) {
    // The HTTP listener of a service whose limits are Envoy's keeps the embedded default.
    c.default_rule = DefaultConfig().default_rule;
  } else {
    Node rl = top["rate_limits"];
    rl.OnlyKeys({"default", "endpoints", "tiers"});
    c.default_rule.name = "default";
    c.default_rule.path = "/*";
    c.default_rule.key = {KeyPart{KeyPart::Kind::kIp, ""}};
    if (rl.Has("default")) c.default_rule = ReadDefault(rl["default"], c);
    if (rl.Has("endpoints")) {
      Node eps = rl["endpoints"];
      eps.ExpectSequence();
      // The explicit names first: an unnamed rule's name is made to avoid them all.
      RuleNames names;
      names.taken = {"default"};
      std::set<std::string> named;
      for (size_t i = 0; i < eps.yaml().size(); ++i) {
        Node ep = eps.at(i);
        if (!ep.yaml().IsMap() || !ep.Has("name")) continue;
        Node name = ep["name"];
        std::string text = name.String();
        if (text.empty()) name.Fail("empty rule name");
        // The default rule's counters, metrics and limit names are "default"'s.
        if (text == "default") name.Fail("the name 'default' is the default rule's");
        // /metrics counts rules past its 1024th under that name.
        if (text == "(other)")
          name.Fail("the name '(other)' is the metrics' (rules past the 1024th)");
        if (text.starts_with("tiers.")) {
          name.Fail("names beginning 'tiers.' are the top-level tiers' (their limits' names)");
        }
        if (!named.insert(text).second) ep.Fail("duplicate rule name '" + text + "'");
        names.taken.insert(text);
      }
      for (size_t i = 0; i < eps.yaml().size(); ++i) {
        c.endpoints.push_back(ReadEndpoint(eps.at(i), c, names));
      }
    }
    if (rl.Has("tiers")) {
      Node tiers = rl["tiers"];
      tiers.UniqueKeys();
      for (const auto& kv : tiers.yaml()) {
        std::string tier = TierName(kv.first, tiers);
        Node t = tiers[tier];
        t.OnlyKeys({"limit", "window", "limits", "requests_per_second", "requests_per_minute",
                    "requests_per_hour", "requests_per_day", "algorithm", "burst"});
        auto limits = ReadLimits(t, "tiers." + tier, ReadDefaults(t, c));
        if (limits.empty()) t.Fail("no limits for tier '" + tier + "'");
        c.tiers[tier] = std::move(limits);
      }
      // The top-level tiers replace the default rule's limits: its cost must fit theirs too.
      if (rl.Has("default")) {
        for (const auto& [tier, limits] : c.tiers) {
          CheckCostFits(rl["default"], c.default_rule.cost, limits);
        }
      }
    }
  }
  if (top.Has("keys")) ReadKeySources(top["keys"], c.keys);
  if (top.Has("trusted_proxies")) {
    Node tp = top["trusted_proxies"];
    tp.ExpectSequence();
    for (size_t i = 0; i < tp.yaml().size(); ++i) {
      Node item = tp.at(i);
      auto cidr = Cidr::Parse(item.String());
      if (!cidr) item.Fail("bad address or CIDR '" + item.String() + "'");
      c.trusted_proxies.push_back(*cidr);
    }
  }
  if (top.Has("forwarding_header")) {
    std::string h = top["forwarding_header"].String();
    for (char& ch : h) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (h == "x-forwarded-for") {
      c.forwarding_header = Config::ForwardingHeader::kXForwardedFor;
    } else if (h == "forwarded") {
      c.forwarding_header = Config::ForwardingHeader::kForwarded;
    } else {
      top["forwarding_header"].Fail("must be x-forwarded-for or forwarded, got '" +
                                    top["forwarding_header"].String() + "'");
    }
  }
  if (top.Has("ipv6_prefix")) {
    int64_t prefix = top["ipv6_prefix"].Integer(1);  // checked before it is narrowed
    if (prefix > 128) top["ipv6_prefix"].Fail("must be <= 128");
    c.ipv6_prefix = static_cast<int>(prefix);
  }
  if (top.Has("response_headers")) {
    Node h = top["response_headers"];
    h.OnlyKeys({"ietf"});
    if (h.Has("ietf")) c.ietf_headers = h["ietf"].Bool();
  }
  if (top.Has("decision_api")) {
    Node d = top["decision_api"];
    d.OnlyKeys({"trust_loopback"});
    if (d.Has("trust_loopback")) c.decision_api_trusts_loopback = d["trust_loopback"].Bool();
  }
  // A rule an earlier one shadows (it matches every method and path, paths: settings
  // applied) would never decide a request: its limits would silently do nothing.
  if (!c.endpoints.empty()) {
    if (auto dead = RuleSet(c).FirstUnreachable()) {
      const auto [later, earlier] = *dead;
      top["rate_limits"]["endpoints"].at(later).Fail(
          "rule '" + c.endpoints[later].name + "' can never match: rule '" +
          c.endpoints[earlier].name +
          "' before it matches every request it would (rules match in file order: put the "
          "narrower rule first, or remove it)");
    }
  }
  // Valid, but the identity headers could never count: a config that says what it wants
  // and cannot get it is said aloud, not left to surprise the operator under load.
  if (c.keys.from_trusted_proxies_only && c.trusted_proxies.empty()) {
    c.warnings.push_back(Located(
        source, top["keys"]["from_trusted_proxies_only"].yaml().Mark(),
        "keys.from_trusted_proxies_only",
        "no trusted_proxies are set, so the gateway reads " + c.keys.user_id_header + ", " +
            c.keys.api_key_header + " and " + c.keys.tier_header +
            " from no one (rules keyed on them count by client address) and the decision API " +
            (c.decision_api_trusts_loopback ? "takes them from loopback callers only"
                                            : "from no caller")));
  }
  return c;
}

Status Format(const std::string& source, const YAML::Mark& mark, const std::string& key,
              const std::string& message) {
  return Status::Invalid(Located(source, mark, key, message));
}

}  // namespace

Status LoadConfigText(std::string_view yaml, const std::string& source, Config* out,
                      bool rules_optional) {
  try {
    // A later document ("---") would be read by nothing: its rules would silently not
    // exist. (Kubernetes tooling joins manifests that way; a config is one document. A
    // file with empty documents, or that only ends with "---", is fine.)
    const YamlScan scan = ScanYaml(yaml);
    if (scan.too_many) return Format(source, *scan.too_many, "", kTooManyYamlNodes);
    if (scan.later_document) {
      throw LoadError{*scan.later_document, "",
                      "a config file holds one YAML document; this is a later one ('---')"};
    }
    YAML::Node root = YAML::Load(std::string(yaml));
    if (auto why = ExpandedTooLarge(root)) return Format(source, root.Mark(), "", *why);
    *out = ReadConfig(root, source, rules_optional);
    return Status::Ok();
  } catch (const LoadError& e) {
    return Format(source, e.mark, e.key, e.message);
  } catch (const YAML::Exception& e) {
    return Format(source, e.mark, "", ExplainYamlError(yaml, e));
  } catch (const std::bad_alloc&) {
    return Status::Invalid(source + ": out of memory reading it");
  }
}

Status LoadConfigFile(const std::string& path, Config* out, bool rules_optional) {
  std::string text;
  if (Status st = ReadConfigFile(path, &text); !st.ok()) return st;
  return LoadConfigText(text, path, out, rules_optional);
}

}  // namespace sluice::rules
