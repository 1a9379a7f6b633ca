#include "store/sync/syncer.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <unordered_map>

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include "core/log.h"
#include "store/redis/address.h"
#include "store/redis/cluster_topology.h"
#include "store/redis/connection.h"
#include "store/redis/script.h"

namespace sluice::sync {
namespace asio = boost::asio;
using redis::CallError;
using redis::Reply;
using redis::SplitAddress;

namespace {

LogLimiter g_sync_log;
LogLimiter g_peer_log;
LogLimiter g_peer_dropped_log;

constexpr int kMaxRedirects = 5;

// Sets this node's field of a window's hash to its cumulative hits (never lowering it, so a
// round resent after a lost reply, or overtaken by a later one, counts once) and answers
// the sum of every node's field: the window's global total.
constexpr std::string_view kCountScript =
    "local own = tonumber(ARGV[2]) "
    "if own > tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') then "
    "redis.call('HSET', KEYS[1], ARGV[1], own) redis.call('PEXPIRE', KEYS[1], ARGV[3]) end "
    "local total = 0 "
    "for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end "
    "return total";

// Publishes a region's total to a peer, never lowering it: nodes of one region may publish
// totals read at different moments.
constexpr std::string_view kPublishScript =
    "local v = tonumber(redis.call('GET', KEYS[1]) or '0') "
    "if tonumber(ARGV[1]) > v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end "
    "return 0";

int64_t SteadyUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A count from an INCRBY (integer) or GET (string or nil) reply.
bool ReadCount(const Reply& r, int64_t* out) {
  if (r.type == Reply::Type::kInteger) {
    *out = r.integer;
    return true;
  }
  if (r.type == Reply::Type::kNil) {
    *out = 0;
    return true;
  }
  if (r.type != Reply::Type::kString) return false;
  auto [end, ec] = std::from_chars(r.str.data(), r.str.data() + r.str.size(), *out);
  return ec == std::errc() && end == r.str.data() + r.str.size();
}

std::string Describe(CallError e, const Reply& r) {
  if (e == CallError::kTimeout) return "timeout";
  if (e == CallError::kConnection) return "connection";
  return "answered " + r.ToString();
}

}  // namespace

struct Syncer::Impl {
  Impl(SyncStore& s, const SyncerOptions& o)
      : store(s),
        options(o),
        timer(io),
        give_up(io),
        tls(o.tls ? std::make_shared<redis::TlsContextSlot>(redis::MakeTlsContext(o.tls_files))
                  : nullptr),
        count_sha(redis::Sha1Hex(kCountScript)) {
    std::random_device rd;
    char id[17];
    std::snprintf(id, sizeof id, "%08x%08x", rd(), rd());
    node_id = id;
  }

  // `peer`: another region's Redis, whose certificate names its own host. `node`: the
  // cluster node's index in `nodes` (kNotANode: not a cluster node).
  static constexpr size_t kNotANode = SIZE_MAX;
  std::shared_ptr<redis::Connection> Connect(const std::string& address, bool peer = false,
                                             size_t node = kNotANode) {
    redis::ConnectionOptions co;
    co.tls = tls;
    co.tls_server_name = peer ? "" : options.tls_server_name;
    co.tls_verify = options.tls_verify;
    if (!SplitAddress(address, &co.host, &co.port)) co.host = address;
    co.username = options.username;
    co.password = options.password;
    // Another region is a WAN away: a TCP and a TLS handshake there may take longer than
    // the connect timeout sized for this region's Redis (200 ms by default), every time.
    co.connect_timeout =
        peer ? std::max<std::chrono::microseconds>(options.connect_timeout, kPeerTimeout)
             : options.connect_timeout;
    co.stall_timeout =
        std::max<std::chrono::microseconds>(std::chrono::seconds(1), options.interval * 2);
    // Nor is a peer's call given up on (with its connection) before its deadline.
    if (peer)
      co.stall_timeout = std::max<std::chrono::microseconds>(co.stall_timeout, kPeerTimeout);
    if (node != kNotANode) {
      // As the Redis store's: a node no slot maps to any more (a failed master, a dead
      // seed) is not redialed, and logged about, forever; a call to it dials again.
      co.redial = [this, node] {
        RefreshSlots();
        return slots.Serves(node);
      };
    }
    auto c = std::make_shared<redis::Connection>(io, std::move(co));
    c->Start();
    return c;
  }

