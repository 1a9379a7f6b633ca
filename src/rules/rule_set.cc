#include "rules/rule_set.h"

#include <algorithm>
#include <set>
#include <unordered_map>

namespace sluice::rules {
namespace {

std::vector<std::string_view> Segments(std::string_view path) {
  std::vector<std::string_view> out;
  size_t i = 1;
  while (i <= path.size()) {
    size_t slash = path.find('/', i);
    if (slash == std::string_view::npos) slash = path.size();
    if (slash > i) out.push_back(path.substr(i, slash - i));
    i = slash + 1;
  }
  return out;
}

// "prefix" + "name=value", after a '|' unless first: "ip=…", "header:x-tenant=…". In a
// value, '|', '=' and '%' are written %7C, %3D and %25: otherwise a user id of "a|ip=x"
// would spell another request's user id and address, and share its counts.
void AppendPart(std::string& key, std::string_view prefix, std::string_view name,
                std::string_view value) {
  if (!key.empty()) key += '|';
  key += prefix;
  key += name;
  key += '=';
  if (value.find_first_of("|=%") == std::string_view::npos) {
    key += value;
    return;
  }
  for (char c : value) {
    if (c == '|') {
      key += "%7C";
    } else if (c == '=') {
      key += "%3D";
    } else if (c == '%') {
      key += "%25";
    } else {
      key += c;
    }
  }
}

// Methods are compared without regard to ASCII case: HTTP's are case-sensitive, but
// upstreams that uppercase what they receive (WSGI servers do) would serve "post" as POST,
// so a POST rule holds for it too.
bool SameMethod(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           auto upper = [](char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 32) : c; };
           return upper(x) == upper(y);
         });
}

// A GET rule holds for HEAD too: servers answer HEAD with their GET handler (RFC 9110
// 9.3.2; Flask, Express, Django and Go's mux all do), so the work a GET limit guards runs.
bool MethodMatches(std::string_view rule_method, std::string_view method) {
  return SameMethod(rule_method, method) ||
         (SameMethod(rule_method, "GET") && SameMethod(method, "HEAD"));
}

}  // namespace

bool RuleSet::Pattern::Matches(std::string_view path) const {
  switch (kind) {
    case Kind::kExact:
      return path == text;
    case Kind::kPrefix:
      if (text.empty()) return true;  // "/*"
      return path.starts_with(text) && (path.size() == text.size() || path[text.size()] == '/');
    case Kind::kSegments: {
      size_t i = 0, pos = 1;
      while (i < segments.size()) {
        if (pos > path.size()) return false;
        size_t slash = path.find('/', pos);
        if (slash == std::string_view::npos) slash = path.size();
        std::string_view seg = path.substr(pos, slash - pos);
        if (seg.empty() || (!segments[i].empty() && seg != segments[i])) return false;
        ++i;
        pos = slash + 1;
      }
      // pos is one past the '/' that ended the last segment, or past the end if none did.
      return any_rest || (trailing_slash ? pos == path.size() : pos > path.size());
    }
  }
  return false;
}

std::string RuleSet::Pattern::Lead() const {
  if (kind != Kind::kSegments) return text;
  std::string lead;
  for (const std::string& seg : segments) {
    if (seg.empty()) break;
    lead += '/';
    lead += seg;
  }
  return lead;
}

std::string RuleSet::Pattern::SamplePath() const {
  if (kind != Kind::kSegments) return text.empty() ? "/" : text;
  std::string path;
  for (const std::string& seg : segments) {
    path += '/';
    path += seg.empty() ? std::string_view("{}") : std::string_view(seg);
  }
  if (path.empty() || trailing_slash) path += '/';
  return path;
}

bool RuleSet::Pattern::Covers(const Pattern& o) const {
  if (kind == Kind::kPrefix && text.empty()) return true;  // "/*"
  switch (o.kind) {
    case Kind::kExact:
      return Matches(o.text);
    case Kind::kPrefix:
      // Every path below o's base too: a prefix at or above it, or parameters then "/*".
      if (o.text.empty()) return false;
      return (kind == Kind::kPrefix || (kind == Kind::kSegments && any_rest)) && Matches(o.text);
    case Kind::kSegments: {
      if (kind == Kind::kExact) return false;
      if (kind == Kind::kPrefix) {
        // o's paths all begin with its literal segments before its first parameter.
        std::string lead = o.Lead();
        return !lead.empty() && Matches(lead);
      }
      if (any_rest ? segments.size() > o.segments.size()
                   : segments.size() != o.segments.size() || o.any_rest ||
                         trailing_slash != o.trailing_slash) {
        return false;
      }
      for (size_t i = 0; i < segments.size(); ++i) {
        if (!segments[i].empty() && segments[i] != o.segments[i]) return false;
      }
      return true;
    }
  }
  return false;
}

