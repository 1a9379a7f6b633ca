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

// `s` without the optional whitespace (spaces and tabs) around it (RFC 9110 5.6.3).
inline std::string_view TrimOws(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Calls f(piece) for each piece of `s` between `delim`s, empty ones included.
template <class F>
void ForEachPiece(std::string_view s, char delim, F&& f) {
  while (true) {
    const size_t at = s.find(delim);
    f(s.substr(0, at));
    if (at == std::string_view::npos) return;
    s.remove_prefix(at + 1);
  }
}

inline bool IsToken(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), IsTchar);
}

}  // namespace sluice::rules

#endif  // SLUICE_RULES_HTTP_TOKEN_H_
