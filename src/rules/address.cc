#include "rules/address.h"

#include <cctype>
#include <charconv>

#include "rules/client_ip.h"

namespace sluice::rules {

namespace {

// A port in min..65535, digits only.
std::optional<uint16_t> ParsePort(std::string_view port, int min = 1) {
  int p = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
  if (port.empty() || !std::isdigit(static_cast<unsigned char>(port[0])) || ec != std::errc() ||
      end != port.data() + port.size() || p < min || p > 65535) {
    return std::nullopt;
  }
  return static_cast<uint16_t>(p);
}

// A host name, dotted IPv4 or bracketed IPv6: the host as a resolver takes it (an IPv6
// address without its brackets), or nullopt.
std::optional<std::string_view> ParseHost(std::string_view host) {
  if (host.starts_with('[')) {
    if (host.size() < 3 || !host.ends_with(']')) return std::nullopt;
    std::string_view ip = host.substr(1, host.size() - 2);
    if (ip.find(':') == std::string_view::npos || !IpAddress::Parse(ip)) return std::nullopt;
    return ip;
  }
  // A name may end with the root's dot ("redis.internal."), as resolvers read it; an IPv4
  // address may not (it would stay numeric below and fail to parse).
  std::string_view name = host;
  if (name.size() > 1 && name.back() == '.' && name.find_first_not_of("0123456789.") != name.npos) {
    name.remove_suffix(1);
  }
  if (name.empty() || name.front() == '.' || name.back() == '.' ||
      name.find("..") != std::string_view::npos) {
    return std::nullopt;
  }
  bool numeric = true;  // digits and dots only: must be an IPv4 address
  for (char c : name) {
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '-' || c == '_') {
      numeric = false;
    } else if (!std::isdigit(static_cast<unsigned char>(c)) && c != '.') {
      return std::nullopt;
    }
  }
  if (numeric && !IpAddress::Parse(name)) return std::nullopt;
  return host;
}

}  // namespace

bool IsHostPort(std::string_view s) {
  const size_t colon = s.rfind(':');
  return colon != std::string_view::npos && ParseHost(s.substr(0, colon)) &&
         ParsePort(s.substr(colon + 1));
}

std::optional<ListenAddress> ParseListenAddress(std::string_view s) {
  const size_t colon = s.rfind(':');
  if (colon == std::string_view::npos) return std::nullopt;
  std::string_view ip = s.substr(0, colon);
  if (ip.size() >= 2 && ip.front() == '[' && ip.back() == ']') {
    ip = ip.substr(1, ip.size() - 2);
    if (ip.find(':') == std::string_view::npos) return std::nullopt;  // "[1.2.3.4]"
  }
  const auto port = ParsePort(s.substr(colon + 1), /*min=*/0);
  if (!port || !IpAddress::Parse(ip)) return std::nullopt;
  return ListenAddress{std::string(ip), *port};
}

std::optional<UpstreamUrl> ParseUpstreamUrl(std::string_view url) {
  constexpr std::string_view kScheme = "http://";
  if (!url.starts_with(kScheme)) return std::nullopt;
  url.remove_prefix(kScheme.size());
  if (url.ends_with('/')) url.remove_suffix(1);
  const size_t colon = url.rfind(':');
  const bool has_port =
      colon != std::string_view::npos && url.find(']', colon) == std::string_view::npos;
  const auto host = ParseHost(has_port ? url.substr(0, colon) : url);
  const auto port = has_port ? ParsePort(url.substr(colon + 1)) : std::optional<uint16_t>(80);
  if (!host || !port) return std::nullopt;
  return UpstreamUrl{std::string(*host), *port};
}

}  // namespace sluice::rules
