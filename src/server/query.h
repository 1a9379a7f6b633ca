// Reading one parameter from a request target's query string ("/p?a=1&b=2#f").
#ifndef SLUICE_SERVER_QUERY_H_
#define SLUICE_SERVER_QUERY_H_

#include <optional>
#include <string_view>

namespace sluice::server {

// The raw (still percent-encoded) value of the first `name` parameter; "" for a parameter
// without '='; nullopt when absent.
inline std::optional<std::string_view> FindQueryParam(std::string_view target,
                                                      std::string_view name) {
  size_t q = target.find('?');
  if (q == std::string_view::npos) return std::nullopt;
  std::string_view rest = target.substr(q + 1);
  rest = rest.substr(0, rest.find('#'));
  while (!rest.empty()) {
    size_t amp = rest.find('&');
    std::string_view pair = rest.substr(0, amp);
    size_t eq = pair.find('=');
    if (pair.substr(0, eq) == name) {
      return eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1);
    }
    if (amp == std::string_view::npos) break;
    rest = rest.substr(amp + 1);
  }
  return std::nullopt;
}

}  // namespace sluice::server

#endif  // SLUICE_SERVER_QUERY_H_
