#include "rules/client_ip.h"

#include <gtest/gtest.h>

#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

namespace sluice::rules {
namespace {

using namespace std::string_literals;
using namespace std::string_view_literals;

IpAddress Ip(std::string_view text) {
  std::optional<IpAddress> a = IpAddress::Parse(text);
  EXPECT_TRUE(a.has_value()) << text;
  return a.value_or(IpAddress{});
}

Cidr Net(std::string_view text) {
  std::optional<Cidr> c = Cidr::Parse(text);
  EXPECT_TRUE(c.has_value()) << text;
  return c.value_or(Cidr{});
}

TrustedProxies Trust(std::initializer_list<std::string_view> cidrs) {
  std::vector<Cidr> v;
  for (std::string_view c : cidrs) v.push_back(Net(c));
  return TrustedProxies(std::move(v));
}

// 10.0.0.0/8 and fd00::/8 are the proxies; everything else is the internet.
const TrustedProxies& Proxies() {
  static const TrustedProxies* p = new TrustedProxies(Trust({"10.0.0.0/8", "fd00::/8"}));
  return *p;
}

std::string Client(std::string_view peer, std::vector<std::string_view> xff,
                   std::vector<std::string_view> forwarded = {},
                   const TrustedProxies& trusted = Proxies()) {
  return ClientIp(Ip(peer), xff, forwarded, trusted).ToString();
}

TEST(IpAddress, ParsesAndPrintsCanonically) {
  struct Case {
    std::string_view in;
    bool v4;
    std::string_view out;
  };
  const Case cases[] = {
      {"1.2.3.4", true, "1.2.3.4"},
      {"0.0.0.0", true, "0.0.0.0"},
      {"255.255.255.255", true, "255.255.255.255"},
      {"0.9.10.99", true, "0.9.10.99"},
      {"100.199.200.249", true, "100.199.200.249"},
      {"::ffff:1.2.3.4", true, "1.2.3.4"},
      {"::FFFF:102:304", true, "1.2.3.4"},
      {"[::ffff:1.2.3.4]", true, "1.2.3.4"},
      {"2001:db8::1", false, "2001:db8::1"},
      {"2001:DB8:0:0:0:0:0:1", false, "2001:db8::1"},
      {"[2001:db8::1]", false, "2001:db8::1"},
      {"2001:db8:0:1:0:0:0:1", false, "2001:db8:0:1::1"},       // RFC 5952: longest run of zeros
      {"2001:db8:0:1:1:1:1:1", false, "2001:db8:0:1:1:1:1:1"},  // one zero is not "::"
      {"::", false, "::"},
      {"::1", false, "::1"},
      {"fe80::1", false, "fe80::1"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.in);
    std::optional<IpAddress> a = IpAddress::Parse(c.in);
    ASSERT_TRUE(a.has_value());
    EXPECT_EQ(a->v4, c.v4);
    EXPECT_EQ(a->ToString(), c.out);
    EXPECT_EQ(IpAddress::Parse(a->ToString()), a);
  }
  EXPECT_EQ(Ip("1.2.3.4"), Ip("::ffff:1.2.3.4"));
  EXPECT_NE(Ip("1.2.3.4"), Ip("::1.2.3.4"));  // IPv4-compatible is not IPv4-mapped
}

TEST(IpAddress, RejectsWhatIsNotABareAddress) {
  const std::string_view bad[] = {
      "",
      "1.2.3",
      "1.2.3.4.5",
      "1.2.3.256",
      "1.2.3.-1",
      "1.2.3.4.",
      ".1.2.3.4",
      "1..2.3",
      "01.2.3.4",  // octal to some parsers
      "1.2.3.0x4",
      "1234.1.1.1",
      " 1.2.3.4",
      "1.2.3.4 ",
      "1.2.3.4:80",
      "[1.2.3.4]",
      "::g",
      ":::",
      "1:2:3:4:5:6:7:8:9",
      "2001:db8::1::2",
      "fe80::1%eth0",
      "[2001:db8::1]:443",
      "[2001:db8::1",
      "2001:db8::1]",
      "[]",
      "[",
      "unknown",
      "localhost",
      "1.2.3.4\0"sv,
      "::1\0"sv,
      "1.2.3.4\0garbage"sv,
  };
  for (std::string_view s : bad) EXPECT_EQ(IpAddress::Parse(s), std::nullopt) << s;
}

TEST(Cidr, ParsesAndMasks) {
  Cidr c = Net("10.0.0.0/8");
  EXPECT_EQ(c.prefix, 8);
  EXPECT_EQ(c.network, Ip("10.0.0.0"));
  EXPECT_EQ(Net("10.1.2.3/8"), c);  // host bits are masked off
  EXPECT_EQ(Net("::ffff:10.0.0.0/8"), c);
  EXPECT_EQ(Net("127.0.0.1").prefix, 32);
  EXPECT_EQ(Net("::1").prefix, 128);
  EXPECT_EQ(Net("fd12:3456::1/8").network, Ip("fd00::"));
  EXPECT_EQ(Net("192.168.1.129/25").network, Ip("192.168.1.128"));
  EXPECT_EQ(Net("2001:db8:ffff::/33").network, Ip("2001:db8:8000::"));
  EXPECT_EQ(Net("[2001:db8::]/32").prefix, 32);

  const std::string_view bad[] = {
      "10.0.0.0/33",         "::/129",      "x/8", "10.0.0.0/",   "10.0.0.0/-1",
      "10.0.0.0/+8",         "10.0.0.0/08", "/8",  "10.0/8",      "10.0.0.0/8/8",
      "::ffff:10.0.0.0/104", "10.0.0.0/8 ", "",    "fd00::/1000",
  };
  for (std::string_view s : bad) EXPECT_EQ(Cidr::Parse(s), std::nullopt) << s;
}

TEST(Cidr, ContainsAtEdgePrefixes) {
  Cidr all4 = Net("0.0.0.0/0");
  EXPECT_TRUE(all4.Contains(Ip("0.0.0.0")));
  EXPECT_TRUE(all4.Contains(Ip("255.255.255.255")));
  EXPECT_FALSE(all4.Contains(Ip("::")));  // families never mix
  EXPECT_FALSE(all4.Contains(Ip("::1.2.3.4")));

  Cidr all6 = Net("::/0");
  EXPECT_TRUE(all6.Contains(Ip("::")));
  EXPECT_TRUE(all6.Contains(Ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
  EXPECT_FALSE(all6.Contains(Ip("1.2.3.4")));
  EXPECT_FALSE(all6.Contains(Ip("::ffff:1.2.3.4")));  // that is an IPv4 address

  Cidr host4 = Net("192.0.2.7/32");
  EXPECT_TRUE(host4.Contains(Ip("192.0.2.7")));
  EXPECT_FALSE(host4.Contains(Ip("192.0.2.6")));
  EXPECT_FALSE(host4.Contains(Ip("192.0.2.8")));

  Cidr host6 = Net("2001:db8::7/128");
  EXPECT_TRUE(host6.Contains(Ip("2001:db8::7")));
  EXPECT_FALSE(host6.Contains(Ip("2001:db8::6")));

  Cidr odd = Net("192.168.1.128/25");
  EXPECT_TRUE(odd.Contains(Ip("192.168.1.255")));
  EXPECT_TRUE(odd.Contains(Ip("192.168.1.128")));
  EXPECT_FALSE(odd.Contains(Ip("192.168.1.127")));

  Cidr v6 = Net("fd00::/8");
  EXPECT_TRUE(v6.Contains(Ip("fdff:1::1")));
  EXPECT_FALSE(v6.Contains(Ip("fe00::1")));
  EXPECT_FALSE(v6.Contains(Ip("fc00::1")));
}

TEST(TrustedProxies, DefaultTrustsNobody) {
  TrustedProxies none;
  EXPECT_TRUE(none.empty());
  EXPECT_FALSE(none.Trusts(Ip("127.0.0.1")));
  EXPECT_FALSE(Proxies().empty());
  EXPECT_TRUE(Proxies().Trusts(Ip("10.9.8.7")));
  EXPECT_TRUE(Proxies().Trusts(Ip("fd00::5")));
  EXPECT_FALSE(Proxies().Trusts(Ip("11.0.0.1")));
}

TEST(ClientIp, UntrustedPeerIsTheClientWhateverItSends) {
  EXPECT_EQ(Client("203.0.113.7", {"1.1.1.1"}), "203.0.113.7");
  EXPECT_EQ(Client("203.0.113.7", {}, {"for=1.1.1.1"}), "203.0.113.7");
  EXPECT_EQ(Client("2001:db8::9", {"10.0.0.1, 1.1.1.1"}), "2001:db8::9");
  // Trusting nobody, nobody's headers count.
  EXPECT_EQ(Client("10.0.0.1", {"1.1.1.1"}, {}, TrustedProxies()), "10.0.0.1");
}

TEST(ClientIp, TrustedPeerWithoutHeadersIsTheClient) {
  EXPECT_EQ(Client("10.0.0.1", {}), "10.0.0.1");
  EXPECT_EQ(Client("10.0.0.1", {""}), "10.0.0.1");
  EXPECT_EQ(Client("10.0.0.1", {" , ,"}), "10.0.0.1");
}

TEST(ClientIp, TrustedPeerGivesTheRightmostUntrustedHop) {
  EXPECT_EQ(Client("10.0.0.1", {"203.0.113.7"}), "203.0.113.7");
  // The client prepended a spoofed hop; its proxy appended the real address.
  EXPECT_EQ(Client("10.0.0.1", {"1.1.1.1, 203.0.113.7"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {"1.1.1.1,203.0.113.7"}), "203.0.113.7");
  EXPECT_EQ(Client("::ffff:10.0.0.1", {"2001:db8::7"}), "2001:db8::7");
  EXPECT_EQ(Client("fd00::1", {"[2001:db8::7]"}), "2001:db8::7");
}

TEST(ClientIp, ChainsOfTrustedProxiesAreSkipped) {
  EXPECT_EQ(Client("10.0.0.1", {"1.1.1.1, 203.0.113.7, 10.0.0.3, fd00::2"}), "203.0.113.7");
  // Several header lines form one list, in order.
  EXPECT_EQ(Client("10.0.0.1", {"1.1.1.1, 203.0.113.7", "10.0.0.3", "fd00::2"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {"1.1.1.1", "203.0.113.7, 10.0.0.3"}), "203.0.113.7");
  // Empty elements are ignored (RFC 9110 list syntax).
  EXPECT_EQ(Client("10.0.0.1", {"203.0.113.7,, 10.0.0.3,"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {"\t203.0.113.7 \t, 10.0.0.3"}), "203.0.113.7");
}

TEST(ClientIp, AllHopsTrustedGivesTheLeftmost) {
  EXPECT_EQ(Client("10.0.0.1", {"10.0.0.5, 10.0.0.4, fd00::3"}), "10.0.0.5");
  EXPECT_EQ(Client("10.0.0.1", {"10.0.0.5", "10.0.0.4"}), "10.0.0.5");
}

TEST(ClientIp, GarbageEndsTheWalkAtTheLastGoodHop) {
  // Garbage right of the client: the trusted hop that reported it is the client.
  EXPECT_EQ(Client("10.0.0.1", {"203.0.113.7, garbage, 10.0.0.3"}), "10.0.0.3");
  EXPECT_EQ(Client("10.0.0.1", {"203.0.113.7, garbage"}), "10.0.0.1");
  EXPECT_EQ(Client("10.0.0.1", {"garbage"}), "10.0.0.1");
  EXPECT_EQ(Client("10.0.0.1", {"10.0.0.5, unknown, 10.0.0.4"}), "10.0.0.4");
  // Garbage left of the client is never read: the client is found first.
  EXPECT_EQ(Client("10.0.0.1", {"garbage, 203.0.113.7, 10.0.0.3"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {"garbage, 10.0.0.5, 10.0.0.3"}), "10.0.0.5");
  // Zones and NULs are not addresses in X-Forwarded-For, nor is a port without an address.
  EXPECT_EQ(Client("10.0.0.1", {"fe80::1%eth0, 10.0.0.3"}), "10.0.0.3");
  EXPECT_EQ(Client("10.0.0.1", {"203.0.113.7:, 10.0.0.3"}), "10.0.0.3");
  EXPECT_EQ(Client("10.0.0.1", {"203.0.113.7:123456, 10.0.0.3"}), "10.0.0.3");
  EXPECT_EQ(Client("10.0.0.1", {"2001:db8::7:443, 10.0.0.3"}), "2001:db8::7:443");
  const std::string nul = "203.0.113.7\0"s + "1.1.1.1";
  EXPECT_EQ(Client("10.0.0.1", {nul}), "10.0.0.1");
  // An unbalanced quote from the client cannot swallow what its proxy appended.
  EXPECT_EQ(Client("10.0.0.1", {"\"1.1.1.1, 203.0.113.7"}), "203.0.113.7");
}

TEST(ClientIp, AWalkEndedByGarbageSaysTheClientIsUnidentified) {
  auto identified = [](std::string_view peer, std::vector<std::string_view> xff,
                       std::vector<std::string_view> forwarded = {}) {
    bool known = false;
    ClientIp(Ip(peer), xff, forwarded, Proxies(), &known);
    return known;
  };
  EXPECT_TRUE(identified("203.0.113.9", {"garbage"}));  // an untrusted peer is itself
  EXPECT_TRUE(identified("10.0.0.1", {}));
  EXPECT_TRUE(identified("10.0.0.1", {"203.0.113.7"}));
  EXPECT_TRUE(identified("10.0.0.1", {"10.0.0.5, 10.0.0.3"}));  // all trusted: the leftmost
  EXPECT_TRUE(identified("10.0.0.1", {"garbage, 203.0.113.7, 10.0.0.3"}));
  EXPECT_FALSE(identified("10.0.0.1", {"unknown"}));
  EXPECT_FALSE(identified("10.0.0.1", {"203.0.113.7, unknown, 10.0.0.3"}));
  EXPECT_FALSE(identified("10.0.0.1", {}, {"for=_hidden"}));
  EXPECT_FALSE(identified("10.0.0.1", {}, {"for=unknown, for=10.0.0.3"}));
  EXPECT_TRUE(identified("10.0.0.1", {}, {"for=unknown, for=203.0.113.7"}));
}

TEST(ClientIp, XForwardedForHopsWithAPort) {
  // As Azure Application Gateway and IIS ARR write them: the address is the client's.
  EXPECT_EQ(Client("10.0.0.1", {"203.0.113.7:5000"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {"198.51.100.9:80, 203.0.113.7:5000"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {"[2001:db8::7]:443"}), "2001:db8::7");
  EXPECT_EQ(Client("10.0.0.1", {"203.0.113.7:5000, 10.0.0.3:80"}), "203.0.113.7");
}

TEST(ClientIp, ForwardedForms) {
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=203.0.113.7"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=\"[2001:db8::7]:4711\""}), "2001:db8::7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=\"[2001:db8::7]\""}), "2001:db8::7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=203.0.113.7:80"}), "203.0.113.7");  // unquoted
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=[2001:db8::7]:80"}), "2001:db8::7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=\"203.0.113.7:80\""}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=203.0.113.7:_abc-1"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"For=203.0.113.7"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"FOR=203.0.113.7;Proto=https"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"proto=https;for=203.0.113.7;by=10.0.0.1"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=\"\\[2001:db8::7\\]\""}), "2001:db8::7");  // escapes
  // Several elements, comma-separated, and several lines.
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=1.1.1.1, for=203.0.113.7, for=10.0.0.3"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=1.1.1.1, for=203.0.113.7", "for=\"[fd00::3]:80\""}),
            "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=10.0.0.5,for=10.0.0.4"}), "10.0.0.5");
}

