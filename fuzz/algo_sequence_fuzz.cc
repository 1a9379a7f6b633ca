// Fuzzes the six algorithms against their naive references (src/algo/reference): the input
// decodes into a policy (any Policy::Validate accepts: limits from 0 to 2^63 - 1, periods
// from 1 ms to ten years, bursts), a start time and up to 1000 actions (requests of any cost,
// dry runs, the clock moving forward, stepping back, sweeps), which
// reference/sequence_check.h runs step by step. Any disagreement with the reference, broken
// definition (remaining, retry_after, reset_after exact) or broken promise over a window
// aborts with the step that showed it. reference_agreement_test.cc runs the same checker on
// seeded random inputs.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>

#include "algo/reference/sequence_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace sluice::algo::reference;
  const Scenario s = DecodeScenario(std::span<const uint8_t>(data, size), 1000);
  if (std::string error = CheckScenario(s); !error.empty()) {
    std::fprintf(stderr, "algo_sequence: start %lld: %s\n", static_cast<long long>(s.start),
                 error.c_str());
    std::abort();
  }
  return 0;
}
