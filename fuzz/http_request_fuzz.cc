// Fuzzes what the main listener does with the bytes a client sends: Beast's request parser
// under Sluice's header and body bounds (pipelined requests included), the answer to a
// request it refuses, and for each request it accepts the Front handler as a connection
// calls it (absolute-form targets, path normalization, query parameters, client address
// through X-Forwarded-For / Forwarded and the trusted proxies, key extraction, rule
// matching, the decision on the in-memory store, the decision API and the Envoy JSON form),
// then the answer as it goes on the wire.
//
// Input: the first byte picks the peer address (trusted proxy or not, IPv4, IPv6 or
// IPv4-mapped); the rest is the byte stream of one connection, up to its end.
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string_view>

#include <boost/asio/buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http/error.hpp>

#include "fuzz/fuzz_fixture.h"
#include "rules/client_ip.h"
#include "rules/path.h"
#include "server/query.h"

namespace {

namespace asio = boost::asio;
namespace http = boost::beast::http;
using sluice::fuzz::Fixture;
using tcp = asio::ip::tcp;

tcp::endpoint Peer(uint8_t pick) {
  static const char* const kPeers[] = {
      "10.1.2.3",          // trusted proxy (v4)
      "203.0.113.7",       // a client
      "fd00::1",           // trusted proxy (v6)
      "2001:db8:1:2::99",  // a v6 client
      "::ffff:10.0.0.5",   // trusted, v4-mapped on a dual-stack socket
      "127.0.0.1",         // trusted, exact address
      "::1",
      "198.51.100.250",
  };
  return {asio::ip::make_address(kPeers[pick % std::size(kPeers)]), 40000};
}

// Properties of the pure parts the handler relies on, checked on this request's own strings.
void CheckPureParts(const sluice::server::HttpRequest& req) {
  using sluice::rules::IpAddress;
  using sluice::rules::NormalizePath;
  for (bool ci : {true, false}) {
    sluice::rules::PathOptions o{.case_insensitive = ci,
                                 .strip_trailing_slash = !ci,
                                 .strip_path_parameters = true,
                                 .allow_encoded_slashes = ci};
    auto path = NormalizePath(req.target(), o);
    // Documented: normalizing a normalized path gives it back unchanged.
    if (path && NormalizePath(*path, o) != path) {
      sluice::fuzz::Fail("NormalizePath is not idempotent on '" + std::string(req.target()) + "'");
    }
  }
  // Documented: a parameter is found (named in any spelling that decodes to the name) iff
  // its decoded value is given; decoding never lengthens.
  auto found = sluice::server::FindQueryParams(req.target(), "account");
  auto value = sluice::server::QueryParam(req.target(), "account");
  if ((found.count > 0) != value.has_value()) {
    sluice::fuzz::Fail("FindQueryParams and QueryParam disagree on '" + std::string(req.target()) +
                       "'");
  }
  if (value && value->size() > found.first_raw.size()) {
    sluice::fuzz::Fail("a decoded query value is longer than its raw text");
  }
  for (const auto& f : req) {
    if (!boost::beast::iequals(f.name_string(), "x-forwarded-for")) continue;
    std::string_view hops = f.value();
    while (!hops.empty()) {
      size_t comma = hops.find(',');
      std::string_view hop = hops.substr(0, comma);
      while (!hop.empty() && hop.front() == ' ') hop.remove_prefix(1);
      while (!hop.empty() && hop.back() == ' ') hop.remove_suffix(1);
      // Documented: Parse(ToString()) gives back any address Parse returned.
      if (auto a = IpAddress::Parse(hop); a && IpAddress::Parse(a->ToString()) != a) {
        sluice::fuzz::Fail("IpAddress does not round-trip: '" + std::string(hop) + "'");
      }
      if (comma == std::string_view::npos) break;
      hops.remove_prefix(comma + 1);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture& fixture = *new Fixture();
  if (size == 0) return 0;
  const tcp::endpoint peer = Peer(data[0]);
  std::string_view stream(reinterpret_cast<const char*>(data + 1), size - 1);
  const sluice::server::HttpOptions options;  // the server's bounds

  // One connection: requests are read and answered in turn until the stream ends, the
  // parser refuses one, or an answer closes the connection (as Session::OnRead does).
  for (int requests = 0; requests < 16; ++requests) {
    sluice::server::HttpRequestParser parser;
    sluice::server::LimitRequestParser(parser, options);
    boost::system::error_code ec;
    // What http::async_read does over a socket whose bytes are all there: put until the
    // message is done; when the parser takes no more, the stream has ended.
    while (!parser.is_done()) {
      size_t used = stream.empty() ? 0 : parser.put(asio::buffer(stream.data(), stream.size()), ec);
      stream.remove_prefix(used);
      if (ec == http::error::need_more) ec = {};
      if (ec) break;
      if (used == 0) {
        if (!parser.got_some()) return 0;  // end_of_stream between requests: closed
        parser.put_eof(ec);
        if (!ec && !parser.is_done()) ec = http::error::partial_message;
        break;
      }
    }
    sluice::server::HttpResponse res;
    res.version(11);
    if (ec) {
      sluice::server::RejectUnparsedRequest(res, ec, !parser.get().target().empty());
      res.keep_alive(false);
      sluice::fuzz::CheckAnswer(res, false);
      return 0;
    }
    sluice::server::HttpRequest& req = parser.get();
    std::string_view target = req.target();
    size_t sep = target.find("://");
    const bool absolute =
        sep != std::string_view::npos && (boost::beast::iequals(target.substr(0, sep), "http") ||
                                          boost::beast::iequals(target.substr(0, sep), "https"));
    if (sluice::server::ToOriginForm(req)) return 0;  // refused, and the connection closed
    // Documented: an absolute-form target it takes leaves origin form and one Host.
    if (absolute && (!req.target().starts_with('/') || req.count(http::field::host) != 1)) {
      sluice::fuzz::Fail("ToOriginForm left '" + std::string(req.target()) + "'");
    }
    CheckPureParts(req);
    res.version(req.version());
    res.keep_alive(req.keep_alive());
    const bool head = req.method() == http::verb::head;
    bool ready = true;
    try {
      ready = fixture.front.Handle(req, peer, res, sluice::fuzz::NoDefer);
    } catch (const std::exception& e) {
      // The connection would answer 400 and close (Session::OnRead), but decisions are made
      // without exceptions: one thrown here is a bug in what it came from.
      sluice::fuzz::Fail(std::string("the handler threw: ") + e.what());
    }
    if (!ready) sluice::fuzz::Fail("a handler deferred its answer");
    sluice::fuzz::CheckAnswer(res, head);
    if (!res.keep_alive() || stream.empty()) return 0;
  }
  return 0;
}