TEST(ClientIp, ForwardedHopsThatAreNotAddresses) {
  const std::string_view not_addresses[] = {
      "for=unknown",
      "for=_hidden",
      "for=2001:db8::7",  // IPv6 needs brackets
      "for=\"[2001:db8::7]:\"",
      "for=203.0.113.7:123456",
      "for=203.0.113.7:8x",
      "for=\"203.0.113.7",
      "for=\"203.0.113.7\"x",
      "for=",
      "proto=https",  // no for= at all
      "for=203.0.113.7;for=1.1.1.1",
      "for=203.0.113.7;=x",
      "for 203.0.113.7",
      "for=\"[fe80::1%25eth0]\"",
      "for=\"[2001:db8::7]x\"",
      "for=[2001:db8::7",
      "for=\"1.2.3.4\0\""sv,
  };
  for (std::string_view bad : not_addresses) {
    SCOPED_TRACE(bad);
    // Right of a trusted hop that reported it, the walk ends there; alone, at the peer.
    std::string line = "for=203.0.113.9, for=10.0.0.5, " + std::string(bad) + ", for=10.0.0.3";
    EXPECT_EQ(Client("10.0.0.1", {}, {line}), "10.0.0.3");
    EXPECT_EQ(Client("10.0.0.1", {}, {bad}), "10.0.0.1");
  }
  // A client's unbalanced quote does not swallow the element its proxy appended.
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=\"1.1.1.1, for=203.0.113.7"}), "203.0.113.7");
  EXPECT_EQ(Client("10.0.0.1", {}, {"for=\"1.1.1.1;, for=203.0.113.7"}), "203.0.113.7");
}

