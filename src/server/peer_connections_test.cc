#include "server/peer_connections.h"

#include <gtest/gtest.h>

namespace sluice::server {
namespace {

namespace ip = boost::asio::ip;

TEST(PeerConnections, KeysIpv4ByAddressAndIpv6ByPrefix) {
  EXPECT_EQ(PeerConnections::KeyOf(ip::make_address("192.0.2.7")),
            PeerConnections::KeyOf(ip::make_address("::ffff:192.0.2.7")));
  EXPECT_NE(PeerConnections::KeyOf(ip::make_address("192.0.2.7")),
            PeerConnections::KeyOf(ip::make_address("192.0.2.8")));
  // One host rotating through its /64 is one peer; the next /64 is another.
  EXPECT_EQ(PeerConnections::KeyOf(ip::make_address("2001:db8:1:2::1")),
            PeerConnections::KeyOf(ip::make_address("2001:db8:1:2:ffff:ffff:ffff:ffff")));
  EXPECT_NE(PeerConnections::KeyOf(ip::make_address("2001:db8:1:2::1")),
            PeerConnections::KeyOf(ip::make_address("2001:db8:1:3::1")));
}

TEST(PeerConnections, RefusesAtTheBoundAndTakesMoreOnceReleased) {
  PeerConnections peers(2);
  uint64_t a = PeerConnections::KeyOf(ip::make_address("127.0.0.2"));
  uint64_t b = PeerConnections::KeyOf(ip::make_address("127.0.0.1"));
  EXPECT_TRUE(peers.Acquire(a));
  EXPECT_TRUE(peers.Acquire(a));
  EXPECT_FALSE(peers.Acquire(a));
  EXPECT_EQ(peers.Count(a), 2u);  // the refused one was not counted
  EXPECT_TRUE(peers.Acquire(b));  // another address is not held back
  peers.Release(a);
  EXPECT_TRUE(peers.Acquire(a));
  peers.Release(a);
  peers.Release(a);
  peers.Release(b);
  EXPECT_EQ(peers.Count(a), 0u);
  EXPECT_EQ(peers.Count(b), 0u);
}

TEST(PeerConnections, ZeroMeansNoBound) {
  PeerConnections peers(0);
  EXPECT_FALSE(peers.enabled());
  uint64_t a = PeerConnections::KeyOf(ip::make_address("127.0.0.2"));
  for (int i = 0; i < 1000; ++i) EXPECT_TRUE(peers.Acquire(a));
  EXPECT_EQ(peers.Count(a), 0u);
}

}  // namespace
}  // namespace sluice::server
