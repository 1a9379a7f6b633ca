// RedisStore: rate limit state shared by many Sluice nodes in one Redis or a Redis Cluster.
//
// All the limits of one request are decided by one call of Sluice's Lua script (sluice.lua,
// the twin of src/algo), which Redis runs atomically: every limit admits and spends, or
// nothing is spent, with no read-modify-write race between nodes. The script reads the time
// from Redis (TIME), so clock skew between nodes cannot change a decision, and gives every
// key an expiry at the moment its state is back to fresh. Calls go by EVALSHA (the SHA-1 is
// computed here, so no round trip loads it); a Redis that answers NOSCRIPT (restarted,
// flushed) gets the script once by EVAL, which also caches it.
//
// Keys are "<prefix>{<client key>}:<limit id>": the hash tag puts all limits of one client
// in one Redis Cluster slot, so one script call can touch them all. In cluster mode each
// worker keeps its own slot map (from CLUSTER SLOTS, refreshed on MOVED and on connection
// failures), follows MOVED and ASK, and so follows a failover to a promoted replica.
//
// Every node has a circuit breaker, shared by all workers: after `breaker_failures`
// consecutive failed calls to a node, calls for its keys are answered kOpen at once for
// `breaker_open_for`, then one probe at a time goes through. A dead Cluster master so costs
// only its own keys a few deadlines; the other shards keep deciding on Redis.
//
// Every worker thread has its own connections (pool_size per node), made on first use on
// that thread's io_context (or ahead of it by Connect); calls from concurrent requests are
// pipelined on them. No lock or shared counter is touched per decision.
//
// Thread-safety: CheckAll may be called from any thread that runs an io_context (it uses
// the calling thread's connections); CloseThread on each such thread before its io_context
// ends.
#ifndef SLUICE_STORE_REDIS_REDIS_STORE_H_
#define SLUICE_STORE_REDIS_REDIS_STORE_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ssl/context.hpp>

#include "sluice/decision.h"
#include "sluice/policy.h"
#include "sluice/time.h"
#include "store/circuit_breaker.h"
#include "store/redis/cluster_topology.h"  // KeySlot, for the store's users
#include "store/redis/script.h"

