// Writing HTTP/1.1 header lines straight into a byte buffer, for the listener's responses
// and the upstream's requests (both send one contiguous buffer: see docs/design.md).
#ifndef SLUICE_SERVER_WIRE_H_
#define SLUICE_SERVER_WIRE_H_

#include <string>

namespace sluice::server {

// Appends "Name: value\r\n" for every field, then the blank line that ends the header.
template <class Fields>
void AppendHeaderLines(std::string& out, const Fields& fields) {
  for (const auto& f : fields) {
    out += f.name_string();
    out += ": ";
    out += f.value();
    out += "\r\n";
  }
  out += "\r\n";
}

}  // namespace sluice::server

#endif  // SLUICE_SERVER_WIRE_H_
