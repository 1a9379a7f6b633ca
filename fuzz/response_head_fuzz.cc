// Fuzzes the gateway's reading of an upstream answer's head in place
// (server/response_head.h) against Beast's parser, which reads every head the fast reading
// leaves alone. Checked, for any bytes: when ParseSimpleResponseHead calls a head simple,
// Beast reads it without error and agrees on where it ends, the status, the reason, the
// Content-Length, that no chunked body follows, the keep-alive, and the fields (the values
// of each name in order); any shorter prefix of a simple head is incomplete, never simple. (So an
// answer relayed the fast way reaches the client as Beast would have read it.)
#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/buffer.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/parser.hpp>

#include "fuzz/fuzz_fail.h"
#include "server/response_head.h"

namespace {

namespace http = boost::beast::http;
using sluice::fuzz::Fail;
using sluice::server::HeadParse;
using sluice::server::ParseSimpleResponseHead;
using sluice::server::ResponseHead;

void CheckAgainstBeast(std::string_view bytes, const ResponseHead& head) {
  http::response_parser<http::empty_body> beast;
  beast.body_limit(boost::none);
  boost::system::error_code ec;
  size_t used = beast.put(boost::asio::buffer(bytes.data(), bytes.size()), ec);
  if (ec) Fail("Beast refused a simple head: " + ec.message());
  if (!beast.is_header_done()) Fail("Beast did not finish a simple head");
  if (used != head.size) Fail("Beast ends the head elsewhere");
  const auto& m = beast.get();
  if (m.result_int() != head.status) Fail("Beast reads another status");
  // Beast names an empty reason by its status, as the listener writes it.
  std::string_view reason =
      head.reason.empty() ? std::string_view(http::obsolete_reason(m.result())) : head.reason;
  if (std::string_view(m.reason()) != reason) Fail("Beast reads another reason");
  if (m.version() != 11) Fail("Beast reads another version");
  if (beast.chunked()) Fail("Beast expects a chunked body");
  if (!beast.content_length() || *beast.content_length() != head.content_length) {
    Fail("Beast reads another Content-Length");
  }
  if (beast.keep_alive() == head.close) Fail("Beast reads another keep-alive");
  // Beast keeps fields of one name together (a repeated name goes after its last one), the
  // fast reader keeps the upstream's order: the same fields and, name by name, the same
  // values in the same order.
  using Field = std::pair<std::string, std::string_view>;
  auto lower = [](std::string_view name) {
    std::string out(name);
    for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return out;
  };
  std::vector<Field> beast_fields, fast_fields;
  for (const auto& f : m) beast_fields.emplace_back(lower(f.name_string()), f.value());
  for (const ResponseHead::Line& line : head.lines) {
    fast_fields.emplace_back(lower(line.name), line.value);
    if (!line.raw.starts_with(line.name) || !line.raw.ends_with("\r\n")) {
      Fail("a line's raw bytes are not the line");
    }
  }
  auto by_name = [](const Field& a, const Field& b) { return a.first < b.first; };
  std::stable_sort(beast_fields.begin(), beast_fields.end(), by_name);
  std::stable_sort(fast_fields.begin(), fast_fields.end(), by_name);
  if (beast_fields != fast_fields) Fail("Beast reads other fields");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  ResponseHead head;
  HeadParse result = ParseSimpleResponseHead(bytes, head);
  if (result != HeadParse::kSimple) return 0;
  if (head.size == 0 || head.size > bytes.size()) Fail("a simple head of a bad size");
  CheckAgainstBeast(bytes, head);
  ResponseHead again;
  if (ParseSimpleResponseHead(bytes.substr(0, head.size), again) != HeadParse::kSimple ||
      again.size != head.size) {
    Fail("the head alone does not read the same");
  }
  for (size_t cut : {size_t{0}, head.size / 2, head.size - 1}) {
    if (ParseSimpleResponseHead(bytes.substr(0, cut), again) == HeadParse::kSimple) {
      Fail("a part of a head was read as a whole one");
    }
  }
  return 0;
}
