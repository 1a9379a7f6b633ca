#include "sluice/status.h"

namespace sluice {

std::string Status::ToString() const { return ok() ? "OK" : message_; }

}  // namespace sluice
