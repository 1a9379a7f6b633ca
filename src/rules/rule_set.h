// RuleSet: a validated Config compiled for matching requests to rules and building keys.
//
// Matching: endpoints in file order, first match wins (the seed's find_rule); requests no
// endpoint matches fall to the default rule. A pattern is exact ("/api/login"), a prefix
// ("/api/*": "/api" and everything below it), or has parameters ("/users/{id}/posts": one
// segment each). Patterns and request paths are normalized alike (rules/path.h), so
// "/API//login/" meets the "/api/login" rule.
//
// Keys: the rule's key parts joined, e.g. "ip=203.0.113.7" or "user_id=42|ip=203.0.113.7".
// A part the request lacks (no user id header) is replaced by the client IP, so leaving a
// header out never escapes a limit. Tiers: a request whose tier has limits on its rule (or,
// for the default rule, in rate_limits.tiers) is decided by those limits instead; tier limits
// of the default rule are keyed by user id.
//
// Thread-safety: immutable after construction; share it freely (reload swaps a new one in).
#ifndef SLUICE_RULES_RULE_SET_H_
#define SLUICE_RULES_RULE_SET_H_

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "rules/config.h"

namespace sluice::rules {

// What a front end knows about a request. Header names are asked in lower case.
class RequestAttributes {
 public:
  virtual ~RequestAttributes() = default;
  virtual std::optional<std::string_view> Header(std::string_view lower_name) const = 0;
  virtual std::optional<std::string_view> Query(std::string_view name) const = 0;
};

struct Request {
  std::string_view method;     // upper case
  std::string_view path;       // normalized (NormalizePath)
  std::string_view client_ip;  // IpKey of the client address
  const RequestAttributes* attributes = nullptr;
  // Set by the decision API, where the caller states them; otherwise read from headers.
  std::optional<std::string_view> user_id, api_key, tier;
  // Whether the identity headers (KeySources) may be read: false for a peer that is not a
  // trusted proxy when keys.from_trusted_proxies_only is set.
  bool identity_headers = true;
};

// The limits one request must pass, with the key each is checked under.
struct Resolution {
  struct Check {
    const LimitSpec* limit;
    std::string key;
  };
  const Rule* rule = nullptr;
  std::vector<Check> checks;
  int64_t cost = 1;
  bool shadow = false;
};

class RuleSet {
 public:
  explicit RuleSet(Config config);

  const Config& config() const { return config_; }
  // Every limit of every rule and tier. Two may share a name (and then share counters when
  // their policies match).
  std::vector<const LimitSpec*> AllLimits() const;
  // Calls f(rule, tier, limit) for each limit of each rule, its tiers' included (the
  // top-level tiers' as the default rule's; `tier` is empty for the rule's own limits), in
  // the order AllLimits lists them.
  void ForEachLimit(
      const std::function<void(const Rule&, std::string_view tier, const LimitSpec&)>& f) const;

  // The rule for a method and a normalized path: the first endpoint rule in file order
  // that matches, else the default rule. A config of many rules is matched through an index
  // of its patterns' literal text, in time that grows with the path's segments, not with
  // the rules.
  const Rule& Match(std::string_view method, std::string_view path) const;
  // The first endpoint rule no request can reach, since an earlier one matches every
  // method and path it does (rules match in file order), and that earlier rule:
  // {unreachable, earlier} as indexes in config().endpoints, or nullopt.
  std::optional<std::pair<size_t, size_t>> FirstUnreachable() const;
  // Fills `out` (reusing its storage) with the limits and keys for `request`.
  void Resolve(const Request& request, Resolution& out) const;

 private:
  struct Pattern {
    enum class Kind { kExact, kPrefix, kSegments } kind;
    std::string text;                   // exact path, or prefix without "/*"
    std::vector<std::string> segments;  // kSegments: "" stands for a {param}
    bool any_rest = false;              // kSegments ending in "/*": any path below too
    // kSegments ending in "/" (kept when paths.strip_trailing_slash is off): the path's
    // last segment must be followed by "/" and nothing more.
    bool trailing_slash = false;
    bool Matches(std::string_view path) const;
    // Whether this pattern matches every path `other` matches.
    bool Covers(const Pattern& other) const;
    // The literal path before any parameter: every path this pattern matches begins with
    // it, followed by '/' or nothing.
    std::string Lead() const;
    // One path this pattern matches (a parameter stands as "{}").
    std::string SamplePath() const;
  };

  struct TextHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };
  // Endpoint indexes in file order, by a text: a lookup by string_view allocates nothing.
  using TextIndex = std::unordered_map<std::string, std::vector<size_t>, TextHash, std::equal_to<>>;

  bool AcceptsMethod(size_t rule, std::string_view method) const;
  // The first endpoint before `below`, in file order, that the indexes hold under `path` or
  // one of its segment prefixes and `accept(index)` takes; `below` when none.
  template <typename Accept>
  size_t Earliest(std::string_view path, size_t below, Accept accept) const;

  Config config_;
  std::vector<Pattern> patterns_;  // one per endpoint
  // Endpoints with exact patterns by their path, the others by Pattern::Lead().
  TextIndex exact_index_, lead_index_;
  // config_.keys' header names in lower case, as RequestAttributes::Header takes them.
  std::string user_id_header_, api_key_header_, tier_header_;
};

}  // namespace sluice::rules

#endif  // SLUICE_RULES_RULE_SET_H_
