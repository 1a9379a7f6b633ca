// Fuzzes the JSON bodies of the decision API and of Envoy's JSON form: each input is sent as
// the body of POST /v1/check, POST /v1/check/batch and POST /v1/envoy/ratelimit through the
// Front handler (which parses, validates, resolves the rules and decides on the in-memory
// store), and each answer is checked: it reads back as HTTP, its JSON is valid, and it
// agrees with the request (an answered check says whether it was allowed as its status
// does; an answered batch has one result per check).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <boost/json/parse.hpp>
#include <boost/json/value.hpp>

#include "fuzz/fuzz_fixture.h"

namespace {

namespace http = boost::beast::http;
namespace json = boost::json;
using sluice::fuzz::Fail;

sluice::server::HttpResponse Post(sluice::fuzz::Fixture& fixture, std::string_view target,
                                  std::string_view body) {
  sluice::server::HttpRequest req{http::verb::post, target, 11};
  req.set(http::field::host, "sluice");
  req.set(http::field::content_type, "application/json");
  req.set("X-Forwarded-For", "198.51.100.1, 203.0.113.9");  // the peer is a trusted proxy
  req.body() = std::string(body);
  req.prepare_payload();
  static const boost::asio::ip::tcp::endpoint peer(boost::asio::ip::make_address("10.0.0.1"),
                                                   40000);
  sluice::server::HttpResponse res;
  res.version(11);
  res.keep_alive(true);
  if (!fixture.front.Handle(req, peer, res, sluice::fuzz::NoDefer)) {
    Fail("a handler deferred its answer");
  }
  sluice::fuzz::CheckAnswer(res, false);
  return res;
}

const json::value* Field(const json::value& v, std::string_view name) {
  return v.is_object() ? v.as_object().if_contains(name) : nullptr;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static sluice::fuzz::Fixture& fixture = *new sluice::fuzz::Fixture();
  std::string_view body(reinterpret_cast<const char*>(data), size);

  auto one = Post(fixture, "/v1/check", body);
  if (one.result() == http::status::ok || one.result() == http::status::too_many_requests) {
    const json::value answer = json::parse(one.body());
    const json::value* allowed = Field(answer, "allowed");
    if (!allowed || !allowed->is_bool() ||
        allowed->as_bool() != (one.result() == http::status::ok)) {
      Fail("a check's answer disagrees with its status: " + one.body());
    }
  } else if (one.result() != http::status::bad_request) {
    Fail("unexpected status for /v1/check: " + one.body());
  }

  auto batch = Post(fixture, "/v1/check/batch", body);
  if (batch.result() == http::status::ok) {
    const json::value answer = json::parse(batch.body());
    const json::value request = json::parse(body);
    const json::value* results = Field(answer, "results");
    const json::value* checks = Field(request, "checks");
    if (!results || !results->is_array() || !checks || !checks->is_array() ||
        results->as_array().size() != checks->as_array().size()) {
      Fail("a batch's answer does not have one result per check: " + batch.body());
    }
  } else if (batch.result() != http::status::bad_request) {
    Fail("unexpected status for /v1/check/batch: " + batch.body());
  }

  auto envoy = Post(fixture, "/v1/envoy/ratelimit", body);
  if (envoy.result() == http::status::ok) {
    const json::value answer = json::parse(envoy.body());
    const json::value* code = Field(answer, "overallCode");
    if (!code || !code->is_string()) Fail("an RLS answer without overallCode: " + envoy.body());
  } else if (envoy.result() != http::status::bad_request) {
    Fail("unexpected status for /v1/envoy/ratelimit: " + envoy.body());
  }
  return 0;
}
