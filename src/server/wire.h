// Writing HTTP/1.1 straight into byte buffers, for the listener's responses and the
// upstream's requests: header lines (a head goes out as one contiguous buffer: see
// docs/design.md), and the framing of a streamed body's pieces.
#ifndef SLUICE_SERVER_WIRE_H_
#define SLUICE_SERVER_WIRE_H_

#include <array>
#include <cstdio>
#include <iterator>
#include <span>
#include <string>
#include <string_view>

#include <boost/asio/buffer.hpp>
#include <boost/beast/core/string.hpp>

namespace sluice::server {

// Appends "Name: value\r\n" for every field, then `rendered` (lines already in that form),
// then the blank line that ends the header.
template <class Fields>
void AppendHeaderLines(std::string& out, const Fields& fields, std::string_view rendered = {}) {
  for (const auto& f : fields) {
    out += f.name_string();
    out += ": ";
    out += f.value();
    out += "\r\n";
  }
  out += rendered;
  out += "\r\n";
}

// Whether two field names are the same, in any case; the lengths first, the cheap test.
// (Inline, and ASCII only as field names are: Beast's iequals is a call per compare.)
inline bool SameFieldName(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; };
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i] && lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

// Calls `f(name)` for each line of `rendered` (header lines, "Name: value\r\n" each) until
// it returns true; returns whether one did.
template <class F>
bool AnyRenderedName(std::string_view rendered, F f) {
  while (!rendered.empty()) {
    size_t colon = rendered.find(':');
    size_t end = rendered.find("\r\n");
    if (colon == std::string_view::npos || end == std::string_view::npos) return false;
    if (f(rendered.substr(0, colon))) return true;
    rendered.remove_prefix(end + 2);
  }
  return false;
}

// Whether `rendered` has a line named `name`, in any case.
inline bool RenderedHas(std::string_view rendered, std::string_view name) {
  return AnyRenderedName(rendered, [name](std::string_view n) { return SameFieldName(n, name); });
}

// Erases, in one walk of the fields' list, the ones `drop(field)` picks. A head holds a
// handful of fields, so one walk costs less than beast's erase by name for each of several
// names (each a descent of the fields' tree with case-blind compares).
template <class Fields, class Pred>
void EraseFieldsIf(Fields& fields, Pred drop) {
  for (auto it = fields.begin(); it != fields.end();) {
    it = drop(*it) ? fields.erase(it) : std::next(it);
  }
}

// The buffers that send one piece of a streamed body: the piece as is, or as an HTTP/1.1
// chunk, followed for the last piece by the zero chunk that ends the body. The span and
// the size line live in this object: keep it until the write completes.
class PieceFrame {
 public:
  std::span<const boost::asio::const_buffer> Frame(std::string_view piece, bool last,
                                                   bool chunked) {
    size_t n = 0;
    if (chunked && !piece.empty()) {
      char hex[24];
      int len = std::snprintf(hex, sizeof hex, "%zx\r\n", piece.size());
      size_line_.assign(hex, static_cast<size_t>(len));
      bufs_[n++] = boost::asio::buffer(size_line_);
    }
    if (!piece.empty()) bufs_[n++] = boost::asio::buffer(piece.data(), piece.size());
    if (chunked && !piece.empty()) bufs_[n++] = boost::asio::buffer("\r\n", 2);
    if (chunked && last) bufs_[n++] = boost::asio::buffer("0\r\n\r\n", 5);
    return {bufs_.data(), n};
  }

 private:
  std::array<boost::asio::const_buffer, 4> bufs_;
  std::string size_line_;
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_WIRE_H_
