// Where a key lives in Redis Cluster (its slot), and what the cluster tells a client about
// where slots live: the CLUSTER SLOTS reply, and the MOVED and ASK errors that redirect one
// call. Both come from the network, so both are
// checked field by field: a malformed entry is skipped or refused, never trusted.
//
// Addresses come back as "host:port", the form SplitAddress reads. A node may leave its host
// out (an empty host, or "?" in CLUSTER SLOTS, e.g. with cluster-preferred-endpoint-type
// unknown-endpoint): the client then uses the host of the node that answered, as Redis asks.
//
// Thread-safety: plain functions and values.
#ifndef SLUICE_STORE_REDIS_CLUSTER_TOPOLOGY_H_
#define SLUICE_STORE_REDIS_CLUSTER_TOPOLOGY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "store/redis/resp.h"

namespace sluice::redis {

inline constexpr int64_t kClusterSlots = 16384;

// The slot of a key: CRC16 of its hash tag (the first non-empty "{...}"), or of the whole key.
uint16_t KeySlot(std::string_view key);

// Slots first..last (both included, first <= last < kClusterSlots) and their master.
struct SlotRange {
  uint16_t first = 0;
  uint16_t last = 0;
  std::string address;
};

// The well-formed ranges of a CLUSTER SLOTS reply, in its order; `answered_by` is the
// address of the node that sent it. Not an array: no ranges.
std::vector<SlotRange> ParseClusterSlots(const Reply& reply, std::string_view answered_by);

struct Redirect {
  bool moved = false;  // MOVED: the slot lives there now; ASK: for this call only
  uint16_t slot = 0;
  std::string address;
};

// "MOVED 3999 127.0.0.1:6381" or "ASK 3999 127.0.0.1:6381"; nullopt for any other reply,
// or one whose slot or address does not parse.
std::optional<Redirect> ParseRedirect(const Reply& reply, std::string_view answered_by);

}  // namespace sluice::redis

#endif  // SLUICE_STORE_REDIS_CLUSTER_TOPOLOGY_H_
