#include "server/admin.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <optional>
#include <vector>

#include <boost/asio/post.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "algo/saturating.h"
#include "rules/config_file.h"
#include "rules/path.h"
#include "server/query.h"

namespace sluice::server {
namespace http = boost::beast::http;
namespace json = boost::json;

namespace {

// An admin call's parameter, decoded. An operator's typo must not act on another key than
// meant: a parameter given twice, or with a '%' not followed by two hex digits (which the
// gateway's readers take literally), is an error, set in `error`.
std::optional<std::string> AdminParam(std::string_view target, std::string_view name,
                                      std::string* error) {
  QueryParamLookup found = FindQueryParams(target, name);
  if (found.count == 0) return std::nullopt;
  if (found.count > 1) {
    if (error->empty()) *error = "the parameter '" + std::string(name) + "' is given twice";
    return std::nullopt;
  }
  std::string_view raw = found.first_raw;
  for (size_t i = raw.find('%'); i != std::string_view::npos; i = raw.find('%', i + 1)) {
    if (i + 2 >= raw.size() || query_detail::Hex(raw[i + 1]) < 0 ||
        query_detail::Hex(raw[i + 2]) < 0) {
      if (error->empty()) {
        *error = "the parameter '" + std::string(name) +
                 "' has a '%' not followed by two hex digits (write '%25' for '%')";
      }
      return std::nullopt;
    }
  }
  return DecodeQueryComponent(raw);
}

void Reply(HttpResponse& res, http::status status, std::string_view type, std::string body) {
  res.result(status);
  res.set(http::field::content_type, type);
  res.body() = std::move(body);
}

// `text` with each byte that is not part of well-formed UTF-8 replaced by U+FFFD: keys and
// names come percent-decoded from the query, and a JSON text must be UTF-8 (RFC 8259 8.1).
std::string WellFormedUtf8(std::string_view text) {
  std::string out;
  for (size_t bad; (bad = rules::FirstNonUtf8(text)) != std::string_view::npos;) {
    out.append(text.substr(0, bad)).append("\xEF\xBF\xBD");
    text.remove_prefix(bad + 1);
  }
  return out.append(text);
}

void Error(HttpResponse& res, http::status status, const std::string& message) {
  json::object o;
  o["error"] = std::string(http::obsolete_reason(status));
  o["message"] = WellFormedUtf8(message);
  Reply(res, status, "application/json", json::serialize(o));
}

// GET /v1/keys' answer.
std::string KeyState(std::string_view name, const Policy& policy, std::string_view key,
                     const Decision& d) {
  json::object o;
  o["limit_name"] = WellFormedUtf8(name);
  o["policy"] = policy.ToString();
  o["key"] = WellFormedUtf8(key);
  o["limit"] = d.limit;
  o["remaining"] = d.remaining;
  o["reset_after_ms"] = algo::SatAdd(d.reset_after, kMillisecond - 1) / kMillisecond;
  return json::serialize(o);
}

// "Bearer TOKEN", the scheme in any case (RFC 9110 11.1) and one or more spaces after it,
// the token exactly; compared in time that depends neither on where the first difference
// is nor on how long the token is (only on what the client sent).
bool BearerIs(std::string_view value, const std::string& token) {
  constexpr std::string_view kScheme = "bearer";
  if (value.size() <= kScheme.size() || value[kScheme.size()] != ' ') return false;
  for (size_t i = 0; i < kScheme.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(value[i])) != kScheme[i]) return false;
  }
  std::string_view sent = value.substr(kScheme.size());
  sent.remove_prefix(std::min(sent.find_first_not_of(' '), sent.size()));
  // Every byte sent is compared, against the token's byte or a zero past its end.
  unsigned char diff = sent.size() == token.size() ? 0 : 1;
  for (size_t i = 0; i < sent.size(); ++i) {
    const char expected = i < token.size() ? token[i] : '\0';
    diff |= static_cast<unsigned char>(sent[i] ^ expected);
  }
  return diff == 0 && !token.empty();
}

}  // namespace

