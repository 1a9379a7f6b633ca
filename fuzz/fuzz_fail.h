// How a fuzz target reports a broken property: a message on stderr, then abort(), which
// libFuzzer records as a crash with the input that caused it.
#ifndef SLUICE_FUZZ_FUZZ_FAIL_H_
#define SLUICE_FUZZ_FUZZ_FAIL_H_

#include <cstdio>
#include <cstdlib>
#include <string>

namespace sluice::fuzz {

[[noreturn]] inline void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz property broken: %s\n", what.c_str());
  std::abort();
}

}  // namespace sluice::fuzz

#endif  // SLUICE_FUZZ_FUZZ_FAIL_H_
