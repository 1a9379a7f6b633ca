#include "rules/envoy_config.h"

#include "rules/config_file.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <new>
#include <set>
#include <sstream>
#include <system_error>

namespace sluice::rules::envoy {
namespace {

// requests_per_unit is a uint32 in envoyproxy/ratelimit and in the RLS response.
constexpr int64_t kMaxRequestsPerUnit = std::numeric_limits<uint32_t>::max();

struct UnitEntry {
  Unit unit;
  std::string_view name;
  DurationUs duration;
};
constexpr UnitEntry kUnits[] = {
    {Unit::kSecond, "second", kSecond}, {Unit::kMinute, "minute", kMinute},
    {Unit::kHour, "hour", kHour},       {Unit::kDay, "day", kDay},
    {Unit::kWeek, "week", 7 * kDay},    {Unit::kMonth, "month", 30 * kDay},
    {Unit::kYear, "year", 365 * kDay},
};

// Where something is in a file, for messages that point at two places.
struct Location {
  std::string source;
  int line = 0;  // 1-based
  int column = 0;

  std::string ToString() const {
    return source + ":" + std::to_string(line) + ":" + std::to_string(column);
  }
  // "LINE:COL" when in `here`, else "FILE:LINE:COL".
  std::string RelativeTo(const std::string& here) const {
    return source == here ? std::to_string(line) + ":" + std::to_string(column) : ToString();
  }
};

// The first error found while reading; reading stops at it.
struct LoadError {
  YAML::Mark mark;
  std::string key;
  std::string message;
};

// Where a key envoyproxy/ratelimit knows belongs, for one written elsewhere. Its loader
// takes any of its keys at any level and skips a misplaced one without a word (a descriptor
// with `unit` beside `key` has no limit at all); Sluice refuses it, and says where it goes.
std::string Belongs(std::string_view k) {
  std::string_view where;
  if (k == "unit" || k == "requests_per_unit" || k == "unlimited" || k == "replaces" ||
      k == "name") {
    where = "in a descriptor's 'rate_limit:'";
  } else if (k == "shadow_mode" || k == "detailed_metric" || k == "key" || k == "value" ||
             k == "descriptors" || k == "rate_limit") {
    where = "in a descriptor";
  } else if (k == "domain") {
    where = "at the top of the file";
  } else {
    return "";
  }
  return " here (it belongs " + std::string(where) + ")";
}

// A YAML node with the key path that led to it, for error messages.
class Node {
 public:
  Node(YAML::Node node, std::string key) : node_(std::move(node)), key_(std::move(key)) {}

  const YAML::Node& yaml() const { return node_; }
  const std::string& key() const { return key_; }
  Location Where(const std::string& source) const {
    return {source, node_.Mark().line + 1, node_.Mark().column + 1};
  }

  [[noreturn]] void Fail(const std::string& message) const {
    throw LoadError{node_.Mark(), key_, message};
  }

  void ExpectMap() const {
    if (!node_.IsMap()) Fail("expected a mapping of keys to values");
  }
  void ExpectSequence() const {
    if (!node_.IsSequence()) Fail("expected a list");
  }
  // Fails on a key not in `allowed`, and on a key given twice (yaml-cpp keeps both, and
  // lookups would see only the first).
  void OnlyKeys(std::initializer_list<std::string_view> allowed) const {
    ExpectMap();
    std::set<std::string, std::less<>> seen;
    for (const auto& kv : node_) {
      if (!kv.first.IsScalar()) throw LoadError{kv.first.Mark(), key_, "expected a string key"};
      const std::string& k = kv.first.Scalar();
      if (std::find(allowed.begin(), allowed.end(), k) == allowed.end()) {
        throw LoadError{kv.first.Mark(), Join(k), "unknown key '" + k + "'" + Belongs(k)};
      }
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
    return {n[std::string(k)], Join(k)};
  }
  Node at(size_t i) const {
    const YAML::Node& n = node_;
    return {n[i], key_ + "[" + std::to_string(i) + "]"};
  }

  std::string String() const {
    if (!node_.IsScalar()) Fail("expected a string");
    return node_.Scalar();
  }
  int64_t Integer(int64_t min, int64_t max) const {
    if (!node_.IsScalar()) Fail("expected a whole number");
    const std::string& s = node_.Scalar();
    int64_t v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec == std::errc::result_out_of_range) Fail("number out of range: " + s);
    if (ec != std::errc() || end != s.data() + s.size()) {
      Fail("expected a whole number, got '" + s + "'");
    }
    if (max == std::numeric_limits<int64_t>::max() && v < min) {
      Fail("must be >= " + std::to_string(min) + ", got " + s);
    }
    if (v < min || v > max) {
      Fail("must be between " + std::to_string(min) + " and " + std::to_string(max) + ", got " + s);
    }
    return v;
  }
  // YAML 1.1's booleans, as envoyproxy/ratelimit's YAML library reads them.
  bool Bool() const {
    if (!node_.IsScalar()) Fail("expected true or false");
    const std::string& s = node_.Scalar();
    for (std::string_view t :
         {"true", "True", "TRUE", "yes", "Yes", "YES", "y", "Y", "on", "On", "ON"}) {
      if (s == t) return true;
    }
    for (std::string_view f :
         {"false", "False", "FALSE", "no", "No", "NO", "n", "N", "off", "Off", "OFF"}) {
      if (s == f) return false;
    }
    Fail("expected true or false, got '" + s + "'");
  }

