// Human-readable listings of a config, for `sluice validate` and `sluice serve`.
#ifndef SLUICE_RULES_DESCRIBE_H_
#define SLUICE_RULES_DESCRIBE_H_

#include <string>

#include "rules/config.h"

namespace sluice::rules {

// "ip", "user_id+ip", "api_key+header:x-tenant".
std::string DescribeKey(const std::vector<KeyPart>& key);
// One line per rule and tier, in matching order, ending with the default rule.
std::string DescribeConfig(const Config& config);
// "server listen 0.0.0.0:8080, admin token set, threads 4\n": what the file's server:
// section sets, in its own words (never the token); "" when it sets nothing.
std::string DescribeServer(const ServerSettings& server);

}  // namespace sluice::rules

#endif  // SLUICE_RULES_DESCRIBE_H_
