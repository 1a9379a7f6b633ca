// Envoy rate limit configs: envoyproxy/ratelimit's YAML format, loaded unchanged, and its
// descriptor matching, for Sluice's implementation of Envoy's RLS v3 API
// (envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit).
//
// A config is a directory of YAML files, each holding one domain: a tree of descriptors, each
// a key with an optional value, optionally a rate limit, optionally nested descriptors. Envoy
// sends a domain and descriptors; each request descriptor is a list of (key, value) entries,
// matched level by level against the tree:
//
//   - at each level, the descriptor with the entry's key and exactly its value wins; else the
//     first descriptor (in file order) with that key whose value holds '*' and matches the
//     entry's value ('*' stands for any run of characters: "foo*" is a prefix match); else
//     the descriptor with that key and no value, which stands for every value;
//   - a limit applies only if every entry was matched, one per level, and the descriptor the
//     last entry matched has a limit. Limits on the way down never apply: ("a","1") does not
//     match a descriptor a=1 whose limit is meant for requests ("a","1"),("b","2"), and a
//     request with more entries than the tree has levels matches nothing;
//   - counters are per value: the counter of a match is named by the domain and every entry
//     of the request, values included, so a key-only or wildcard descriptor counts each
//     distinct value apart ("to_number" limits each phone number on its own). A wildcard
//     descriptor with `share_threshold: true` is the exception: all values it matches share
//     one counter;
//   - a request whose descriptors match several limits is decided by all of them, except
//     that a limit whose `replaces` names another limit of the request drops that one
//     (ApplyReplaces).
//
// Sluice extensions, none of which envoyproxy/ratelimit accepts:
//   - `algorithm:` (fixed_window, the default and envoyproxy/ratelimit's only one;
//     sliding_window_log, sliding_window_counter, token_bucket, gcra) and `burst:`
//     (token_bucket and gcra only) inside `rate_limit`. Not leaky_queue: it has admitted
//     requests wait their turn, and an RLS answer can only allow or refuse;
//   - `rate_limits: [{unit, requests_per_unit, algorithm, burst, name, replaces}, ...]` in a
//     descriptor instead of `rate_limit`, for several limits on one descriptor (a burst limit
//     and a daily one): all must admit. envoyproxy/ratelimit rejects the same descriptor twice
//     in one list, so it cannot express this.
//
// Where Sluice is stricter than envoyproxy/ratelimit (a config it rejects, envoyproxy loads):
// a key where it has no meaning (envoyproxy accepts any of its keys at any level and ignores
// misplaced ones), `requests_per_unit` missing (envoyproxy reads 0: every request blocked),
// a YAML key given twice in one mapping, a number that is not plain decimal, `replaces`
// naming a limit of its own descriptor, and two descriptors whose ids (below) coincide.
// Other differences: hidden files and directories are skipped (its
// RUNTIME_IGNOREDOTFILES=true); every other regular file, in subdirectories too, is read as
// envoyproxy reads them. Keys and
// values are compared as they are, where envoyproxy joins them as "key_value" first (so it
// confuses key "a_b" with key "a", value "b...": its duplicate check, kept here, rejects
// such configs); `replaces` naming no limit of its domain is a warning. A domain is in one
// file unless EnvoyLoadOptions::merge_domains says otherwise (envoyproxy/ratelimit's
// MERGE_DOMAIN_CONFIG): then the files naming it add their descriptors to its list, in file
// order, and a descriptor two files give is an error as in one file.
//
// Thread-safety: an EnvoyConfig is immutable after loading; share it freely. A Match points
// into the config it came from.
#ifndef SLUICE_RULES_ENVOY_CONFIG_H_
#define SLUICE_RULES_ENVOY_CONFIG_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "sluice/policy.h"
#include "sluice/status.h"

