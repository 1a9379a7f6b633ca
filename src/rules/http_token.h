// HTTP tokens (RFC 9110 5.6.2): the characters of methods, field names and parameter names,
// for the parsers that check them. Pure functions; thread-safe.
#ifndef SLUICE_RULES_HTTP_TOKEN_H_
#define SLUICE_RULES_HTTP_TOKEN_H_

#include <algorithm>
#include <string_view>

namespace sluice::rules {

inline bool IsTchar(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c != '\0' && std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos);
}

inline bool IsToken(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), IsTchar);
}

}  // namespace sluice::rules

#endif  // SLUICE_RULES_HTTP_TOKEN_H_
