// Network addresses as the config file and the command line write them: "IP:PORT" (the
// listeners), "host:port" (Redis nodes, peers) and "http://HOST[:PORT]" (gateway mode's
// upstream). The config's validation
// and the server read them with the same functions, so what `sluice validate` accepts is
// what `sluice serve` runs. Pure functions, thread-safe.
#ifndef SLUICE_RULES_ADDRESS_H_
#define SLUICE_RULES_ADDRESS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace sluice::rules {

// "host:port": a host name (a trailing root dot allowed), dotted IPv4 or bracketed IPv6
// ("[::1]"; no zone id), and a port in 1..65535.
bool IsHostPort(std::string_view s);

struct ListenAddress {
  std::string ip;  // an IP literal, an IPv6 one without its brackets
  uint16_t port = 0;
};

// "IP:PORT" as a listener binds it: dotted IPv4 or IPv6 (in brackets, "[::1]:8080"; the
// last colon of a bare one starts the port), no name and no zone id, and a port in
// 0..65535 (0: any free port); nullopt for anything else.
std::optional<ListenAddress> ParseListenAddress(std::string_view s);

struct UpstreamUrl {
  std::string host;  // a name or an IP address, an IPv6 one without its brackets
  uint16_t port = 80;
};

// "http://HOST[:PORT]", with one trailing "/" allowed and HOST as IsHostPort reads it (port
// 80 when left out); nullopt for anything else (https, a path, a bad host or port).
std::optional<UpstreamUrl> ParseUpstreamUrl(std::string_view url);

}  // namespace sluice::rules

#endif  // SLUICE_RULES_ADDRESS_H_
