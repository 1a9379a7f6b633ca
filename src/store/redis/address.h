// SplitAddress: "host:port" (or "[v6]:port") as a Redis node address is written in config
// and in MOVED/CLUSTER SLOTS replies, split into its parts. Shared by the Redis store and
// the local_sync syncer.
#ifndef SLUICE_STORE_REDIS_ADDRESS_H_
#define SLUICE_STORE_REDIS_ADDRESS_H_

#include <charconv>
#include <cstdint>
#include <string>
#include <string_view>

namespace sluice::redis {

// False (and nothing written to `host`) when `a` has no ":port" or the port is not a number.
inline bool SplitAddress(std::string_view a, std::string* host, uint16_t* port) {
  size_t colon = a.rfind(':');
  if (colon == std::string_view::npos) return false;
  std::string_view h = a.substr(0, colon);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  std::string_view p = a.substr(colon + 1);
  auto [end, ec] = std::from_chars(p.data(), p.data() + p.size(), *port);
  if (ec != std::errc() || end != p.data() + p.size()) return false;
  host->assign(h);
  return true;
}

// One spelling per node: "[v6]:port" for an IPv6 host, "host:port" otherwise. A seed
// written "[::1]:7000" and the "::1:7000" of a MOVED reply must name one node, with one
// circuit breaker and one pool. An address that does not split is kept as it is.
inline std::string CanonicalAddress(std::string_view a) {
  std::string host;
  uint16_t port = 0;
  if (!SplitAddress(a, &host, &port)) return std::string(a);
  bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]:" : host + ":") + std::to_string(port);
}

}  // namespace sluice::redis

#endif  // SLUICE_STORE_REDIS_ADDRESS_H_
