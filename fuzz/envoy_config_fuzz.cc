// Fuzzes the envoyproxy/ratelimit YAML loader (rules/envoy_config.h): the input is split at
// lines "%%" into up to four files of one directory (so domains and ids meet across files),
// and a config that loads must keep its promises: every limit's policy is valid, ids are
// unique, and a request naming the values down to any descriptor with limits matches that
// very descriptor, with its limits; the matches of all those requests together go through
// ApplyReplaces.
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "fuzz/fuzz_fail.h"
#include "rules/envoy_config.h"

namespace {

namespace envoy = sluice::rules::envoy;
using sluice::fuzz::Fail;

struct Walk {
  std::set<std::string> ids, limit_ids;  // a lone rate_limit's id is its descriptor's
  std::vector<envoy::Match> matches;
  std::vector<std::pair<std::string, std::string>> entries;
};

void Visit(const envoy::EnvoyConfig& config, const std::string& domain, const envoy::Descriptor& d,
           Walk& w, bool exact_path) {
  if (!w.ids.insert(d.id).second) Fail("two descriptors share the id " + d.id);
  for (const envoy::RateLimitSpec& spec : d.limits) {
    if (!w.limit_ids.insert(spec.id).second) Fail("two limits share the id " + spec.id);
    if (!spec.unlimited && !spec.policy.Validate().ok()) Fail("an invalid policy: " + spec.id);
  }
  // A value names its descriptor exactly (wildcards included: their pattern is a value too);
  // a key-only descriptor stands for any value, which another one may claim first.
  w.entries.emplace_back(d.key, d.value.value_or("any"));
  exact_path = exact_path && d.value.has_value();
  auto m = envoy::MatchDescriptor(config, domain, w.entries);
  if (exact_path && !d.limits.empty()) {
    if (!m || m->descriptor != &d || m->limits.size() != d.limits.size()) {
      Fail("a request naming descriptor " + d.id + " does not match it");
    }
  }
  if (m) {
    if (m->limits.empty() || m->cache_key.empty()) Fail("an empty match for " + d.id);
    w.matches.push_back(std::move(*m));
  }
  for (const envoy::Descriptor& child : d.descriptors) Visit(config, domain, child, w, exact_path);
  w.entries.pop_back();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  std::vector<envoy::EnvoyConfigSource> sources;
  while (sources.size() < 3) {
    size_t cut = text.find("\n%%\n");
    if (cut == std::string_view::npos) break;
    sources.push_back(
        {"f" + std::to_string(sources.size()) + ".yaml", std::string(text.substr(0, cut))});
    text.remove_prefix(cut + 4);
  }
  sources.push_back({"f" + std::to_string(sources.size()) + ".yaml", std::string(text)});

  envoy::EnvoyConfig config;
  sluice::Status st = envoy::LoadEnvoyConfigTexts(sources, &config);
  if (!st.ok()) {
    if (st.message().empty()) Fail("an error without a message");
    return 0;
  }
  Walk w;
  for (const auto& [name, domain] : config.domains) {
    if (name != domain.name) Fail("a domain filed under another name");
    for (const envoy::Descriptor& d : domain.descriptors) Visit(config, name, d, w, true);
  }
  envoy::ApplyReplaces(w.matches);
  return 0;
}