 private:
  std::string Join(std::string_view k) const {
    return key_.empty() ? std::string(k) : key_ + "." + std::string(k);
  }
  YAML::Node node_;
  std::string key_;
};

// ---- reading ----

// A descriptor of one list so far, filed by CompositeKey.
struct Sibling {
  Location where;
  std::string key;
  std::string what;  // Describe()
};

// What the files of one domain share: one file's, or several merged (merge_domains).
struct DomainContext {
  std::map<std::string, Sibling> siblings;  // the domain's top-level descriptors
  // The domain's limit names, and the names `replaces` refers to (with where), checked once
  // every file of the domain is read.
  std::set<std::string, std::less<>> names;
  struct Replaced {
    std::string name;
    Node node;
    std::string source;
  };
  std::vector<Replaced> replaced;
};

// What reading one file shares with the files before it, and with the rest of its domain.
struct Context {
  std::string source;  // the file's name, for Location
  // Every descriptor id and limit id of the config so far, and where each was written.
  std::map<std::string, Location, std::less<>>* descriptor_ids = nullptr;
  std::map<std::string, Location, std::less<>>* limit_ids = nullptr;
  DomainContext* domain = nullptr;               // the file's domain
  std::vector<std::string>* warnings = nullptr;  // EnvoyConfig::warnings
};

// A setting that loads but does not do what its writer may expect, for the operator's log.
void Warn(const Node& n, const std::string& source, std::vector<std::string>* warnings,
          const std::string& message) {
  warnings->push_back(Located(source, n.yaml().Mark(), n.key(), message));
}
void Warn(const Node& n, Context& ctx, const std::string& message) {
  Warn(n, ctx.source, ctx.warnings, message);
}

Algorithm ReadAlgorithm(const Node& n) {
  std::string s = n.String();
  auto a = ParseAlgorithm(s);
  if (!a) {
    n.Fail("unknown algorithm '" + s +
           "' (one of fixed_window, sliding_window_log, sliding_window_counter, token_bucket, "
           "gcra)");
  }
  // A leaky_queue admits a request and has it wait its turn; an RLS answer is OK or
  // OVER_LIMIT, and Envoy forwards an OK at once, so the queue's steady rate would be lost
  // without a word.
  if (*a == Algorithm::kLeakyQueue) {
    n.Fail(
        "leaky_queue delays requests, which an RLS answer cannot ask of Envoy (it forwards "
        "every OK at once); gcra is the same leaky bucket as a meter: it refuses what the "
        "queue would delay");
  }
  return *a;
}

bool UsesBurst(Algorithm a) { return a == Algorithm::kTokenBucket || a == Algorithm::kGcra; }

// `rate_limit`, or an entry of `rate_limits` (`in_list`: no `unlimited` there).
RateLimitSpec ReadLimit(const Node& n, bool in_list, std::vector<Node>* replaces_nodes) {
  if (in_list) {
    n.OnlyKeys({"unit", "requests_per_unit", "name", "replaces", "algorithm", "burst"});
  } else {
    n.OnlyKeys(
        {"unit", "requests_per_unit", "unlimited", "name", "replaces", "algorithm", "burst"});
  }
  RateLimitSpec s;
  if (n.Has("unlimited")) s.unlimited = n["unlimited"].Bool();
  if (n.Has("name")) s.name = n["name"].String();
  if (s.unlimited) {
    // envoyproxy/ratelimit rejects a unit with `unlimited: true` and ignores a
    // requests_per_unit; so does Sluice (the number must still be one).
    for (std::string_view k : {"unit", "algorithm", "burst"}) {
      if (n.Has(k)) {
        n[k].Fail("no '" + std::string(k) +
                  "' with 'unlimited: true' (an unlimited limit is never counted)");
      }
    }
    if (n.Has("requests_per_unit")) n["requests_per_unit"].Integer(0, kMaxRequestsPerUnit);
  } else {
    if (!n.Has("unit")) n.Fail("missing 'unit'");
    if (!n.Has("requests_per_unit")) {
      n.Fail("missing 'requests_per_unit' (0 blocks every request)");
    }
    Node u = n["unit"];
    std::string unit = u.String();
    auto parsed = ParseUnit(unit);
    if (!parsed) {
      u.Fail("unknown unit '" + unit + "' (one of second, minute, hour, day, week, month, year)");
    }
    s.unit = *parsed;
    s.policy.algorithm =
        n.Has("algorithm") ? ReadAlgorithm(n["algorithm"]) : Algorithm::kFixedWindow;
    s.policy.limit = n["requests_per_unit"].Integer(0, kMaxRequestsPerUnit);
    s.policy.period = UnitDuration(s.unit);
    if (n.Has("burst")) {
      Node b = n["burst"];
      s.policy.burst = b.Integer(0, std::numeric_limits<int64_t>::max());
      if (!UsesBurst(s.policy.algorithm)) {
        b.Fail(
            "'burst' needs an algorithm that uses it (token_bucket or gcra); "
            "the algorithm is " +
            std::string(AlgorithmName(s.policy.algorithm)));
      }
    }
    if (Status st = s.policy.ValidateStrict(); !st.ok()) {
      (n.Has("burst") && st.message().starts_with("burst") ? n["burst"] : n).Fail(st.message());
    }
  }
  if (n.Has("replaces")) {
    Node list = n["replaces"];
    list.ExpectSequence();
    for (size_t i = 0; i < list.yaml().size(); ++i) {
      Node r = list.at(i);
      r.OnlyKeys({"name"});
      if (!r.Has("name")) r.Fail("missing 'name'");
      Node name = r["name"];
      s.replaces.push_back(name.String());
      if (s.replaces.back().empty()) name.Fail("empty name");
      replaces_nodes->push_back(name);
    }
  }
  return s;
}

// Adds `id` to `ids`, or fails: ids must be unique in the whole config.
void ClaimId(std::map<std::string, Location, std::less<>>& ids, const std::string& id,
             const Node& n, const Context& ctx, std::string_view what) {
  auto [it, added] = ids.emplace(id, n.Where(ctx.source));
  if (!added) {
    n.Fail(std::string(what) + " id '" + id + "' is also the id of the " + std::string(what) +
           " at " + it->second.RelativeTo(ctx.source) +
           " (ids join keys with '.' and values with '_'; rename one)");
  }
}

void ReadDescriptorList(const Node& list, const std::string& parent_id,
                        std::vector<Descriptor>& out, DescriptorIndex& index, Context& ctx);

// The key envoyproxy/ratelimit files a descriptor under in its list: "key" or "key_value".
std::string CompositeKey(const Descriptor& d) { return d.value ? d.key + "_" + *d.value : d.key; }

// "key 'a'", "key 'a' with value 'b'".
std::string Describe(const Descriptor& d) {
  return "key '" + d.key + "'" + (d.value ? " with value '" + *d.value + "'" : "");
}

Descriptor ReadDescriptor(const Node& n, const std::string& parent_id, Context& ctx,
                          std::map<std::string, Sibling>& siblings) {
  n.OnlyKeys({"key", "value", "rate_limit", "rate_limits", "descriptors", "shadow_mode",
              "quota_mode", "detailed_metric", "value_to_metric", "share_threshold", "metadata"});
  Descriptor d;
  d.location = n.Where(ctx.source).ToString();
  if (!n.Has("key")) n.Fail("missing 'key'");
  d.key = n["key"].String();
  if (d.key.empty()) n["key"].Fail("empty key");
  if (n.Has("value") && !n["value"].yaml().IsNull()) {
    std::string v = n["value"].String();
    if (!v.empty()) d.value = std::move(v);
  }
  std::string composite = CompositeKey(d);
  auto [first, added] =
      siblings.emplace(composite, Sibling{n.Where(ctx.source), d.key, Describe(d)});
  if (!added) {
    std::string at = first->second.where.RelativeTo(ctx.source);
    if (first->second.key == d.key) {
      n.Fail("duplicate descriptor '" + composite + "' in this list (first at " + at + ")");
    }
    // Different descriptors, the same to envoyproxy/ratelimit, which rejects the config.
    n.Fail(Describe(d) + " collides with " + first->second.what + " at " + at +
           " (envoyproxy/ratelimit files both as '" + composite + "')");
  }
  d.id = parent_id + "." + composite;
  ClaimId(*ctx.descriptor_ids, d.id, n, ctx, "descriptor");

  if (n.Has("shadow_mode")) d.shadow_mode = n["shadow_mode"].Bool();
  // envoyproxy/ratelimit's quota mode lets a request over its quota through and reports it
  // in metadata. Sluice does neither, so it would refuse what the config means to allow.
  if (n.Has("quota_mode") && n["quota_mode"].Bool()) {
    n["quota_mode"].Fail(
        "quota_mode (allow over the quota and report it in metadata) is not supported: Sluice "
        "would refuse those requests (shadow_mode counts without refusing)");
  }
  if (n.Has("detailed_metric")) d.detailed_metric = n["detailed_metric"].Bool();
  if (n.Has("value_to_metric")) d.value_to_metric = n["value_to_metric"].Bool();
  if (n.Has("share_threshold")) {
    d.share_threshold = n["share_threshold"].Bool();
    if (d.share_threshold && !d.Wildcard()) {
      n["share_threshold"].Fail("share_threshold needs a wildcard value (one with '*')");
    }
  }
  if (n.Has("metadata")) {
    Node m = n["metadata"];
    m.ExpectMap();
    Warn(m, ctx,
         "not sent to Envoy: Sluice answers no dynamic_metadata (the descriptor matches and "
         "counts as usual)");
  }

  // `rate_limit:` with nothing after it is no limit, as envoyproxy/ratelimit reads it.
  bool has_limit = n.Has("rate_limit") && !n["rate_limit"].yaml().IsNull();
  if (has_limit && n.Has("rate_limits")) {
    n["rate_limits"].Fail("give 'rate_limit' or 'rate_limits', not both");
  }
  std::vector<Node> limit_nodes;
  if (has_limit) limit_nodes.push_back(n["rate_limit"]);
  if (n.Has("rate_limits")) {
    Node list = n["rate_limits"];
    list.ExpectSequence();
    if (list.yaml().size() == 0) list.Fail("empty list of limits");
    for (size_t i = 0; i < list.yaml().size(); ++i) limit_nodes.push_back(list.at(i));
  }
  std::vector<std::vector<Node>> replaces_nodes(limit_nodes.size());
  for (size_t i = 0; i < limit_nodes.size(); ++i) {
    bool in_list = n.Has("rate_limits");
    d.limits.push_back(ReadLimit(limit_nodes[i], in_list, &replaces_nodes[i]));
    d.limits.back().id = in_list ? d.id + "[" + std::to_string(i) + "]" : d.id;
    ClaimId(*ctx.limit_ids, d.limits.back().id, limit_nodes[i], ctx, "limit");
  }
  for (size_t i = 0; i < d.limits.size(); ++i) {
    if (!d.limits[i].name.empty()) ctx.domain->names.insert(d.limits[i].name);
    for (size_t j = 0; j < d.limits[i].replaces.size(); ++j) {
      const std::string& r = d.limits[i].replaces[j];
      for (const RateLimitSpec& own : d.limits) {
        if (own.name == r) {
          replaces_nodes[i][j].Fail("a limit cannot replace a limit of its own descriptor ('" + r +
                                    "')");
        }
      }
      ctx.domain->replaced.push_back({r, replaces_nodes[i][j], ctx.source});
    }
  }
  if (n.Has("descriptors")) ReadDescriptorList(n["descriptors"], d.id, d.descriptors, d.index, ctx);
  return d;
}

void BuildIndex(const std::vector<Descriptor>& list, DescriptorIndex& index) {
  for (size_t i = 0; i < list.size(); ++i) {
    const Descriptor& d = list[i];
    DescriptorIndex::ForKey& k = index.keys[d.key];
    if (!d.value) {
      k.any_value = i;
      continue;
    }
    k.by_value.emplace(*d.value, i);
    if (d.Wildcard()) k.wildcards.push_back(i);
  }
}

// Appends the descriptors of `list` to `out`, each checked against `siblings` (those of
// `out` so far), and indexes `out` anew.
void ReadDescriptorList(const Node& list, const std::string& parent_id,
                        std::vector<Descriptor>& out, DescriptorIndex& index, Context& ctx,
                        std::map<std::string, Sibling>& siblings) {
  if (list.yaml().IsNull()) return;  // `descriptors:` with nothing after it
  list.ExpectSequence();
  for (size_t i = 0; i < list.yaml().size(); ++i) {
    out.push_back(ReadDescriptor(list.at(i), parent_id, ctx, siblings));
  }
  index = DescriptorIndex();
  BuildIndex(out, index);
}

void ReadDescriptorList(const Node& list, const std::string& parent_id,
                        std::vector<Descriptor>& out, DescriptorIndex& index, Context& ctx) {
  std::map<std::string, Sibling> siblings;
  ReadDescriptorList(list, parent_id, out, index, ctx, siblings);
}

// Reads one file into `config`: a new domain, or with `merge`, more descriptors of a domain
// an earlier file began (`contexts` holds what each domain's files share).
void ReadDomain(const YAML::Node& root, Context& ctx, bool merge, EnvoyConfig& config,
                std::map<std::string, DomainContext, std::less<>>& contexts) {
  ctx.warnings = &config.warnings;
  Node top(root, "");
  if (!root.IsDefined() || root.IsNull()) top.Fail("empty config");
  top.OnlyKeys({"domain", "descriptors"});
  if (!top.Has("domain")) top.Fail("missing 'domain'");
  Node name_node = top["domain"];
  std::string name = name_node.String();
  if (name.empty()) name_node.Fail("empty domain");
  auto it = config.domains.find(name);
  if (it != config.domains.end() && !merge) {
    name_node.Fail("duplicate domain '" + name + "' (also in " + it->second.source_file +
                   "; --envoy-merge-domains merges the files of one domain, as "
                   "envoyproxy/ratelimit's MERGE_DOMAIN_CONFIG does)");
  }
  // A file that fails fails the whole load, so the domain is read into in place.
  Domain& d = config.domains[name];
  if (d.name.empty()) {
    d.name = name;
    d.source_file = ctx.source;
  }
  DomainContext& dc = contexts[name];
  ctx.domain = &dc;
  if (top.Has("descriptors")) {
    ReadDescriptorList(top["descriptors"], d.name, d.descriptors, d.index, ctx, dc.siblings);
  }
}

Status Format(const std::string& source, const YAML::Mark& mark, const std::string& key,
              const std::string& message) {
  return Status::Invalid(Located(source, mark, key, message));
}

// ---- matching ----

// Whether `value` matches `pattern`, in which each '*' stands for any run of characters.
bool WildcardMatches(std::string_view pattern, std::string_view value) {
  size_t star = pattern.find('*');
  if (star == std::string_view::npos) return pattern == value;
  std::string_view head = pattern.substr(0, star);
  size_t last = pattern.rfind('*');
  std::string_view tail = pattern.substr(last + 1);
  if (value.size() < head.size() + tail.size() || !value.starts_with(head) ||
      !value.ends_with(tail)) {
    return false;
  }
  std::string_view rest = value.substr(head.size(), value.size() - head.size() - tail.size());
  // The literal pieces between the first and last '*', in order, leftmost first.
  std::string_view middle = pattern.substr(star + 1, last - star);  // up to and with last '*'
  while (!middle.empty()) {
    size_t next = middle.find('*');
    std::string_view piece = middle.substr(0, next);
    middle.remove_prefix(next + 1);
    if (piece.empty()) continue;
    size_t at = rest.find(piece);
    if (at == std::string_view::npos) return false;
    rest.remove_prefix(at + piece.size());
  }
  return true;
}

enum class How : uint8_t { kExact, kWildcard, kAnyValue };

struct Step {
  const Descriptor* descriptor;
  How how;
};

// One entry against one level.
std::optional<Step> Lookup(const std::vector<Descriptor>& list, const DescriptorIndex& index,
                           std::string_view key, std::string_view value) {
  auto k = index.keys.find(key);
  if (k == index.keys.end()) return std::nullopt;
  const DescriptorIndex::ForKey& f = k->second;
  if (auto v = f.by_value.find(value); v != f.by_value.end()) {
    return Step{&list[v->second], How::kExact};
  }
  for (size_t i : f.wildcards) {
    if (WildcardMatches(*list[i].value, value)) return Step{&list[i], How::kWildcard};
  }
  if (f.any_value) return Step{&list[*f.any_value], How::kAnyValue};
  return std::nullopt;
}

template <typename Entry>
bool MatchEntries(const EnvoyConfig& config, std::string_view domain,
                  std::span<const Entry> entries, Match& m) {
  auto d = config.domains.find(domain);
  if (d == config.domains.end() || entries.empty()) return false;
  const std::vector<Descriptor>* list = &d->second.descriptors;
  const DescriptorIndex* index = &d->second.index;
  // The walk's steps, in this thread's vector: its memory is kept, as the matches' is.
  thread_local std::vector<Step> steps;
  steps.clear();
  for (size_t i = 0; i < entries.size(); ++i) {
    auto step = Lookup(*list, *index, entries[i].first, entries[i].second);
    if (!step) return false;
    steps.push_back(*step);
    if (i + 1 < entries.size()) {
      if (step->descriptor->descriptors.empty()) return false;  // entries left over
      list = &step->descriptor->descriptors;
      index = &step->descriptor->index;
    }
  }
  const Descriptor* last = steps.back().descriptor;
  if (last->limits.empty()) return false;

  m.descriptor = last;
  m.limits.clear();
  m.cache_key.clear();
  m.metric_key.clear();
  for (const RateLimitSpec& l : last->limits) m.limits.push_back(&l);
  // A share_threshold wildcard stands for its values by its pattern, in counters and stats.
  auto shared = [&](size_t i) -> const std::string* {
    const Step& s = steps[i];
    return s.how == How::kWildcard && s.descriptor->share_threshold ? &*s.descriptor->value
                                                                    : nullptr;
  };
  AppendEscaped(m.cache_key, domain);
  for (size_t i = 0; i < entries.size(); ++i) {
    m.cache_key += '|';
    AppendEscaped(m.cache_key, entries[i].first);
    m.cache_key += '=';
    const std::string* pattern = shared(i);
    AppendEscaped(m.cache_key, pattern ? std::string_view(*pattern) : entries[i].second);
  }

  // envoyproxy/ratelimit's stat key. With detailed_metric (on the final descriptor): every
  // entry's key and value. Otherwise, per level, the value the descriptor was written with
  // (none for a key-only one), or the request's where value_to_metric asks for it.
  m.metric_key.assign(domain);
  bool any_shared = false;
  for (size_t i = 0; i < entries.size(); ++i) any_shared = any_shared || shared(i) != nullptr;
  for (size_t i = 0; i < entries.size(); ++i) {
    std::string_view key = entries[i].first, value = entries[i].second;
    const Step& s = steps[i];
    m.metric_key += '.';
    m.metric_key += key;
    std::string_view shown;
    bool underscore = false;
    if (last->detailed_metric) {
      const std::string* pattern = shared(i);
      shown = pattern ? std::string_view(*pattern) : value;
      underscore = any_shared ? !shown.empty() : true;  // as envoyproxy writes "key_" or "key"
    } else {
      switch (s.how) {
        case How::kExact:
          shown = value;
          break;
        case How::kWildcard:
          shown = s.descriptor->value_to_metric && !s.descriptor->share_threshold
                      ? value
                      : std::string_view(*s.descriptor->value);
          break;
        case How::kAnyValue:
          if (s.descriptor->value_to_metric) shown = value;
          break;
      }
      underscore = !shown.empty();
    }
    if (underscore) {
      m.metric_key += '_';
      m.metric_key += shown;
    }
  }
  return true;
}

template <typename Entry>
std::optional<Match> MatchEntries(const EnvoyConfig& config, std::string_view domain,
                                  std::span<const Entry> entries) {
  Match m;
  if (!MatchEntries(config, domain, entries, m)) return std::nullopt;
  return m;
}

}  // namespace

void AppendEscaped(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  static constexpr auto kSpecial = [] {
    std::array<bool, 256> t{};
    for (unsigned char c : std::string_view("%|={}")) t[c] = true;
    return t;
  }();
  // In runs: a value rarely holds any of the five.
  size_t run = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    auto u = static_cast<unsigned char>(s[i]);
    if (!kSpecial[u]) continue;
    out.append(s.data() + run, i - run);
    const char escaped[] = {'%', kHex[u >> 4], kHex[u & 0xF]};
    out.append(escaped, sizeof escaped);
    run = i + 1;
  }
  out.append(s.data() + run, s.size() - run);
}