bool Admin::Handle(HttpRequest& req, const boost::asio::ip::tcp::endpoint&, HttpResponse& res,
                   const std::function<Completion()>& defer) {
  if (!token_.empty()) {
    auto it = req.find(http::field::authorization);
    if (it == req.end() || !BearerIs(it->value(), token_)) {
      res.set(http::field::www_authenticate, "Bearer");
      Error(res, http::status::unauthorized, "a bearer token is required");
      return true;
    }
  }
  std::string_view target = req.target();
  std::string_view path = target.substr(0, target.find('?'));
  if ((path == "/healthz" || path == "/readyz" || path == "/metrics") &&
      req.method() != http::verb::get && req.method() != http::verb::head) {
    res.set(http::field::allow, "GET, HEAD");
    Error(res, http::status::method_not_allowed, "use GET");
    return true;
  }
  if (path == "/healthz") {
    Reply(res, http::status::ok, "text/plain", "ok\n");
    return true;
  }
  if (path == "/readyz") {
    // Ready even while the shared store is down: rules keep deciding by their fail_mode,
    // and taking every node out of rotation at once would turn a Redis outage into a full
    // one. The store's state is reported for dashboards and alerts.
    auto answer = [this, &res] {
      std::string type, state;
      bool ok = service_.StoreReady(&type, &state);
      boost::json::object o;
      o["ready"] = true;
      o["store"] = type;
      o["store_state"] = state;
      o["degraded"] = !ok;
      Reply(res, http::status::ok, "application/json", boost::json::serialize(o));
    };
    // A breaker waiting for a probe is probed now (bounded by the store's timeout): with no
    // traffic, nothing else would tell whether Redis is back.
    redis::RedisStore* remote = service_.remote_store();
    if (!remote || remote->health().probing == 0) {
      answer();
      return true;
    }
    auto done = std::make_shared<Completion>(defer());
    remote->Probe(WorkerContext(), [answer, done] {
      answer();
      (*done)();
    });
    return false;
  }
  if (path == "/metrics") {
    auto active = service_.rules();
    std::string text = service_.metrics().Render([&](std::string& out) {
      out += "# HELP sluice_keys Keys held per limit.\n# TYPE sluice_keys gauge\n";
      std::string evictions =
          "# HELP sluice_evictions_total Keys evicted from full tables per limit.\n"
          "# TYPE sluice_evictions_total counter\n";
      std::string refusals =
          "# HELP sluice_table_full_refusals_total New keys refused per limit: its table was "
          "full of keys at their limit, which are never evicted.\n"
          "# TYPE sluice_table_full_refusals_total counter\n";
      // One series per limit name, over its tables: rules that share a name and policy
      // share one table; with different policies each has its own.
      std::map<std::string, std::vector<const Limit*>, std::less<>> by_name;
      const auto add = [&by_name](std::string_view name, const Limit& limit) {
        auto it = by_name.find(name);
        if (it == by_name.end())
          it = by_name.emplace(std::string(name), std::vector<const Limit*>{}).first;
        auto& tables = it->second;
        if (std::find(tables.begin(), tables.end(), &limit) == tables.end()) {
          tables.push_back(&limit);
        }
      };
      for (const auto& [spec, limit] : active->limits) add(spec->name, *limit);
      if (more_tables_) more_tables_(add);
      for (const auto& [name, tables] : by_name) {
        uint64_t keys = 0, evicted = 0, refused = 0;
        for (const Limit* t : tables) keys += t->size();
        // The counters add up every table the name has had: a reload that moves it to
        // another policy's table (or back) must not make them fall.
        std::vector<const Limit*> all = service_.store().TablesFor(name);
        for (const Limit* t : tables) {
          if (std::find(all.begin(), all.end(), t) == all.end()) all.push_back(t);
        }
        for (const Limit* t : all) {
          evicted += t->evictions();
          refused += t->full_refusals();
        }
        out += "sluice_keys{limit=\"" + PromLabel(name) + "\"} " + std::to_string(keys) + "\n";
        evictions += "sluice_evictions_total{limit=\"" + PromLabel(name) + "\"} " +
                     std::to_string(evicted) + "\n";
        refusals += "sluice_table_full_refusals_total{limit=\"" + PromLabel(name) + "\"} " +
                    std::to_string(refused) + "\n";
      }
      out += evictions;
      out += refusals;
      AppendMetric(out, "sluice_memory_store_bytes",
                   "Memory held by the in-memory tables, those a reload left unused included "
                   "(an expired key's memory is given back by the sweep).",
                   "gauge", std::to_string(service_.store().bytes()));
      AppendMetric(out, "sluice_reloads_total", "Config reloads applied.", "counter",
                   std::to_string(service_.reloads()));
      AppendMetric(out, "sluice_reload_failures_total",
                   "Config reloads refused; the running rules stayed.", "counter",
                   std::to_string(service_.reload_failures()));
      // Whether each part's last reload applied: the counters above cannot tell a failure
      // fixed by the next reload from one still standing.
      out +=
          "# HELP sluice_config_last_reload_successful Whether the last reload of each part "
          "applied (1) or was refused, the part running on as before (0): the rules, the "
          "Envoy config, the gRPC and the store's TLS files (a part shows once reloaded).\n"
          "# TYPE sluice_config_last_reload_successful gauge\n";
      for (size_t i = 0; i < Service::kReloadParts; ++i) {
        const auto part = static_cast<Service::ReloadPart>(i);
        const std::optional<bool> ok = service_.last_reload_ok(part);
        if (!ok && part != Service::ReloadPart::kRules) continue;
        out.append("sluice_config_last_reload_successful{part=\"")
            .append(Service::ReloadPartName(part))
            .append(ok.value_or(true) ? "\"} 1\n" : "\"} 0\n");
      }
      if (const redis::RedisStore* remote = service_.remote_store()) {
        // /readyz's view, for alerts: an idle node with an open breaker makes no
        // degraded decisions to count.
        const redis::RedisStore::Health h = remote->health();
        const auto gauge = [&out](std::string_view name, std::string_view help, size_t value) {
          AppendMetric(out, name, help, "gauge", std::to_string(value));
        };
        gauge("sluice_redis_nodes", "Redis nodes known (seeds, and a cluster's masters).", h.nodes);
        gauge("sluice_redis_nodes_open",
              "Redis nodes whose circuit breaker is open or waiting for a probe: their keys "
              "decide by their fail_mode.",
              h.open + h.probing);
        gauge("sluice_redis_nodes_unreachable",
              "Redis nodes no connection comes up to (refused, TLS, AUTH, no answer) while "
              "their breakers are closed.",
              h.unreachable);
        if (remote->options().cluster) {
          const redis::RedisStore::Redirects r = remote->redirects();
          out +=
              "# HELP sluice_redis_cluster_redirects_total Calls Redis Cluster sent to another "
              "node (MOVED: the slot map was stale; ASK: a slot migrating), followed.\n"
              "# TYPE sluice_redis_cluster_redirects_total counter\n"
              "sluice_redis_cluster_redirects_total{kind=\"moved\"} " +
              std::to_string(r.moved) +
              "\n"
              "sluice_redis_cluster_redirects_total{kind=\"ask\"} " +
              std::to_string(r.asked) + "\n";
          AppendMetric(out, "sluice_redis_cluster_tryagain_retries_total",
                       "Calls sent again after TRYAGAIN (a slot migration had split their "
                       "keys between two nodes).",
                       "counter", std::to_string(r.tried_again));
        }
      }
      service_.RenderSyncMetrics(out);
      if (more_metrics_) more_metrics_(out);
    });
    Reply(res, http::status::ok, "text/plain; version=0.0.4", std::move(text));
    return true;
  }
  if (path == "/v1/reload") {
    if (req.method() != http::verb::post) {
      res.set(http::field::allow, "POST");
      Error(res, http::status::method_not_allowed, "use POST");
      return true;
    }
    if (!reload_) {
      Error(res, http::status::bad_request, "no config file to reload");
      return true;
    }
    // Answered once the reload is done; meanwhile this worker serves on.
    auto done = std::make_shared<Completion>(defer());
    reload_([&res, done, &io = WorkerContext()](Status st) {
      boost::asio::post(io, [&res, done, st = std::move(st)] {
        if (st.ok()) {
          Reply(res, http::status::ok, "application/json", R"({"reloaded":true})");
        } else {
          Error(res,
                st.unavailable() ? http::status::service_unavailable : http::status::bad_request,
                st.message());
        }
        (*done)();
      });
    });
    return false;
  }
  if (path == "/v1/keys") return Keys(req, res, defer);
  Error(res, http::status::not_found, "no such admin endpoint");
  return true;
}

