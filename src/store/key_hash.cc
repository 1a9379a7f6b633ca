#include "store/key_hash.h"

#include <random>

namespace sluice::internal {

KeyHasher::KeyHasher(uint64_t seed) : seed_(seed) {
  if (seed_ != 0) return;
  std::random_device rd;
  while (seed_ == 0) seed_ = (uint64_t{rd()} << 32) ^ rd();
}

}  // namespace sluice::internal