std::string_view UnitName(Unit u) {
  for (const auto& e : kUnits) {
    if (e.unit == u) return e.name;
  }
  return "unknown";
}

std::optional<Unit> ParseUnit(std::string_view name) {
  std::string lower(name);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const auto& e : kUnits) {
    if (e.name == lower) return e.unit;
  }
  return std::nullopt;
}

DurationUs UnitDuration(Unit u) {
  for (const auto& e : kUnits) {
    if (e.unit == u) return e.duration;
  }
  return 0;
}

Status LoadEnvoyConfigTexts(std::span<const EnvoyConfigSource> sources, EnvoyConfig* out,
                            const EnvoyLoadOptions& options) {
  EnvoyConfig config;
  std::map<std::string, Location, std::less<>> descriptor_ids, limit_ids;
  std::map<std::string, DomainContext, std::less<>> contexts;
  for (const EnvoyConfigSource& s : sources) {
    try {
      // (Only the first document is read, as envoyproxy/ratelimit reads only the first.)
      if (auto too_many = ScanYaml(s.yaml, /*first_only=*/true).too_many) {
        return Format(s.source, *too_many, "", kTooManyYamlNodes);
      }
      YAML::Node root = YAML::Load(s.yaml);
      if (auto why = ExpandedTooLarge(root)) return Format(s.source, root.Mark(), "", *why);
      Context ctx;
      ctx.source = s.source;
      ctx.descriptor_ids = &descriptor_ids;
      ctx.limit_ids = &limit_ids;
      ReadDomain(root, ctx, options.merge_domains, config, contexts);
    } catch (const LoadError& e) {
      return Format(s.source, e.mark, e.key, e.message);
    } catch (const YAML::Exception& e) {
      return Format(s.source, e.mark, "", ExplainYamlError(s.yaml, e));
    } catch (const std::bad_alloc&) {
      return Status::Invalid(s.source + ": out of memory reading it");
    }
  }
  for (const auto& [domain, dc] : contexts) {
    for (const DomainContext::Replaced& r : dc.replaced) {
      if (dc.names.count(r.name) > 0) continue;
      Warn(r.node, r.source, &config.warnings,
           "'" + r.name + "' names no rate limit of domain '" + domain + "'");
    }
  }
  *out = std::move(config);
  return Status::Ok();
}

