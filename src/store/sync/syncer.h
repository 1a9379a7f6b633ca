// Syncer: the thread of the "local + sync" mode that moves a SyncStore's hits to Redis and
// brings the global totals back, every `interval`.
//
// A round collects the windows decided since the last round (SyncStore::Collect) and sends
// them as one pipelined batch on one connection: per window, one EVALSHA of a short script
// that sets this process' field of the window's hash to its cumulative hits (never
// lowering it: a resent round counts once), refreshes the expiry (the key outlives every
// decision that reads it) and answers the sum of all fields. Each total is applied to the
// local counts. Keys are "<prefix>{<client key>}:<limit id>:<window index>": the hash tag
// keeps a client's keys in one Redis Cluster slot, and the policy hash in the limit id
// gives a changed limit fresh keys. One round is in flight at a time; the next starts
// `interval` after the last began.
//
// With Redis Cluster, each window's call goes to the master of its key's slot (a slot map
// from CLUSTER SLOTS, asked of the seeds at start and again after a MOVED or a failed
// call), MOVED and ASK are followed within the round, so a round spans every shard and a
// failover is followed like the Redis store follows it.
//
// With peers (other regions' Redis), each round also publishes this region's totals to
// them and reads theirs back (SyncerOptions).
//
// When Redis fails, decisions go on from local counts (that is the mode's point); hits
// stay unsent and go with the next round that reaches Redis. Failures are counted,
// logged at most once a second, and reported by stats() for /readyz and /metrics.
//
// Thread-safety: the constructor starts the thread and the destructor stops it after one
// last round (so a clean shutdown delivers the hits of its last interval); stats() from
// any thread.
#ifndef SLUICE_STORE_SYNC_SYNCER_H_
#define SLUICE_STORE_SYNC_SYNCER_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "sluice/time.h"
#include "store/redis/connection.h"
#include "store/sync/sync_store.h"

namespace sluice::sync {

// Another region's Redis, for async aggregation between regions.
struct SyncPeer {
  std::string region;
  std::string address;  // "host:port"
};

struct SyncerOptions {
  std::string address;   // "host:port": this node's (this region's) Redis, or a cluster seed
  bool cluster = false;  // `address` and `seeds` are Redis Cluster nodes
  std::vector<std::string> seeds;  // more cluster nodes to ask for the slot map
  std::string username;
  std::string password;
  std::string key_prefix = "sluice:";
  std::chrono::microseconds interval{100'000};
  std::chrono::microseconds connect_timeout{200'000};
  // TLS to this region's Redis (and to the peers', each checked against its own host).
  bool tls = false;
  redis::TlsFiles tls_files;
  std::string tls_server_name;  // empty: the host of each address
  bool tls_verify = true;
  // Async aggregation: this node's region, and the other regions' Redis. Each round also
  // publishes this region's totals to every peer (as <key>@<region>, never lowering a
  // value) and reads the peers' published totals from this region's Redis; the local
  // count of a window is then this region's total plus the others'.
  std::string region;
  std::vector<SyncPeer> peers;
};

class Syncer {
 public:
  Syncer(SyncStore& store, SyncerOptions options);
  ~Syncer();
  Syncer(const Syncer&) = delete;
  Syncer& operator=(const Syncer&) = delete;

  struct Stats {
    uint64_t rounds = 0;          // rounds that reached Redis (an idle one's probe too)
    uint64_t failures = 0;        // rounds that did not (wholly or in part)
    uint64_t windows_synced = 0;  // windows whose totals came back
    int64_t last_ok_age_us = -1;  // since the last round that reached Redis; -1: none yet
    bool failing = false;         // the last round failed
    uint64_t peer_failures = 0;   // publications to other regions' Redis that failed
    // Totals a peer had not taken that were given up on: 100,000 were already waiting for
    // it. That region never learns them.
    uint64_t peer_dropped = 0;
    bool peer_failing = false;  // the last round's publication failed (for one peer or more)
    std::string last_peer_error;
    // The longest round (from collecting the hits to the totals applied and, with peers,
    // published) and the longest time between two rounds' starts, since the start: the
    // `d` and `I` of the over-admission bound (docs/design.md) as this node ran them.
    int64_t round_max_us = 0;
    int64_t interval_max_us = 0;
    std::string last_error;
  };
  Stats stats() const;
  const SyncerOptions& options() const { return options_; }
  // RedisStore::ReloadTls, for the syncer's connections (this region's Redis and the
  // peers'). From any thread.
  bool ReloadTls(std::string* error);

  struct Impl;  // the syncer thread's loop, connection and round

 private:
  SyncStore& store_;
  const SyncerOptions options_;
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
};

}  // namespace sluice::sync

#endif  // SLUICE_STORE_SYNC_SYNCER_H_
