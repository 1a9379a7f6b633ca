#include "store/redis/cluster_topology.h"

#include <array>
#include <charconv>

#include "store/redis/address.h"

namespace sluice::redis {
namespace {

// "host:port" with the answering node's host standing in for a missing one; nullopt when
// the port is not one.
std::optional<std::string> NodeAddress(std::string_view host, int64_t port,
                                       std::string_view answered_by) {
  if (port <= 0 || port > 65535) return std::nullopt;
  std::string own_host;
  uint16_t own_port = 0;
  if (host.empty() || host == "?") {
    if (!SplitAddress(answered_by, &own_host, &own_port)) return std::nullopt;
    host = own_host;
  }
  return CanonicalAddress(std::string(host) + ":" + std::to_string(port));
}

// CRC16-CCITT (XMODEM), the Redis Cluster key hash.
constexpr std::array<uint16_t, 256> MakeCrcTable() {
  std::array<uint16_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i << 8;
    for (int b = 0; b < 8; ++b) c = (c & 0x8000) ? (c << 1) ^ 0x1021 : c << 1;
    t[i] = static_cast<uint16_t>(c & 0xffff);
  }
  return t;
}
constexpr auto kCrcTable = MakeCrcTable();

uint16_t Crc16(std::string_view s) {
  uint16_t crc = 0;
  for (unsigned char c : s) {
    crc = static_cast<uint16_t>((crc << 8) ^ kCrcTable[((crc >> 8) ^ c) & 0xff]);
  }
  return crc;
}

bool IsSlot(const Reply& r) {
  return r.type == Reply::Type::kInteger && r.integer >= 0 && r.integer < kClusterSlots;
}

}  // namespace

uint16_t KeySlot(std::string_view key) {
  size_t open = key.find('{');
  if (open != std::string_view::npos) {
    size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  return static_cast<uint16_t>(Crc16(key) & (kClusterSlots - 1));
}

std::vector<SlotRange> ParseClusterSlots(const Reply& reply, std::string_view answered_by) {
  std::vector<SlotRange> out;
  if (reply.type != Reply::Type::kArray) return out;
  for (const Reply& range : reply.elements) {
    // [first, last, [host, port, id...], replicas...]
    if (range.type != Reply::Type::kArray || range.elements.size() < 3) continue;
    const Reply& first = range.elements[0];
    const Reply& last = range.elements[1];
    const Reply& master = range.elements[2];
    if (!IsSlot(first) || !IsSlot(last) || first.integer > last.integer) continue;
    if (master.type != Reply::Type::kArray || master.elements.size() < 2) continue;
    const Reply& host = master.elements[0];
    const Reply& port = master.elements[1];
    if (host.type != Reply::Type::kString || port.type != Reply::Type::kInteger) continue;
    auto address = NodeAddress(host.str, port.integer, answered_by);
    if (!address) continue;
    out.push_back({static_cast<uint16_t>(first.integer), static_cast<uint16_t>(last.integer),
                   std::move(*address)});
  }
  return out;
}

std::optional<Redirect> ParseRedirect(const Reply& reply, std::string_view answered_by) {
  Redirect r;
  if (reply.ErrorIs("MOVED")) {
    r.moved = true;
  } else if (!reply.ErrorIs("ASK")) {
    return std::nullopt;
  }
  std::string_view rest(reply.str);
  const size_t word = r.moved ? 6 : 4;  // "MOVED " or "ASK "
  if (rest.size() <= word) return std::nullopt;
  rest.remove_prefix(word);
  size_t space = rest.find(' ');
  if (space == std::string_view::npos) return std::nullopt;
  std::string_view slot = rest.substr(0, space), target = rest.substr(space + 1);
  int64_t s = -1;
  auto [end, ec] = std::from_chars(slot.data(), slot.data() + slot.size(), s);
  if (ec != std::errc() || end != slot.data() + slot.size() || s < 0 || s >= kClusterSlots) {
    return std::nullopt;
  }
  std::string host;
  uint16_t port = 0;
  if (!SplitAddress(target, &host, &port)) return std::nullopt;
  auto address = NodeAddress(host, port, answered_by);
  if (!address) return std::nullopt;
  r.slot = static_cast<uint16_t>(s);
  r.address = std::move(*address);
  return r;
}

void SlotMap::Apply(const Reply& reply, std::string_view answered_by,
                    const std::function<size_t(std::string_view)>& index_of) {
  for (const SlotRange& range : ParseClusterSlots(reply, answered_by)) {
    size_t node = index_of(range.address);
    for (size_t s = range.first; s <= range.last; ++s) Move(static_cast<uint16_t>(s), node);
    known_ = true;
  }
}

bool SlotMap::BeginRefresh(Clock::time_point now, size_t nodes, size_t* ask) {
  if (refreshing_ || nodes == 0 || now - last_refresh_ < min_gap_) return false;
  refreshing_ = true;
  last_refresh_ = now;
  *ask = next_++ % nodes;
  return true;
}

}  // namespace sluice::redis