Status LoadEnvoyConfigText(std::string_view yaml, const std::string& source, EnvoyConfig* out) {
  EnvoyConfigSource s{source, std::string(yaml)};
  return LoadEnvoyConfigTexts(std::span(&s, 1), out);
}

Status LoadEnvoyConfigFile(const std::string& path, EnvoyConfig* out) {
  std::string text;
  if (Status st = ReadConfigFile(path, &text); !st.ok()) return st;
  return LoadEnvoyConfigText(text, path, out);
}

namespace {

// The config files of `dir`, as envoyproxy/ratelimit reads its runtime directory: every
// regular file whatever its name, in subdirectories too, but none whose name starts with '.'
// (a Kubernetes ConfigMap's "..data" and "..2026_..." copies of the same files, editors'
// swap files). Symlinks are followed, to files and to directories alike, as ConfigMaps'
// are (a ConfigMap item at `sub/x.yaml` is a link `sub -> ..data/sub`); a directory is read
// once, by the first path that reaches it, so a link back up makes no loop. Paths relative
// to `dir`, sorted; false with *error when a directory cannot be read.
bool ConfigFileNames(const std::string& dir, std::vector<std::string>* names, std::string* error) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::string base = dir.ends_with('/') ? dir : dir + "/";
  std::set<fs::path> read;  // the directories being read, by their real path
  if (fs::path real = fs::canonical(dir, ec); !ec) read.insert(real);
  ec.clear();
  fs::recursive_directory_iterator it(dir, fs::directory_options::follow_directory_symlink, ec);
  for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    std::string name = it->path().filename().string();
    std::error_code type_ec;
    if (name.starts_with('.')) {
      if (it->is_directory(type_ec)) it.disable_recursion_pending();
      continue;
    }
    if (it->is_directory(type_ec)) {
      std::error_code real_ec;
      fs::path real = fs::canonical(it->path(), real_ec);
      if (real_ec || !read.insert(real).second) it.disable_recursion_pending();
      continue;
    }
    if (!it->is_regular_file(type_ec)) continue;  // follows symlinks
    std::string path = it->path().string();       // `dir` joined with the names below it
    names->push_back(path.substr(std::min(path.size(), base.size())));
  }
  if (ec) {
    *error = dir + ": cannot read the directory: " + ec.message();
    return false;
  }
  std::sort(names->begin(), names->end());
  return true;
}

}  // namespace

