#include "rules/config.h"

namespace sluice::rules {

Config DefaultConfig() {
  Config c;
  c.source = "(embedded default)";
  c.default_rule.name = "default";
  c.default_rule.path = "/*";
  c.default_rule.key = {KeyPart{KeyPart::Kind::kIp, ""}};
  c.default_rule.limits = {
      {"default/requests_per_minute", Policy::SlidingWindowCounter(60, kMinute)}};
  return c;
}

}  // namespace sluice::rules
