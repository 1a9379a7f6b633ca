#include "server/admin.h"

#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "algo/saturating.h"
#include "rules/path.h"
#include "server/query.h"

namespace sluice::server {
namespace http = boost::beast::http;
namespace json = boost::json;

namespace {

void Reply(HttpResponse& res, http::status status, std::string_view type, std::string body) {
  res.result(status);
  res.set(http::field::content_type, type);
  res.body() = std::move(body);
}

void Error(HttpResponse& res, http::status status, const std::string& message) {
  json::object o;
  o["error"] = std::string(http::obsolete_reason(status));
  o["message"] = message;
  Reply(res, status, "application/json", json::serialize(o));
}

// The decoded value of one query parameter ("%20" and "+" become spaces).
std::optional<std::string> QueryParam(std::string_view target, std::string_view name) {
  auto raw = FindQueryParam(target, name);
  if (!raw) return std::nullopt;
  auto hex = [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; };
  std::string out;
  for (size_t i = 0; i < raw->size(); ++i) {
    char c = (*raw)[i];
    if (c == '+') {
      out += ' ';
    } else if (c == '%' && i + 2 < raw->size() && hex((*raw)[i + 1]) && hex((*raw)[i + 2])) {
      out += static_cast<char>(std::stoi(std::string(raw->substr(i + 1, 2)), nullptr, 16));
      i += 2;
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

bool Admin::Handle(HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
                   const std::function<Completion()>&) {
  Respond(req, peer, res);
  return true;
}

void Admin::Respond(const HttpRequest& req, const boost::asio::ip::tcp::endpoint&,
                    HttpResponse& res) {
  if (!token_.empty()) {
    auto it = req.find(http::field::authorization);
    if (it == req.end() || it->value() != "Bearer " + token_) {
      res.set(http::field::www_authenticate, "Bearer");
      return Error(res, http::status::unauthorized, "a bearer token is required");
    }
  }
  std::string_view target = req.target();
  std::string_view path = target.substr(0, target.find('?'));
  if (path == "/healthz") return Reply(res, http::status::ok, "text/plain", "ok\n");
  if (path == "/readyz") {
    // Ready even while the shared store is down: rules keep deciding by their fail_mode,
    // and taking every node out of rotation at once would turn a Redis outage into a full
    // one. The store's state is reported for dashboards and alerts.
    std::string type, state;
    bool ok = service_.StoreReady(&type, &state);
    boost::json::object o;
    o["ready"] = true;
    o["store"] = type;
    o["store_state"] = state;
    o["degraded"] = !ok;
    return Reply(res, http::status::ok, "application/json", boost::json::serialize(o));
  }
  if (path == "/metrics") {
    auto active = service_.rules();
    std::string text = service_.metrics().Render([&](std::string& out) {
      out += "# HELP sluice_keys Keys held per limit.\n# TYPE sluice_keys gauge\n";
      std::string evictions =
          "# HELP sluice_evictions_total Keys evicted from full tables per limit.\n"
          "# TYPE sluice_evictions_total counter\n";
      for (const auto& [spec, limit] : active->limits) {
        out += "sluice_keys{limit=\"" + spec->name + "\"} " + std::to_string(limit->size()) + "\n";
        evictions += "sluice_evictions_total{limit=\"" + spec->name + "\"} " +
                     std::to_string(limit->evictions()) + "\n";
      }
      out += evictions;
      out +=
          "# HELP sluice_reloads_total Config reloads applied.\n# TYPE sluice_reloads_total "
          "counter\nsluice_reloads_total " +
          std::to_string(service_.reloads()) + "\n";
      service_.RenderSyncMetrics(out);
    });
    return Reply(res, http::status::ok, "text/plain; version=0.0.4", std::move(text));
  }
  if (path == "/v1/reload") {
    if (req.method() != http::verb::post)
      return Error(res, http::status::method_not_allowed, "use POST");
    Status st = reload_ ? reload_() : Status::Invalid("no config file to reload");
    if (!st.ok()) return Error(res, http::status::bad_request, st.message());
    return Reply(res, http::status::ok, "application/json", R"({"reloaded":true})");
  }
  if (path == "/v1/keys") {
    auto limit_name = QueryParam(target, "limit");
    auto key = QueryParam(target, "key");
    if (!limit_name || !key)
      return Error(res, http::status::bad_request, "need ?limit=NAME&key=KEY");
    if (service_.remote()) {
      // The counters live in Redis, under "<prefix>{<key>}:<limit>~<policy hash>"; the ones
      // here only serve the `local` fail mode, and reading them would mislead.
      return Error(res, http::status::not_implemented,
                   "the counters are in Redis with this store; inspect or delete them there "
                   "(keys '<key_prefix>{KEY}:LIMIT~*')");
    }
    Limit* limit = service_.store().FindLimit(*limit_name);
    if (!limit) return Error(res, http::status::not_found, "no limit named '" + *limit_name + "'");
    if (req.method() == http::verb::delete_) {
      bool held = limit->Reset(*key);
      json::object o;
      o["deleted"] = held;
      return Reply(res, http::status::ok, "application/json", json::serialize(o));
    }
    if (req.method() != http::verb::get)
      return Error(res, http::status::method_not_allowed, "use GET or DELETE");
    Decision d = limit->Check(*key, SystemClock::Instance().Now(), 0);
    json::object o;
    o["limit_name"] = limit->name();
    o["policy"] = limit->policy().ToString();
    o["key"] = *key;
    o["limit"] = d.limit;
    o["remaining"] = d.remaining;
    o["reset_after_ms"] = algo::SatAdd(d.reset_after, kMillisecond - 1) / kMillisecond;
    return Reply(res, http::status::ok, "application/json", json::serialize(o));
  }
  Error(res, http::status::not_found, "no such admin endpoint");
}

}  // namespace sluice::server