std::string EnvoyConfigDirStamp(const std::string& dir) {
  std::vector<std::string> names;
  std::string error, stamp;
  if (!ConfigFileNames(dir, &names, &error)) return error;
  for (const std::string& name : names) {
    std::string file = ConfigFileStamp(dir + "/" + name);
    if (!file.empty()) stamp += name + ' ' + file + '\n';
  }
  return stamp;
}

Status LoadEnvoyConfigDir(const std::string& dir, EnvoyConfig* out,
                          const EnvoyLoadOptions& options) {
  namespace fs = std::filesystem;
  std::vector<std::string> names;
  std::string error;
  if (!ConfigFileNames(dir, &names, &error)) return Status::Invalid(error);
  if (names.empty())
    return Status::Invalid(dir + ": no config files (every file not starting with '.' is one)");
  std::vector<EnvoyConfigSource> sources;
  for (const std::string& name : names) {
    std::string path = (fs::path(dir) / name).string();
    std::string text;
    if (Status st = ReadConfigFile(path, &text); !st.ok()) return st;
    sources.push_back({path, std::move(text)});
  }
  return LoadEnvoyConfigTexts(sources, out, options);
}

std::optional<Match> MatchDescriptor(const EnvoyConfig& config, std::string_view domain,
                                     std::span<const std::pair<std::string, std::string>> entries) {
  return MatchEntries(config, domain, entries);
}

