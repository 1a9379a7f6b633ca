#include "store/key_hash.h"

#include <random>

namespace sluice::internal {

KeyHasher::KeyHasher(uint64_t seed) : seed_(seed) {
  if (seed_ == 0) {
    std::random_device rd;
    seed_ = (uint64_t{rd()} << 32) ^ rd();
  }
}

}  // namespace sluice::internal
