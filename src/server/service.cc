#include "server/service.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <new>

#include <boost/asio/post.hpp>

#include "core/log.h"

namespace sluice::server {
namespace {

// Per-thread view of the active rules and scratch space, so a decision allocates nothing
// once a thread has warmed up.
struct ThreadState {
  uint64_t owner = 0;  // Service::id_, not its address: a new Service may reuse that
  std::shared_ptr<const ActiveRules> rules;
  rules::Resolution resolution;
  std::vector<LimitCheck> checks;
  std::vector<Decision> decisions;
  std::vector<redis::RemoteCheck> remote_checks;
  std::vector<sync::SyncCheck> sync_checks;
};
thread_local ThreadState t_state;

LogLimiter g_degraded_log;
LogLimiter g_full_log;

void LogSyncTableFull() {
  g_full_log.Warn(
      "local_sync: a limit's table of keys is full (--max-keys) with keys whose windows are "
      "still live; new keys are decided by this node alone, without sync");
}

// How long /readyz says degraded after a key was refused a slot: a table stays full while
// its keys' windows are live, and a scrape or probe between two refusals should see it.
constexpr DurationUs kFullReported = 10 * kSecond;

redis::RedisStoreOptions RedisOptions(const rules::StoreConfig& c) {
  redis::RedisStoreOptions o;
  o.cluster = c.type == rules::StoreConfig::Type::kRedisCluster;
  o.addresses = c.addresses;
  o.username = c.username;
  o.password = c.password;
  o.connect_timeout = std::chrono::microseconds(c.connect_timeout);
  o.timeout = std::chrono::microseconds(c.timeout);
  o.pool_size = c.pool_size;
  o.key_prefix = c.key_prefix;
  o.tls = c.tls;
  o.tls_ca_file = c.tls_ca_file;
  o.tls_cert_file = c.tls_cert_file;
  o.tls_key_file = c.tls_key_file;
  o.tls_server_name = c.tls_server_name;
  o.tls_verify = c.tls_verify;
  o.breaker_failures = c.breaker_failures;
  o.breaker_open_for = std::chrono::microseconds(c.breaker_open_for);
  return o;
}

bool SameStore(const rules::StoreConfig& a, const rules::StoreConfig& b) {
  return a.type == b.type && a.addresses == b.addresses && a.username == b.username &&
         a.password == b.password && a.tls == b.tls && a.tls_ca_file == b.tls_ca_file &&
         a.tls_cert_file == b.tls_cert_file && a.tls_key_file == b.tls_key_file &&
         a.tls_server_name == b.tls_server_name && a.tls_verify == b.tls_verify &&
         a.connect_timeout == b.connect_timeout && a.timeout == b.timeout &&
         a.pool_size == b.pool_size && a.key_prefix == b.key_prefix &&
         a.breaker_failures == b.breaker_failures && a.breaker_open_for == b.breaker_open_for &&
         a.mode == b.mode && a.sync_interval == b.sync_interval && a.peers == b.peers;
}

sync::SyncerOptions SyncerOptionsFor(const rules::Config& c) {
  sync::SyncerOptions o;
  o.address = c.store.addresses.front();
  o.cluster = c.store.type == rules::StoreConfig::Type::kRedisCluster;
  if (o.cluster) o.seeds.assign(c.store.addresses.begin() + 1, c.store.addresses.end());
  o.username = c.store.username;
  o.password = c.store.password;
  o.key_prefix = c.store.key_prefix;
  o.interval = std::chrono::microseconds(c.store.sync_interval);
  o.connect_timeout = std::chrono::microseconds(c.store.connect_timeout);
  o.tls = c.store.tls;
  o.tls_files = {c.store.tls_ca_file, c.store.tls_cert_file, c.store.tls_key_file};
  o.tls_server_name = c.store.tls_server_name;
  o.tls_verify = c.store.tls_verify;
  o.region = c.region;
  for (const auto& p : c.store.peers) o.peers.push_back({p.region, p.address});
  return o;
}

}  // namespace

// A decision waiting for the shared store.
struct Service::PendingRemote {
  std::shared_ptr<const ActiveRules> active;
  Verdict verdict;
  bool shadow = false;
  rules::FailMode fail_mode = rules::FailMode::kLocal;
  int64_t cost = 1;
  std::vector<std::pair<const rules::LimitSpec*, std::string>> checks;
  std::function<void(Verdict)> done;
};

Limit* ActiveRules::LimitFor(const rules::LimitSpec* spec) const {
  auto it = limits.find(spec);
  return it == limits.end() ? nullptr : it->second;
}

Service::Service(rules::Config config, MemoryStore::Options store_options, bool start_sync)
    : store_(store_options),
      store_config_(config.store),
      region_(config.region),
      default_fail_mode_(config.store.fail_mode) {
  if (store_config_.mode == rules::StoreConfig::Mode::kLocalSync) {
    sync_ = std::make_unique<sync::SyncStore>(store_options.max_keys_per_limit);
    if (start_sync) syncer_ = std::make_unique<sync::Syncer>(*sync_, SyncerOptionsFor(config));
  } else if (store_config_.type != rules::StoreConfig::Type::kMemory) {
    remote_ = std::make_unique<redis::RedisStore>(RedisOptions(store_config_));
  }
  active_ = Build(std::move(config), 1);
  generation_.store(1);
}

Service::~Service() { syncer_.reset(); }

std::shared_ptr<const ActiveRules> Service::Build(rules::Config config, uint64_t generation) {
  rules::TrustedProxies trusted(config.trusted_proxies);
  auto active = std::make_shared<ActiveRules>(ActiveRules{
      rules::RuleSet(std::move(config)), std::move(trusted), {}, {}, {}, {}, generation});
  for (const rules::LimitSpec* spec : active->rules.AllLimits()) {
    // The in-memory limits exist with any store: they are the `local` fail mode's.
    // A name another policy holds (an older config's, or another rule's with the same limit
    // name) gets counters of its own; a policy unchanged by a reload keeps its counts.
    Limit* l = store_.AddLimitOrVariant(spec->name, spec->policy);
    active->limits.emplace(spec, l);
    if (remote_) {
      active->remote_limits.emplace(
          spec, std::make_unique<redis::RemoteLimit>(
                    redis::MakeRemoteLimit(spec->name + spec->store_scope, spec->policy)));
    }
    if (sync_) {
      // The same id as the Redis store's keys: a changed policy starts on fresh counts.
      std::string error;
      auto limit =
          sync_->AddLimit(redis::MakeRemoteLimit(spec->name + spec->store_scope, spec->policy).id,
                          spec->policy, &error);
      if (!error.empty()) throw std::runtime_error("limit '" + spec->name + "': " + error);
      active->sync_limits.emplace(spec, std::move(limit));
    }
  }
  const rules::Config& c = active->rules.config();
  active->metrics_slots.emplace(&c.default_rule, metrics_.SlotFor(c.default_rule.name));
  for (const rules::Rule& r : c.endpoints)
    active->metrics_slots.emplace(&r, metrics_.SlotFor(r.name));
  return active;
}

Status Service::Reload(rules::Config config) {
  // The rules are built outside mu_, which the workers take to pick up the new ones: a
  // large rule set's build then holds none of them.
  std::lock_guard reloading(reload_mu_);
  // The new rules were validated against the file's store; which limits can run depends on
  // the store's type and mode (local_sync adds up window counts; Redis bounds limit x
  // window), so rules for another type or mode are not applied to the running store.
  if (config.store.type != store_config_.type || config.store.mode != store_config_.mode) {
    return Status::Invalid(
        "the store's type or mode changed; that takes a restart, and the rules were checked "
        "against the new store, so the running rules stay");
  }
  // The region names this node's regional shares (their keys) and the totals the syncer
  // publishes to the other regions: the new rules' shares with the old publications would
  // count one region's hits under two names.
  if (config.region != region_) {
    return Status::Invalid("the top-level region changed ('" + region_ + "' to '" + config.region +
                           "'); that takes a restart, so the running rules stay");
  }
  // local_sync: the rules were checked against the file's sync_interval, but the running
  // one stays until a restart; a window must be longer than the one that runs.
  if (local_sync()) {
    std::string too_short;
    rules::RuleSet(config).ForEachLimit(
        [&](const rules::Rule&, std::string_view, const rules::LimitSpec& l) {
          if (too_short.empty() && l.policy.period <= store_config_.sync_interval) {
            too_short = "limit '" + l.name + "': " +
                        rules::SyncIntervalTooLong(l.policy.period, store_config_.sync_interval) +
                        " (the running sync_interval; a new one takes a restart)";
          }
        });
    if (!too_short.empty()) return Status::Invalid(too_short);
  }
  if (!SameStore(config.store, store_config_)) {
    // Connections live on every worker; switching stores under load is a restart's job.
    Log("WARN", "the store section changed; the new rules apply, the store changes need a restart");
  }
  const rules::FailMode fail_mode = config.store.fail_mode;
  uint64_t next = generation_.load() + 1;
  std::shared_ptr<const ActiveRules> built;
  try {
    built = Build(std::move(config), next);
  } catch (const std::runtime_error& e) {  // a local_sync table that cannot be mapped
    return Status::Invalid(e.what());
  } catch (const std::bad_alloc&) {
    return Status::Invalid("out of memory building the rules");
  }
  // The fail mode is a decision's, not the connections': it applies with the rules, as the
  // rules' own fail_mode does (and not at all when they are refused).
  default_fail_mode_.store(fail_mode, std::memory_order_relaxed);
  {
    std::lock_guard lock(mu_);
    active_ = std::move(built);
  }
  generation_.store(next, std::memory_order_release);
  SetReloadOutcome(ReloadPart::kRules, true);
  return Status::Ok();
}

std::string_view Service::ReloadPartName(ReloadPart part) {
  switch (part) {
    case ReloadPart::kRules:
      return "rules";
    case ReloadPart::kEnvoy:
      return "envoy";
    case ReloadPart::kGrpcTls:
      return "grpc_tls";
    case ReloadPart::kStoreTls:
      return "store_tls";
  }
  return "unknown";
}

std::shared_ptr<const ActiveRules> Service::rules() const {
  std::lock_guard lock(mu_);
  return active_;
}

const ActiveRules& Service::Active() {
  ThreadState& t = t_state;
  if (t.owner != id_ || !t.rules ||
      t.rules->generation != generation_.load(std::memory_order_acquire)) {
    t.owner = id_;
    t.rules = rules();
  }
  return *t.rules;
}

std::shared_ptr<const ActiveRules> Service::ActiveShared() {
  Active();
  return t_state.rules;
}

void Service::CountVerdict(const Verdict& v) {
  Metrics::Outcome outcome = Metrics::Outcome::kAllowed;
  if (v.peek) {
    outcome = Metrics::Outcome::kPeeked;
  } else if (v.would_reject) {
    outcome = v.allowed ? Metrics::Outcome::kShadowLimited : Metrics::Outcome::kLimited;
  } else if (v.decision.delay > 0) {
    outcome = Metrics::Outcome::kDelayed;
  }
  metrics_.Count(v.metrics_slot, outcome);
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
  v.peek = cost == 0;  // asked for; a rule's configured cost of 0 admits its traffic
  const size_t n = t.resolution.checks.size();
  if (n == 0) {  // a rule with no limits admits everything
    CountVerdict(v);
    return v;
  }
  t.checks.clear();
  for (const auto& c : t.resolution.checks) {
    t.checks.push_back({active.LimitFor(c.limit), c.key, t.resolution.cost});
  }
  t.decisions.resize(n);
  size_t deciding = 0;
  if (!sync_ || !DecideSynced(active, v.now, &deciding)) {
    deciding = store_.CheckAll(t.checks, v.now, t.decisions);
  }
  v.decision = RequestDecision(t.decisions, deciding);
  v.limit = t.resolution.checks[deciding].limit;
  v.would_reject = !v.decision.allowed;
  v.allowed = v.decision.allowed || t.resolution.shadow;
  CountVerdict(v);
  return v;
}

bool Service::DecideSynced(const ActiveRules& active, TimeUs now, size_t* deciding) {
  ThreadState& t = t_state;
  t.sync_checks.clear();
  for (const auto& c : t.resolution.checks) {
    t.sync_checks.push_back(
        {active.sync_limits.find(c.limit)->second.get(), c.key, t.resolution.cost});
  }
  if (sync_->CheckAll(t.sync_checks, now, t.decisions, deciding) ==
      sync::SyncStore::Result::kDecided) {
    return true;
  }
  LogSyncTableFull();
  return false;
}

void Service::DecideRemote(std::shared_ptr<const ActiveRules> active, const rules::Request& req,
                           std::optional<int64_t> cost, boost::asio::io_context& io,
                           std::function<void(Verdict)> done) {
  ThreadState& t = t_state;
  active->rules.Resolve(req, t.resolution);
  if (cost) t.resolution.cost = *cost;
  auto p = std::make_shared<PendingRemote>();
  Verdict& v = p->verdict;
  v.rule = t.resolution.rule;
  v.metrics_slot = active->metrics_slots.find(v.rule)->second;
  v.now = SystemClock::Instance().Now();
  p->shadow = t.resolution.shadow;
  p->fail_mode = v.rule->fail_mode.value_or(DefaultFailMode());
  p->cost = t.resolution.cost;
  v.peek = cost == 0;
  p->done = std::move(done);
  p->active = active;
  for (const auto& c : t.resolution.checks) p->checks.emplace_back(c.limit, c.key);
  if (p->checks.empty()) {  // a rule with no limits admits everything
    CountVerdict(v);
    boost::asio::post(io, [p] { p->done(p->verdict); });
    return;
  }
  t.remote_checks.clear();
  for (const auto& [spec, key] : p->checks) {
    t.remote_checks.push_back({active->remote_limits.find(spec)->second.get(), key, p->cost});
  }
  remote_->CheckAll(io, t.remote_checks,
                    [this, p](redis::StoreError error, std::span<const Decision> decisions,
                              TimeUs) { FinishRemote(*p, error, decisions); });
}

void Service::FinishRemote(PendingRemote& p, redis::StoreError error,
                           std::span<const Decision> decisions) {
  if (error != redis::StoreError::kNone) {
    CountStoreError(error);
    return p.done(Degrade(p, error));
  }
  Verdict& v = p.verdict;
  size_t deciding = DecidingIndex(decisions);
  v.decision = RequestDecision(decisions, deciding);
  v.limit = p.checks[deciding].first;
  v.would_reject = !v.decision.allowed;
  v.allowed = v.decision.allowed || p.shadow;
  CountVerdict(v);
  p.done(v);
}

Verdict Service::Degrade(PendingRemote& p, redis::StoreError error) {
  Verdict v = p.verdict;
  v.now = SystemClock::Instance().Now();
  LogDegraded("rule '" + v.rule->name + "'", p.fail_mode, error);
  const rules::LimitSpec* first = p.checks.front().first;
  v.limit = first;
  switch (p.fail_mode) {
    case rules::FailMode::kOpen:
      v.degraded = Degraded::kOpen;
      v.decision = FailDecision(first->policy, p.fail_mode);
      break;
    case rules::FailMode::kClosed:
      v.degraded = Degraded::kClosed;
      v.decision = FailDecision(first->policy, p.fail_mode);
      v.would_reject = true;
      v.allowed = p.shadow;
      break;
    case rules::FailMode::kLocal: {
      v.degraded = Degraded::kLocal;
      ThreadState& t = t_state;
      const ActiveRules& active = *p.active;
      t.checks.clear();
      for (const auto& [spec, key] : p.checks)
        t.checks.push_back({active.LimitFor(spec), key, p.cost});
      t.decisions.resize(t.checks.size());
      size_t deciding = store_.CheckAll(t.checks, v.now, t.decisions);
      v.decision = RequestDecision(t.decisions, deciding);
      v.limit = p.checks[deciding].first;
      v.would_reject = !v.decision.allowed;
      v.allowed = v.decision.allowed || p.shadow;
      break;
    }
  }
  CountVerdict(v);
  return v;
}

void Service::LogDegraded(std::string_view what, rules::FailMode mode, redis::StoreError error) {
  metrics_.CountDegraded(static_cast<size_t>(mode));
  if (g_degraded_log.Allow()) {
    uint64_t more = g_degraded_log.TakeSuppressed();
    Log("WARN", "store unavailable (" + std::string(redis::StoreErrorName(error)) +
                    "): " + std::string(what) + " decided by fail_mode " +
                    std::string(rules::FailModeName(mode)) +
                    (more ? " (and " + std::to_string(more) + " more degraded decisions)" : ""));
  }
}

Decision Service::FailDecision(const Policy& policy, rules::FailMode mode) const {
  bool windowed = policy.algorithm == Algorithm::kFixedWindow ||
                  policy.algorithm == Algorithm::kSlidingWindowLog ||
                  policy.algorithm == Algorithm::kSlidingWindowCounter;
  int64_t capacity = windowed ? policy.limit : policy.EffectiveBurst();
  if (mode == rules::FailMode::kOpen) {
    return {true, capacity, capacity, 0, 0, 0};  // the shared counts are unknown: a fresh key
  }
  return {false, capacity, 0, store_config_.breaker_open_for, store_config_.breaker_open_for, 0};
}

std::shared_ptr<sync::SyncLimit> Service::AddSyncLimit(const std::string& name,
                                                       const Policy& policy, std::string* error) {
  return sync_ ? sync_->AddLimit(redis::MakeRemoteLimit(name, policy).id, policy, error) : nullptr;
}

bool Service::CheckStore(std::span<const StoreCheck> checks, rules::FailMode mode,
                         boost::asio::io_context& io, StoreResult* out,
                         std::function<void(StoreResult)> done) {
  auto synced = [](const StoreCheck& c) { return c.synced != nullptr; };
  if (sync_ && !checks.empty() && std::all_of(checks.begin(), checks.end(), synced)) {
    ThreadState& t = t_state;
    t.sync_checks.clear();
    for (const StoreCheck& c : checks) t.sync_checks.push_back({c.synced, c.key, c.cost});
    out->decisions.resize(checks.size());
    size_t deciding = 0;
    if (sync_->CheckAll(t.sync_checks, SystemClock::Instance().Now(), out->decisions, &deciding) ==
        sync::SyncStore::Result::kDecided) {
      return true;
    }
    LogSyncTableFull();
  }
  auto local = [this](std::span<const StoreCheck> cs, StoreResult& r) {
    ThreadState& t = t_state;
    t.checks.clear();
    for (const StoreCheck& c : cs) t.checks.push_back({c.local, c.key, c.cost});
    r.decisions.resize(cs.size());
    if (!cs.empty()) store_.CheckAll(t.checks, SystemClock::Instance().Now(), r.decisions);
  };
  if (!remote_ || checks.empty()) {
    local(checks, *out);
    return true;
  }
  auto degrade = [this, local, mode](const std::vector<StoreCheck>& cs, redis::StoreError error) {
    StoreResult r;
    LogDegraded("a direct check", mode, error);
    if (mode == rules::FailMode::kLocal) {
      r.degraded = Degraded::kLocal;
      local(cs, r);
      return r;
    }
    r.degraded = mode == rules::FailMode::kOpen ? Degraded::kOpen : Degraded::kClosed;
    for (const StoreCheck& c : cs) r.decisions.push_back(FailDecision(c.remote->policy, mode));
    return r;
  };
  using Shared = std::pair<std::vector<StoreCheck>, std::function<void(StoreResult)>>;
  auto shared = std::make_shared<Shared>(std::vector<StoreCheck>(checks.begin(), checks.end()),
                                         std::move(done));
  ThreadState& t = t_state;
  t.remote_checks.clear();
  for (const StoreCheck& c : shared->first) t.remote_checks.push_back({c.remote, c.key, c.cost});
  remote_->CheckAll(io, t.remote_checks,
                    [this, shared, degrade](redis::StoreError error,
                                            std::span<const Decision> decisions, TimeUs) {
                      if (error != redis::StoreError::kNone) {
                        CountStoreError(error);
                        return shared->second(degrade(shared->first, error));
                      }
                      StoreResult r;
                      r.decisions.assign(decisions.begin(), decisions.end());
                      shared->second(std::move(r));
                    });
  return false;
}

bool Service::StoreReady(std::string* type, std::string* state) const {
  if (syncer_) {
    *type = "redis (local_sync)";
    sync::Syncer::Stats s = syncer_->stats();
    if (s.failing) {
      *state = "degraded: sync failing (" + s.last_error +
               "), decisions go on from local counts; hits of " + std::to_string(sync_->held()) +
               " keys wait for Redis";
      return false;
    }
    if (s.peer_failing) {
      *state = "degraded: publishing this region's totals failed (" + s.last_peer_error +
               "): the other regions see this region's hits late";
      return false;
    }
    TimeUs full = sync_->last_full();
    if (full != 0 && SystemClock::Instance().Now() - full < kFullReported) {
      *state =
          "degraded: a limit's key table is full (--max-keys): new keys are decided by this "
          "node alone, without sync";
      return false;
    }
    *state = "ok: local counts, synced every " + FormatDuration(store_config_.sync_interval);
    return true;
  }
  switch (store_config_.type) {
    case rules::StoreConfig::Type::kMemory:
      *type = "memory";
      *state = "ok";
      return true;
    case rules::StoreConfig::Type::kRedis:
      *type = "redis";
      break;
    case rules::StoreConfig::Type::kRedisCluster:
      *type = "redis-cluster";
      break;
  }
  redis::RedisStore::Health h = remote_->health();
  if (h.open + h.probing + h.unreachable == 0) {
    if (h.slot_refusing > 0) {
      // Every node answers, but some keys took their fail mode: a slot migration's
      // TRYAGAIN, or a slot no master serves.
      *state = "degraded: " + h.slot_problem +
               " within the last 10 s: keys of the slots it refused decide by their rules' "
               "fail_mode";
      return false;
    }
    *state = "ok";
    return true;
  }
  const std::string why = h.problem.empty() ? "" : " (" + h.problem + ")";
  if (store_config_.type == rules::StoreConfig::Type::kRedis) {
    *state =
        h.open ? "unavailable: circuit breaker open" + why + ", rules decide by their fail_mode"
        : h.probing
            ? "recovering: probing the store"
            : "unavailable: no connection comes up" + why + ", rules decide by their fail_mode";
    return false;
  }
  if (h.open + h.probing == 0) {
    *state = "unavailable: no connection comes up to " + std::to_string(h.unreachable) + " of " +
             std::to_string(h.nodes) + " nodes" + why +
             ", their keys decide by their rules' fail_mode";
    return false;
  }
  *state = "unavailable: circuit breaker open for " + std::to_string(h.open + h.probing) + " of " +
           std::to_string(h.nodes) + " nodes (" + (h.problem.empty() ? h.example : h.problem) +
           "), their keys decide by their rules' fail_mode";
  return false;
}

void Service::RenderSyncMetrics(std::string& out) const {
  if (!syncer_) return;
  sync::Syncer::Stats s = syncer_->stats();
  auto counter = [&out](std::string_view name, std::string_view help, uint64_t v) {
    AppendMetric(out, name, help, "counter", std::to_string(v));
  };
  counter("sluice_sync_rounds_total",
          "Sync rounds that reached Redis (an idle node's probe is a round).", s.rounds);
  counter("sluice_sync_failures_total", "Sync rounds that failed; decisions went on locally.",
          s.failures);
  counter("sluice_sync_windows_total", "Windows of keys whose global totals came back.",
          s.windows_synced);
  counter("sluice_sync_dropped_hits_total",
          "Hits never sent because their window ended while Redis was unreachable.",
          sync_->dropped());
  counter("sluice_sync_table_full_total", "Decisions made without sync: the key table was full.",
          sync_->full());
  counter("sluice_sync_peer_failures_total",
          "Rounds whose totals could not be published to another region.", s.peer_failures);
  counter("sluice_sync_peer_dropped_total",
          "Totals given up on for another region: more than 100,000 already waited for it.",
          s.peer_dropped);
  AppendMetric(out, "sluice_sync_held_keys", "Keys whose hits wait for Redis.", "gauge",
               std::to_string(sync_->held()));
  auto seconds = [&out](std::string_view name, std::string_view help, int64_t us) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.6f", static_cast<double>(us) / 1e6);
    AppendMetric(out, name, help, "gauge", buf);
  };
  seconds("sluice_sync_round_max_seconds",
          "The longest sync round since the start, from collecting hits to applying totals.",
          s.round_max_us);
  seconds("sluice_sync_interval_max_seconds",
          "The longest time between two sync rounds' starts since the start.", s.interval_max_us);
  AppendMetric(out, "sluice_sync_degraded",
               "Whether the last sync round failed, or its publication to another region (1).",
               "gauge", s.failing || s.peer_failing ? "1" : "0");
}

void Service::CountStoreError(redis::StoreError error) {
  // A call the breaker kept from the store is counted by the degraded decision only.
  if (error != redis::StoreError::kOpen) metrics_.CountStoreError(static_cast<size_t>(error) - 1);
}

void Service::ConnectThread(boost::asio::io_context& io) {
  if (remote_) remote_->Connect(io);
}

void Service::CloseThread() {
  if (remote_) remote_->CloseThread();
}

bool Service::ReloadStoreTls(std::string* error) {
  if (remote_ && !remote_->ReloadTls(error)) return false;
  return !syncer_ || syncer_->ReloadTls(error);
}

void Service::ReportFullTables() {
  auto now = store_.FullRefusals();
  for (size_t i = 0; i < now.size(); ++i) {
    uint64_t before = i < full_refusals_seen_.size() ? full_refusals_seen_[i].second : 0;
    if (now[i].second > before) {
      Log("WARN", "limit " + now[i].first + ": " + std::to_string(now[i].second - before) +
                      " new keys refused, its table full of keys at their limit (a key with "
                      "nothing left is never forgotten; raise --max-keys)");
    }
  }
  full_refusals_seen_ = std::move(now);
}

}  // namespace sluice::server
