// Reading parameters from a request target's query string ("/p?a=1&b=2#f"), the way the
// applications behind Sluice read them: names and values percent-decoded, '+' a space.
#ifndef SLUICE_SERVER_QUERY_H_
#define SLUICE_SERVER_QUERY_H_

#include <optional>
#include <string>
#include <string_view>

namespace sluice::server {

namespace query_detail {

inline int Hex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Calls put(char) for each decoded byte of `raw`: "%XX" is that byte, '+' a space, and a
// '%' not followed by two hex digits stays as it is.
template <typename Put>
void Decode(std::string_view raw, Put&& put) {
  for (size_t i = 0; i < raw.size(); ++i) {
    char c = raw[i];
    if (c == '+') {
      put(' ');
    } else if (c == '%' && i + 2 < raw.size() && Hex(raw[i + 1]) >= 0 && Hex(raw[i + 2]) >= 0) {
      put(static_cast<char>(Hex(raw[i + 1]) * 16 + Hex(raw[i + 2])));
      i += 2;
    } else {
      put(c);
    }
  }
}

// Whether `raw`, decoded, is `plain` (no copy).
inline bool DecodedEquals(std::string_view raw, std::string_view plain) {
  size_t at = 0;
  bool same = true;
  Decode(raw, [&](char c) {
    same = same && at < plain.size() && plain[at] == c;
    ++at;
  });
  return same && at == plain.size();
}

}  // namespace query_detail

inline std::string DecodeQueryComponent(std::string_view raw) {
  std::string out;
  query_detail::Decode(raw, [&](char c) { out += c; });
  return out;
}

// The parameters named `name` (compared decoded, so "%61ccount" is "account"): how many
// there are, and the first one's raw value ("" for a parameter without '=').
struct QueryParamLookup {
  size_t count = 0;
  std::string_view first_raw;
};

// `separators`: "&", or "&;" to read as the widest of the applications a key must hold
// for: Rack before 3.0 (Rails 7.0 and older) and older Python and Go split on ';' too, so
// "account=alice;x=1" is their alice, and must be Sluice's.
inline QueryParamLookup FindQueryParams(std::string_view target, std::string_view name,
                                        std::string_view separators = "&") {
  QueryParamLookup out;
  size_t q = target.find('?');
  if (q == std::string_view::npos) return out;
  std::string_view rest = target.substr(q + 1);
  rest = rest.substr(0, rest.find('#'));
  while (!rest.empty()) {
    size_t amp = rest.find_first_of(separators);
    std::string_view pair = rest.substr(0, amp);
    size_t eq = pair.find('=');
    if (query_detail::DecodedEquals(pair.substr(0, eq), name) && out.count++ == 0) {
      out.first_raw = eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1);
    }
    if (amp == std::string_view::npos) break;
    rest = rest.substr(amp + 1);
  }
  return out;
}

// The decoded value of the first `name` parameter; nullopt when absent.
inline std::optional<std::string> QueryParam(std::string_view target, std::string_view name) {
  QueryParamLookup found = FindQueryParams(target, name);
  if (found.count == 0) return std::nullopt;
  return DecodeQueryComponent(found.first_raw);
}

}  // namespace sluice::server

#endif  // SLUICE_SERVER_QUERY_H_
