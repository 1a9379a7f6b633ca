// PeerConnections: how many connections each client address holds, against a bound.
//
// A flood of connections from one address (slowloris, a leaking client) can otherwise take
// every slot of the server-wide connection bound and lock out everyone else. Addresses are
// counted by IPv4 address or IPv6 /64 (one host usually owns a whole /64, so counting
// single IPv6 addresses would let it rotate around the bound).
//
// Touched on accept and close only, never per request: a small mutex per shard (by address
// hash) keeps two workers accepting different clients from waiting on each other.
//
// Thread-safety: all methods may be called concurrently.
#ifndef SLUICE_SERVER_PEER_CONNECTIONS_H_
#define SLUICE_SERVER_PEER_CONNECTIONS_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <unordered_map>

#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>

namespace sluice::server {

class PeerConnections {
 public:
  // 0: no bound (then nothing is counted).
  explicit PeerConnections(size_t max_per_peer) : max_(max_per_peer) {}

  // The key an address is counted under: the IPv4 address (also when IPv4-mapped IPv6), or
  // the IPv6 /64 prefix.
  static uint64_t KeyOf(const boost::asio::ip::address& a);

  bool enabled() const { return max_ != 0; }
  // Counts one more connection for `key`; false (and nothing counted) at the bound.
  bool Acquire(uint64_t key);
  // Counts a just-accepted connection under its peer's key and returns the key; nullopt
  // (nothing counted) at the bound or when the peer's address cannot be read.
  std::optional<uint64_t> Admit(const boost::asio::ip::tcp::socket& socket);
  // Forgets one connection counted by a successful Acquire (or Admit).
  void Release(uint64_t key);
  // Connections counted for `key` now (for tests).
  size_t Count(uint64_t key) const;

 private:
  struct Shard {
    mutable std::mutex mu;
    std::unordered_map<uint64_t, uint32_t> counts;
  };
  Shard& ShardOf(uint64_t key) { return shards_[(key * 0x9E3779B97F4A7C15ull) >> 58]; }
  const Shard& ShardOf(uint64_t key) const { return shards_[(key * 0x9E3779B97F4A7C15ull) >> 58]; }

  const size_t max_;
  std::array<Shard, 64> shards_;
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_PEER_CONNECTIONS_H_
