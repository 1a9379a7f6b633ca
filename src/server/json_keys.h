// Duplicate keys in a JSON text. RFC 8259 leaves an object with a key given twice to each
// parser, and parsers differ (the first wins in some, the last in Boost.JSON, Go and
// Python): a proxy that checks one "path" or "user_id" and a limiter that reads the other
// would disagree about what was asked. The decision API and the RLS JSON form refuse such
// a text instead of picking one.
//
// Thread-safety: a plain function.
#ifndef SLUICE_SERVER_JSON_KEYS_H_
#define SLUICE_SERVER_JSON_KEYS_H_

#include <optional>
#include <string>
#include <string_view>

namespace sluice::server {

// The first key (decoded) that an object of `text` holds twice, at any depth; nullopt when
// there is none, or when `text` is not JSON (its parse tells why).
std::optional<std::string> FirstDuplicateKey(std::string_view text);

}  // namespace sluice::server

#endif  // SLUICE_SERVER_JSON_KEYS_H_
