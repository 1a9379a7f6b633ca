#include "server/response_head.h"

#include <array>

#include "rules/http_token.h"
#include "server/wire.h"

namespace sluice::server {
namespace {

bool IsWhite(char c) { return c == ' ' || c == '\t'; }

// Printable ASCII, space and tab: what a simple head's values and reason may hold.
constexpr auto kPlain = [] {
  std::array<bool, 256> t{};
  t['\t'] = true;
  for (int c = ' '; c <= '~'; ++c) t[c] = true;
  return t;
}();

bool IsPlain(char c) { return kPlain[static_cast<unsigned char>(c)]; }

std::string_view Trim(std::string_view s) {
  while (!s.empty() && IsWhite(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsWhite(s.back())) s.remove_suffix(1);
  return s;
}

enum class Scan { kLine, kIncomplete, kBad };

// Moves `p` over plain bytes to the CR of the CR LF that ends the line.
Scan ScanPlain(const char*& p, const char* end) {
  while (p < end && IsPlain(*p)) ++p;
  if (p == end) return Scan::kIncomplete;
  if (*p != '\r') return Scan::kBad;
  if (p + 1 == end) return Scan::kIncomplete;
  return p[1] == '\n' ? Scan::kLine : Scan::kBad;
}

// The Connection header's list: "close" and the names of other hop-by-hop fields.
bool ReadConnection(std::string_view value, ResponseHead& out) {
  while (true) {
    size_t comma = value.find(',');
    std::string_view token = Trim(value.substr(0, comma));
    if (!token.empty()) {
      if (!rules::IsToken(token)) return false;
      if (SameFieldName(token, "close")) {
        out.close = true;
      } else if (!SameFieldName(token, "keep-alive")) {
        out.connection_named.push_back(token);
      }
    }
    if (comma == std::string_view::npos) return true;
    value.remove_prefix(comma + 1);
  }
}

bool ReadLength(std::string_view value, uint64_t& length) {
  if (value.empty() || value.size() > 18) return false;  // 18 digits cannot overflow
  uint64_t n = 0;
  for (char c : value) {
    if (c < '0' || c > '9') return false;
    n = n * 10 + static_cast<uint64_t>(c - '0');
  }
  length = n;
  return true;
}

// "HTTP/1.1 SSS reason": a final status with a body, other than 204 and 304.
bool ReadStatusLine(std::string_view line, ResponseHead& out) {
  constexpr std::string_view kVersion = "HTTP/1.1 ";
  if (!line.starts_with(kVersion) || line.size() < kVersion.size() + 4) return false;
  line.remove_prefix(kVersion.size());
  unsigned status = 0;
  for (int i = 0; i < 3; ++i) {
    if (line[i] < '0' || line[i] > '9') return false;
    status = status * 10 + static_cast<unsigned>(line[i] - '0');
  }
  if (line[3] != ' ' || status < 200 || status > 599 || status == 204 || status == 304) {
    return false;
  }
  out.status = status;
  out.reason = line.substr(4);
  return true;
}

}  // namespace

// One pass over the bytes, each looked up in a table once: this runs on every answer.
HeadParse ParseSimpleResponseHead(std::string_view bytes, ResponseHead& out) {
  out.lines.clear();
  out.connection_named.clear();
  out.close = false;
  out.content_length = 0;
  out.size = 0;
  // Past kMaxSimpleHead bytes the head is not simple, whole or not.
  const bool capped = bytes.size() > kMaxSimpleHead;
  const auto more = capped ? HeadParse::kNotSimple : HeadParse::kIncomplete;
  const char* const begin = bytes.data();
  const char* const end = begin + (capped ? kMaxSimpleHead : bytes.size());
  const char* p = begin;
  if (Scan scan = ScanPlain(p, end); scan != Scan::kLine) {
    return scan == Scan::kIncomplete ? more : HeadParse::kNotSimple;
  }
  if (!ReadStatusLine(std::string_view(begin, p), out)) return HeadParse::kNotSimple;
  p += 2;
  bool have_length = false;
  while (true) {
    const char* const line = p;
    while (p < end && rules::IsTchar(*p)) ++p;  // the name, right before its colon
    if (p == end) return more;
    if (p == line && *p == '\r') {  // the blank line: the head is whole
      if (p + 1 == end) return more;
      if (p[1] != '\n') return HeadParse::kNotSimple;
      p += 2;
      break;
    }
    // A name and its colon (which also rules out a space before the colon and obsolete
    // line folding).
    if (p == line || *p != ':') return HeadParse::kNotSimple;
    std::string_view name(line, static_cast<size_t>(p - line));
    const char* const value_begin = ++p;
    if (Scan scan = ScanPlain(p, end); scan != Scan::kLine) {
      return scan == Scan::kIncomplete ? more : HeadParse::kNotSimple;
    }
    std::string_view value =
        Trim(std::string_view(value_begin, static_cast<size_t>(p - value_begin)));
    p += 2;
    if (SameFieldName(name, "content-length")) {
      if (have_length || !ReadLength(value, out.content_length)) return HeadParse::kNotSimple;
      have_length = true;
    } else if (SameFieldName(name, "transfer-encoding")) {
      return HeadParse::kNotSimple;
    } else if (SameFieldName(name, "connection")) {
      if (!ReadConnection(value, out)) return HeadParse::kNotSimple;
    } else if (SameFieldName(name, "proxy-connection")) {
      return HeadParse::kNotSimple;  // Beast reads it as Connection: rare enough to leave to it
    }
    out.lines.push_back({name, value, std::string_view(line, static_cast<size_t>(p - line))});
  }
  if (!have_length) return HeadParse::kNotSimple;
  out.size = static_cast<size_t>(p - begin);
  return HeadParse::kSimple;
}

}  // namespace sluice::server
