#include "store/redis/cluster_topology.h"

#include <gtest/gtest.h>

#include "store/redis/address.h"

namespace sluice::redis {
namespace {

Reply Parse(std::string_view bytes) {
  Reply r;
  size_t used = 0;
  EXPECT_EQ(ParseReply(bytes, r, &used), ParseStatus::kOk) << bytes;
  EXPECT_EQ(used, bytes.size());
  return r;
}

// A master entry as Redis 7 writes it: host, port, node id, and its extra networking
// metadata (an empty array over RESP2).
std::string Master(std::string_view host, std::string_view port) {
  return "*4\r\n$" + std::to_string(host.size()) + "\r\n" + std::string(host) + "\r\n" +
         std::string(port) + "$3\r\nabc\r\n*0\r\n";
}

std::string Range(std::string_view first, std::string_view last, const std::string& master) {
  return "*3\r\n" + std::string(first) + std::string(last) + master;
}

TEST(ClusterTopology, KeySlotFollowsHashTags) {
  // The examples of the Redis Cluster specification.
  EXPECT_EQ(KeySlot("123456789"), 0x31C3);  // CRC16/XMODEM check value
  EXPECT_EQ(KeySlot("foo"), 12182);
  EXPECT_EQ(KeySlot("{user1000}.following"), KeySlot("user1000"));
  EXPECT_EQ(KeySlot("foo{bar}{zap}"), KeySlot("bar"));
  EXPECT_EQ(KeySlot("foo{{bar}}zap"), KeySlot("{bar"));
  EXPECT_NE(KeySlot("foo{}{bar}"), KeySlot("bar"));  // an empty tag hashes the whole key
  EXPECT_EQ(KeySlot("sluice:{ip=10.0.0.1}:a"), KeySlot("sluice:{ip=10.0.0.1}:b"));
}

TEST(ClusterTopology, ReadsEveryRangeAndItsMaster) {
  Reply r = Parse("*3\r\n" + Range(":0\r\n", ":5460\r\n", Master("127.0.0.1", ":7000\r\n")) +
                  Range(":5461\r\n", ":10922\r\n", Master("127.0.0.1", ":7001\r\n")) +
                  // With a replica after the master: only the master serves the slots.
                  "*4\r\n:10923\r\n:16383\r\n" + Master("10.0.0.3", ":7002\r\n") +
                  Master("10.0.0.4", ":7005\r\n"));
  auto ranges = ParseClusterSlots(r, "127.0.0.1:7000");
  ASSERT_EQ(ranges.size(), 3u);
  EXPECT_EQ((std::tuple(ranges[0].first, ranges[0].last, ranges[0].address)),
            (std::tuple(0, 5460, std::string("127.0.0.1:7000"))));
  EXPECT_EQ((std::tuple(ranges[1].first, ranges[1].last, ranges[1].address)),
            (std::tuple(5461, 10922, std::string("127.0.0.1:7001"))));
  EXPECT_EQ((std::tuple(ranges[2].first, ranges[2].last, ranges[2].address)),
            (std::tuple(10923, 16383, std::string("10.0.0.3:7002"))));
}

TEST(ClusterTopology, AMissingHostIsTheAnsweringNodes) {
  Reply r = Parse("*2\r\n" + Range(":0\r\n", ":99\r\n", Master("", ":7003\r\n")) +
                  Range(":100\r\n", ":199\r\n", Master("?", ":7004\r\n")));
  auto ranges = ParseClusterSlots(r, "192.168.1.9:7000");
  ASSERT_EQ(ranges.size(), 2u);
  EXPECT_EQ(ranges[0].address, "192.168.1.9:7003");
  EXPECT_EQ(ranges[1].address, "192.168.1.9:7004");
}

TEST(ClusterTopology, MalformedRangesAreSkipped) {
  const std::string good = Range(":0\r\n", ":10\r\n", Master("h", ":1\r\n"));
  Reply r = Parse("*9\r\n" + good +
                  Range(":10\r\n", ":5\r\n", Master("h", ":2\r\n")) +         // first after last
                  Range(":0\r\n", ":16384\r\n", Master("h", ":3\r\n")) +      // past the last slot
                  Range(":-1\r\n", ":5\r\n", Master("h", ":4\r\n")) +         // negative
                  Range("$1\r\n0\r\n", ":5\r\n", Master("h", ":5\r\n")) +     // a slot as a string
                  Range(":0\r\n", ":5\r\n", Master("h", ":70000\r\n")) +      // no such port
                  Range(":0\r\n", ":5\r\n", Master("h", "$4\r\n7000\r\n")) +  // a port as a string
                  "*2\r\n:0\r\n:5\r\n" +                                      // no master
                  ":7\r\n");                                                  // not a range at all
  auto ranges = ParseClusterSlots(r, "127.0.0.1:7000");
  ASSERT_EQ(ranges.size(), 1u);
  EXPECT_EQ(ranges[0].address, "h:1");
  EXPECT_TRUE(ParseClusterSlots(Parse("-ERR This instance has cluster support disabled\r\n"),
                                "127.0.0.1:7000")
                  .empty());
}

TEST(ClusterTopology, ReadsMovedAndAsk) {
  auto moved = ParseRedirect(Parse("-MOVED 3999 127.0.0.1:6381\r\n"), "127.0.0.1:6379");
  ASSERT_TRUE(moved);
  EXPECT_TRUE(moved->moved);
  EXPECT_EQ(moved->slot, 3999);
  EXPECT_EQ(moved->address, "127.0.0.1:6381");
  auto ask = ParseRedirect(Parse("-ASK 16383 10.1.2.3:7002\r\n"), "127.0.0.1:6379");
  ASSERT_TRUE(ask);
  EXPECT_FALSE(ask->moved);
  EXPECT_EQ(ask->slot, 16383);
  EXPECT_EQ(ask->address, "10.1.2.3:7002");
  // An unknown endpoint: the host of the node that answered.
  auto own = ParseRedirect(Parse("-MOVED 12 :7004\r\n"), "10.0.0.1:7000");
  ASSERT_TRUE(own);
  EXPECT_EQ(own->address, "10.0.0.1:7004");
}

// An IPv6 node is one node however it is spelled: a seed's "[::1]:7000", CLUSTER SLOTS'
// "::1" and 7000, a MOVED's "::1:7000". Two spellings made two breakers and two pools.
TEST(ClusterTopology, AnIpv6NodeHasOneSpelling) {
  EXPECT_EQ(CanonicalAddress("[::1]:7000"), "[::1]:7000");
  EXPECT_EQ(CanonicalAddress("::1:7000"), "[::1]:7000");
  EXPECT_EQ(CanonicalAddress("10.0.0.1:7000"), "10.0.0.1:7000");
  EXPECT_EQ(CanonicalAddress("redis-0.redis:6379"), "redis-0.redis:6379");
  auto moved = ParseRedirect(Parse("-MOVED 3999 ::1:7001\r\n"), "[::1]:7000");
  ASSERT_TRUE(moved);
  EXPECT_EQ(moved->address, "[::1]:7001");
  auto own = ParseRedirect(Parse("-MOVED 12 :7004\r\n"), "[::1]:7000");
  ASSERT_TRUE(own);
  EXPECT_EQ(own->address, "[::1]:7004");
  auto ranges = ParseClusterSlots(
      Parse("*1\r\n" + Range(":0\r\n", ":99\r\n", Master("::1", ":7002\r\n"))), "[::1]:7000");
  ASSERT_EQ(ranges.size(), 1u);
  EXPECT_EQ(ranges[0].address, "[::1]:7002");
}

TEST(ClusterTopology, RefusesMalformedRedirects) {
  for (const char* bytes :
       {"-MOVED\r\n", "-MOVED \r\n", "-MOVED 3999\r\n", "-MOVED x 127.0.0.1:6381\r\n",
        "-MOVED 16384 127.0.0.1:6381\r\n", "-MOVED -1 127.0.0.1:6381\r\n", "-ASK 1 127.0.0.1\r\n",
        "-ASK 1 127.0.0.1:0\r\n", "-ASK 1 127.0.0.1:99999\r\n", "-MOVEDX 1 127.0.0.1:6381\r\n",
        "-ERR MOVED 1 127.0.0.1:6381\r\n", "+MOVED 1 127.0.0.1:6381\r\n"}) {
    EXPECT_FALSE(ParseRedirect(Parse(bytes), "127.0.0.1:6379")) << bytes;
  }
}

TEST(SlotMap, AppliesRangesAndMoves) {
  SlotMap map;
  std::vector<std::string> nodes = {"127.0.0.1:7000"};  // the client's numbering
  auto index_of = [&nodes](std::string_view a) {
    for (size_t i = 0; i < nodes.size(); ++i) {
      if (nodes[i] == a) return i;
    }
    nodes.emplace_back(a);
    return nodes.size() - 1;
  };
  EXPECT_EQ(map.NodeOf(0), 0);  // before any reply: the first node
  EXPECT_EQ(map.NodeOf(16383), 0);
  map.Apply(Parse("*2\r\n" + Range(":0\r\n", ":8191\r\n", Master("127.0.0.1", ":7001\r\n")) +
                  Range(":8192\r\n", ":16383\r\n", Master("", ":7000\r\n"))),
            "127.0.0.1:7000", index_of);
  EXPECT_EQ(nodes, (std::vector<std::string>{"127.0.0.1:7000", "127.0.0.1:7001"}));
  EXPECT_EQ(map.NodeOf(0), 1);
  EXPECT_EQ(map.NodeOf(8191), 1);
  EXPECT_EQ(map.NodeOf(8192), 0);
  EXPECT_EQ(map.NodeOf(16383), 0);
  map.Move(8191, 0);
  EXPECT_EQ(map.NodeOf(8191), 0);
  EXPECT_EQ(map.NodeOf(8190), 1);
}

TEST(SlotMap, OneRefreshAtATimeAndAtMostOnePerGap) {
  SlotMap map(std::chrono::milliseconds(100));
  SlotMap::Clock::time_point t0{std::chrono::seconds(1000)};
  size_t ask = 99;
  ASSERT_TRUE(map.BeginRefresh(t0, 3, &ask));
  EXPECT_EQ(ask, 0u);
  // In flight: no second one, however late.
  EXPECT_FALSE(map.BeginRefresh(t0 + std::chrono::seconds(5), 3, &ask));
  map.EndRefresh();
  // Done, but within the gap of the last start.
  EXPECT_FALSE(map.BeginRefresh(t0 + std::chrono::milliseconds(99), 3, &ask));
  ASSERT_TRUE(map.BeginRefresh(t0 + std::chrono::milliseconds(100), 3, &ask));
  EXPECT_EQ(ask, 1u);  // the next node: a dead one is not asked every time
  map.EndRefresh();
  ASSERT_TRUE(map.BeginRefresh(t0 + std::chrono::milliseconds(200), 3, &ask));
  EXPECT_EQ(ask, 2u);
  map.EndRefresh();
  EXPECT_FALSE(map.BeginRefresh(t0 + std::chrono::seconds(9), 0, &ask));  // no node to ask
}

}  // namespace
}  // namespace sluice::redis
