#include "rules/path.h"

#include <cstddef>

namespace sluice::rules {
namespace {

constexpr char kHexDigits[] = "0123456789ABCDEF";

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Decoding these would change how the output reads when normalized again (see path.h).
bool StaysEncoded(unsigned char c, const PathOptions& options) {
  return c == '/' || c == '\\' || c == '%' || c == '?' || c == '#' ||
         (c == ';' && options.strip_path_parameters);
}

bool IsControl(unsigned char c) { return c < 0x20 || c == 0x7F; }

// The byte that the escape at path[i] ('%') stands for, or -1 when it is not "%" and two hex
// digits.
int Escaped(std::string_view path, size_t i) {
  if (path.size() - i < 3) return -1;
  const int hi = HexValue(path[i + 1]);
  const int lo = HexValue(path[i + 2]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

}  // namespace

bool HasAmbiguousSlash(std::string_view target) {
  const std::string_view path = target.substr(0, target.find_first_of("?#"));
  if (path.starts_with("//")) return true;
  if (path.find('\\') != std::string_view::npos) return true;
  for (size_t i = path.find('%'); i != std::string_view::npos; i = path.find('%', i + 1)) {
    const int e = Escaped(path, i);
    if (e == '/' || e == '\\') return true;
  }
  return false;
}

std::optional<std::string> NormalizePath(std::string_view target, const PathOptions& options) {
  const std::string_view path = target.substr(0, target.find_first_of("?#"));
  if (path.empty() || path.front() != '/') return std::nullopt;
  // "//host/api/login" is "/api/login" on host "host" to a WHATWG URL parser given it as
  // a relative URL (Node's `new URL(req.url, base)`) and to Python's urlsplit, and
  // "/host/api/login" to others.
  if (path.starts_with("//") && !options.allow_encoded_slashes) return std::nullopt;
  const size_t n = path.size();

  // Every input byte yields at most one output byte (an escape that stays encoded yields
  // its own three), so this is the only allocation.
  std::string out;
  out.reserve(n);
  out.push_back('/');
  size_t i = 1;
  while (i < n) {
    if (path[i] == '/') {  // collapses runs of '/'
      ++i;
      continue;
    }
    // One segment, up to the next raw '/'; `out` ends with '/' here.
    const size_t start = out.size();
    int dots = 0;
    bool only_dots = true;
    for (; i < n && path[i] != '/'; ++i) {
      auto c = static_cast<unsigned char>(path[i]);
      if (c == ';' && options.strip_path_parameters) {
        // The segment's parameters: dropped, up to the next '/', once they are valid.
        for (; i < n && path[i] != '/'; ++i) {
          int p = static_cast<unsigned char>(path[i]);
          if (p == '%') {
            p = Escaped(path, i);
            if (p < 0) return std::nullopt;
            i += 2;
          }
          if (IsControl(static_cast<unsigned char>(p))) return std::nullopt;
        }
        break;
      }
      // A raw '\\' is as ambiguous as an escaped one: a WHATWG URL parser (Node's, a
      // browser's) reads it as '/', others as a byte of the segment.
      if (c == '\\' && !options.allow_encoded_slashes) return std::nullopt;
      if (c == '%') {
        const int e = Escaped(path, i);
        if (e < 0) return std::nullopt;
        i += 2;
        c = static_cast<unsigned char>(e);
        if ((c == '/' || c == '\\') && !options.allow_encoded_slashes) return std::nullopt;
        if (StaysEncoded(c, options)) {
          out.push_back('%');
          out.push_back(kHexDigits[e / 16]);
          out.push_back(kHexDigits[e % 16]);
          only_dots = false;
          continue;
        }
      }
      if (IsControl(c)) return std::nullopt;
      if (c == '.') {
        ++dots;
      } else {
        only_dots = false;
      }
      if (options.case_insensitive && c >= 'A' && c <= 'Z') {
        c = static_cast<unsigned char>(c - 'A' + 'a');
      }
      out.push_back(static_cast<char>(c));
    }
    if (only_dots && dots <= 2) {  // "." or ".." (a segment is never empty)
      out.resize(start);
      // ".." drops the segment before it. The scan back covers only bytes being dropped,
      // so the whole pass stays linear.
      if (dots == 2 && start > 1) out.resize(out.rfind('/', start - 2) + 1);
    } else if (i < n) {
      out.push_back('/');
    }
  }
  if (options.strip_trailing_slash && out.size() > 1 && out.back() == '/') out.pop_back();
  return out;
}

}  // namespace sluice::rules