TEST(ClientIp, XForwardedForIsPreferredOverForwarded) {
  EXPECT_EQ(Client("10.0.0.1", {"203.0.113.7"}, {"for=1.1.1.1"}), "203.0.113.7");
  // Present but empty still wins: the proxy that wrote it reported no client.
  EXPECT_EQ(Client("10.0.0.1", {""}, {"for=1.1.1.1"}), "10.0.0.1");
}

TEST(IpAddress, Loopback) {
  for (const char* a : {"127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1"}) {
    EXPECT_TRUE(Ip(a).IsLoopback()) << a;
  }
  for (const char* a : {"10.0.0.1", "128.0.0.1", "::2", "::", "1::1", "::127.0.0.1"}) {
    EXPECT_FALSE(Ip(a).IsLoopback()) << a;
  }
}

TEST(IpKey, V4IsDottedV6IsANetwork) {
  EXPECT_EQ(IpKey(Ip("203.0.113.7")), "203.0.113.7");
  EXPECT_EQ(IpKey(Ip("::ffff:203.0.113.7")), "203.0.113.7");
  EXPECT_EQ(IpKey(Ip("203.0.113.7"), 48), "203.0.113.7");  // the prefix is for IPv6 only
  EXPECT_EQ(IpKey(Ip("2001:db8:1:2:3:4:5:6")), "2001:db8:1:2::/64");
  EXPECT_EQ(IpKey(Ip("2001:db8:1:2:3:4:5:6"), 48), "2001:db8:1::/48");
  EXPECT_EQ(IpKey(Ip("2001:db8:1:2:3:4:5:6"), 128), "2001:db8:1:2:3:4:5:6/128");
  EXPECT_EQ(IpKey(Ip("2001:db8:1:2:3:4:5:6"), 0), "::/0");
  EXPECT_EQ(IpKey(Ip("2001:db8:1:2:3:4:5:6"), 56), "2001:db8:1::/56");
  EXPECT_EQ(IpKey(Ip("2001:db8:1:2ff:3:4:5:6"), 56), "2001:db8:1:200::/56");
}

