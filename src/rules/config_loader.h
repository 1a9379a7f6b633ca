// Loading and validating a YAML config into a Config.
//
// Every error names where it is, as "FILE:LINE:COL: KEY: message" (1-based line and column,
// KEY the path to the offending key, e.g. "rate_limits.endpoints[1].window"), so an operator
// can go straight to it. Unknown keys are errors, not warnings: a misspelt "windw" must not
// silently fall back to a default. Loading never throws.
#ifndef SLUICE_RULES_CONFIG_LOADER_H_
#define SLUICE_RULES_CONFIG_LOADER_H_

#include <string>
#include <string_view>

#include "rules/config.h"
#include "sluice/status.h"

namespace sluice::rules {

// Reads and validates the file at `path`. On error `out` is left unchanged. With
// `rules_optional` (the service's limits are an Envoy config's) a file without
// `rate_limits` is valid, and the HTTP listener keeps the embedded default rule.
Status LoadConfigFile(const std::string& path, Config* out, bool rules_optional = false);
// The same for YAML text; `source` names it in error messages.
Status LoadConfigText(std::string_view yaml, const std::string& source, Config* out,
                      bool rules_optional = false);

}  // namespace sluice::rules

#endif  // SLUICE_RULES_CONFIG_LOADER_H_