namespace sluice::rules::envoy {

// The unit of a rate limit, numbered as envoy.service.ratelimit.v3.RateLimitResponse's
// RateLimit.Unit (for the response's current_limit). Month is 30 days and year 365 days,
// as envoyproxy/ratelimit counts them; windows are aligned to the Unix epoch.
enum class Unit : uint8_t {
  kUnknown = 0,
  kSecond = 1,
  kMinute = 2,
  kHour = 3,
  kDay = 4,
  kMonth = 5,
  kYear = 6,
  kWeek = 7,
};

// "second", ..., "year"; "unknown" for kUnknown.
std::string_view UnitName(Unit u);
// The config name of a unit, any case ("Minute", "HOUR"), as envoyproxy/ratelimit reads it.
std::optional<Unit> ParseUnit(std::string_view name);
// How long a window of `u` is; 0 for kUnknown.
DurationUs UnitDuration(Unit u);

// One limit of a descriptor.
struct RateLimitSpec {
  // requests_per_unit per unit; fixed_window unless `algorithm:` (a Sluice extension) says
  // otherwise. Unused (default) when `unlimited`.
  Policy policy;
  Unit unit = Unit::kUnknown;  // kUnknown only when `unlimited`
  // `unlimited: true`: matches, and so counts as configured, but is never counted or
  // limited; the answer is OK (envoyproxy/ratelimit reports LimitRemaining = UINT32_MAX).
  bool unlimited = false;
  std::string name;                   // rate_limit.name; "" if none
  std::vector<std::string> replaces;  // names of the limits this one replaces (ApplyReplaces)
  // Unique in the config: the descriptor's id, with "[i]" appended for rate_limits[i].
  std::string id;
};

// Lookup tables over one list of descriptors (a domain's, or a descriptor's nested list):
// positions in that list, built by the loader.
struct DescriptorIndex {
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  template <typename V>
  using Map = std::unordered_map<std::string, V, Hash, std::equal_to<>>;
  struct ForKey {
    Map<size_t> by_value;             // every descriptor with a value, wildcards included
    std::vector<size_t> wildcards;    // those whose value holds '*', in file order
    std::optional<size_t> any_value;  // the descriptor with no value
  };
  Map<ForKey> keys;
};

struct Descriptor {
  std::string key;
  // The value to match; nullopt: any value (each counted apart). `value: ""` is no value,
  // as in envoyproxy/ratelimit. A value holding '*' is a wildcard (Wildcard()).
  std::optional<std::string> value;
  // 0 or more: `rate_limit` gives one, the `rate_limits` list (Sluice) several. A descriptor
  // with none and no nested descriptors matches but limits nothing (envoyproxy's whitelist).
  std::vector<RateLimitSpec> limits;
  bool shadow_mode = false;             // decide and count, but always answer OK
  bool detailed_metric = false;         // metrics name the request's values (Match::metric_key)
  bool value_to_metric = false;         // metrics name the value this descriptor matched
  bool share_threshold = false;         // wildcard only: all matched values share one counter
  std::vector<Descriptor> descriptors;  // nested: matched by the request's next entry
  DescriptorIndex index;                // over `descriptors`
  // Unique in the config, envoyproxy/ratelimit's stat key: the domain, then for each level
  // "." + key, with "_" + value if the descriptor has one: "messaging.message_type_marketing.
  // to_number", "example9.key1_value*".
  std::string id;
  std::string location;  // "FILE:LINE:COL" of the descriptor in its file

