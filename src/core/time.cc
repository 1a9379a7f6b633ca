#include <time.h>

#include "sluice/time.h"

namespace sluice {

TimeUs SystemClock::Now() const {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts.tv_sec * kSecond + ts.tv_nsec / 1000;
}

const SystemClock& SystemClock::Instance() {
  static const SystemClock clock;
  return clock;
}

}  // namespace sluice
