#include "rules/config.h"

namespace sluice::rules {

bool KeyNamesUser(const std::vector<KeyPart>& key) {
  for (const KeyPart& p : key) {
    if (p.kind == KeyPart::Kind::kUserId) return true;
  }
  return false;
}

std::string_view FailModeName(FailMode m) {
  switch (m) {
    case FailMode::kOpen:
      return "open";
    case FailMode::kClosed:
      return "closed";
    case FailMode::kLocal:
      return "local";
  }
  return "?";
}

std::optional<FailMode> ParseFailMode(std::string_view name) {
  for (FailMode m : {FailMode::kOpen, FailMode::kClosed, FailMode::kLocal}) {
    if (name == FailModeName(m)) return m;
  }
  return std::nullopt;
}

std::string SyncIntervalTooLong(DurationUs period, DurationUs interval) {
  return "a window of " + FormatDuration(period) + " is not longer than store.sync_interval (" +
         FormatDuration(interval) +
         "): nodes would learn each other's hits only once the window is over, each admitting "
         "the whole limit (use a shorter sync_interval)";
}

std::string_view StoreTypeName(StoreConfig::Type t) {
  switch (t) {
    case StoreConfig::Type::kMemory:
      return "memory";
    case StoreConfig::Type::kRedis:
      return "redis";
    case StoreConfig::Type::kRedisCluster:
      return "redis-cluster";
  }
  return "?";
}

std::optional<StoreConfig::Type> ParseStoreType(std::string_view name) {
  for (StoreConfig::Type t :
       {StoreConfig::Type::kMemory, StoreConfig::Type::kRedis, StoreConfig::Type::kRedisCluster}) {
    if (name == StoreTypeName(t)) return t;
  }
  return std::nullopt;
}

std::string_view StoreModeName(StoreConfig::Mode m) {
  return m == StoreConfig::Mode::kLocalSync ? "local_sync" : "remote";
}

std::optional<StoreConfig::Mode> ParseStoreMode(std::string_view name) {
  for (StoreConfig::Mode m : {StoreConfig::Mode::kRemote, StoreConfig::Mode::kLocalSync}) {
    if (name == StoreModeName(m)) return m;
  }
  return std::nullopt;
}

FailMode EffectiveFailMode(const Config& config, const Rule& rule) {
  return rule.fail_mode.value_or(config.store.fail_mode);
}

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
