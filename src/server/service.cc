#include "server/service.h"

#include <algorithm>

namespace sluice::server {
namespace {

// Per-thread view of the active rules and scratch space, so a decision allocates nothing
// once a thread has warmed up.
struct ThreadState {
  const Service* owner = nullptr;
  std::shared_ptr<const ActiveRules> rules;
  rules::Resolution resolution;
  std::vector<LimitCheck> checks;
  std::vector<Decision> decisions;
};
thread_local ThreadState t_state;

}  // namespace

Limit* ActiveRules::LimitFor(const rules::LimitSpec* spec) const {
  auto it = limits.find(spec);
  return it == limits.end() ? nullptr : it->second;
}

Service::Service(rules::Config config, MemoryStore::Options store_options) : store_(store_options) {
  active_ = Build(std::move(config), 1);
  generation_.store(1);
}

std::shared_ptr<const ActiveRules> Service::Build(rules::Config config, uint64_t generation) {
  rules::TrustedProxies trusted(config.trusted_proxies);
  auto active = std::make_shared<ActiveRules>(
      ActiveRules{rules::RuleSet(std::move(config)), std::move(trusted), {}, {}, generation});
  for (const rules::LimitSpec* spec : active->rules.AllLimits()) {
    Limit* l = store_.AddLimit(spec->name, spec->policy);
    // The name is taken by another policy (an older config, or another rule using the same
    // limit name): give this policy counters of its own.
    for (int i = 2; !l && i < 1000; ++i) {  // policies are validated: the first new name works
      l = store_.AddLimit(spec->name + "#" + std::to_string(generation) + "." + std::to_string(i),
                          spec->policy);
    }
    active->limits.emplace(spec, l);
  }
  const rules::Config& c = active->rules.config();
  active->metrics_slots.emplace(&c.default_rule, metrics_.SlotFor(c.default_rule.name));
  for (const rules::Rule& r : c.endpoints)
    active->metrics_slots.emplace(&r, metrics_.SlotFor(r.name));
  return active;
}

Status Service::Reload(rules::Config config) {
  std::lock_guard lock(mu_);
  uint64_t next = generation_.load() + 1;
  active_ = Build(std::move(config), next);
  generation_.store(next, std::memory_order_release);
  return Status::Ok();
}

std::shared_ptr<const ActiveRules> Service::rules() const {
  std::lock_guard lock(mu_);
  return active_;
}

const ActiveRules& Service::Active() {
  ThreadState& t = t_state;
  if (t.owner != this || !t.rules ||
      t.rules->generation != generation_.load(std::memory_order_acquire)) {
    t.owner = this;
    t.rules = rules();
  }
  return *t.rules;
}

Verdict Service::Decide(const ActiveRules& active, const rules::Request& req,
                        std::optional<int64_t> cost) {
  ThreadState& t = t_state;
  active.rules.Resolve(req, t.resolution);
  if (cost) t.resolution.cost = *cost;
  Verdict v;
  v.rule = t.resolution.rule;
  v.metrics_slot = active.metrics_slots.find(v.rule)->second;
  v.now = SystemClock::Instance().Now();
  const size_t n = t.resolution.checks.size();
  if (n == 0) {  // a rule with no limits admits everything
    metrics_.Count(v.metrics_slot, Metrics::Outcome::kAllowed);
    return v;
  }
  t.checks.clear();
  for (const auto& c : t.resolution.checks) {
    t.checks.push_back({active.LimitFor(c.limit), c.key, t.resolution.cost});
  }
  t.decisions.resize(n);
  size_t deciding = store_.CheckAll(t.checks, v.now, t.decisions);
  v.decision = t.decisions[deciding];
  v.limit = t.resolution.checks[deciding].limit;
  v.would_reject = !v.decision.allowed;
  v.allowed = v.decision.allowed || t.resolution.shadow;
  Metrics::Outcome outcome = Metrics::Outcome::kAllowed;
  if (v.would_reject) {
    outcome = v.allowed ? Metrics::Outcome::kShadowLimited : Metrics::Outcome::kLimited;
  } else if (v.decision.delay > 0) {
    outcome = Metrics::Outcome::kDelayed;
  }
  metrics_.Count(v.metrics_slot, outcome);
  return v;
}

}  // namespace sluice::server
