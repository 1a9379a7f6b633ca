#include "rules/address.h"

#include <cctype>
#include <charconv>

#include "rules/client_ip.h"

namespace sluice::rules {

bool IsHostPort(std::string_view s) {
  size_t colon = s.rfind(':');
  if (colon == std::string_view::npos) return false;
  std::string_view host = s.substr(0, colon);
  std::string_view port = s.substr(colon + 1);
  int p = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
  if (port.empty() || !std::isdigit(static_cast<unsigned char>(port[0])) || ec != std::errc() ||
      end != port.data() + port.size() || p < 1 || p > 65535) {
    return false;
  }
  if (host.starts_with('[')) {
    if (host.size() < 3 || !host.ends_with(']')) return false;
    std::string_view ip = host.substr(1, host.size() - 2);
    return ip.find(':') != std::string_view::npos && IpAddress::Parse(ip).has_value();
  }
  // A name may end with the root's dot ("redis.internal."), as resolvers read it; an IPv4
  // address may not (it would stay numeric below and fail to parse).
  if (host.size() > 1 && host.back() == '.' && host.find_first_not_of("0123456789.") != host.npos) {
    host.remove_suffix(1);
  }
  if (host.empty() || host.front() == '.' || host.back() == '.' ||
      host.find("..") != std::string_view::npos) {
    return false;
  }
  bool numeric = true;  // digits and dots only: must be an IPv4 address
  for (char c : host) {
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '-' || c == '_') {
      numeric = false;
    } else if (!std::isdigit(static_cast<unsigned char>(c)) && c != '.') {
      return false;
    }
  }
  return !numeric || IpAddress::Parse(host).has_value();
}

std::optional<UpstreamUrl> ParseUpstreamUrl(std::string_view url) {
  constexpr std::string_view kScheme = "http://";
  if (!url.starts_with(kScheme)) return std::nullopt;
  url.remove_prefix(kScheme.size());
  if (url.ends_with('/')) url.remove_suffix(1);
  const size_t colon = url.rfind(':');
  const bool has_port =
      colon != std::string_view::npos && url.find(']', colon) == std::string_view::npos;
  const std::string host_port = has_port ? std::string(url) : std::string(url) + ":80";
  if (!IsHostPort(host_port)) return std::nullopt;
  const size_t split = host_port.rfind(':');
  UpstreamUrl u;
  std::string_view host = std::string_view(host_port).substr(0, split);
  if (host.starts_with('[')) host = host.substr(1, host.size() - 2);
  u.host = std::string(host);
  std::from_chars(host_port.data() + split + 1, host_port.data() + host_port.size(), u.port);
  return u;
}

}  // namespace sluice::rules
