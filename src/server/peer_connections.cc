#include "server/peer_connections.h"

namespace sluice::server {

uint64_t PeerConnections::KeyOf(const boost::asio::ip::address& a) {
  if (a.is_v4()) return (uint64_t{1} << 32) | a.to_v4().to_uint();
  auto v6 = a.to_v6();
  if (v6.is_v4_mapped()) {
    return (uint64_t{1} << 32) |
           boost::asio::ip::make_address_v4(boost::asio::ip::v4_mapped, v6).to_uint();
  }
  auto bytes = v6.to_bytes();
  uint64_t prefix = 0;
  for (size_t i = 0; i < 8; ++i) prefix = (prefix << 8) | bytes[i];
  // A prefix starting 0000:0001: lies in the reserved ::/8, so it never meets an IPv4 key.
  return prefix;
}

bool PeerConnections::Acquire(uint64_t key) {
  if (max_ == 0) return true;
  Shard& s = ShardOf(key);
  std::lock_guard lock(s.mu);
  uint32_t& n = s.counts[key];
  if (n >= max_) return false;
  ++n;
  return true;
}

std::optional<uint64_t> PeerConnections::Admit(const boost::asio::ip::tcp::socket& socket) {
  boost::system::error_code ec;
  auto peer = socket.remote_endpoint(ec);
  if (ec) return std::nullopt;
  uint64_t key = KeyOf(peer.address());
  if (!Acquire(key)) return std::nullopt;
  return key;
}

void PeerConnections::Release(uint64_t key) {
  if (max_ == 0) return;
  Shard& s = ShardOf(key);
  std::lock_guard lock(s.mu);
  auto it = s.counts.find(key);
  if (it == s.counts.end()) return;
  if (--it->second == 0) s.counts.erase(it);
}

size_t PeerConnections::Count(uint64_t key) const {
  const Shard& s = ShardOf(key);
  std::lock_guard lock(s.mu);
  auto it = s.counts.find(key);
  return it == s.counts.end() ? 0 : it->second;
}

}  // namespace sluice::server