RuleSet::RuleSet(Config config) : config_(std::move(config)) {
  auto lower = [](std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  };
  user_id_header_ = lower(config_.keys.user_id_header);
  api_key_header_ = lower(config_.keys.api_key_header);
  tier_header_ = lower(config_.keys.tier_header);
  for (const Rule& r : config_.endpoints) {
    Pattern p;
    // Patterns are normalized like request paths; "{" and "}" survive normalization.
    std::string pattern = r.path;
    bool prefix = pattern.ends_with("/*") || pattern == "/*";
    if (prefix) pattern.resize(pattern.size() - 1);
    std::string norm = NormalizePath(pattern, config_.paths).value_or(pattern);
    // A prefix is whole segments whatever the trailing-slash setting: "/api/search/*"
    // holds "/api/search/q", and "/api/search" and "/api/search/" too.
    if (prefix && norm.size() > 1 && norm.back() == '/') norm.pop_back();
    if (norm.find('{') != std::string::npos) {
      p.kind = Pattern::Kind::kSegments;
      p.any_rest = prefix;
      p.trailing_slash = !prefix && norm.size() > 1 && norm.back() == '/';
      for (std::string_view seg : Segments(norm)) {
        bool param = seg.size() >= 2 && seg.front() == '{' && seg.back() == '}';
        p.segments.emplace_back(param ? std::string_view() : seg);
      }
    } else if (prefix) {
      p.kind = Pattern::Kind::kPrefix;
      p.text = norm == "/" ? "" : norm;
    } else {
      p.kind = Pattern::Kind::kExact;
      p.text = norm;
    }
    patterns_.push_back(std::move(p));
  }
  for (size_t i = 0; i < patterns_.size(); ++i) {
    const Pattern& p = patterns_[i];
    if (p.kind == Pattern::Kind::kExact) {
      exact_index_[p.text].push_back(i);
    } else {
      lead_index_[p.Lead()].push_back(i);
    }
  }
}

std::vector<const LimitSpec*> RuleSet::AllLimits() const {
  std::vector<const LimitSpec*> out;
  ForEachLimit([&out](const Rule&, std::string_view, const LimitSpec& l) { out.push_back(&l); });
  return out;
}

void RuleSet::ForEachLimit(
    const std::function<void(const Rule&, std::string_view tier, const LimitSpec&)>& f) const {
  auto each = [&f](const Rule& r, std::string_view tier, const std::vector<LimitSpec>& limits) {
    for (const LimitSpec& l : limits) f(r, tier, l);
  };
  each(config_.default_rule, "", config_.default_rule.limits);
  for (const auto& [tier, limits] : config_.tiers) each(config_.default_rule, tier, limits);
  for (const Rule& r : config_.endpoints) {
    each(r, "", r.limits);
    for (const auto& [tier, limits] : r.tiers) each(r, tier, limits);
  }
}

bool RuleSet::AcceptsMethod(size_t rule, std::string_view method) const {
  const Rule& r = config_.endpoints[rule];
  return r.methods.empty() ||
         std::any_of(r.methods.begin(), r.methods.end(),
                     [method](const std::string& m) { return MethodMatches(m, method); });
}

template <typename Accept>
size_t RuleSet::Earliest(std::string_view path, size_t below, Accept accept) const {
  // A pattern matches only paths that begin with its lead at a segment boundary, so the
  // candidates are those indexed under the path itself (exact) and under its segment
  // prefixes; each list is in file order, so the first accepted in each is its earliest.
  size_t best = below;
  auto consider = [&](const TextIndex& index, std::string_view text) {
    auto it = index.find(text);
    if (it == index.end()) return;
    for (size_t i : it->second) {
      if (i >= best) return;
      if (accept(i)) {
        best = i;
        return;
      }
    }
  };
  consider(exact_index_, path);
  for (size_t end = 0; end <= path.size(); ++end) {
    if (end == 0 || end == path.size() || path[end] == '/') {
      consider(lead_index_, path.substr(0, end));
    }
  }
  return best;
}

