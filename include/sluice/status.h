// Status: success or an error message, returned by value (no exceptions on any path that
// decides a request). Cheap to return when OK: no allocation.
#ifndef SLUICE_STATUS_H_
#define SLUICE_STATUS_H_

#include <string>
#include <string_view>
#include <utility>

namespace sluice {

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  static Status Ok() { return Status(); }
  static Status Invalid(std::string message) { return Status(std::move(message)); }
  // Not done for want of the service, not for anything the caller gave (shutting down).
  static Status Unavailable(std::string message) {
    Status s(std::move(message));
    s.unavailable_ = true;
    return s;
  }

  bool ok() const { return !error_; }
  bool unavailable() const { return unavailable_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

 private:
  explicit Status(std::string message) : error_(true), message_(std::move(message)) {}
  bool error_ = false;
  bool unavailable_ = false;
  std::string message_;
};

}  // namespace sluice

#endif  // SLUICE_STATUS_H_
