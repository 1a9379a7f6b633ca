// KeyHasher: maps a client key to a 64-bit fingerprint with XXH3, seeded per store.
//
// XXH3 hashes a short key in a few nanoseconds, which matters on a 25 ns decision budget
// (hence inline); the random seed keeps clients from precomputing colliding keys against a
// running store (it is not a MAC: the defense is that the seed never leaves the process).
#ifndef SLUICE_STORE_KEY_HASH_H_
#define SLUICE_STORE_KEY_HASH_H_

#include <cstdint>
#include <string_view>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace sluice::internal {

class KeyHasher {
 public:
  // seed 0 draws a random seed.
  explicit KeyHasher(uint64_t seed);
  uint64_t operator()(std::string_view key) const {
    return XXH3_64bits_withSeed(key.data(), key.size(), seed_);
  }

 private:
  uint64_t seed_;
};

}  // namespace sluice::internal

#endif  // SLUICE_STORE_KEY_HASH_H_