bool Admin::Keys(const HttpRequest& req, HttpResponse& res,
                 const std::function<Completion()>& defer) {
  const bool erase = req.method() == http::verb::delete_;
  if (!erase && req.method() != http::verb::get) {
    res.set(http::field::allow, "GET, DELETE");
    Error(res, http::status::method_not_allowed, "use GET or DELETE");
    return true;
  }
  std::string bad;
  auto limit_name = AdminParam(req.target(), "limit", &bad);
  auto key = AdminParam(req.target(), "key", &bad);
  auto rule_name = AdminParam(req.target(), "rule", &bad);
  auto tier_name = AdminParam(req.target(), "tier", &bad);
  if (!bad.empty()) {
    Error(res, http::status::bad_request, bad);
    return true;
  }
  if (!limit_name || !key) {
    Error(res, http::status::bad_request, "need ?limit=NAME&key=KEY");
    return true;
  }
  // The in-memory counters: the store itself, or with a shared store the ones the `local`
  // fail mode decides with (a reset forgets those too). The running rules' table of that
  // name, which after a reload that changed its policy is not the first one it had.
  auto active = service_.rules();
  // Rules, and a rule and its tiers, may give limits of different policies one name (each
  // then has its own counters): `rule=NAME` and `tier=TIER` say whose (`tier=` alone, or
  // empty, for a rule's own limits); without them, such a name is ambiguous and refused.
  struct Owned {
    std::string rule;
    std::string tier;
    const rules::LimitSpec* spec;
  };
  std::vector<Owned> named;
  active->rules.ForEachLimit(
      [&](const rules::Rule& r, std::string_view tier, const rules::LimitSpec& l) {
        if (l.name == *limit_name && (!rule_name || r.name == *rule_name) &&
            (!tier_name || tier == *tier_name)) {
          named.push_back({r.name, std::string(tier), &l});
        }
      });
  const rules::LimitSpec* spec = named.empty() ? nullptr : named.front().spec;
  for (const Owned& o : named) {
    if (o.spec->policy == spec->policy) continue;
    std::string owners;
    bool tiers = false;
    for (const Owned& each : named) {
      tiers = tiers || !each.tier.empty();
      owners += (owners.empty() ? "'" : ", '") + each.rule + "'" +
                (each.tier.empty() ? "" : " tier '" + each.tier + "'") + " (" +
                each.spec->policy.ToString() + ")";
    }
    Error(res, http::status::conflict,
          "limit name '" + *limit_name + "' is used by limits of different policies in rules " +
              owners +
              (tiers ? ": add &rule=NAME and &tier=TIER (empty for the rule's own)"
                     : ": add &rule=NAME"));
    return true;
  }
  if ((rule_name || tier_name) && !spec) {
    // "rule 'a' tier 'pro' has no limit named 'x'", "no rule's own limits (no tier) have a
    // limit named 'x'".
    const std::string tier = !tier_name           ? ""
                             : tier_name->empty() ? " (its own limits, no tier)"
                                                  : " tier '" + *tier_name + "'";
    const std::string quoted = "'" + *limit_name + "'";
    Error(res, http::status::not_found,
          rule_name ? "rule '" + *rule_name + "'" + tier + " has no limit named " + quoted
          : tier_name->empty() ? "no rule's own limits (no tier) have a limit named " + quoted
                               : "no rule" + tier + " has a limit named " + quoted);
    return true;
  }
  // Envoy's limits, which no rule owns, by their table's name. Any other name no running
  // rule owns is unknown, even if a table of that name remains from rules a reload replaced:
  // its state is no longer what any decision reads.
  const bool envoy_name =
      limit_name->starts_with("envoy:") || limit_name->starts_with("envoy-override:");
  Limit* local = spec ? active->limits.at(spec) : nullptr;
  if (envoy_name) {
    // The table the running Envoy config decides with: after reloads that changed a
    // limit's policy and back, the newest table of that name is not it.
    std::optional<Policy> current;
    if (more_tables_) {
      more_tables_([&](std::string_view name, const Limit& l) {
        if (!current && name == *limit_name) current = l.policy();
      });
    }
    local = current ? service_.store().AddLimitOrVariant(*limit_name, *current)
                    : service_.store().FindLimit(*limit_name);
  }
  // local_sync: decisions come from the synced counts, this node's view of every node's
  // hits in the window; GET shows that. No one node can reset them: each node's share is
  // its own field in Redis, which it sends again on its next round.
  if (service_.local_sync() && local) {
    std::shared_ptr<sync::SyncLimit> synced;  // held for the check
    if (spec) {
      if (auto it = active->sync_limits.find(spec); it != active->sync_limits.end()) {
        synced = it->second;
      }
    } else {  // an Envoy limit: its synced counts go by the same name and policy
      synced = service_.AddSyncLimit(*limit_name, local->policy());
    }
    if (synced != nullptr) {
      if (erase) {
        Error(res, http::status::conflict,
              "store mode local_sync sums every node's hits in Redis: a key cannot be reset "
              "from one node (its count ends with its window)");
        return true;
      }
      std::vector<StoreCheck> checks(1);
      checks[0].local = local;  // a key with no slot left is decided there, so read there
      checks[0].synced = synced.get();
      checks[0].key = *key;
      checks[0].cost = 0;
      auto done = std::make_shared<Completion>(defer());
      StoreResult now;
      if (service_.CheckStore(checks, rules::FailMode::kLocal, WorkerContext(), &now,
                              [&res, done, active, policy = local->policy(), name = *limit_name,
                               key = *key](StoreResult r) {
                                Reply(res, http::status::ok, "application/json",
                                      KeyState(name, policy, key, r.decisions[0]));
                                (*done)();
                              })) {
        Reply(res, http::status::ok, "application/json",
              KeyState(*limit_name, local->policy(), *key, now.decisions[0]));
        return true;
      }
      return false;
    }
  }
  if (!service_.remote()) {
    if (!local) {
      Error(res, http::status::not_found, "no limit named '" + *limit_name + "'");
    } else if (erase) {
      json::object o;
      o["deleted"] = local->Reset(*key);
      Reply(res, http::status::ok, "application/json", json::serialize(o));
    } else {
      Decision d = local->Check(*key, SystemClock::Instance().Now(), 0);
      Reply(res, http::status::ok, "application/json",
            KeyState(*limit_name, local->policy(), *key, d));
    }
    return true;
  }

  // With Redis the state is read (a peek of cost 0) or deleted there, by the limit's
  // current id: the one decisions use.
  const redis::RemoteLimit* remote = nullptr;
  if (auto it = spec ? active->remote_limits.find(spec) : active->remote_limits.end();
      it != active->remote_limits.end()) {
    remote = it->second.get();
  }
  // An Envoy limit's: the one its descriptors use, made from its name and policy as the
  // RLS makes it (held here until the call ends).
  std::shared_ptr<const redis::RemoteLimit> envoy_remote;
  if (!remote && envoy_name && local) {
    envoy_remote = std::make_shared<const redis::RemoteLimit>(
        redis::MakeRemoteLimit(*limit_name, local->policy()));
    remote = envoy_remote.get();
  }
  if (!remote) {
    Error(res, http::status::not_found, "no limit named '" + *limit_name + "'");
    return true;
  }
  auto done = std::make_shared<Completion>(defer());
  auto failed = [&res](redis::StoreError e) {
    Error(res, http::status::service_unavailable,
          "redis: " + std::string(redis::StoreErrorName(e)) + "; try again");
  };
  if (erase) {
    // The fail mode's local counts are reset with Redis's, and only once Redis has: a reset
    // that fails resets nothing. (`local` is the memory store's, which keeps every table.)
    service_.remote_store()->Forget(
        WorkerContext(), *remote, *key,
        [&res, done, failed, envoy_remote, local, key = *key](redis::StoreError e, bool held) {
          if (e != redis::StoreError::kNone) {
            failed(e);
          } else {
            if (local) local->Reset(key);
            json::object o;
            o["deleted"] = held;
            Reply(res, http::status::ok, "application/json", json::serialize(o));
          }
          (*done)();
        });
    return false;
  }
  redis::RemoteCheck check{remote, *key, 0};
  service_.remote_store()->CheckAll(
      WorkerContext(), std::span(&check, 1),
      [&res, done, failed, active, remote, envoy_remote, name = *limit_name, key = *key](
          redis::StoreError e, std::span<const Decision> d, TimeUs) {
        if (e != redis::StoreError::kNone) {
          failed(e);
        } else {
          Reply(res, http::status::ok, "application/json",
                KeyState(name, remote->policy, key, d[0]));
        }
        (*done)();
      });
  return false;
}

}  // namespace sluice::server