const Rule& RuleSet::Match(std::string_view method, std::string_view path) const {
  auto accept = [&](size_t i) { return AcceptsMethod(i, method) && patterns_[i].Matches(path); };
  // Below this many rules trying each in turn costs less than the index's lookups. (A path
  // not beginning with '/' has no segment prefixes: it is tried against every rule.)
  constexpr size_t kIndexFrom = 16;
  if (patterns_.size() >= kIndexFrom && !path.empty() && path.front() == '/') {
    size_t i = Earliest(path, patterns_.size(), accept);
    return i < patterns_.size() ? config_.endpoints[i] : config_.default_rule;
  }
  for (size_t i = 0; i < patterns_.size(); ++i) {
    if (accept(i)) return config_.endpoints[i];
  }
  return config_.default_rule;
}

std::optional<std::pair<size_t, size_t>> RuleSet::FirstUnreachable() const {
  // Whether every method `later` holds, `earlier` holds (none listed: every method; a GET
  // rule holds HEAD).
  auto methods_covered = [](const Rule& earlier, const Rule& later) {
    if (earlier.methods.empty()) return true;
    if (later.methods.empty()) return false;
    return std::all_of(later.methods.begin(), later.methods.end(), [&](const std::string& m) {
      return std::any_of(earlier.methods.begin(), earlier.methods.end(),
                         [&](const std::string& e) { return MethodMatches(e, m); });
    });
  };
  // An earlier pattern covers a later one only if it matches some one path the later
  // matches, so the candidates are those the index finds for one such path: a config of
  // thousands of rules is checked in about linear time, not by trying every pair.
  const auto& rules = config_.endpoints;
  for (size_t later = 0; later < rules.size(); ++later) {
    const Pattern& p = patterns_[later];
    size_t earlier = Earliest(p.SamplePath(), later, [&](size_t i) {
      return methods_covered(rules[i], rules[later]) && patterns_[i].Covers(p);
    });
    if (earlier < later) return std::pair(later, earlier);
  }
  return std::nullopt;
}

void RuleSet::Resolve(const Request& req, Resolution& out) const {
  const Rule& rule = Match(req.method, req.path);
  out.rule = &rule;
  out.cost = rule.cost;
  out.shadow = rule.shadow;
  out.checks.clear();

  auto header = [&](std::string_view lower) -> std::optional<std::string_view> {
    if (!req.attributes) return std::nullopt;
    auto v = req.attributes->Header(lower);
    if (v && v->empty()) return std::nullopt;
    return v;
  };
  auto identity = [&](std::string_view lower) -> std::optional<std::string_view> {
    return req.identity_headers ? header(lower) : std::nullopt;
  };
  auto user_id = req.user_id ? req.user_id : identity(user_id_header_);
  auto api_key = req.api_key ? req.api_key : identity(api_key_header_);
  auto tier = req.tier ? req.tier : identity(tier_header_);

  const std::vector<LimitSpec>* limits = &rule.limits;
  const std::vector<KeyPart>* parts = &rule.key;
  if (tier) {
    std::string t(*tier);
    if (auto it = rule.tiers.find(t); it != rule.tiers.end()) {
      limits = &it->second;
    } else if (&rule == &config_.default_rule) {
      if (auto dt = config_.tiers.find(t); dt != config_.tiers.end()) {
        limits = &dt->second;
        // A top-level tier is a quota per user: keyed by the user, unless the default
        // rule's key already names the user (`user_id+ip`, where the ip part keeps a
        // client that names any user id from spending that user's quota).
        static const std::vector<KeyPart> kByUser = {KeyPart{KeyPart::Kind::kUserId, ""}};
        if (!KeyNamesUser(rule.key)) parts = &kByUser;
      }
    }
  }

  std::string key;
  for (const KeyPart& part : *parts) {
    std::optional<std::string_view> value;
    std::string_view prefix, name;
    switch (part.kind) {
      case KeyPart::Kind::kIp:
        break;
      case KeyPart::Kind::kUserId:
        value = user_id;
        name = "user_id";
        break;
      case KeyPart::Kind::kApiKey:
        value = api_key;
        name = "api_key";
        break;
      case KeyPart::Kind::kHeader:
        value = header(part.name);
        prefix = "header:";
        name = part.name;
        break;
      case KeyPart::Kind::kQuery:
        if (req.attributes) value = req.attributes->Query(part.name);
        if (value && value->empty()) value.reset();
        prefix = "query:";
        name = part.name;
        break;
    }
    if (part.kind == KeyPart::Kind::kIp || !value) {
      AppendPart(key, "", "ip", req.client_ip);
    } else {
      AppendPart(key, prefix, name, *value);
    }
  }
  for (const LimitSpec& l : *limits) out.checks.push_back({&l, key});
}

}  // namespace sluice::rules
