// Client addresses for rate limit keys: IP addresses and CIDR ranges, the proxies whose
// forwarding headers are believed, the walk over X-Forwarded-For / Forwarded that finds the
// client behind them, and the key an address is counted under.
//
// The rule throughout is that a client must not be able to choose its own key: forwarding
// headers are read only from trusted peers, and only as far as trusted proxies vouch for
// them (see ClientIp).
//
// All functions are pure and thread-safe; IpAddress and Cidr are plain values.
#ifndef SLUICE_RULES_CLIENT_IP_H_
#define SLUICE_RULES_CLIENT_IP_H_

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sluice::rules {

// An IPv4 or IPv6 address as 16 bytes (IPv4 as IPv4-mapped ::ffff:a.b.c.d, flagged v4), so
// that an IPv4 client reaching a dual-stack socket is the same address as over IPv4.
struct IpAddress {
  bool v4 = true;
  std::array<uint8_t, 16> bytes{};

  // Accepts "1.2.3.4" (exactly four decimal parts, no leading zeros: "010.0.0.1" is octal
  // to some parsers), "2001:db8::1", "[2001:db8::1]" and "::ffff:1.2.3.4" (which gives a v4
  // address). Rejects ports, zones ("fe80::1%eth0"), surrounding whitespace, and a bracketed
  // IPv4 address.
  static std::optional<IpAddress> Parse(std::string_view text);
  // Canonical text: dotted IPv4, RFC 5952 IPv6 ("2001:db8::1"). Parse(ToString()) gives back any
  // address Parse returned.
  std::string ToString() const;
  bool IsLoopback() const;  // 127.0.0.0/8 or ::1

  friend bool operator==(const IpAddress&, const IpAddress&) = default;
};

// A range of addresses: a network and a prefix length.
struct Cidr {
  IpAddress network;  // masked: the bits past `prefix` are zero
  int prefix = 0;     // 0..32 for v4, 0..128 for v6

  // Accepts "10.0.0.0/8", "fd00::/8", and a bare address ("127.0.0.1" = /32, "::1" = /128).
  // Host bits are masked off ("10.1.2.3/8" is 10.0.0.0/8). The prefix is decimal without a
  // sign or leading zeros, and counts in the address's own family: "::ffff:10.0.0.0/8" is
  // the v4 range 10.0.0.0/8.
  static std::optional<Cidr> Parse(std::string_view text);
  // A v4 address never matches a v6 range, and vice versa.
  bool Contains(const IpAddress& a) const;

  friend bool operator==(const Cidr&, const Cidr&) = default;
};

// The proxies whose forwarding headers are believed. Immutable after construction; safe to
// share between threads.
class TrustedProxies {
 public:
  TrustedProxies() = default;  // trusts nobody
  explicit TrustedProxies(std::vector<Cidr> cidrs);

  bool Trusts(const IpAddress& a) const;  // linear in the number of ranges
  bool empty() const { return cidrs_.empty(); }

 private:
  std::vector<Cidr> cidrs_;
};

// The client address of a request. `peer` is the socket's remote address; `xff` holds the
// value of each X-Forwarded-For header line and `forwarded` of each Forwarded line, in the
// order received. Callers pass the lines of one of the two only, the one the trusted
// proxies write (Config::forwarding_header): a proxy passes the other on from the client.
//
// Forwarding headers are read only when the peer is trusted; otherwise the peer is the client,
// so nobody can choose a key by sending these headers straight to Sluice. From a trusted
// peer, the hops of X-Forwarded-For (all lines, comma-separated, in order; empty elements are
// ignored, and each hop must be a bare address as IpAddress::Parse reads it: no port) or, only
// if no X-Forwarded-For line is present, the for= parameters of Forwarded (RFC 7239: `for=1.2.3.4`,
// `for=1.2.3.4:80`, `for="[2001:db8::1]:4711"`, case-insensitive names, several elements
// comma-separated) are walked right to left from the peer, skipping trusted hops:
//   - the first untrusted hop is the client;
//   - if every hop is trusted, the leftmost one is;
//   - a hop that is not an address ends the walk, and the last trusted address to its right
//     (the peer if there is none) is the client: garbage never becomes a key. In Forwarded,
//     an element without exactly one for=, a syntax error, "unknown" and obfuscated
//     identifiers ("_hidden") are such hops.
// Elements are split at every ',' (and Forwarded pairs at every ';'), inside quotes too: a node
// never contains either, and honoring quotes would let a client's unbalanced '"' swallow the
// element its proxy appends (the request would then be keyed as the proxy).
// One pass over the headers, no allocation.
// `identified` (when given) is set to false when the walk ended at a hop that is not an
// address: the address returned is then a trusted proxy's, good for a key (the proxy's
// unidentified clients share it) but not for deciding whom to trust.
IpAddress ClientIp(const IpAddress& peer, std::span<const std::string_view> xff,
                   std::span<const std::string_view> forwarded, const TrustedProxies& trusted,
                   bool* identified = nullptr);

// The rate limit key of an address: IPv4 as dotted text ("203.0.113.7"); IPv6 masked to
// `v6_prefix` bits (clamped to 0..128; default 64, because one customer usually owns a whole
// /64) and written as network/prefix ("2001:db8:1:2::/64", "2001:db8::1/128"). The two forms
// never collide. An address in NAT64's well-known prefix 64:ff9b::/96 is keyed as the IPv4
// address it embeds, which is the client.
std::string IpKey(const IpAddress& a, int v6_prefix = 64);

}  // namespace sluice::rules

#endif  // SLUICE_RULES_CLIENT_IP_H_
