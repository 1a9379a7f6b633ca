#include "server/front.h"

#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/container/small_vector.hpp>

#include <list>
#include <optional>
#include <string>

#include "core/log.h"
#include "rules/http_token.h"
#include "rules/path.h"
#include "server/json_keys.h"
#include "server/query.h"

namespace sluice::server {
namespace http = boost::beast::http;
namespace json = boost::json;

namespace {

// Why a path with a raw backslash, %2F or %5C is refused
// (rules::PathOptions::allow_encoded_slashes).
constexpr const char* kEncodedSlash =
    "a '\\', an escaped '/' or '\\' (%2F, %5C), or a leading '//' in the path is refused: "
    "upstreams disagree on whether it separates segments or names a host "
    "(paths.allow_encoded_slashes allows it)";

// The decision API's paths are matched without a query string: "/v1/check?v=2" is the
// decision API too, not a request for the gateway's rules (which would answer "allowed").
std::string_view ApiRoute(std::string_view target) { return target.substr(0, target.find('?')); }

// A normalized path that names one of the API's routes in another spelling (case, slashes,
// escapes, a trailing slash): the exact spellings never reach the gateway's rules.
bool IsApiRouteSpelledOtherwise(std::string_view normalized) {
  for (std::string_view route : {"/v1/check", "/v1/check/batch", "/v1/envoy/ratelimit"}) {
    if (boost::beast::iequals(normalized, route)) return true;
  }
  return false;
}

LogLimiter forwarding_log;

// Whom the decision API believes: a client at an address in trusted_proxies, or a loopback
// one unless decision_api.trust_loopback is off. Not a client its proxies could not name:
// it stands behind them, not at their address.
bool TrustedCaller(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
                   const ActiveRules& active) {
  bool identified = true;
  const rules::IpAddress a = ClientAddress(req, peer, active, &identified);
  return identified && (active.trusted.Trusts(a) ||
                        (active.rules.config().decision_api_trusts_loopback && a.IsLoopback()));
}

// The value a header or query key takes when its field or parameter comes more than once.
constexpr char kRepeated[] = "(repeated)";

void JsonReply(HttpResponse& res, http::status status, std::string body) {
  res.result(status);
  res.set(http::field::content_type, "application/json");
  res.body() = std::move(body);
}

void BadRequest(HttpResponse& res, Service& service, const std::string& message) {
  service.metrics().CountBadRequest();
  json::object o;
  o["error"] = "bad_request";
  o["message"] = message;
  JsonReply(res, http::status::bad_request, json::serialize(o));
}

// Header and query lookups over a Beast request.
class HttpAttributes final : public rules::RequestAttributes {
 public:
  explicit HttpAttributes(const HttpRequest& req) : req_(req) {}
  // A header or parameter given more than once has no one value: applications and proxies
  // differ on which they read (the first in Flask and Go, the last in PHP and Django; a
  // header's lines joined, or one of them), so keying on either would let a client be
  // counted under one value (a new one each time) and served under another. Every such
  // request shares one key instead.
  std::optional<std::string_view> Header(std::string_view name) const override {
    auto [first, end] = req_.equal_range(name);
    if (first == end) return std::nullopt;
    if (std::next(first) != end) return std::string_view(kRepeated);
    return first->value();
  }
  std::optional<std::string_view> Query(std::string_view name) const override {
    QueryParamLookup found = FindQueryParams(req_.target(), name, "&;");
    if (found.count == 0) return std::nullopt;
    if (found.count > 1) return std::string_view(kRepeated);
    if (found.first_raw.find_first_of("%+") == std::string_view::npos) return found.first_raw;
    return decoded_.emplace_back(DecodeQueryComponent(found.first_raw));
  }

