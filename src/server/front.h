// Front: the main listener's handler. Routes
//   POST /v1/check        one decision, stated as JSON (any service, any language)
//   POST /v1/check/batch  many decisions in one round trip
//   POST /v1/envoy/ratelimit  Envoy's RLS call as JSON (when serving Envoy: see rls.h)
//   anything else         gateway mode: the request itself is decided by the rules. Limited:
//                         429 with the headers and the seed's body. Allowed: forwarded to the
//                         upstream (after its queue delay, for leaky_queue rules) and its
//                         answer gets the rate limit headers; with no upstream configured,
//                         Sluice answers 200 itself (a decision-only gateway)
//
// Thread-safety: Handle runs on any worker thread; all state is in Service.
#ifndef SLUICE_SERVER_FRONT_H_
#define SLUICE_SERVER_FRONT_H_

#include "rules/client_ip.h"
#include "server/http_server.h"
#include "server/render.h"
#include "server/service.h"
#include "server/upstream.h"

namespace sluice::server {

class Front final : public Handler {
 public:
  // `upstream` may be null: allowed requests are then answered 200 by Sluice itself.
  // `envoy` (may be null) answers POST /v1/envoy/ratelimit. A batch of more than
  // `max_batch_checks` checks is refused whole (400): a worker decides a batch in one go,
  // so its size bounds how long one request can hold the worker's other connections.
  Front(Service& service, Upstream* upstream, Handler* envoy = nullptr,
        size_t max_batch_checks = kDefaultMaxBatchChecks)
      : service_(service),
        upstream_(upstream),
        envoy_(envoy),
        max_batch_checks_(max_batch_checks) {}

  static constexpr size_t kDefaultMaxBatchChecks = 1000;

  bool Handle(HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
              const std::function<Completion()>& defer) override;
  // In gateway mode, bodies over 64 KiB or chunked are streamed to the upstream after the
  // decision (made on the head alone), so they are not bounded by max_body_bytes and a
  // rejected request never uploads (with Expect: 100-continue) or is cut off.
  bool StreamsBody(const HttpRequest& head) override;
  bool HandleStream(HttpRequest& req, std::unique_ptr<BodySource> body,
                    const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
                    const std::function<Completion()>& defer) override;
  // Queued requests whose turn comes after the drain deadline are answered 503 now, with
  // Retry-After: their connections would be closed unanswered at the deadline.
  void OnDrain(std::chrono::steady_clock::time_point deadline) override;

 private:
  using Later = std::function<std::shared_ptr<Completion>()>;
  bool Gateway(HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
               const std::function<Completion()>& defer,
               std::shared_ptr<BodySource> body = nullptr);
  // What follows a gateway verdict: the 429, or Sluice's own 200, or forwarding. Returns
  // true when `res` is ready; false when the answer waits (forwarding, or a queued
  // request's turn), which finishes through `later()`.
  bool AfterVerdict(HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
                    const Verdict& v, const ActiveRules& active, const Later& later,
                    std::shared_ptr<BodySource> body);
  // Runs `go` once a queued request's turn comes, `delay` from now; a client gone by then
  // gets nothing sent on its behalf (counted as abandoned), nor one whose turn is past the
  // drain deadline (answered 503 at the drain's start, counted as shed).
  void AfterTurn(DurationUs delay, const std::shared_ptr<Completion>& done, HttpResponse& res,
                 std::function<void()> go);
  bool Check(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
             bool batch, const std::function<Completion()>& defer);

  Service& service_;
  Upstream* upstream_;
  Handler* envoy_;
  size_t max_batch_checks_;
};

// The socket address of a peer as an IpAddress.
rules::IpAddress PeerAddress(const boost::asio::ip::tcp::endpoint& peer);
// The client address of `peer` in rate limit key form, through the trusted proxies of the
// active rules.
std::string ClientKey(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
                      const ActiveRules& active);
// The client address itself: the peer, or the one its trusted proxies name. `identified`
// (when given) is false when they name it in a way that is not an address ("unknown",
// "_hidden"): the address is then the last trusted proxy's (see rules::ClientIp).
rules::IpAddress ClientAddress(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
                               const ActiveRules& active, bool* identified = nullptr);

}  // namespace sluice::server

#endif  // SLUICE_SERVER_FRONT_H_
