// Where a key lives in Redis Cluster (its slot), and what the cluster tells a client about
// where slots live: the CLUSTER SLOTS reply, and the MOVED and ASK errors that redirect one
// call. Both come from the network, so both are
// checked field by field: a malformed entry is skipped or refused, never trusted.
//
// Addresses come back as "host:port", the form SplitAddress reads. A node may leave its host
// out (an empty host, or "?" in CLUSTER SLOTS, e.g. with cluster-preferred-endpoint-type
// unknown-endpoint): the client then uses the host of the node that answered, as Redis asks.
//
// SlotMap is one client's view of where slots live, shared by the Redis store's clients and
// the local_sync syncer.
//
// Thread-safety: plain functions and values; a SlotMap belongs to one thread.
#ifndef SLUICE_STORE_REDIS_CLUSTER_TOPOLOGY_H_
#define SLUICE_STORE_REDIS_CLUSTER_TOPOLOGY_H_

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
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

// Whether an error answer says the client's slot map may be stale: "CLUSTERDOWN Hash slot
// not served" comes from a node that no longer serves the slot (removed from the cluster by
// del-node, which resets it), and no MOVED will ever come from it.
inline bool SaysSlotMapStale(const Reply& reply) {
  return reply.is_error() && std::string_view(reply.str).starts_with("CLUSTERDOWN");
}

// Slot -> node, the node being an index the client gives its own connections, and the pace
// of refreshes: one CLUSTER SLOTS at a time, at most one per min_gap, so a storm of MOVED
// replies or failed calls asks once.
class SlotMap {
 public:
  using Clock = std::chrono::steady_clock;
  explicit SlotMap(std::chrono::milliseconds min_gap = std::chrono::milliseconds(100))
      : min_gap_(min_gap) {
    nodes_.fill(0);
  }

  uint16_t NodeOf(uint16_t slot) const { return nodes_[slot]; }
  // A MOVED: the slot lives on `node` now.
  void Move(uint16_t slot, size_t node) { nodes_[slot] = static_cast<uint16_t>(node); }
  // Every slot on `from` goes to `to` (a seed that turned out to be no cluster node).
  void Reassign(size_t from, size_t to) {
    std::replace(nodes_.begin(), nodes_.end(), static_cast<uint16_t>(from),
                 static_cast<uint16_t>(to));
  }
  // Whether a CLUSTER SLOTS answer has placed any slot yet (before it, every slot points at
  // the first seed).
  bool Known() const { return known_; }
  // Whether the last refresh began kPeriodic ago or more: a client with no MOVED to tell
  // it (idle, or its masters replaced while it was) still follows the cluster.
  static constexpr std::chrono::seconds kPeriodic{5};
  bool Due(Clock::time_point now) const { return now - last_refresh_ >= kPeriodic; }
  // Whether any slot lives on `node`.
  bool Serves(size_t node) const {
    return std::find(nodes_.begin(), nodes_.end(), node) != nodes_.end();
  }
  // Applies a CLUSTER SLOTS reply from `answered_by`; `index_of` gives (adding if new) the
  // client's index of a master's address.
  void Apply(const Reply& reply, std::string_view answered_by,
             const std::function<size_t(std::string_view)>& index_of);

  // Whether a refresh may start at `now`; if so it is in flight until EndRefresh. `*ask`: which
  // of `nodes` to ask (round-robin, so a dead node is not asked every time).
  bool BeginRefresh(Clock::time_point now, size_t nodes, size_t* ask);
  void EndRefresh() { refreshing_ = false; }

 private:
  std::array<uint16_t, kClusterSlots> nodes_;
  std::chrono::milliseconds min_gap_;
  bool refreshing_ = false;
  bool known_ = false;
  Clock::time_point last_refresh_{};
  size_t next_ = 0;
};

}  // namespace sluice::redis

#endif  // SLUICE_STORE_REDIS_CLUSTER_TOPOLOGY_H_