 private:
  const HttpRequest& req_;
  mutable std::list<std::string> decoded_;  // stable: the values handed out point here
};

// Header and query lookups over the decision API's JSON ("headers": {...}, "query": {...},
// or the query string of "path" when no "query" is given), read as the gateway reads a
// request's: a header named twice in any case, or a parameter given twice in the path,
// keys as "(repeated)".
class JsonAttributes final : public rules::RequestAttributes {
 public:
  explicit JsonAttributes(const json::object& o, std::string_view path_target) {
    if (auto* h = o.if_contains("headers"); h && h->is_object()) headers_ = &h->as_object();
    if (auto* q = o.if_contains("query"); q && q->is_object()) query_ = &q->as_object();
    path_target_ = path_target;
  }
  std::optional<std::string_view> Header(std::string_view lower_name) const override {
    if (!headers_) return std::nullopt;
    std::optional<std::string_view> found;
    for (const auto& kv : *headers_) {
      std::string_view k = kv.key();
      if (k.size() == lower_name.size() &&
          std::equal(
              k.begin(), k.end(), lower_name.begin(),
              [](char a, char b) { return std::tolower(static_cast<unsigned char>(a)) == b; }) &&
          kv.value().is_string()) {
        if (found) return std::string_view(kRepeated);
        found = std::string_view(kv.value().as_string());
      }
    }
    return found;
  }
  std::optional<std::string_view> Query(std::string_view name) const override {
    if (!query_) {
      QueryParamLookup found = FindQueryParams(path_target_, name, "&;");
      if (found.count == 0) return std::nullopt;
      if (found.count > 1) return std::string_view(kRepeated);
      return decoded_.emplace_back(DecodeQueryComponent(found.first_raw));
    }
    if (auto* v = query_->if_contains(name); v && v->is_string()) {
      return std::string_view(v->as_string());
    }
    return std::nullopt;
  }

 private:
  const json::object* headers_ = nullptr;
  const json::object* query_ = nullptr;
  std::string_view path_target_;            // "path" as given, query string and all
  mutable std::list<std::string> decoded_;  // stable: the values handed out point here
};

std::optional<std::string_view> StringField(const json::object& o, std::string_view name,
                                            std::string* error) {
  auto* v = o.if_contains(name);
  if (!v || v->is_null()) return std::nullopt;
  if (!v->is_string()) {
    *error = "'" + std::string(name) + "' must be a string";
    return std::nullopt;
  }
  return std::string_view(v->as_string());
}

}  // namespace

rules::IpAddress PeerAddress(const boost::asio::ip::tcp::endpoint& peer) {
  rules::IpAddress peer_ip;
  const auto& a = peer.address();
  if (a.is_v4() || (a.is_v6() && a.to_v6().is_v4_mapped())) {
    auto v4 = a.is_v4() ? a.to_v4()
                        : boost::asio::ip::make_address_v4(boost::asio::ip::v4_mapped, a.to_v6());
    auto b = v4.to_bytes();
    peer_ip.v4 = true;
    peer_ip.bytes = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3]};
  } else {
    peer_ip.v4 = false;
    auto b = a.to_v6().to_bytes();
    std::copy(b.begin(), b.end(), peer_ip.bytes.begin());
  }
  return peer_ip;
}

std::string ClientKey(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
                      const ActiveRules& active) {
  return rules::IpKey(ClientAddress(req, peer, active), active.rules.config().ipv6_prefix);
}

rules::IpAddress ClientAddress(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
                               const ActiveRules& active, bool* identified) {
  if (identified) *identified = true;
  const rules::Config& config = active.rules.config();
  rules::IpAddress peer_ip = PeerAddress(peer);
  rules::IpAddress client = peer_ip;
  if (!active.trusted.empty()) {
    // Inline storage: reading forwarding headers allocates nothing.
    // Only the header the config names: the proxy writes that one, and passes the other
    // on from the client as it came.
    boost::container::small_vector<std::string_view, 4> xff, fwd;
    const bool forwarded = config.forwarding_header == rules::Config::ForwardingHeader::kForwarded;
    bool other = false;  // the header not read came
    for (const auto& f : req) {
      if (boost::beast::iequals(f.name_string(), "x-forwarded-for")) {
        if (forwarded)
          other = true;
        else
          xff.push_back(f.value());
      } else if (f.name() == http::field::forwarded) {
        if (forwarded)
          fwd.push_back(f.value());
        else
          other = true;
      }
    }
    // A proxy that writes the other header: its clients are all counted as its address.
    if (other && xff.empty() && fwd.empty() && active.trusted.Trusts(peer_ip) &&
        forwarding_log.Allow()) {
      Log("WARN", std::string("a trusted proxy (") + peer_ip.ToString() + ") sent only " +
                      (forwarded ? "X-Forwarded-For" : "Forwarded") +
                      ", which forwarding_header does not read: its requests are keyed as "
                      "its own address (set forwarding_header: " +
                      (forwarded ? "x-forwarded-for" : "forwarded") + ")");
    }
    client = rules::ClientIp(peer_ip, xff, fwd, active.trusted, identified);
  }
  return client;
}