namespace sluice::redis {

class TlsContextSlot;  // connection.h

struct RedisStoreOptions {
  bool cluster = false;
  std::vector<std::string> addresses;  // "host:port"; cluster: seed nodes
  std::string username;
  std::string password;
  std::chrono::microseconds connect_timeout{200'000};
  std::chrono::microseconds timeout{5'000};  // deadline of each decision's call
  int pool_size = 1;
  std::string key_prefix = "sluice:";
  bool tls = false;
  std::string tls_ca_file;  // empty: the system's CA paths
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_server_name;
  bool tls_verify = true;
  int breaker_failures = 5;  // consecutive failed calls to a node that open its breaker
  std::chrono::microseconds breaker_open_for{1'000'000};
};

// A limit as the store sees it: a stable id (part of its Redis keys) and its policy
// compiled into the script's arguments.
struct RemoteLimit {
  std::string id;  // e.g. "endpoints[0].limits[0]~a1b2c3d4": a changed policy gets new keys
  Policy policy;
  CompiledLimit compiled;
};
RemoteLimit MakeRemoteLimit(std::string_view name, const Policy& policy);

struct RemoteCheck {
  const RemoteLimit* limit;
  std::string_view key;  // the client's key; all checks of one call share it (one slot)
  int64_t cost = 1;
};

enum class StoreError : uint8_t {
  kNone,
  kTimeout,     // no answer by the deadline
  kConnection,  // no connection to the node, or it broke
  kServer,      // Redis answered with an error (script error, CLUSTERDOWN, OOM, ...)
  kOpen,        // the node's circuit breaker is open: not called
};
std::string_view StoreErrorName(StoreError e);

class RedisStore {
 public:
  // On success, `decisions[i]` is the decision of checks[i] and `now` Redis' time.
  using Callback =
      std::function<void(StoreError error, std::span<const Decision> decisions, TimeUs now)>;

  // Throws std::runtime_error when the TLS files cannot be loaded.
  explicit RedisStore(RedisStoreOptions options);
  ~RedisStore();

  // Decides `checks` all-or-nothing, as MemoryStore::CheckAll does.
  // `callback` runs later on `io` (the calling thread's loop), never inside this call.
  // `now`, when given, replaces Redis' TIME (tests only: it makes traces reproducible).
  void CheckAll(boost::asio::io_context& io, std::span<const RemoteCheck> checks, Callback callback,
                std::optional<TimeUs> now = std::nullopt);
  // Deletes the state `limit` keeps for `key` (an operator's reset); `callback` gets whether
  // there was one, later on `io`, as with CheckAll.
  using ForgetCallback = std::function<void(StoreError error, bool held)>;
  void Forget(boost::asio::io_context& io, const RemoteLimit& limit, std::string_view key,
              ForgetCallback callback);
  // Connects this thread's pools and loads the script, so that the first decision on the
  // thread costs one round trip, not a connect and a NOSCRIPT retry. Optional.
  void Connect(boost::asio::io_context& io);
  // Pings, from this thread, each node whose breaker's open time is over, and closes the
  // breakers of those that answer (reopens the others'); `done` runs later on `io` once all
  // have answered or timed out. For /readyz: an idle node finds Redis back without traffic.
  void Probe(boost::asio::io_context& io, std::function<void()> done);
  // Closes this thread's connections (answering their pending calls kConnection).
  void CloseThread();

  // The nodes whose breaker is not closed (in cluster mode, only those the newest slot map
  // places slots on and still called in the last 10 s: a failed master replaced by its
  // replica drops out), out of all known (in cluster mode, all mapped).
  struct Health {
    size_t nodes = 0;
    size_t open = 0;      // refusing calls
    size_t probing = 0;   // open time over, waiting for a probe to succeed
    std::string example;  // the address of one node that is not closed
    // Nodes whose connections fail to come up (refused, TLS, AUTH, no answer) while
    // their breakers are closed: an idle node, or fewer failed calls than open a breaker.
    size_t unreachable = 0;
    std::string problem;  // "address: why" of one unreachable or open node, when known
    // Nodes up and answering, that refused keys of some slots within the last 10 s (a
    // slot migration's TRYAGAIN, a slot no master serves): those keys took their fail mode.
    size_t slot_refusing = 0;
    std::string slot_problem;  // "address: answered ..." of one of them
  };
  Health health() const;
  // Calls a Redis Cluster moved, since start, over every thread: MOVED and ASK answers
  // followed, and calls sent again after TRYAGAIN. A resharding shows here.
  struct Redirects {
    uint64_t moved = 0;
    uint64_t asked = 0;
    uint64_t tried_again = 0;
  };
  Redirects redirects() const {
    return {moved_.load(std::memory_order_relaxed), asked_.load(std::memory_order_relaxed),
            tried_again_.load(std::memory_order_relaxed)};
  }
  // Reads the TLS files again (certificate rotation): connections made from here on use
  // them, those open keep theirs. On an error (*error) the current ones stay. Without TLS,
  // does nothing. From any thread.
  bool ReloadTls(std::string* error);

  const RedisStoreOptions& options() const { return options_; }
  const std::string& sha1() const { return sha1_; }

  class ThreadClient;  // one per thread: connections, slot map, scratch buffers

 private:
  struct NodeHealth {
    NodeHealth(std::string a, int failures, int64_t open_for_us)
        : address(std::move(a)), breaker(failures, open_for_us) {}
    const std::string address;
    CircuitBreaker breaker;
    std::atomic<int64_t> last_refused_us{0};  // steady clock; written only while not closed
    // Connections' news, from every worker (steady clock): the node counts as unreachable
    // while a failure is newer than the last news of a connection that came up or answers,
    // and recent, and no connection has answered for a while.
    std::atomic<int64_t> failed_us{0};
    std::atomic<int64_t> up_us{0};
    mutable std::mutex why_mu;
    std::string why;        // the last failure, guarded by why_mu
    int64_t why_us = 0;     // when `why` was set (steady clock), guarded by why_mu
    bool why_said = false;  // `why` is Redis' own words (an error answer)
    // The last error answer counted as the node's failure (OOM, READONLY, NOPERM, NOAUTH),
    // for /readyz beside a breaker it opened: when (steady clock), and what, under why_mu.
    std::atomic<int64_t> refused_us{0};
    std::string refused_why;
    // The last answer about a slot (TRYAGAIN, CLUSTERDOWN) that sent a call to its fail
    // mode while the node itself was fine: when, and what (under why_mu).
    std::atomic<int64_t> slot_refused_us{0};
    std::string slot_refused_why;
    std::atomic<bool> eviction_warned{false};  // logged once per process, not per worker
    // Cluster: when a worker's newest slot map last placed a slot on the node, and when
    // one last placed none there (steady clock). A node the newest map leaves out (a
    // failed master its replica replaced) says nothing about the store's health.
    std::atomic<int64_t> mapped_us{0};
    std::atomic<int64_t> unmapped_us{0};
  };

  ThreadClient& Client(boost::asio::io_context& io);
  // The node's health record, made on first use; lives as long as the store.
  NodeHealth& HealthFor(std::string_view address) const;
  // Every node address any thread has met (seeds, MOVED and ASK targets, slot maps).
  std::vector<std::string> KnownAddresses() const;

  RedisStoreOptions options_;
  std::string sha1_;
  std::shared_ptr<TlsContextSlot> tls_;  // null: plain TCP
  uint64_t id_;                          // tells this store's thread clients from another store's
  mutable std::mutex health_mu_;         // guards health_'s list, not the records
  mutable std::deque<NodeHealth> health_;
  // redirects(): counted by the thread clients, on redirects only (off the common path).
  mutable std::atomic<uint64_t> moved_{0};
  mutable std::atomic<uint64_t> asked_{0};
  mutable std::atomic<uint64_t> tried_again_{0};
};

}  // namespace sluice::redis

#endif  // SLUICE_STORE_REDIS_REDIS_STORE_H_