TEST(IpKey, Nat64ClientsAreTheirIpv4Addresses) {
  EXPECT_EQ(IpKey(Ip("64:ff9b::198.51.100.1")), "198.51.100.1");
  EXPECT_EQ(IpKey(Ip("64:ff9b::203.0.113.7")), "203.0.113.7");
  EXPECT_EQ(IpKey(Ip("64:ff9b::cb00:7107"), 48), "203.0.113.7");
  EXPECT_EQ(IpKey(Ip("64:ff9b:0:0:1::cb00:7107")), "64:ff9b::/64");  // not the /96
  EXPECT_EQ(IpKey(Ip("2001:db8::1"), 200), "2001:db8::1/128");       // clamped
  EXPECT_EQ(IpKey(Ip("2001:db8::1"), -5), "::/0");
}

TEST(IpKey, OneSlash64IsOneKey) {
  EXPECT_EQ(IpKey(Ip("2001:db8:1:2::1")), IpKey(Ip("2001:db8:1:2:ffff:ffff:ffff:ffff")));
  EXPECT_NE(IpKey(Ip("2001:db8:1:2::1")), IpKey(Ip("2001:db8:1:3::1")));
  EXPECT_NE(IpKey(Ip("2001:db8:1:2::1"), 128), IpKey(Ip("2001:db8:1:2::2"), 128));
}

}  // namespace
}  // namespace sluice::rules
