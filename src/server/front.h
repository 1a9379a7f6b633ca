// Front: the main listener's handler. Routes
//   POST /v1/check        one decision, stated as JSON (any service, any language)
//   POST /v1/check/batch  many decisions in one round trip
//   anything else         gateway mode: the request itself is decided by the rules; it gets
//                         the rate limit headers, and 429 with the seed's body when limited
//                         (with no upstream configured, an allowed request is answered 200
//                         by Sluice itself: a decision-only gateway for sidecars and tests)
//
// Thread-safety: Handle runs on any worker thread; all state is in Service.
#ifndef SLUICE_SERVER_FRONT_H_
#define SLUICE_SERVER_FRONT_H_

#include "rules/client_ip.h"
#include "server/http_server.h"
#include "server/render.h"
#include "server/service.h"

namespace sluice::server {

class Front final : public Handler {
 public:
  Front(Service& service, RenderOptions render) : service_(service), render_(render) {}

  void Handle(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
              HttpResponse& res) override;

 private:
  void Gateway(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
               HttpResponse& res);
  void Check(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer, HttpResponse& res,
             bool batch);

  Service& service_;
  RenderOptions render_;
};

// The client address of `peer` in rate limit key form, through the trusted proxies of the
// active rules.
std::string ClientKey(const HttpRequest& req, const boost::asio::ip::tcp::endpoint& peer,
                      const ActiveRules& active);

}  // namespace sluice::server

#endif  // SLUICE_SERVER_FRONT_H_