bool Front::Handle(HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
                   const std::function<Completion()>& defer) {
  std::string_view target = ApiRoute(req.target());
  // envoyproxy/ratelimit's own path for its JSON form too, where no upstream could own it.
  // (Its /healthcheck is decided by the rules like any path: 200 unless limited, which is
  // what probes read; answering it apart would let any client past the rules there.)
  const bool envoy =
      envoy_ && (target == "/v1/envoy/ratelimit" || (!upstream_ && target == "/json"));
  const bool check = target == "/v1/check" || target == "/v1/check/batch";
  if (!envoy && !check) return Gateway(req, peer, res, defer);
  // In front of an upstream, the listener is public, and a caller of the decision API
  // (either form) states whose limits to spend: any client could use up another user's.
  // Only a client Sluice trusts (the address behind its trusted proxies) may call it there.
  if (upstream_) {
    const ActiveRules& active = service_.Active();
    if (!TrustedCaller(req, peer, active)) {
      JsonReply(
          res, http::status::forbidden,
          R"j({"error":"forbidden","message":"in gateway mode the decision API )j"
          R"j(answers trusted clients only (trusted_proxies, and loopback unless decision_api.trust_loopback is false)"})j");
      return true;
    }
  }
  if (envoy) return envoy_->Handle(req, peer, res, defer);
  if (req.method() != http::verb::post) {
    res.set(http::field::allow, "POST");
    JsonReply(res, http::status::method_not_allowed,
              R"({"error":"method_not_allowed","message":"use POST"})");
    return true;
  }
  return Check(req, peer, res, target.ends_with("/batch"), defer);
}

// Bodies up to this size are read whole before the decision (one read, usually in the same
// packets as the head); larger ones are streamed.
constexpr uint64_t kStreamBodiesOver = 64 * 1024;

bool Front::StreamsBody(const HttpRequest& head) {
  // Without an upstream too: the decision is the head's, and the answer need not wait for
  // a body nobody reads (the connection closes after it instead).
  std::string_view target = ApiRoute(head.target());
  if (target == "/v1/check" || target == "/v1/check/batch" || target == "/v1/envoy/ratelimit") {
    return false;  // the decision API reads its JSON whole, bounded
  }
  // A client that sends "Expect: 100-continue" waits for the decision before its body: a
  // refused one never sends it.
  if (head.version() >= 11 && boost::beast::iequals(head[http::field::expect], "100-continue")) {
    return true;
  }
  auto length = AnnouncedLength(head);
  return head.chunked() || (length && *length > kStreamBodiesOver);
}

bool Front::HandleStream(HttpRequest& req, std::unique_ptr<BodySource> body,
                         const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
                         const std::function<Completion()>& defer) {
  return Gateway(req, peer, res, defer, std::move(body));
}

