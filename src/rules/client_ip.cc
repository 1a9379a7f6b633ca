#include "rules/client_ip.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "rules/http_token.h"

namespace sluice::rules {
namespace {

constexpr size_t kV4Offset = 12;  // where the IPv4 bytes sit in an IPv4-mapped address

bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsAlpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsHexDigit(char c) { return IsDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

IpAddress FromV4(const std::array<uint8_t, 4>& b) {
  IpAddress a;
  a.v4 = true;
  a.bytes[10] = 0xff;
  a.bytes[11] = 0xff;
  std::copy(b.begin(), b.end(), a.bytes.begin() + kV4Offset);
  return a;
}

// Strict dotted quad, by hand rather than inet_pton so that what is accepted does not depend
// on the C library (some accept "1.2.3", octal or hex parts).
std::optional<IpAddress> ParseV4(std::string_view s) {
  std::array<uint8_t, 4> b{};
  size_t i = 0;
  for (size_t part = 0; part < 4; ++part) {
    if (part > 0) {
      if (i >= s.size() || s[i] != '.') return std::nullopt;
      ++i;
    }
    const size_t begin = i;
    unsigned value = 0;
    while (i < s.size() && IsDigit(s[i]) && i - begin < 3) {
      value = value * 10 + static_cast<unsigned>(s[i] - '0');
      ++i;
    }
    if (i == begin || value > 255) return std::nullopt;
    if (i - begin > 1 && s[begin] == '0') return std::nullopt;
    b[part] = static_cast<uint8_t>(value);
  }
  if (i != s.size()) return std::nullopt;
  return FromV4(b);
}

std::optional<IpAddress> ParseV6(std::string_view s) {
  // The longest text form is "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255" (45 bytes).
  // Checking the characters first also keeps out NULs, which would end inet_pton's string
  // early, and zones ("%eth0").
  char buf[46];
  if (s.empty() || s.size() >= sizeof(buf)) return std::nullopt;
  for (char c : s) {
    if (!IsHexDigit(c) && c != ':' && c != '.') return std::nullopt;
  }
  std::memcpy(buf, s.data(), s.size());
  buf[s.size()] = '\0';
  IpAddress a;
  if (inet_pton(AF_INET6, buf, a.bytes.data()) != 1) return std::nullopt;
  constexpr uint8_t kMappedPrefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  a.v4 = std::memcmp(a.bytes.data(), kMappedPrefix, sizeof(kMappedPrefix)) == 0;
  return a;
}

// Bits of `bytes` counted for a prefix of the address's own family.
int BitOffset(const IpAddress& a) { return a.v4 ? static_cast<int>(kV4Offset) * 8 : 0; }

IpAddress Masked(IpAddress a, int prefix) {
  const int keep = BitOffset(a) + prefix;
  for (int bit = 0; bit < 128; bit += 8) {
    const int left = keep - bit;  // bits of this byte to keep
    uint8_t& byte = a.bytes[static_cast<size_t>(bit / 8)];
    if (left <= 0) {
      byte = 0;
    } else if (left < 8) {
      byte = static_cast<uint8_t>(byte & (0xff << (8 - left)));
    }
  }
  return a;
}

// Decimal 0..max without sign or leading zeros.
std::optional<int> ParsePrefix(std::string_view s, int max) {
  if (s.empty() || s.size() > 3 || (s.size() > 1 && s[0] == '0')) return std::nullopt;
  int value = 0;
  for (char c : s) {
    if (!IsDigit(c)) return std::nullopt;
    value = value * 10 + (c - '0');
  }
  if (value > max) return std::nullopt;
  return value;
}

// Folds hops fed in header order (left to right) into what the right-to-left walk described
// at ClientIp returns, so the hops need not be stored. The walk stops at the rightmost
// "stopper" (an untrusted or unparseable hop): the answer is that hop when it is untrusted,
// else the first hop after it (the start of the list counts as an unparseable stopper, which
// gives the leftmost hop when all are trusted), or the peer if no hop follows.
class HopWalk {
 public:
  explicit HopWalk(const TrustedProxies& trusted) : trusted_(trusted) {}

  void Add(const std::optional<IpAddress>& hop) {
    if (!hop) {
      stop_untrusted_ = false;
      stop_garbage_ = true;
      after_stop_.reset();
    } else if (!trusted_.Trusts(*hop)) {
      stop_untrusted_ = true;
      stop_garbage_ = false;
      untrusted_ = *hop;
      after_stop_.reset();
    } else if (!after_stop_) {
      after_stop_ = *hop;
    }
  }

  IpAddress Client(const IpAddress& peer) const {
    if (stop_untrusted_) return untrusted_;
    return after_stop_ ? *after_stop_ : peer;
  }
  // False when the walk ended at a hop that is not an address: the client stands behind
  // it, unknown, and the address Client() gives is a trusted proxy's.
  bool Identified() const { return !stop_garbage_; }

 private:
  const TrustedProxies& trusted_;
  bool stop_untrusted_ = false;
  bool stop_garbage_ = false;
  IpAddress untrusted_;
  std::optional<IpAddress> after_stop_;
};

// Forwarding headers are split with ForEachPiece (http_token.h). Quoted strings get no
// special treatment: a node never contains ',' or ';', and honoring quotes would let a client's
// unbalanced '"' swallow the element its proxy appends after it (the request would then be keyed as
// the proxy). A quoted value that does contain one is split into malformed pieces, which end the
// walk like any other garbage.

// RFC 7239 node: IPv4 [":" port] or "[" IPv6 "]" [":" port]; port is 1*5DIGIT or an
// obfuscated "_..." string. "unknown" and obfuscated nodes are not addresses.
std::optional<IpAddress> ParseNode(std::string_view node) {
  std::optional<IpAddress> a;
  std::string_view rest;
  if (!node.empty() && node.front() == '[') {
    const size_t close = node.find(']');
    if (close == std::string_view::npos) return std::nullopt;
    a = ParseV6(node.substr(1, close - 1));
    rest = node.substr(close + 1);
  } else {
    const size_t colon = node.find(':');
    a = ParseV4(node.substr(0, colon));
    if (colon != std::string_view::npos) rest = node.substr(colon);
  }
  if (!a || rest.empty()) return a;
  std::string_view port = rest.substr(1);
  if (rest.front() != ':' || port.empty()) return std::nullopt;
  if (port.front() == '_') {
    port.remove_prefix(1);
    const bool ok = !port.empty() && std::all_of(port.begin(), port.end(), [](char c) {
      return IsDigit(c) || IsAlpha(c) || c == '.' || c == '_' || c == '-';
    });
    return ok ? a : std::nullopt;
  }
  const bool ok = port.size() <= 5 && std::all_of(port.begin(), port.end(), IsDigit);
  return ok ? a : std::nullopt;
}

// The value of a parameter: a token, or a quoted string with its escapes undone into `buf`
// (a node never needs more room; longer values are rejected). RFC 7239 wants a node with a
// port or brackets quoted, but proxies send `for=1.2.3.4:80`, so a bare value may also hold
// ':', '[' and ']'.
std::optional<std::string_view> ParamValue(std::string_view v, char (&buf)[64]) {
  if (v.empty() || v.front() != '"') {
    const bool ok = std::all_of(
        v.begin(), v.end(), [](char c) { return IsTchar(c) || c == ':' || c == '[' || c == ']'; });
    if (v.empty() || !ok) return std::nullopt;
    return v;
  }
  if (v.size() < 2 || v.back() != '"') return std::nullopt;
  size_t n = 0;
  for (size_t i = 1; i + 1 < v.size(); ++i) {
    char c = v[i];
    if (c == '\\') {
      if (i + 2 >= v.size()) return std::nullopt;  // the closing quote was escaped
      c = v[++i];
    } else if (c == '"') {
      return std::nullopt;
    }
    const auto u = static_cast<unsigned char>(c);
    if ((u < 0x20 && c != '\t') || u == 0x7f) return std::nullopt;
    if (n == sizeof(buf)) return std::nullopt;
    buf[n++] = c;
  }
  return std::string_view(buf, n);
}

char AsciiLower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }

// `lower` must be lower case.
bool EqualsIgnoreCase(std::string_view s, std::string_view lower) {
  return s.size() == lower.size() && std::equal(s.begin(), s.end(), lower.begin(),
                                                [](char x, char y) { return AsciiLower(x) == y; });
}

// The address in the for= parameter of one Forwarded element; nullopt when the element has
// none, more than one, or a syntax error.
std::optional<IpAddress> ForwardedFor(std::string_view element) {
  std::optional<IpAddress> found;
  bool seen_for = false;
  bool ok = true;
  ForEachPiece(element, ';', [&](std::string_view pair) {
    pair = TrimOws(pair);
    if (pair.empty() || !ok) return;  // tolerates "for=1.2.3.4;"
    const size_t eq = pair.find('=');
    if (eq == std::string_view::npos || !IsToken(pair.substr(0, eq))) {
      ok = false;
      return;
    }
    char buf[64];
    const std::optional<std::string_view> value = ParamValue(pair.substr(eq + 1), buf);
    if (!value) {
      ok = false;
      return;
    }
    if (!EqualsIgnoreCase(pair.substr(0, eq), "for")) return;
    if (seen_for) ok = false;
    seen_for = true;
    found = ParseNode(*value);
  });
  return ok ? found : std::nullopt;
}

}  // namespace

std::optional<IpAddress> IpAddress::Parse(std::string_view text) {
  if (!text.empty() && text.front() == '[') {
    if (text.size() < 2 || text.back() != ']') return std::nullopt;
    return ParseV6(text.substr(1, text.size() - 2));
  }
  if (text.find(':') != std::string_view::npos) return ParseV6(text);
  return ParseV4(text);
}

std::string IpAddress::ToString() const {
  if (v4) {
    // By hand: this names the client of every request, and inet_ntop formats with sprintf,
    // which cost more than the whole decision.
    char buf[15];  // 255.255.255.255
    size_t n = 0;
    for (size_t i = 0; i < 4; ++i) {
      const unsigned b = bytes[kV4Offset + i];
      if (i > 0) buf[n++] = '.';
      if (b >= 100) buf[n++] = static_cast<char>('0' + b / 100);
      if (b >= 10) buf[n++] = static_cast<char>('0' + b / 10 % 10);
      buf[n++] = static_cast<char>('0' + b % 10);
    }
    return std::string(buf, n);
  }
  char buf[INET6_ADDRSTRLEN];
  const char* s = inet_ntop(AF_INET6, bytes.data(), buf, sizeof(buf));
  return s != nullptr ? std::string(s) : std::string();
}

bool IpAddress::IsLoopback() const {
  if (v4) return bytes[kV4Offset] == 127;
  return std::all_of(bytes.begin(), bytes.end() - 1, [](uint8_t b) { return b == 0; }) &&
         bytes.back() == 1;
}

std::optional<Cidr> Cidr::Parse(std::string_view text) {
  const size_t slash = text.find('/');
  const std::optional<IpAddress> a = IpAddress::Parse(text.substr(0, slash));
  if (!a) return std::nullopt;
  const int max = a->v4 ? 32 : 128;
  int prefix = max;
  if (slash != std::string_view::npos) {
    const std::optional<int> p = ParsePrefix(text.substr(slash + 1), max);
    if (!p) return std::nullopt;
    prefix = *p;
  }
  return Cidr{Masked(*a, prefix), prefix};
}

bool Cidr::Contains(const IpAddress& a) const {
  return a.v4 == network.v4 && Masked(a, prefix) == network;
}

TrustedProxies::TrustedProxies(std::vector<Cidr> cidrs) : cidrs_(std::move(cidrs)) {}

bool TrustedProxies::Trusts(const IpAddress& a) const {
  return std::any_of(cidrs_.begin(), cidrs_.end(), [&](const Cidr& c) { return c.Contains(a); });
}

IpAddress ClientIp(const IpAddress& peer, std::span<const std::string_view> xff,
                   std::span<const std::string_view> forwarded, const TrustedProxies& trusted,
                   bool* identified) {
  if (identified) *identified = true;
  if (!trusted.Trusts(peer)) return peer;
  HopWalk walk(trusted);
  if (!xff.empty()) {
    for (std::string_view line : xff) {
      ForEachPiece(line, ',', [&](std::string_view hop) {
        hop = TrimOws(hop);
        if (hop.empty()) return;
        // Some proxies (Azure Application Gateway, IIS ARR) write the client's port too:
        // "203.0.113.7:5000", "[2001:db8::1]:443". Unread, every client behind such a
        // proxy would be keyed as the proxy.
        auto a = IpAddress::Parse(hop);
        walk.Add(a ? a : ParseNode(hop));
      });
    }
  } else {
    for (std::string_view line : forwarded) {
      ForEachPiece(line, ',', [&](std::string_view element) {
        if (!TrimOws(element).empty()) walk.Add(ForwardedFor(element));
      });
    }
  }
  if (identified) *identified = walk.Identified();
  return walk.Client(peer);
}

std::string IpKey(const IpAddress& a, int v6_prefix) {
  if (a.v4) return a.ToString();
  // NAT64's well-known prefix (RFC 6052): every IPv4 client behind one translator would
  // share its /64. The address it stands for is the client.
  static constexpr std::array<uint8_t, kV4Offset> kNat64 = {0x00, 0x64, 0xff, 0x9b};
  if (std::equal(kNat64.begin(), kNat64.end(), a.bytes.begin())) {
    std::array<uint8_t, 4> v4;
    std::copy_n(a.bytes.begin() + kV4Offset, 4, v4.begin());
    return FromV4(v4).ToString();
  }
  const int prefix = std::clamp(v6_prefix, 0, 128);
  return Masked(a, prefix).ToString() + "/" + std::to_string(prefix);
}

}  // namespace sluice::rules
