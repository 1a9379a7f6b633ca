// HTTP tokens (RFC 9110 5.6.2): the characters of methods, field names and parameter names,
// for the parsers that check them. Pure functions; thread-safe.
#ifndef SLUICE_RULES_HTTP_TOKEN_H_
#define SLUICE_RULES_HTTP_TOKEN_H_

#include <algorithm>
#include <array>
#include <string_view>

namespace sluice::rules {

namespace internal {
inline constexpr auto kTchar = [] {
  std::array<bool, 256> t{};
  for (int c = '0'; c <= '9'; ++c) t[c] = true;
  for (int c = 'a'; c <= 'z'; ++c) t[c] = true;
  for (int c = 'A'; c <= 'Z'; ++c) t[c] = true;
  for (char c : std::string_view("!#$%&'*+-.^_`|~")) t[static_cast<unsigned char>(c)] = true;
  return t;
}();
}  // namespace internal

// A table, not a search of the punctuation: field names are checked on a gateway's every
// answer.
inline bool IsTchar(char c) { return internal::kTchar[static_cast<unsigned char>(c)]; }

inline bool IsToken(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), IsTchar);
}

}  // namespace sluice::rules

#endif  // SLUICE_RULES_HTTP_TOKEN_H_
