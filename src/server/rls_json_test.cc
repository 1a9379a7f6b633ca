// RlsJsonHandler (POST /v1/envoy/ratelimit): its refusals are JSON whatever the caller sent.
#include <gtest/gtest.h>

#include <cstdlib>

#include <boost/json/parse.hpp>

#include "rules/config.h"
#include "server/rls.h"

namespace sluice::server {
namespace {

// Protobuf's parse errors quote the input; bytes that are not UTF-8 must not make the 400
// body invalid JSON.
TEST(RlsJsonTest, AMalformedRequestWithBytesThatAreNotUtf8GetsAJsonRefusal) {
  Service service(rules::DefaultConfig(), MemoryStore::Options{});
  Rls rls(service, RlsOptions{});
  RlsJsonHandler handler(rls);
  HttpRequest req{boost::beast::http::verb::post, "/v1/envoy/ratelimit", 11};
  req.body() = "{\"domain\": \"a\xff\xfe\", \"descriptors\": []}";
  HttpResponse res;
  boost::asio::ip::tcp::endpoint peer(boost::asio::ip::make_address("127.0.0.1"), 1);
  ASSERT_TRUE(handler.Handle(req, peer, res, []() -> Completion { std::abort(); }));
  EXPECT_EQ(res.result(), boost::beast::http::status::bad_request);
  boost::json::error_code ec;
  boost::json::value body = boost::json::parse(res.body(), ec);
  ASSERT_FALSE(ec) << res.body();
  EXPECT_EQ(body.at("error").as_string(), "bad_request");
  EXPECT_NE(res.body().find("malformed RateLimitRequest JSON"), std::string::npos);
}

}  // namespace
}  // namespace sluice::server