  bool Wildcard() const { return value && value->find('*') != std::string::npos; }
};

struct Domain {
  std::string name;
  std::vector<Descriptor> descriptors;
  DescriptorIndex index;    // over `descriptors`
  std::string source_file;  // the first file that names it
};

struct EnvoyConfig {
  std::map<std::string, Domain, std::less<>> domains;
  // What loads but is likely a mistake, as "FILE:LINE:COL: key.path: message" (`replaces`
  // naming no limit of its domain, `metadata:`, which Sluice does not send). Logged at each
  // load.
  std::vector<std::string> warnings;
};

// Loading. Every error names where it is, as "FILE:LINE:COL: KEY: message" (KEY the path to
// the offending key, e.g. "descriptors[0].descriptors[1].rate_limit.unit"); loading stops at
// the first. On error `out` is left unchanged. Loading never throws.

// Every regular file under `dir`, in subdirectories too, whatever its name ends with, as
// envoyproxy/ratelimit reads its runtime directory; none whose name starts with '.', nor
// any below a directory so named (a ConfigMap's "..data" copies). In name order. A
// directory without any is an error.
struct EnvoyLoadOptions {
  // Several files may name one domain; their descriptors make one list (MERGE_DOMAIN_CONFIG).
  bool merge_domains = false;
};
Status LoadEnvoyConfigDir(const std::string& dir, EnvoyConfig* out,
                          const EnvoyLoadOptions& options = {});
// What the config files of `dir` are now (names, and each one's ConfigFileStamp): a
// change means LoadEnvoyConfigDir would read something else. A Kubernetes ConfigMap update
// (a symlink swap) changes it.
std::string EnvoyConfigDirStamp(const std::string& dir);
// One file.
Status LoadEnvoyConfigFile(const std::string& path, EnvoyConfig* out);
// YAML text; `source` names it in error messages.
Status LoadEnvoyConfigText(std::string_view yaml, const std::string& source, EnvoyConfig* out);
// Several texts, as files of one directory (in this order).
struct EnvoyConfigSource {
  std::string source;  // the name errors give
  std::string yaml;
};
Status LoadEnvoyConfigTexts(std::span<const EnvoyConfigSource> sources, EnvoyConfig* out,
                            const EnvoyLoadOptions& options = {});

// Matching.

struct Match {
  const Descriptor* descriptor = nullptr;  // the descriptor the request's last entry matched
  // Its limits (never empty from MatchDescriptor; ApplyReplaces may remove some). All must
  // admit; unlimited ones admit without counting.
  std::vector<const RateLimitSpec*> limits;
  // What the counters are named by: the domain and each entry's key and value (for a
  // share_threshold wildcard, its pattern instead of the value), unambiguously encoded:
  // "messaging|message_type=marketing|to_number=2061111111". '%', '|', '=', '{' and '}' in
  // a domain, key or value are written %XX, so the key holds no Redis Cluster hash tag. A
  // descriptor with several limits keeps one counter per limit under this one key, in each
  // limit's own table: in one hash tag, so in one Redis Cluster slot.
  std::string cache_key;
  // envoyproxy/ratelimit's stat key for this match: the descriptor's id, with the request's
  // values where detailed_metric or value_to_metric ask for them
  // ("example8.key1_unspecified_value").
  std::string metric_key;
};

// Appends `s` to a counter name as Match::cache_key writes its parts: '%', '|', '=', '{'
// and '}' as %XX, everything else as it is.
void AppendEscaped(std::string& out, std::string_view s);

// The limits one request descriptor (its entries, in order) meets in `domain`, or nullopt:
// unknown domain, no entries, an entry matching nothing, entries left over, or a final
// descriptor without limits. The match points into `config`.
std::optional<Match> MatchDescriptor(const EnvoyConfig& config, std::string_view domain,
                                     std::span<const std::pair<std::string, std::string>> entries);
std::optional<Match> MatchDescriptor(
    const EnvoyConfig& config, std::string_view domain,
    std::span<const std::pair<std::string_view, std::string_view>> entries);
// The same into `*out`, reusing its memory (a server's calls match without allocating);
// false, with `*out` unspecified, where the above gives nullopt.
bool MatchDescriptor(const EnvoyConfig& config, std::string_view domain,
                     std::span<const std::pair<std::string_view, std::string_view>> entries,
                     Match* out);

// envoyproxy/ratelimit's `replaces`, over the matches of all descriptors of one request:
// the names in the `replaces` of every matched limit (unlimited ones included) are
// collected first, then every limit (unlimited ones excepted) whose non-empty name is among
// them is removed from its match: it is neither checked nor counted. Its request descriptor
// is then OK unless another of its limits says otherwise; a match left with no limits is OK.
// Matches are never removed or reordered, so they stay aligned with the request's
// descriptors. A limit is removed even if it replaces another in turn.
void ApplyReplaces(std::vector<Match>& matches);
// The same with one entry per request descriptor, nullopt where it matched nothing.
void ApplyReplaces(std::vector<std::optional<Match>>& matches);

}  // namespace sluice::rules::envoy

#endif  // SLUICE_RULES_ENVOY_CONFIG_H_