  void Start() {
    NodeIndex(options.address);  // node 0: the one Redis, or the first seed
    if (options.cluster) {
      for (const std::string& a : options.seeds) NodeIndex(a);
      RefreshSlots();
    }
    peer_states.resize(options.peers.size());
    for (size_t p = 0; p < options.peers.size(); ++p) PeerNode(p, options.peers[p].address);
    unpublished.resize(options.peers.size());
    Schedule(std::chrono::steady_clock::now());
  }

  struct Node;
  // The index of the node `given` names in `list` (one spelling per node), added with the
  // connection `connect(address, index)` makes if it is not there yet.
  template <class MakeConnection>
  static size_t IndexOf(std::vector<Node>& list, std::string_view given, MakeConnection connect) {
    const std::string address = redis::CanonicalAddress(given);
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].address == address) return i;
    }
    list.push_back({address, connect(address, list.size())});
    return list.size() - 1;
  }

  size_t NodeIndex(std::string_view given) {
    return IndexOf(nodes, given, [this](const std::string& address, size_t index) {
      return Connect(address, /*peer=*/false, options.cluster ? index : kNotANode);
    });
  }

  // The node that holds `key`: its slot's master (cluster), else the one Redis.
  size_t NodeFor(std::string_view key) const {
    return options.cluster ? slots.NodeOf(redis::KeySlot(key)) : 0;
  }

  // Asks a node for the slot map (cluster), as often as the SlotMap allows.
  void RefreshSlots() {
    auto now = std::chrono::steady_clock::now();
    size_t node = 0;
    if (!options.cluster || !slots.BeginRefresh(now, nodes.size(), &node)) return;
    std::string_view cmd[] = {"CLUSTER", "SLOTS"};
    nodes[node].conn->Call(
        cmd, now + options.connect_timeout, [this, node](CallError e, const Reply& r) {
          slots.EndRefresh();
          if (e != CallError::kNone) return;
          slots.Apply(r, nodes[node].address, [this](std::string_view a) { return NodeIndex(a); });
        });
  }

  // Where a MOVED or ASK reply sends the call (nullopt: not one, or too many hops). A MOVED
  // also updates the slot map.
  std::optional<std::pair<size_t, bool>> Redirected(const Reply& r, size_t from, int hops) {
    if (!options.cluster || hops >= kMaxRedirects) return std::nullopt;
    auto to = redis::ParseRedirect(r, nodes[from].address);
    if (!to) return std::nullopt;
    size_t target = NodeIndex(to->address);
    if (to->moved) {
      slots.Move(to->slot, target);
      RefreshSlots();
    }
    return std::pair(target, !to->moved);
  }

  // Sends a call to `node`, after ASKING when an ASK redirect sent it there.
  void CallOn(size_t node, bool asking, std::span<const std::string_view> args,
              redis::Connection::Callback done) {
    if (asking) {
      std::string_view ask[] = {"ASKING"};
      nodes[node].conn->Call(ask, Deadline(), [](CallError, const Reply&) {});
    }
    nodes[node].conn->Call(args, Deadline(), std::move(done));
  }

  // Written by this thread only; read by stats() from any.
  static void RaiseMax(std::atomic<int64_t>& max, std::chrono::steady_clock::duration d) {
    int64_t us = std::chrono::duration_cast<std::chrono::microseconds>(d).count();
    if (us > max.load(std::memory_order_relaxed)) max.store(us, std::memory_order_relaxed);
  }

  void Schedule(std::chrono::steady_clock::time_point at) {
    timer.expires_at(at);
    timer.async_wait([this](const boost::system::error_code& ec) {
      // Not once stopping: Stop runs the last round itself, and a wait that had already
      // fired when it cancelled the timer would start a second one beside it.
      if (!ec && !stopping) Tick();
    });
  }

  // Deadline of a round's calls: the interval (the next round's start), at least 100 ms,
  // and the time Redis takes to run that many calls.
  redis::SteadyTime Deadline() const { return round_deadline; }
  void SetDeadline(size_t calls) {
    round_deadline =
        round_start +
        std::max<std::chrono::microseconds>(options.interval, std::chrono::milliseconds(100)) +
        kPerCallTime * static_cast<int64_t>(calls);
  }

  // A round's share of what Collect listed: at most kMaxCallsPerRound calls, going on
  // where the last round stopped, so a long list is sent over several rounds and no key
  // waits behind the others for good. (At shutdown, only windows with hits to send.)
  void TakeShare() {
    if (stopping) std::erase_if(items, [](const SyncItem& it) { return it.unsent == 0; });
    const size_t per_item = 1 + peer_states.size();
    const size_t cap = std::max<size_t>(1, kMaxCallsPerRound / per_item);
    truncated = items.size() > cap;
    if (!truncated) {
      next_item = 0;
      return;
    }
    const size_t from = next_item % items.size();
    std::rotate(items.begin(), items.begin() + static_cast<std::ptrdiff_t>(from), items.end());
    items.resize(cap);
    next_item = from + cap;
  }

  std::string KeyOf(const SyncItem& item) const {
    std::string k = options.key_prefix;
    k.append("{").append(*item.key).append("}:").append(item.limit->id());
    k.append(":").append(std::to_string(item.window));
    return k;
  }

  void Tick() {
    in_round = true;
    auto now = std::chrono::steady_clock::now();
    // The gap since the last round began: the interval, unless this thread ran late or a
    // round outlasted it. The shutdown's last round is no interval.
    if (round_start != std::chrono::steady_clock::time_point{} && !stopping) {
      RaiseMax(interval_max_us, now - round_start);
    }
    round_start = now;
    // With no MOVED or failure to tell it, the slot map is still refreshed now and then: a
    // cluster whose masters were all replaced between two failures is followed too.
    if (options.cluster && slots.Due(now)) RefreshSlots();
    store.Collect(SystemClock::Instance().Now(), &items);
    TakeShare();
    SetDeadline(items.size() * (1 + peer_states.size()));
    if (items.empty()) return stopping ? Done() : Probe();
    const size_t n = items.size(), np = peer_states.size();
    keys.resize(n);
    totals.assign(n, 0);
    ok.assign(n, 0);
    peer_totals.assign(n * np, 0);
    round_error.clear();
    outstanding = 0;
    for (size_t i = 0; i < n; ++i) {
      keys[i] = KeyOf(items[i]);
      ++outstanding;
      SendCount(i);
      for (size_t p = 0; p < np; ++p) {
        ++outstanding;
        ReadPeerTotal(i, p, NodeFor(keys[i]), /*asking=*/false, 0);
      }
    }
  }

  // A round with nothing to send still asks Redis: otherwise an idle node would keep its
  // last busy round's health, "failing" long after Redis is back or "ok" through an outage
  // (/readyz and sluice_sync_degraded tell it). The probe is the count script on a key of
  // this node's own, with a count that grows by one each time, so every probe writes: a
  // Redis that refuses the script (ACL) or writes (OOM, a read-only replica) fails it, as it
  // would fail a round. The key expires a second after the last probe.
  std::string ProbeKey() const { return options.key_prefix + "{sluice-sync-probe}:" + node_id; }
  void Probe() {
    std::string key = ProbeKey();
    CountCall(key, std::to_string(probes + 1), "1000", NodeFor(key), false, false, 0,
              [this](CallError e, const Reply& r) {
                int64_t total = 0;
                if (e == CallError::kNone && ReadCount(r, &total)) {
                  ++probes;
                  // A round, as its failure would count in failures: an idle node's rate
                  // of rounds must not read as a stalled syncer.
                  rounds.fetch_add(1, std::memory_order_relaxed);
                  RoundSucceeded();
                } else {
                  RoundFailed(Describe(e, r));
                }
                Publish();  // what peers did not take before, if any
                Done();
              });
  }

  // Another region's published total of window i (it shares the window's hash tag).
  void ReadPeerTotal(size_t i, size_t p, size_t node, bool asking, int hops) {
    std::string published = keys[i] + "@" + options.peers[p].region;
    std::string_view get[] = {"GET", published};
    CallOn(node, asking, get, [this, i, p, node, hops](CallError e, const Reply& r) {
      const size_t np = peer_states.size();
      int64_t v = 0;
      if (e == CallError::kNone && ReadCount(r, &v)) {
        peer_totals[i * np + p] = v;
      } else if (auto to = e == CallError::kNone ? Redirected(r, node, hops) : std::nullopt) {
        return ReadPeerTotal(i, p, to->first, to->second, hops + 1);
      } else {
        if (e != CallError::kNone || redis::SaysSlotMapStale(r)) RefreshSlots();
        if (round_error.empty()) {
          round_error = "reading " + options.peers[p].region + "'s totals: " + Describe(e, r);
        }
      }
      Finished();
    });
  }

  // The count script on `key`: sets this node's field to `own` (never lowering it), with an
  // expiry of `ttl_ms`, and answers the key's total to `done` (with the call's error, if
  // any). A Redis that lost its scripts (new, restarted, flushed) gets the text once, which
  // caches it for the calls that follow; a redirect is followed; a failed call asks for the
  // slot map (a master may have died: the next round asks its successor).
  void CountCall(const std::string& key, const std::string& own, const std::string& ttl_ms,
                 size_t node, bool eval, bool asking, int hops,
                 std::function<void(CallError, const Reply&)> done) {
    std::string_view call[] = {eval ? "EVAL" : "EVALSHA",
                               eval ? kCountScript : std::string_view(count_sha),
                               "1",
                               key,
                               node_id,
                               own,
                               ttl_ms};
    CallOn(node, asking, call,
           [this, key, own, ttl_ms, node, eval, asking, hops, done = std::move(done)](
               CallError e, const Reply& r) mutable {
             if (e == CallError::kNone && r.ErrorIs("NOSCRIPT") && !eval) {
               // With ASKING again when an ASK sent it here: else the importing node
               // answers MOVED back to the one migrating the slot.
               return CountCall(key, own, ttl_ms, node, true, asking, hops, std::move(done));
             }
             if (e == CallError::kNone) {
               if (auto to = Redirected(r, node, hops)) {
                 return CountCall(key, own, ttl_ms, to->first, eval, to->second, hops + 1,
                                  std::move(done));
               }
               if (redis::SaysSlotMapStale(r)) RefreshSlots();  // a node no longer serving it
             } else {
               RefreshSlots();
             }
             done(e, r);
           });
  }

  void SendCount(size_t i) {
    const SyncItem& it = items[i];
    // The key outlives every decision that reads it: its window and the next.
    std::string ttl = std::to_string((2 * it.limit->policy().period) / 1000 + 1000);
    CountCall(keys[i], std::to_string(it.own), ttl, NodeFor(keys[i]), false, false, 0,
              [this, i](CallError e, const Reply& r) { OnTotal(i, e, r); });
  }

  void OnTotal(size_t i, CallError e, const Reply& r) {
    int64_t total = 0;
    if (e == CallError::kNone && ReadCount(r, &total)) {
      totals[i] = total;
      ok[i] = 1;
    } else if (round_error.empty()) {
      round_error = Describe(e, r);
    }
    Finished();
  }

  void Finished() {
    if (--outstanding > 0) return;
    ApplyRound();
  }

  void ApplyRound() {
    const size_t np = peer_states.size();
    size_t synced = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      // Not applied: the hits stay unsent and go with the next round. (A reply lost after
      // Redis counted them sends them twice: an over-count, never an under-count.)
      if (!ok[i]) continue;
      int64_t total = totals[i];  // a peer total that could not be read counts as 0
      for (size_t p = 0; p < np; ++p) total += peer_totals[i * np + p];
      store.Apply(items[i], total);
      ++synced;
    }
    windows_synced.fetch_add(synced, std::memory_order_relaxed);
    last_round_ok = round_error.empty();
    if (round_error.empty()) {
      rounds.fetch_add(1, std::memory_order_relaxed);
      RoundSucceeded();
    } else {
      RoundFailed(round_error);
    }
    Publish();
    Done();
  }

  // This round's totals to every other region's Redis, with those a peer did not take
  // before (kept aside, each sent again until taken, whole: the script never lowers a
  // value, so a resend counts nothing twice). With nothing to send and a peer failing, a
  // PING tells whether it is back.
  // A peer is another region, across a WAN: its calls get kPeerTimeout, not the round's
  // deadline, and the round does not wait for them (a slow or unreachable region must not
  // slow this region's own sync). One batch is out to a peer at a time: while one is, a
  // round's totals for it are kept aside, the latest of each, and go with its next batch.
  void Publish() {
    const size_t np = peer_states.size();
    const auto now = std::chrono::steady_clock::now();
    for (size_t p = 0; p < np; ++p) {
      PeerState& peer = peer_states[p];
      const bool busy = peer.inflight > 0;
      peer.inflight += 1;  // released below, so replies during the loop cannot end the batch
      for (size_t i = 0; i < items.size(); ++i) {
        if (!ok[i] || totals[i] <= 0) continue;
        const int64_t ttl_ms = (2 * items[i].limit->policy().period) / 1000 + 1000;
        const std::string published = keys[i] + "@" + options.region;
        if (busy) {
          KeepAside(p, published, totals[i], ttl_ms);
        } else {
          SendPublication(p, published, totals[i], ttl_ms, now + kPeerTimeout);
        }
      }
      if (busy) {
        // The last round's totals go once this batch is in (see PeerCallDone).
        if (stopping) peer.owes_final = true;
        PeerCallDone(p);
        continue;
      }
      SendAside(p, now);
      if (peer.inflight == 1 && peer.failing) {
        std::string_view ping[] = {"PING"};
        ++peer.inflight;
        peer.nodes[0].conn->Call(ping, now + kPeerTimeout, [this, p](CallError e, const Reply& r) {
          if (e != CallError::kNone || r.is_error()) PeerFailed(p, e, r);
          PeerCallDone(p);
        });
      }
      PeerCallDone(p);
    }
  }

  // Sends what the peer did not take before (kept aside), at most kResendPerRound.
  void SendAside(size_t p, std::chrono::steady_clock::time_point now) {
    auto& aside = unpublished[p];
    size_t sent = 0;
    for (auto it = aside.begin(); it != aside.end() && sent < kResendPerRound;) {
      if (it->second.expires <= now) {  // its window no longer matters to anyone
        it = aside.erase(it);
        continue;
      }
      SendPublication(p, it->first, it->second.value, it->second.ttl_ms, now + kPeerTimeout);
      ++sent;
      ++it;
    }
  }

  // A batch's first failure to reach its peer is the one reported.
  void PeerFailed(size_t p, CallError e, const Reply& r) {
    std::string& error = peer_states[p].batch_error;
    if (error.empty()) error = options.peers[p].region + ": " + Describe(e, r);
  }

  // A total the peer has not taken: sent again with its next batch, the largest of each key.
  void KeepAside(size_t p, const std::string& published, int64_t value, int64_t ttl_ms) {
    auto& aside = unpublished[p];
    auto [it, added] = aside.try_emplace(published);
    if (added && aside.size() > kMaxUnpublished) {
      aside.erase(it);  // bounded: past it, this total reaches the peer only if resent
      peer_dropped.fetch_add(1, std::memory_order_relaxed);
      if (g_peer_dropped_log.Allow()) {
        Log("WARN", "publishing to " + options.peers[p].region + ": " +
                        std::to_string(kMaxUnpublished) +
                        " totals already wait for it; newer ones are given up on (counted in "
                        "sluice_sync_peer_dropped_total): that region will not learn them");
      }
    } else if (it->second.value <= value) {
      it->second = {value, ttl_ms,
                    std::chrono::steady_clock::now() + std::chrono::milliseconds(ttl_ms)};
    }
  }

  // A peer's Redis may be a Redis Cluster: a publication goes to the node its slot's MOVED
  // named last (the configured address until one does), and follows MOVED and ASK.
  size_t PeerNode(size_t p, std::string_view given) {
    return IndexOf(peer_states[p].nodes, given, [this](const std::string& address, size_t) {
      return Connect(address, /*peer=*/true);
    });
  }

  void SendPublication(size_t p, const std::string& published, int64_t value, int64_t ttl_ms,
                       redis::SteadyTime deadline, int hops = 0,
                       std::optional<std::pair<size_t, bool>> to = std::nullopt) {
    PeerState& peer = peer_states[p];
    const uint16_t slot = redis::KeySlot(published);
    size_t node = 0;
    bool asking = false;
    if (to) {
      std::tie(node, asking) = *to;
    } else if (auto it = peer.slot_node.find(slot); it != peer.slot_node.end()) {
      node = it->second;
    }
    const std::string v = std::to_string(value), ttl = std::to_string(ttl_ms);
    std::string_view eval[] = {"EVAL", kPublishScript, "1", published, v, ttl};
    ++peer.inflight;
    auto& conn = *peer.nodes[node].conn;
    if (asking) {
      std::string_view ask[] = {"ASKING"};
      conn.Call(ask, deadline, [](CallError, const Reply&) {});
    }
    conn.Call(eval, deadline,
              [this, p, node, slot, published, value, ttl_ms, deadline, hops](CallError e,
                                                                              const Reply& r) {
                auto& aside = unpublished[p];
                std::optional<redis::Redirect> redirect;
                if (e == CallError::kNone && r.is_error() && hops < 3) {
                  redirect = redis::ParseRedirect(r, peer_states[p].nodes[node].address);
                }
                if (redirect) {
                  const size_t target = PeerNode(p, redirect->address);
                  if (redirect->moved) peer_states[p].slot_node[redirect->slot] = target;
                  SendPublication(p, published, value, ttl_ms, deadline, hops + 1,
                                  std::make_pair(target, !redirect->moved));
                } else if (e != CallError::kNone || r.is_error()) {
                  // A node that does not answer may be a master gone for good (a failover): the
                  // slot goes back to the configured address, whose MOVED names its master now.
                  auto& peer_slots = peer_states[p].slot_node;
                  if (auto it = peer_slots.find(slot);
                      e != CallError::kNone && it != peer_slots.end() && it->second == node) {
                    peer_slots.erase(it);
                  }
                  PeerFailed(p, e, r);
                  KeepAside(p, published, value, ttl_ms);
                } else if (auto it = aside.find(published);
                           it != aside.end() && it->second.value <= value) {
                  aside.erase(it);  // taken (a larger total kept aside since is sent on its own)
                }
                PeerCallDone(p);
              });
  }

  // Once a peer's batch is all answered: its health is that batch's.
  void PeerCallDone(size_t p) {
    PeerState& peer = peer_states[p];
    if (--peer.inflight > 0) return;
    peer.failing = !peer.batch_error.empty();
    bool any = false;
    for (const PeerState& s : peer_states) any = any || s.failing;
    peer_failing.store(any, std::memory_order_relaxed);
    if (peer.failing) {
      {
        std::lock_guard lock(error_mu);
        last_peer_error = peer.batch_error;
      }
      peer_failures.fetch_add(1, std::memory_order_relaxed);
      if (g_peer_log.Allow()) {
        Log("WARN", "publishing this region's totals failed (" + peer.batch_error +
                        "): the other regions see them late");
      }
      peer.batch_error.clear();
    }
    if (peer.owes_final && !peer.failing) {  // at shutdown: the last round's totals
      peer.owes_final = false;
      ++peer.inflight;
      SendAside(p, std::chrono::steady_clock::now());
      return PeerCallDone(p);
    }
    peer.owes_final = false;
    if (stopping && final_done) MaybeExit();
  }

  void RoundSucceeded() {
    last_ok_us.store(SteadyUs(), std::memory_order_relaxed);
    failing.store(false, std::memory_order_relaxed);
  }

  void RoundFailed(const std::string& error) {
    failures.fetch_add(1, std::memory_order_relaxed);
    failing.store(true, std::memory_order_relaxed);
    {
      std::lock_guard lock(error_mu);
      last_error = error;
    }
    if (g_sync_log.Allow()) {
      uint64_t more = g_sync_log.TakeSuppressed();
      Log("WARN", "redis sync with " + options.address + " failed (" + error +
                      "): decisions go on from local counts; the hits of " +
                      std::to_string(store.held()) + " keys " +
                      (stopping ? "are lost (shutting down: there is no next round)"
                                : "wait for the next round") +
                      (more ? " (" + std::to_string(more) + " more failures)" : ""));
    }
  }

  void Done() {
    if (!items.empty()) RaiseMax(round_max_us, std::chrono::steady_clock::now() - round_start);
    in_round = false;
    if (stopping) {
      // The hits decided while the last round was out, and those a round's share left,
      // for as long as Redis takes them (at most kShutdownWait in all).
      if (!final_sent || (truncated && last_round_ok)) {
        final_sent = true;
        return Tick();
      }
      final_done = true;
      return MaybeExit();
    }
    auto next = round_start + options.interval;
    Schedule(std::max(next, std::chrono::steady_clock::now()));
  }

  // The loop ends once the last round is done and every peer has answered its last batch
  // (or the shutdown's wait gave up on them, closing their connections).
  void MaybeExit() {
    for (const PeerState& s : peer_states) {
      if (s.inflight > 0) return;
    }
    if (exited) return;
    exited = true;
    for (auto& n : nodes) n.conn->Close();
    for (auto& p : peer_states) {
      for (auto& n : p.nodes) n.conn->Close();
    }
    io.stop();
  }

  // One last round, then the loop ends (at shutdown). A Redis that does not answer holds
  // the exit for at most kShutdownWait, not a round's deadline (up to the interval, 1 m):
  // then the connections close, the rounds fail at once, and those hits are lost.
  void Stop() {
    if (stopping) return;
    stopping = true;
    timer.cancel();
    give_up.expires_after(kShutdownWait);
    give_up.async_wait([this](const boost::system::error_code& ec) {
      if (ec) return;
      Log("WARN", "sync: Redis did not answer within " +
                      std::to_string(
                          std::chrono::duration_cast<std::chrono::seconds>(kShutdownWait).count()) +
                      " s of shutting down; the last round's hits are not sent");
      // Closing answers the pending calls at once, and their callbacks may start the final
      // round (adding nodes): close a copy of the list.
      std::vector<std::shared_ptr<redis::Connection>> conns;
      for (auto& p : peer_states) {
        for (auto& n : p.nodes) conns.push_back(n.conn);
      }
      for (auto& n : nodes) conns.push_back(n.conn);
      for (auto& c : conns) c->Close();
    });
    if (!in_round) {
      final_sent = true;
      Tick();
    }
  }

  static constexpr auto kShutdownWait = std::chrono::seconds(5);
  // A burst of new keys (100,000 a second, for seconds) would otherwise go in one pipelined
  // batch that outlasts every deadline and the connection's stall bound, fails whole, and
  // is followed by a larger one, until the windows end and their hits are dropped.
  static constexpr size_t kMaxCallsPerRound = 20'000;
  // What a call adds to its round's deadline: Redis runs about 100,000 of these short
  // scripts a second on a slow machine.
  static constexpr auto kPerCallTime = std::chrono::microseconds(10);

  SyncStore& store;
  const SyncerOptions& options;
  asio::io_context io;
  asio::steady_timer timer;
  asio::steady_timer give_up;                  // at shutdown
  std::shared_ptr<redis::TlsContextSlot> tls;  // every connection's; null: plain TCP
  struct Node {
    std::string address;
    std::shared_ptr<redis::Connection> conn;
  };
  std::vector<Node> nodes;  // [0]: the one Redis, or the first seed; then what the cluster names
  redis::SlotMap slots;     // cluster: slot -> index in nodes
  std::chrono::steady_clock::time_point round_start{};
  std::vector<SyncItem> items;
  uint64_t probes = 0;  // idle rounds' probes answered (Probe's count)
  std::vector<std::string> keys;
  std::vector<int64_t> totals;
  std::vector<char> ok;
  std::vector<int64_t> peer_totals;  // [item][peer]
  std::string round_error;
  size_t outstanding = 0;
  // Publications to another region (see Publish): a WAN round trip and some slack.
  static constexpr auto kPeerTimeout = std::chrono::seconds(2);
  struct PeerState {
    size_t inflight = 0;      // calls of the batch out to it
    std::string batch_error;  // that batch's first failure
    bool failing = false;     // its last batch failed
    bool owes_final = false;  // the last round found a batch out: one more when it is in
    std::vector<Node> nodes;  // [0]: its configured address; then nodes its MOVED/ASK named
    std::unordered_map<uint16_t, size_t> slot_node;  // a cluster's slots, as MOVED told
  };
  std::vector<PeerState> peer_states;
  // Totals a peer did not take, by peer and published key: sent again each round (at most
  // kResendPerRound a peer) until taken or their window's expiry passes.
  struct Unpublished {
    int64_t value = 0;
    int64_t ttl_ms = 0;
    std::chrono::steady_clock::time_point expires;
  };
  static constexpr size_t kMaxUnpublished = 100'000;
  static constexpr size_t kResendPerRound = 10'000;
  std::vector<std::unordered_map<std::string, Unpublished>> unpublished;
  const std::string count_sha;
  std::string node_id;  // this process' field in the windows' hashes
  redis::SteadyTime round_deadline{};
  size_t next_item = 0;        // where the next round's share of a long list starts
  bool truncated = false;      // this round's share left items for the next
  bool last_round_ok = false;  // the last round with items reached Redis with every call
  bool in_round = false;
  bool stopping = false;
  bool final_sent = false;
  bool final_done = false;  // the last round ended; the loop waits for the peers' answers
  bool exited = false;

  std::atomic<uint64_t> rounds{0}, failures{0}, windows_synced{0}, peer_failures{0},
      peer_dropped{0};
  std::atomic<int64_t> last_ok_us{0};
  std::atomic<int64_t> round_max_us{0}, interval_max_us{0};
  std::atomic<bool> failing{false};
  std::atomic<bool> peer_failing{false};
  mutable std::mutex error_mu;  // guards last_error, last_peer_error (written on failures)
  std::string last_error, last_peer_error;
};