bool Front::Gateway(HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
                    const std::function<Completion()>& defer, std::shared_ptr<BodySource> body) {
  // A client must not send content with TRACE (RFC 9110 9.3.8), and such a request cannot
  // be framed for the upstream: refused before anything is decided or queued.
  if (upstream_ && req.method() == http::verb::trace &&
      (body || !req.body().empty() || req.chunked() || AnnouncedLength(req).value_or(0) > 0)) {
    BadRequest(res, service_, "a TRACE request has no body");
    return true;
  }
  const ActiveRules& active = service_.Active();
  auto path = rules::NormalizePath(req.target(), active.rules.config().paths);
  if (!path) {
    BadRequest(res, service_,
               rules::HasAmbiguousSlash(req.target()) ? kEncodedSlash : "bad request path");
    return true;
  }
  // Without an upstream every path is decided and answered {"allowed":true}, so a caller
  // that misspells the decision API ("/v1/check/", "/V1//check") would read an allowed
  // check in an answer about some other request: it is told where the API is instead.
  if (!upstream_ && IsApiRouteSpelledOtherwise(*path)) {
    JsonReply(res, http::status::not_found,
              R"j({"error":"not_found","message":"the decision API is at POST /v1/check and )j"
              R"j(POST /v1/check/batch, spelled exactly so"})j");
    return true;
  }
  std::string ip = ClientKey(req, peer, active);
  HttpAttributes attrs(req);
  rules::Request r;
  std::string method(req.method_string());
  r.method = method;
  r.path = *path;
  r.client_ip = ip;
  r.attributes = &attrs;
  r.identity_headers = !active.rules.config().keys.from_trusted_proxies_only ||
                       active.trusted.Trusts(PeerAddress(peer));
  int64_t start = Metrics::LatencyNowUs();
  if (service_.remote()) {
    auto shared = service_.ActiveShared();
    auto done = std::make_shared<Completion>(defer());
    service_.DecideRemote(shared, r, std::nullopt, WorkerContext(),
                          [this, &req, &res, peer, shared, done, start, body](Verdict v) {
                            service_.metrics().ObserveLatency(Metrics::LatencyNowUs() - start);
                            if (AfterVerdict(
                                    req, peer, res, v, *shared, [done] { return done; }, body)) {
                              (*done)();
                            }
                          });
    return false;
  }
  Verdict v = service_.Decide(active, r);
  service_.metrics().ObserveLatency(Metrics::LatencyNowUs() - start);
  return AfterVerdict(
      req, peer, res, v, active, [&defer] { return std::make_shared<Completion>(defer()); },
      std::move(body));
}

bool Front::AfterVerdict(HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
                         HttpResponse& res, const Verdict& v, const ActiveRules& active,
                         const Later& later, std::shared_ptr<BodySource> body) {
  RenderOptions options{active.rules.config().ietf_headers};
  if (!v.allowed) {
    RenderRejection(res, v, options);
    return true;
  }
  SetRateLimitHeaders(res, v, options);
  const DurationUs delay = v.delay();
  if (!upstream_) {
    JsonReply(res, http::status::ok, R"({"allowed":true})");
    if (delay <= 0) return true;
    // A decision-only gateway's 200 is what lets its caller (a proxy's auth subrequest)
    // forward the request: it goes when the request's turn comes, as a forward would.
    auto done = later();
    AfterTurn(delay, done, res, [done] { (*done)(); });
    return false;
  }
  // The upstream learns who the client is; a client's own X-Forwarded-For is kept only
  // when it came through a trusted proxy.
  // Every line of it, in order: a proxy may add its own line below the client's. A proxy
  // that writes Forwarded instead passes X-Forwarded-For on from the client: then the
  // upstream is told the client address Sluice found in Forwarded.
  std::string forwarded_for;
  const rules::IpAddress peer_ip = PeerAddress(peer);
  if (active.trusted.Trusts(peer_ip)) {
    if (active.rules.config().forwarding_header == rules::Config::ForwardingHeader::kForwarded) {
      forwarded_for = ClientAddress(req, peer, active).ToString() + ", ";
    } else {
      // Empty entries ("", "a,,b") are left out: an upstream reading the leftmost entry
      // would find no client in them.
      auto [begin, end] = req.equal_range("x-forwarded-for");
      for (auto it = begin; it != end; ++it) {
        rules::ForEachPiece(it->value(), ',', [&](std::string_view entry) {
          entry = rules::TrimOws(entry);
          if (!entry.empty()) forwarded_for.append(entry).append(", ");
        });
      }
    }
  }
  // IpAddress formats an IPv4 address by hand (asio's to_string goes through inet_ntop and
  // sprintf, a tenth of the gateway's own work per request); a v4-mapped peer is named as
  // the IPv4 address it is.
  forwarded_for += peer_ip.ToString();
  req.set("X-Forwarded-For", forwarded_for);
  auto done = later();
  auto forward = [this, &req, &res, done, body]() mutable {
    auto cancel = upstream_->Forward(
        WorkerContext().get_executor(), req, res,
        [done](std::unique_ptr<BodySource> answer) { (*done)(std::move(answer)); }, body);
    // A client that hangs up while the upstream works frees its upstream connection at
    // once, as nginx does, instead of holding both until the answer or its timeout.
    done->OnClientGone([this, cancel = std::move(cancel)] {
      service_.metrics().CountClientGone();
      cancel();
    });
  };
  if (delay > 0) {  // leaky bucket as a queue: wait for this request's turn
    AfterTurn(delay, done, res, std::move(forward));
  } else {
    forward();
  }
  return false;
}

