#include "rules/address.h"

#include <gtest/gtest.h>

namespace sluice::rules {
namespace {

TEST(IsHostPortTest, NamesAddressesAndPorts) {
  for (const char* ok :
       {"redis:6379", "10.0.0.1:1", "[::1]:65535", "a-b_c.example:80", "redis.internal.:6379"}) {
    EXPECT_TRUE(IsHostPort(ok)) << ok;
  }
  for (const char* bad :
       {"redis", "redis:0", "redis:65536", "redis:+1", ":80", "[::1:80", "[]:80", "[1.2.3.4]:80",
        "1.2.3:80", "1.2.3.4.:80", "a..b:80", ".a:80", "a b:80", "a..:80", ".:80"}) {
    EXPECT_FALSE(IsHostPort(bad)) << bad;
  }
}

TEST(ParseUpstreamUrlTest, HostAndPortWithPort80WhenLeftOut) {
  struct Case {
    const char* url;
    const char* host;
    uint16_t port;
  };
  for (const Case& c :
       {Case{"http://127.0.0.1:8000", "127.0.0.1", 8000}, Case{"http://backend/", "backend", 80},
        Case{"http://[::1]", "::1", 80}, Case{"http://[::1]:9/", "::1", 9}}) {
    auto u = ParseUpstreamUrl(c.url);
    ASSERT_TRUE(u.has_value()) << c.url;
    EXPECT_EQ(u->host, c.host) << c.url;
    EXPECT_EQ(u->port, c.port) << c.url;
  }
}

TEST(ParseUpstreamUrlTest, RefusesWhatItCannotServe) {
  for (const char* bad :
       {"https://backend", "backend:80", "http://", "http://backend:0", "http://backend/api",
        "http://backend:80//", "http://a b", "http://[::1", "http://backend:http"}) {
    EXPECT_FALSE(ParseUpstreamUrl(bad).has_value()) << bad;
  }
}

}  // namespace
}  // namespace sluice::rules