Syncer::Syncer(SyncStore& store, SyncerOptions options)
    : store_(store), options_(std::move(options)), impl_(std::make_unique<Impl>(store_, options_)) {
  asio::post(impl_->io, [impl = impl_.get()] { impl->Start(); });
  thread_ = std::thread([impl = impl_.get()] { impl->io.run(); });
}

Syncer::~Syncer() {
  asio::post(impl_->io, [impl = impl_.get()] { impl->Stop(); });
  thread_.join();
}

bool Syncer::ReloadTls(std::string* error) {
  return !impl_->tls || impl_->tls->Reload(options_.tls_files, error);
}

Syncer::Stats Syncer::stats() const {
  Stats s;
  s.rounds = impl_->rounds.load(std::memory_order_relaxed);
  s.failures = impl_->failures.load(std::memory_order_relaxed);
  s.windows_synced = impl_->windows_synced.load(std::memory_order_relaxed);
  s.peer_failures = impl_->peer_failures.load(std::memory_order_relaxed);
  s.peer_dropped = impl_->peer_dropped.load(std::memory_order_relaxed);
  int64_t last = impl_->last_ok_us.load(std::memory_order_relaxed);
  s.last_ok_age_us = last == 0 ? -1 : SteadyUs() - last;
  s.failing = impl_->failing.load(std::memory_order_relaxed);
  s.peer_failing = impl_->peer_failing.load(std::memory_order_relaxed);
  s.round_max_us = impl_->round_max_us.load(std::memory_order_relaxed);
  s.interval_max_us = impl_->interval_max_us.load(std::memory_order_relaxed);
  std::lock_guard lock(impl_->error_mu);
  s.last_error = impl_->last_error;
  s.last_peer_error = impl_->last_peer_error;
  return s;
}

}  // namespace sluice::sync