namespace {

// A request waiting for its turn, on this worker's list until its timer fires.
struct Queued {
  explicit Queued(boost::asio::io_context& io) : timer(io) {}
  boost::asio::steady_timer timer;
  std::chrono::steady_clock::time_point turn;
  bool shed = false;  // its turn is past the drain deadline: answered 503 instead
  std::list<std::weak_ptr<Queued>>::iterator at;
};
thread_local std::list<std::weak_ptr<Queued>> t_queued;
// Once this worker drains: when its connections are closed.
thread_local std::optional<std::chrono::steady_clock::time_point> t_drain_deadline;

}  // namespace

void Front::AfterTurn(DurationUs delay, const std::shared_ptr<Completion>& done, HttpResponse& res,
                      std::function<void()> go) {
  auto q = std::make_shared<Queued>(WorkerContext());
  q->turn = std::chrono::steady_clock::now() + std::chrono::microseconds(delay);
  // Queued during the drain (its head was still arriving when it began) with a turn past
  // its deadline: answered now, as those queued before it were.
  q->shed = t_drain_deadline && q->turn > *t_drain_deadline;
  q->timer.expires_at(q->shed ? std::chrono::steady_clock::now() : q->turn);
  q->at = t_queued.insert(t_queued.end(), q);
  q->timer.async_wait([this, q, go = std::move(go), done, &res](const boost::system::error_code&) {
    t_queued.erase(q->at);
    // As nginx does for a client that hung up: its turn is spent, its request not sent.
    if (done->ClientGone()) {
      service_.metrics().CountAbandoned();
      JsonReply(res, http::status::service_unavailable,
                R"({"error":"client_closed","message":"the client left while queued"})");
      return (*done)();
    }
    if (q->shed) {
      const auto left = q->turn - std::chrono::steady_clock::now();
      const auto seconds = std::chrono::ceil<std::chrono::seconds>(left).count();
      service_.metrics().CountQueueShed();
      res.set(http::field::retry_after, std::to_string(std::max<int64_t>(seconds, 1)));
      JsonReply(res, http::status::service_unavailable,
                R"({"error":"shutting_down","message":"this server is shutting down before )"
                R"(the request's turn in its queue; retry after Retry-After seconds"})");
      return (*done)();
    }
    go();
  });
}

void Front::OnDrain(std::chrono::steady_clock::time_point deadline) {
  t_drain_deadline = deadline;
  size_t shed = 0;
  for (const auto& weak : t_queued) {
    auto q = weak.lock();
    if (!q || q->shed || q->turn <= deadline) continue;
    q->shed = true;
    q->timer.cancel();  // its handler runs now, and answers
    ++shed;
  }
  if (shed > 0) {
    Log("WARN", "shutting down: " + std::to_string(shed) +
                    " queued requests whose turn comes after the drain deadline are answered "
                    "503 (sluice_queue_shed_total)");
  }
}

namespace {

// One check of the decision API, parsed and validated before anything is spent.
struct ParsedCheck {
  std::string method, path, ip;
  std::optional<std::string_view> user_id, api_key, tier;
  std::optional<int64_t> cost;
  std::optional<JsonAttributes> attrs;
  bool identity_trusted = true;  // the identity headers in "headers" are read
};

bool ObjectOfStrings(const json::value& v) {
  if (!v.is_object()) return false;
  return std::all_of(v.as_object().begin(), v.as_object().end(),
                     [](const auto& kv) { return kv.value().is_string(); });
}

// Who calls the decision API: the request's, the same for every check of a batch, so it
// is worked out (from the forwarding headers) once, when a check first needs it.
class Caller {
 public:
  Caller(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
         const ActiveRules& active)
      : req_(req), peer_(peer), active_(active) {}
  bool trusted() {
    if (!trusted_) trusted_ = TrustedCaller(req_, peer_, active_);
    return *trusted_;
  }
  const std::string& key() {
    if (!key_) key_ = ClientKey(req_, peer_, active_);
    return *key_;
  }

