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

TEST(ParseListenAddressTest, IpLiteralsAndAnyPortFromZero) {
  struct Case {
    const char* text;
    const char* ip;
    uint16_t port;
  };
  for (const Case& c : {Case{"127.0.0.1:8080", "127.0.0.1", 8080}, Case{"0.0.0.0:0", "0.0.0.0", 0},
                        Case{"[::1]:65535", "::1", 65535}, Case{"[::]:80", "::", 80},
                        Case{"::1:9090", "::1", 9090}}) {
    auto a = ParseListenAddress(c.text);
    ASSERT_TRUE(a.has_value()) << c.text;
    EXPECT_EQ(a->ip, c.ip) << c.text;
    EXPECT_EQ(a->port, c.port) << c.text;
  }
}

TEST(ParseListenAddressTest, RefusesNamesAndBadPorts) {
  for (const char* bad :
       {"localhost:8080", "127.0.0.1", "127.0.0.1:", ":8080", "127.0.0.1:65536", "127.0.0.1:0x50",
        "127.0.0.1:8080x", "127.0.0.1:+80", "127.0.0.1: 80", "[1.2.3.4]:80", "[::1:80", "[]:80",
        "[fe80::1%eth0]:80", "1.2.3:80", "1.2.3.4.:80"}) {
    EXPECT_FALSE(ParseListenAddress(bad).has_value()) << bad;
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
