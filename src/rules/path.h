// NormalizePath: the canonical form of an HTTP request path, which rules match against.
//
// A rule on "/api/login" must hold whatever spelling of that path a client sends
// ("/API//login/", "/api/./x/../login", "/api/%6cogin?x=1"), so requests and rule patterns
// are both brought to one form before they are compared. The output is itself a path in
// that form: normalizing it again gives it back unchanged.
//
// Escapes are decoded once, except for bytes whose decoding would change how the result
// reads: '/' and '\\' (%2F, %5C; refused unless allowed, see PathOptions) would move segment
// boundaries, '%' (%25) would start a new
// escape, '?' and '#' (%3F, %23) would start a query or fragment. Those stay encoded, with
// uppercase hex even when lowercasing (hex digits are not part of the path's text), so
// "%252e" stays "%252e": a literal "%2e", neither "." nor a dot segment. Only ASCII letters
// are lowercased; other bytes (UTF-8 included) pass through unchanged. A raw '\\' is an
// ordinary byte here, not a separator. With strip_path_parameters a raw ';' ends a segment's
// text (what follows it, up to the next '/', is dropped, though still checked for bad
// escapes and control bytes), and ';' (%3B) stays encoded, so that a decoded one is not read
// as a parameter when the output is normalized again.
//
// Pure function; thread-safe. Linear time; allocates only the result (reserved once: the
// output is never longer than the input).
#ifndef SLUICE_RULES_PATH_H_
#define SLUICE_RULES_PATH_H_

#include <optional>
#include <string>
#include <string_view>

namespace sluice::rules {

struct PathOptions {
  bool case_insensitive = true;      // "/API/Login" matches "/api/login"
  bool strip_trailing_slash = true;  // "/api/login/" matches "/api/login"
  // "/api/login;jsessionid=x" and "/api/x/..;/login" match "/api/login": servlet containers
  // (Tomcat, Jetty) drop a segment's ";" parameters before routing, so an upstream may serve
  // them as "/api/login". Matching more spellings only ever applies a rule to more requests.
  bool strip_path_parameters = true;
  // "/api%2Flogin" is one segment to some upstreams (Express, Go's mux) and "/api/login" to
  // others (CGI and WSGI servers decode PATH_INFO): either way Sluice reads it, a client can
  // pick the other upstream's reading and step out of its rule. So by default an escaped
  // '/' or '\' is not a path (as Apache's AllowEncodedSlashes Off and Tomcat do), nor is a
  // raw '\' ("/api\login" is "/api/login" to a WHATWG URL parser such as Node's, one
  // segment to others); an API that puts them in ids turns this on, behind an upstream that
  // keeps them as they are (a raw '\' is then an ordinary byte).
  bool allow_encoded_slashes = false;
};

// Whether the path of `target` starts with "//", or holds a '\' or an escaped '/' or '\'
// (%2F, %5C, either case): the reason NormalizePath refused it, unless
// allow_encoded_slashes.
bool HasAmbiguousSlash(std::string_view target);

// Normalizes the path of an HTTP request target (origin form) for rule matching: drops the
// query ("?...") and fragment ("#..."); decodes %XX escapes (hex either case) except those
// listed above, which stay encoded in uppercase; collapses runs of '/'; resolves "." and ".."
// segments, also when their dots arrive encoded ("/%2e%2e/", "/.%2E/"), and ".." never climbs
// above the root; removes a trailing slash (never the root "/") when strip_trailing_slash (when
// not, "/a/." gives "/a/", as in RFC 3986); lowercases ASCII letters after decoding when
// case_insensitive.
//
// Returns std::nullopt for input that is not a path: empty (after dropping the query), not
// starting with '/' (the listener turns an absolute-form target into this form first), a
// malformed escape ("%G1", "%4"), a control character (< 0x20 or 0x7F), raw or decoded, or
// a leading "//", a '\' or an escaped '/' or '\' unless allow_encoded_slashes.
std::optional<std::string> NormalizePath(std::string_view target, const PathOptions& options = {});

}  // namespace sluice::rules

#endif  // SLUICE_RULES_PATH_H_