 private:
  const HttpRequest& req_;
  const boost::asio::ip::tcp::endpoint& peer_;
  const ActiveRules& active_;
  std::optional<bool> trusted_;
  std::optional<std::string> key_;
};

// Parses one check; returns an error message, empty when it is valid.
std::string ParseCheck(const json::value& item, const ActiveRules& active, Caller& caller,
                       ParsedCheck& out) {
  if (!item.is_object()) return "a check must be a JSON object";
  const json::object& o = item.as_object();
  const rules::Config& config = active.rules.config();
  std::string error;
  auto path_field = StringField(o, "path", &error);
  auto method = StringField(o, "method", &error);
  auto ip_field = StringField(o, "ip", &error);
  out.user_id = StringField(o, "user_id", &error);
  out.api_key = StringField(o, "api_key", &error);
  out.tier = StringField(o, "tier", &error);
  if (!error.empty()) return error;
  // An empty id is no id, as an empty header is none: the check falls back to the client's
  // address. Kept as "", every caller without one would share the key `user_id=`.
  for (auto* id : {&out.user_id, &out.api_key, &out.tier}) {
    if (*id && (*id)->empty()) id->reset();
  }
  if (!path_field) return "missing 'path'";
  auto path = rules::NormalizePath(*path_field, config.paths);
  if (!path) {
    return "bad 'path': " + std::string(*path_field) +
           (rules::HasAmbiguousSlash(*path_field) ? " (" + std::string(kEncodedSlash) + ")" : "");
  }
  out.path = std::move(*path);
  if (ip_field) {
    // The caller is the client a trusted proxy forwards for, not the proxy: a client
    // behind it must not state another's address either.
    if (!caller.trusted()) {
      return "'ip' is taken only from a trusted caller (trusted_proxies, and loopback unless "
             "decision_api.trust_loopback is false); "
             "leave it out to be decided as the caller's own address";
    }
    auto addr = rules::IpAddress::Parse(*ip_field);
    if (!addr) return "bad 'ip': " + std::string(*ip_field);
    out.ip = rules::IpKey(*addr, config.ipv6_prefix);
  } else {
    out.ip = caller.key();
  }
  if (auto* c = o.if_contains("cost"); c && !c->is_null()) {
    if (c->is_uint64()) return "'cost' is too large (at most 9223372036854775807)";
    if (c->is_double()) return "'cost' must be written as a whole number (no fraction or exponent)";
    if (!c->is_int64()) return "'cost' must be a whole number";
    if (c->as_int64() < 0) return "'cost' must be >= 0";
    out.cost = c->as_int64();
  }
  // A method no request line could carry would match no rule's method, and the check would
  // fall through to a looser rule than the request it describes.
  if (method && !rules::IsToken(*method)) return "bad 'method': " + std::string(*method);
  out.method = std::string(method.value_or("GET"));
  for (char& ch : out.method) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  // Keys read from a header or the query must not be dodged by a value of another type.
  for (const char* name : {"headers", "query"}) {
    if (const json::value* v = o.if_contains(name); v && !ObjectOfStrings(*v)) {
      return "'" + std::string(name) + "' must be an object of strings";
    }
  }
  if (path_field->find('?') != std::string_view::npos && o.contains("query")) {
    return "'path' has a query string and 'query' is given too: give the parameters once";
  }
  // keys.from_trusted_proxies_only: an identity is vouched for only by a caller Sluice
  // trusts, as the gateway reads the identity headers only from a trusted proxy. Anyone
  // else could name any user and spend (or dodge) that user's limits.
  out.identity_trusted = !config.keys.from_trusted_proxies_only || caller.trusted();
  if (!out.identity_trusted && (out.user_id || out.api_key || out.tier)) {
    return "'user_id', 'api_key' and 'tier' are taken only from a trusted caller "
           "(keys.from_trusted_proxies_only)";
  }
  out.attrs.emplace(o, *path_field);
  return "";
}

}  // namespace