std::optional<Match> MatchDescriptor(
    const EnvoyConfig& config, std::string_view domain,
    std::span<const std::pair<std::string_view, std::string_view>> entries) {
  return MatchEntries(config, domain, entries);
}

bool MatchDescriptor(const EnvoyConfig& config, std::string_view domain,
                     std::span<const std::pair<std::string_view, std::string_view>> entries,
                     Match* out) {
  return MatchEntries(config, domain, entries, *out);
}

namespace {

template <typename F>
void ForEachMatch(std::vector<Match>& matches, F f) {
  for (Match& m : matches) f(m);
}
template <typename F>
void ForEachMatch(std::vector<std::optional<Match>>& matches, F f) {
  for (auto& m : matches) {
    if (m) f(*m);
  }
}

template <typename Matches>
void Replace(Matches& matches) {
  std::set<std::string_view> replaced;
  ForEachMatch(matches, [&](Match& m) {
    for (const RateLimitSpec* l : m.limits) replaced.insert(l->replaces.begin(), l->replaces.end());
  });
  if (replaced.empty()) return;
  ForEachMatch(matches, [&](Match& m) {
    std::erase_if(m.limits, [&](const RateLimitSpec* l) {
      return !l->unlimited && !l->name.empty() && replaced.count(l->name) > 0;
    });
  });
}

}  // namespace

void ApplyReplaces(std::vector<Match>& matches) { Replace(matches); }
void ApplyReplaces(std::vector<std::optional<Match>>& matches) { Replace(matches); }

}  // namespace sluice::rules::envoy