bool Front::Check(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
                  HttpResponse& res, bool batch, const std::function<Completion()>& defer) {
  json::error_code ec;
  json::value body = json::parse(req.body(), ec);
  if (ec) {
    BadRequest(res, service_, "malformed JSON: " + ec.message());
    return true;
  }
  if (auto twice = FirstDuplicateKey(req.body())) {
    BadRequest(res, service_, "malformed JSON: the key '" + *twice + "' is given twice");
    return true;
  }
  const ActiveRules& active = service_.Active();

  const json::value* items = &body;
  size_t count = 1;
  if (batch) {
    items = body.is_object() ? body.as_object().if_contains("checks") : nullptr;
    if (!items || !items->is_array()) {
      BadRequest(res, service_, "missing 'checks' (a list)");
      return true;
    }
    count = items->as_array().size();
    if (count > max_batch_checks_) {
      BadRequest(res, service_,
                 "too many checks: " + std::to_string(count) + " (at most " +
                     std::to_string(max_batch_checks_) + " in one batch)");
      return true;
    }
  }
  const int64_t start = Metrics::LatencyNowUs();  // a batch is one request, one latency
  // Every check is validated before any is decided, so a bad batch spends nothing.
  std::vector<ParsedCheck> parsed(count);
  Caller caller(req, peer, active);
  for (size_t i = 0; i < count; ++i) {
    const json::value& item = batch ? items->as_array()[i] : *items;
    std::string error = ParseCheck(item, active, caller, parsed[i]);
    if (!error.empty()) {
      BadRequest(res, service_, batch ? "checks[" + std::to_string(i) + "]: " + error : error);
      return true;
    }
  }
  auto request = [](ParsedCheck& p) {
    rules::Request r;
    r.method = p.method;
    r.path = p.path;
    r.client_ip = p.ip;
    r.attributes = &*p.attrs;
    r.user_id = p.user_id;
    r.api_key = p.api_key;
    r.tier = p.tier;
    r.identity_headers = p.identity_trusted;
    return r;
  };
  RenderOptions options{active.rules.config().ietf_headers};
  auto render_one = [&res, options](const Verdict& v) {
    SetRateLimitHeaders(res, v, options);
    if (!v.allowed) {
      int64_t retry = RetryAfterSeconds(v.decision.retry_after);
      if (retry >= 0) res.set(http::field::retry_after, std::to_string(retry));
    }
    JsonReply(res, v.allowed ? http::status::ok : http::status::too_many_requests, VerdictJson(v));
  };
  auto render_batch = [&res](const std::vector<std::string>& results) {
    std::string out = "{\"results\":[";
    for (size_t i = 0; i < results.size(); ++i) {
      if (i) out += ",";
      out += results[i];
    }
    out += "]}";
    JsonReply(res, http::status::ok, std::move(out));
  };
  Metrics& metrics = service_.metrics();
  if (!service_.remote() || count == 0) {
    if (!batch) {
      Verdict v = service_.Decide(active, request(parsed[0]), parsed[0].cost);
      metrics.ObserveLatency(Metrics::LatencyNowUs() - start);
      render_one(v);
      return true;
    }
    std::vector<std::string> results;
    for (ParsedCheck& p : parsed) {
      results.push_back(VerdictJson(service_.Decide(active, request(p), p.cost)));
    }
    metrics.ObserveLatency(Metrics::LatencyNowUs() - start);
    render_batch(results);
    return true;
  }
  // Shared store: the checks go out together (pipelined) and the answer is sent when the
  // last one is back.
  struct Join {
    std::vector<std::string> results;
    size_t left;
    std::shared_ptr<Completion> done;
  };
  auto join = std::make_shared<Join>(
      Join{std::vector<std::string>(count), count, std::make_shared<Completion>(defer())});
  auto shared = service_.ActiveShared();
  for (size_t i = 0; i < count; ++i) {
    service_.DecideRemote(
        shared, request(parsed[i]), parsed[i].cost, WorkerContext(),
        [join, i, batch, render_one, render_batch, m = &metrics, start](Verdict v) {
          if (!batch) {
            render_one(v);
          } else {
            join->results[i] = VerdictJson(v);
          }
          if (--join->left == 0) {
            m->ObserveLatency(Metrics::LatencyNowUs() - start);
            if (batch) render_batch(join->results);
            (*join->done)();
          }
        });
  }
  return false;
}

}  // namespace sluice::server
