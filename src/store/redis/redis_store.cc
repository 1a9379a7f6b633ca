#include "store/redis/redis_store.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "core/log.h"
#include "store/redis/address.h"
#include "store/redis/cluster_topology.h"
#include "store/redis/connection.h"

namespace sluice::redis {
namespace asio = boost::asio;

namespace {

constexpr int kMaxRedirects = 5;
// A request answered TRYAGAIN (its keys split by a slot migration, which moves a batch of
// keys in about a millisecond) is sent again after 1, 2, 4, then every 8 ms, while its
// deadline leaves room for an answer; at most kMaxTryingAgain calls wait at once.
constexpr std::chrono::milliseconds kTryAgainFirst{1};
constexpr std::chrono::milliseconds kTryAgainMax{8};
constexpr size_t kMaxTryingAgain = 4096;
// One call carries at most this many requests and this many keys (Lua's unpack and Redis'
// argument vector stay small; one slow call does not hold a whole burst).
constexpr size_t kMaxCoalescedRequests = 64;
constexpr size_t kMaxCoalescedKeys = 256;
// A loop turn's requests go to Redis in calls of this many as they come, not all at the
// turn's end: Redis decides the first ones while the worker still reads the rest, where
// one call per turn leaves the worker and Redis waiting on each other in turn. Against
// one call per turn, with 50 Envoy calls in flight, decisions/s rose by about 40% (16
// measured best among 4 to 32) at the same Redis CPU per decision; at 10 and at 200 calls
// in flight they held.
constexpr size_t kSendAtRequests = 16;

std::atomic<uint64_t> g_next_store_id{1};
LogLimiter g_error_log;
LogLimiter g_breaker_log;

// How long a reason Redis gave (an error answer) stays the one /readyz names, over the
// closes and resets that follow it.
constexpr int64_t kReasonHeldUs = 5'000'000;

// A Redis that evicts keys at maxmemory (a maxmemory-policy other than noeviction) drops
// counts without a word: a limited client is admitted again. Under a volatile-* policy
// Sluice's keys, which all expire, go before an application's that do not. What to tell
// the operator, from INFO memory's text; nullopt when Redis never evicts.
std::optional<std::string> EvictionWarning(std::string_view info) {
  auto field = [info](std::string_view name) -> std::string_view {
    size_t at = 0;
    while ((at = info.find(name, at)) != std::string_view::npos) {
      if (at == 0 || info[at - 1] == '\n') {
        std::string_view rest = info.substr(at + name.size());
        return rest.substr(0, rest.find_first_of("\r\n"));
      }
      at += name.size();
    }
    return {};
  };
  std::string_view max = field("maxmemory:");
  std::string_view policy = field("maxmemory_policy:");
  if (max.empty() || max == "0" || policy.empty() || policy == "noeviction") return std::nullopt;
  return "evicts keys at maxmemory (maxmemory-policy " + std::string(policy) +
         "): a count it evicts is lost and its client admitted again" +
         (policy.starts_with("volatile") ? " (Sluice's keys, which all expire, go first)" : "") +
         "; give Sluice a Redis with noeviction";
}

// A node not called for this long while its breaker is open no longer counts in health():
// the slot maps have moved its keys elsewhere.
constexpr int64_t kForgetAfterUs = 10'000'000;
// A node one of whose connections answered this recently is reachable (connections say so
// every half second while they answer).
constexpr int64_t kAnsweringUs = 2'000'000;

int64_t SteadyUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

StoreError FromCallError(CallError e) {
  return e == CallError::kTimeout ? StoreError::kTimeout : StoreError::kConnection;
}

}  // namespace

std::string_view StoreErrorName(StoreError e) {
  switch (e) {
    case StoreError::kNone:
      return "none";
    case StoreError::kTimeout:
      return "timeout";
    case StoreError::kConnection:
      return "connection";
    case StoreError::kServer:
      return "server";
    case StoreError::kOpen:
      return "circuit_open";
  }
  return "unknown";
}

RemoteLimit MakeRemoteLimit(std::string_view name, const Policy& policy) {
  // The policy is part of the id, so a reload that changes a limit starts it on fresh keys
  // instead of reading state written under other parameters.
  std::string p = policy.ToString();
  char hex[17];
  auto h = XXH3_64bits(p.data(), p.size());
  std::snprintf(hex, sizeof hex, "%08x", static_cast<unsigned>(h));
  return {std::string(name) + "~" + hex, policy, CompileForScript(policy)};
}

// Who waits on a call: a decision (EVALSHA) or a key deleted (DEL). Answer tells it once,
// whatever the kind; what came back counts only when there was no error.
struct Caller {
  RedisStore::Callback decided;
  RedisStore::ForgetCallback forgot;

  bool forgetting() const { return static_cast<bool>(forgot); }
  void Answer(StoreError error, std::span<const Decision> decisions, bool held, TimeUs now) {
    bool ok = error == StoreError::kNone;
    if (forgot) {
      auto cb = std::exchange(forgot, nullptr);
      return cb(error, ok && held);
    }
    auto cb = std::exchange(decided, nullptr);
    cb(error, ok ? decisions : std::span<const Decision>(), now);
  }
};

// One call in flight: its command (kept for NOSCRIPT and redirects) and caller; or, for a
// call that carries several requests, those requests' own states (`members`, each with its
// command, decisions and caller) instead of a caller.
struct CallState {
  std::string buf;                               // every argument, back to back
  std::vector<std::pair<size_t, size_t>> spans;  // (offset, length) of each in buf
  std::vector<std::string_view> args;            // views of buf, made once it is complete
  std::vector<ScriptCheck> script_checks;
  std::vector<Decision> decisions;
  Caller caller;
  bool held = false;  // DEL's answer
  SteadyTime deadline;
  int64_t sent_us = 0;  // when its last send went out (SteadyUs), for the node's breaker
  uint16_t slot = 0;
  int redirects = 0;
  int tries_again = 0;          // sent again after TRYAGAIN answers
  size_t tried_again_from = 0;  // the node that answered the last TRYAGAIN
  bool use_eval = false;
  bool asked = false;  // its last send went to a node an ASK named (ASKING first)
  // Its last send found the connection not up: a failure then came before it was written.
  bool sent_unready = false;
  bool trips = false;  // the start's check: an error answer opens the node's breaker at once
  std::vector<CallState*> members;  // owned by the call while it is in flight

  void Add(std::string_view a) {
    spans.emplace_back(buf.size(), a.size());
    buf.append(a);
  }
  void Seal() {
    args.clear();
    for (auto [off, len] : spans) args.emplace_back(buf.data() + off, len);
  }
};

class RedisStore::ThreadClient {
 public:
  ThreadClient(asio::io_context& io, const RedisStore& store)
      : io_(io), store_(store), store_id_(store.id_), refresh_timer_(io), retry_timer_(io) {
    for (const std::string& a : store.options_.addresses) NodeIndex(a);
    if (store.options_.cluster) {
      RequestRefresh();
      RefreshNowAndThen();
    }
  }
  ~ThreadClient() { Close(); }

  asio::io_context& io() const { return io_; }
  // By value: a client may outlive its store (then it is never used, only replaced).
  uint64_t store_id() const { return store_id_; }

  void CheckAll(std::span<const RemoteCheck> checks, Callback callback, std::optional<TimeUs> now) {
    CallState* st = Acquire();
    st->caller.decided = std::move(callback);
    st->deadline = std::chrono::steady_clock::now() + store_.options_.timeout;
    st->redirects = 0;
    st->use_eval = false;
    BuildCommand(*st, checks, now);
    if (store_.options_.cluster || now) {  // a cluster's keys are in many slots
      st->slot = store_.options_.cluster ? KeySlot(st->args[3]) : 0;
      return Send(st, Route(st->slot), /*asking=*/false);
    }
    // The requests of this loop turn go to Redis together: every kSendAtRequests at once,
    // the rest once the handlers that are ready now have run.
    forming_.push_back(st);
    if (forming_.size() >= kSendAtRequests) {
      Form();
      for (auto& c : nodes_[0].pool) c->WriteNow();
      return;
    }
    if (!form_posted_) {
      form_posted_ = true;
      asio::post(io_, [this, alive = std::weak_ptr<char>(alive_)] {
        if (alive.expired()) return;
        form_posted_ = false;
        Form();
      });
    }
  }

  void Forget(const RemoteLimit& limit, std::string_view key, ForgetCallback callback) {
    CallState* st = Acquire();
    st->caller.forgot = std::move(callback);
    st->deadline = std::chrono::steady_clock::now() + store_.options_.timeout;
    st->redirects = 0;
    st->use_eval = false;
    st->buf = "DEL";
    st->buf.append(store_.options_.key_prefix).append("{").append(key).append("}:");
    st->buf.append(limit.id);
    st->args.assign({std::string_view(st->buf).substr(0, 3), std::string_view(st->buf).substr(3)});
    st->slot = store_.options_.cluster ? KeySlot(st->args[1]) : 0;
    Send(st, Route(st->slot), /*asking=*/false);
  }

  // Opens the pools to the nodes known so far and has each load the script. A Redis that
  // answers but refuses it (NOAUTH, NOPERM, LOADING) opens that node's breaker at once, so
  // /readyz says so before any decision fails (a transport failure is the connection's to
  // report). A single Redis also gets a decision on a probe key, which finds what loading
  // the script does not: a read-only replica, an ACL without EVALSHA. (A cluster's slot map
  // is not known yet: its nodes are checked by their first decisions.)
  void Connect() {
    // PING first: an unauthenticated Redis closes the connection on a command as long as
    // the script, before it says NOAUTH.
    std::string_view ping[] = {"PING"};
    std::string_view load[] = {"SCRIPT", "LOAD", kScript};
    auto deadline = std::chrono::steady_clock::now() + store_.options_.connect_timeout;
    for (size_t node = 0; node < nodes_.size(); ++node) {
      Connection& first = Pick(node);
      first.Call(ping, deadline, [this, node](CallError error, const Reply& reply) {
        if (error == CallError::kNone && reply.is_error()) Refused(node, "PING", reply.str);
      });
      first.Call(load, deadline, [this, node](CallError error, const Reply& reply) {
        if (error == CallError::kNone && reply.is_error()) Refused(node, "SCRIPT LOAD", reply.str);
      });
      std::string_view info[] = {"INFO", "memory"};
      first.Call(info, deadline, [this, node](CallError error, const Reply& reply) {
        if (error != CallError::kNone || reply.type != Reply::Type::kString) return;
        NodeHealth& health = *nodes_[node].health;
        auto warning = EvictionWarning(reply.str);
        if (warning && !health.eviction_warned.exchange(true)) {
          Log("WARN", "redis " + health.address + " " + *warning);
        }
      });
      for (auto& c : nodes_[node].pool) c->Start();
    }
    if (store_.options_.cluster) return;
    for (size_t node = 0; node < nodes_.size(); ++node) {
      CallState* st = Acquire();
      st->caller.decided = [](StoreError, std::span<const Decision>, TimeUs) {};
      st->deadline = std::chrono::steady_clock::now() + store_.options_.connect_timeout;
      st->redirects = 0;
      st->use_eval = false;
      st->trips = true;
      RemoteCheck probe{&ProbeLimit(), ProbeKey(node), 1};
      BuildCommand(*st, std::span(&probe, 1), std::nullopt);
      st->slot = 0;
      Send(st, node, /*asking=*/false);
    }
  }

  // The node answered with an error what every decision needs: its breaker opens now, with
  // the answer for /readyz and the log.
  void Refused(size_t node, std::string_view what, std::string_view answer) {
    NodeHealth& health = *nodes_[node].health;
    const int64_t now = SteadyUs();
    const bool was_closed = health.breaker.state(now) == CircuitBreaker::State::kClosed;
    // The first refusal says why (NOAUTH, before the errors it causes); one from a breaker
    // opened otherwise (failed calls) is kept too.
    if (was_closed || now - health.refused_us.load(std::memory_order_relaxed) > kReasonHeldUs) {
      {
        std::lock_guard lock(health.why_mu);
        health.refused_why = std::string(what) + ": " + std::string(answer);
      }
      health.refused_us.store(now, std::memory_order_relaxed);
    }
    health.breaker.Trip(now);
    health.last_refused_us.store(now, std::memory_order_relaxed);
    if (was_closed && g_breaker_log.Allow()) {
      Log("WARN", "redis " + health.address + " refused " + std::string(what) + ": " +
                      std::string(answer) + "; circuit breaker open, its keys decide by their " +
                      "fail_mode");
    }
  }

  // Sends a probe to every node whose breaker waits for one (its open time is over), as a
  // decision would be let through; `done` runs on the loop once each has answered or timed
  // out, never inside this call. So a node with no traffic learns that Redis is back. The
  // probe is a decision (EVALSHA of the script, spending 1 of a limit never reached on a
  // key of its own, expiring within a second): a Redis that answers PING but refuses
  // decisions (an ACL without EVALSHA, OOM with noeviction, a read-only replica) stays
  // failed. In a cluster, only nodes the slot map sends keys to, each with a key in one of
  // its slots: a failed master its replica replaced (or a dead seed) is not probed, so it
  // is forgotten by health() as it should be.
  void Probe(std::function<void()> done) {
    auto left = std::make_shared<size_t>(1);  // 1: held until every probe is sent
    auto finish = [left, done = std::move(done)] {
      if (--*left == 0) done();
    };
    for (size_t node = 0; node < nodes_.size(); ++node) {
      int64_t now = SteadyUs();
      if (store_.options_.cluster && !slots_.Serves(node)) continue;
      if (nodes_[node].health->breaker.state(now) != CircuitBreaker::State::kHalfOpen) continue;
      ++*left;
      CallState* st = Acquire();
      st->caller.decided = [finish](StoreError, std::span<const Decision>, TimeUs) { finish(); };
      st->deadline = std::chrono::steady_clock::now() + store_.options_.timeout;
      st->redirects = 0;
      st->use_eval = false;
      RemoteCheck probe{&ProbeLimit(), ProbeKey(node), 1};
      BuildCommand(*st, std::span(&probe, 1), std::nullopt);
      st->slot = store_.options_.cluster ? KeySlot(st->args[3]) : 0;
      Send(st, node, /*asking=*/false);  // its answer is told to the breaker, as a decision's
    }
    asio::post(io_, finish);
  }

  // Ends every call: each connection's pending calls fail through their callbacks, which
  // may send again or ask for the slot map (growing nodes_). Once closing, those neither
  // send nor dial: they end here.
  void Close() {
    closing_ = true;
    for (CallState* st : std::exchange(forming_, {})) Finish(st, StoreError::kConnection, 0);
    retry_timer_.cancel();
    for (const Waiting& w : std::exchange(retrying_, {})) Finish(w.st, StoreError::kConnection, 0);
    for (size_t i = 0; i < nodes_.size(); ++i) {
      for (const auto& c : std::vector(nodes_[i].pool)) c->Close();
    }
  }

 private:
  struct Node {
    std::string address;
    NodeHealth* health;  // shared with the other threads' clients
    std::vector<std::shared_ptr<Connection>> pool;
    size_t next = 0;
    // Answered CLUSTER SLOTS with "cluster support disabled": a plain Redis among the
    // seeds. No key goes there, or it would keep counts no other Sluice node sees.
    bool not_cluster = false;
  };

  CallState* Acquire() {
    if (free_.empty()) return new CallState;  // NOLINT: owned by free_ once released
    CallState* st = free_.back().release();
    free_.pop_back();
    st->trips = false;
    st->tries_again = 0;
    return st;
  }
  void Release(CallState* st) { free_.emplace_back(st); }

  static const RemoteLimit& ProbeLimit() {
    static const RemoteLimit limit =
        MakeRemoteLimit("sluice-probe", Policy::FixedWindow(1'000'000'000, kMillisecond));
    return limit;
  }
  // A client key whose state lives on `node`: any one outside a cluster; in a cluster, one
  // whose hash tag falls in the first slot the node serves (found by trying names in turn,
  // about 16,000 CRC16s for a slot, and kept).
  std::string_view ProbeKey(size_t node) {
    if (!store_.options_.cluster) return "sluice-probe";
    uint16_t slot = 0;
    while (slot + 1 < kClusterSlots && slots_.NodeOf(slot) != node) ++slot;
    std::string& key = probe_keys_[slot];
    for (uint64_t i = 0; key.empty() || KeySlot(key) != slot; ++i) {
      key = "sluice-probe-" + std::to_string(i);
    }
    return key;
  }

  // Sends the requests gathered this loop turn: alone, or several in one call (sluice.lua's
  // ARGV[2]), up to kMaxCoalesced* each.
  void Form() {
    std::swap(forming_, sending_);
    std::span<CallState* const> calls(sending_);
    while (!calls.empty()) {
      size_t take = 1, keys = calls[0]->decisions.size();
      while (take < calls.size() && take < kMaxCoalescedRequests &&
             keys + calls[take]->decisions.size() <= kMaxCoalescedKeys) {
        keys += calls[take++]->decisions.size();
      }
      Send(take == 1 ? calls[0] : Combine(calls.first(take)), 0, /*asking=*/false);
      calls = calls.subspan(take);
    }
    sending_.clear();
  }

  // One call for `members`: their keys and records in turn, and their sizes as ARGV[2].
  CallState* Combine(std::span<CallState* const> members) {
    CallState* g = Acquire();
    g->members.assign(members.begin(), members.end());
    g->deadline = members[0]->deadline;  // the earliest: all have the same timeout
    g->redirects = 0;
    g->use_eval = false;
    g->slot = 0;
    g->buf.clear();
    g->spans.clear();
    size_t n = 0;
    for (const CallState* m : members) n += m->decisions.size();
    char text[24];
    g->Add("EVALSHA");
    g->Add(store_.sha1_);
    g->Add(FormatScriptNumber(text, static_cast<int64_t>(n)));
    for (const CallState* m : members) {
      for (size_t i = 0; i < m->decisions.size(); ++i) g->Add(m->args[3 + i]);
    }
    size_t start = g->buf.size();
    char number[8];
    PutScriptNumber(number, -1);  // Redis' TIME: coalesced requests never carry a now
    g->buf.append(number, 8);
    for (const CallState* m : members) g->buf.append(m->args[3 + m->decisions.size()].substr(8));
    g->spans.emplace_back(start, g->buf.size() - start);
    start = g->buf.size();
    for (const CallState* m : members) {
      PutScriptNumber(number, static_cast<int64_t>(m->decisions.size()));
      g->buf.append(number, 8);
    }
    g->spans.emplace_back(start, g->buf.size() - start);
    g->Seal();
    g->decisions.resize(n);
    return g;
  }

  // EVALSHA <sha> <n> <keys> <args>; keys are "<prefix>{<client key>}:<limit id>".
  void BuildCommand(CallState& st, std::span<const RemoteCheck> checks, std::optional<TimeUs> now) {
    st.buf.clear();
    st.spans.clear();
    auto add = [&st](std::string_view a) { st.Add(a); };
    add("EVALSHA");
    add(store_.sha1_);
    char n[24];
    add(FormatScriptNumber(n, static_cast<int64_t>(checks.size())));
    for (const RemoteCheck& c : checks) {
      size_t start = st.buf.size();
      st.buf.append(store_.options_.key_prefix).append("{").append(c.key).append("}:");
      st.buf.append(c.limit->id);
      st.spans.emplace_back(start, st.buf.size() - start);
    }
    st.script_checks.clear();
    for (const RemoteCheck& c : checks) st.script_checks.push_back({&c.limit->compiled, c.cost});
    AppendScriptArgs(st.script_checks, now, add);
    st.Seal();
    st.decisions.resize(checks.size());
  }

  size_t NodeIndex(std::string_view given) {
    const std::string address = CanonicalAddress(given);
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (nodes_[i].address == address) return i;
    }
    nodes_.push_back({address, &store_.HealthFor(address), {}, 0});
    return nodes_.size() - 1;
  }

  Connection& Pick(size_t node) {
    Node& n = nodes_[node];
    const auto& o = store_.options_;
    if (n.pool.empty()) {
      for (int i = 0; i < std::max(o.pool_size, 1); ++i) {
        ConnectionOptions co;
        if (!SplitAddress(n.address, &co.host, &co.port)) co.host = n.address;
        co.username = o.username;
        co.password = o.password;
        co.connect_timeout = o.connect_timeout;
        co.tls = store_.tls_;
        co.tls_server_name = o.tls_server_name;
        co.tls_verify = o.tls_verify;
        co.stall_timeout =
            std::max<std::chrono::microseconds>(std::chrono::seconds(1), o.timeout * 10);
        co.on_reachability = [health = n.health](std::string_view why) {
          const int64_t now = SteadyUs();
          if (why.empty()) {
            health->up_us.store(now, std::memory_order_relaxed);
            return;
          }
          // Redis' own words (maxclients, a refused AUTH, NOAUTH to the first PING) say more
          // than the close or reset that follows them on the redials: they stay the reason
          // for a few seconds.
          const bool said = why.starts_with("reply to no command:") || why.starts_with("AUTH:") ||
                            why.starts_with("PING:") ||
                            why.find(" after: ") != std::string_view::npos;
          {
            // Held from when it was said, not from the last failure: the redials of a long
            // outage fail every 200 ms, and would otherwise hold the first words forever.
            std::lock_guard lock(health->why_mu);
            if (said || !health->why_said || now - health->why_us > kReasonHeldUs) {
              health->why.assign(why);
              health->why_said = said;
              health->why_us = now;
            }
          }
          health->failed_us.store(now, std::memory_order_relaxed);
        };
        if (o.cluster) {
          // A node no slot maps to any more (a failed master its replica replaced, a dead
          // seed) is not redialed, and logged about, forever: its connection waits for a
          // call instead (a redirect or a refresh that names it again). Each failed round
          // asks for the slot map, so a worker that never met the failover learns it too.
          co.redial = [this, node] {
            RequestRefresh();
            return slots_.Serves(node);
          };
        }
        n.pool.push_back(std::make_shared<Connection>(io_, std::move(co)));
      }
    }
    // Prefer a connection Redis has answered on, then one that is up: one in backoff would
    // fail the call at once, and one whose greeting is unanswered fails it with its own
    // refusal (a node with room for only some of the pool).
    for (bool answered : {true, false}) {
      for (size_t tries = 0; tries < n.pool.size(); ++tries) {
        Connection& c = *n.pool[n.next++ % n.pool.size()];
        if (answered ? c.answering() : c.ready()) return c;
      }
    }
    return *n.pool[n.next++ % n.pool.size()];
  }

  void Send(CallState* st, size_t node, bool asking) {
    if (closing_) return Finish(st, StoreError::kConnection, 0);
    if (nodes_[node].not_cluster) {  // no seed is a cluster node: nowhere to send it
      NodeFailed(node, StoreError::kServer, SteadyUs());
      return FailLater(st, StoreError::kServer);
    }
    NodeHealth& health = *nodes_[node].health;
    int64_t now = SteadyUs();
    if (!health.breaker.Allow(now)) {
      health.last_refused_us.store(now, std::memory_order_relaxed);
      if (store_.options_.cluster) RequestRefresh();  // its slots may have a new master
      return RefuseLater(st);
    }
    if (st->use_eval) {
      st->args[0] = "EVAL";
      st->args[1] = kScript;
    }
    st->asked = asking;
    st->sent_us = now;
    Connection& c = Pick(node);
    st->sent_unready = !c.ready();
    if (asking) {
      std::string_view ask[] = {"ASKING"};
      c.Call(ask, st->deadline, [](CallError, const Reply&) {});
    }
    c.Call(st->args, st->deadline,
           [this, st, node](CallError e, const Reply& r) { OnReply(st, node, e, r); });
  }

  // Every reply (or failure) is told to the node's breaker: a probe always resolves.
  void NodeFailed(size_t node, StoreError error, int64_t sent_us) {
    NodeHealth& health = *nodes_[node].health;
    int64_t now = SteadyUs();
    if (health.breaker.Failure(now, sent_us)) {
      health.last_refused_us.store(now, std::memory_order_relaxed);
      if (g_breaker_log.Allow()) {
        Log("WARN", "redis " + health.address + ": circuit breaker open after a " +
                        std::string(StoreErrorName(error)) +
                        " failure; its keys decide by their fail_mode");
      }
    }
    if (store_.options_.cluster) RequestRefresh();
  }

  void OnReply(CallState* st, size_t node, CallError error, const Reply& reply) {
    if (error != CallError::kNone) {
      // Sent again after TRYAGAIN and out of time: the migration's, not the node's.
      // (Said of the node that answered TRYAGAIN, not of the one the try went to.)
      if (error == CallError::kTimeout && st->tries_again > 0) {
        return TryAgainExhausted(st, st->tried_again_from);
      }
      NodeFailed(node, FromCallError(error), st->sent_us);
      // Before the first slot map every slot points at the first seed: one that is down
      // must not send every key to its fail mode while other seeds answer (or redirect).
      // (Only a call that was never written: one Redis may have run is not sent again.)
      if (error == CallError::kConnection && st->sent_unready && store_.options_.cluster &&
          !slots_.Known() && st->redirects < kMaxRedirects) {
        for (size_t i = 1; i < nodes_.size(); ++i) {
          size_t other = (node + i) % nodes_.size();
          if (!nodes_[other].not_cluster) {
            ++st->redirects;
            return Send(st, other, /*asking=*/false);
          }
        }
      }
      return Finish(st, FromCallError(error), 0);
    }
    // Sent before the seed's CLUSTER SLOTS answer showed it to be no cluster node (the
    // two share its connection at start): what it decided counts nowhere else, so the
    // call goes again to where the slot map now sends it.
    if (nodes_[node].not_cluster && st->redirects < kMaxRedirects) {
      nodes_[node].health->breaker.Success();  // it answered: a probe's turn is given back
      ++st->redirects;
      return Send(st, Route(st->slot), /*asking=*/false);
    }
    if (reply.is_error()) {
      // Answers about a key or a slot, not the node's health: the node is up. TRYAGAIN
      // comes for a request whose keys a slot migration has split between two nodes; it
      // takes that request's fail mode, not every key of a healthy master.
      // Likewise "CLUSTERDOWN Hash slot not served": one slot has no master (a cluster
      // with require-full-coverage off), and a client keying into it must not put every
      // other slot of that master into its fail mode.
      // CROSSSLOT too, from a cluster: a request's keys in several slots is the request's
      // fault. (A lone Redis saying it is a cluster node, misconfigured: its breaker opens.)
      bool alive = reply.ErrorIs("NOSCRIPT") || reply.ErrorIs("MOVED") || reply.ErrorIs("ASK") ||
                   reply.ErrorIs("TRYAGAIN") ||
                   (reply.ErrorIs("CROSSSLOT") && store_.options_.cluster) ||
                   std::string_view(reply.str).starts_with("CLUSTERDOWN Hash slot not served");
      if (alive) nodes_[node].health->breaker.Success();
      if (store_.options_.cluster && SaysSlotMapStale(reply)) RequestRefresh();
      if (reply.ErrorIs("NOSCRIPT") && !st->use_eval) {
        st->use_eval = true;  // Redis lost its script cache: EVAL sends and caches it
        // Again with ASKING when an ASK sent it there (a node importing the slot, new or
        // restarted, has an empty cache): without it the node answers MOVED back.
        return Send(st, node, st->asked);
      }
      if (st->redirects < kMaxRedirects) {
        if (auto to = ParseRedirect(reply, nodes_[node].address)) {
          ++st->redirects;
          (to->moved ? store_.moved_ : store_.asked_).fetch_add(1, std::memory_order_relaxed);
          size_t target = NodeIndex(to->address);
          if (to->moved) {
            slots_.Move(to->slot, target);
            RequestRefresh();
          }
          return Send(st, target, /*asking=*/!to->moved);
        }
      }
      if (reply.ErrorIs("TRYAGAIN") && store_.options_.cluster) {
        if (RetryLater(st, node)) return;
        return TryAgainExhausted(st, node);
      }
      if (g_error_log.Allow()) {
        // A cluster node behind `type: redis` refuses the shared calls of many clients' keys.
        const bool cluster_node =
            !store_.options_.cluster && (reply.ErrorIs("CROSSSLOT") || reply.ErrorIs("MOVED"));
        Log("WARN", "redis " + nodes_[node].address + " answered " + reply.str +
                        (cluster_node ? " (it is a Redis Cluster node: set store.type: "
                                        "redis-cluster)"
                                      : ""));
      }
      if (alive) {
        SlotRefused(node, "answered " + reply.str);
      } else {
        if (st->trips) {
          Refused(node, "a decision at start", reply.str);
        } else {
          NodeHealth& health = *nodes_[node].health;
          {
            std::lock_guard lock(health.why_mu);
            health.refused_why = "answered " + reply.str;
          }
          health.refused_us.store(SteadyUs(), std::memory_order_relaxed);
          NodeFailed(node, StoreError::kServer, st->sent_us);
        }
      }
      return Finish(st, StoreError::kServer, 0);
    }
    if (st->caller.forgetting()) {
      nodes_[node].health->breaker.Success();
      st->held = reply.type == Reply::Type::kInteger && reply.integer > 0;
      return Finish(st, StoreError::kNone, 0);
    }
    TimeUs now = 0;
    if (!ParseScriptReply(reply, st->decisions, &now)) {
      // Something answers there, but not with decisions (another service on the port, a
      // proxy): a failure of the node like a refused script, or every request would pay a
      // round trip for its fail mode and /readyz would call the store ok.
      if (g_error_log.Allow()) Log("WARN", "unexpected script reply: " + reply.ToString());
      NodeFailed(node, StoreError::kServer, st->sent_us);
      return Finish(st, StoreError::kServer, 0);
    }
    nodes_[node].health->breaker.Success();
    Finish(st, StoreError::kNone, now);
  }

  // The node is fine, but a call's keys take their fail mode: /readyz says so. At most
  // once a second: every request to such a slot comes here.
  void SlotRefused(size_t node, const std::string& why) {
    NodeHealth& health = *nodes_[node].health;
    const int64_t now = SteadyUs();
    if (now - health.slot_refused_us.load(std::memory_order_relaxed) > 1'000'000) {
      {
        std::lock_guard lock(health.why_mu);
        health.slot_refused_why = why;
      }
      health.slot_refused_us.store(now, std::memory_order_relaxed);
    }
  }

  // A call a migration still splits when its deadline leaves no room for another try.
  void TryAgainExhausted(CallState* st, size_t node) {
    if (g_error_log.Allow()) {
      Log("WARN", "redis " + nodes_[node].address +
                      " answered TRYAGAIN until the call's deadline: it takes its fail mode");
    }
    SlotRefused(node, "answered TRYAGAIN");
    Finish(st, StoreError::kServer, 0);
  }

  // Sends `st` again from its slot's master after a wait that doubles with each try, if
  // its deadline leaves room for an answer after it: the migration may have moved the
  // rest of its keys by then (answered ASK, then decided by the importing node) or ended
  // (answered MOVED).
  bool RetryLater(CallState* st, size_t node) {
    const auto wait = std::min(kTryAgainFirst * (1 << std::min(st->tries_again, 3)), kTryAgainMax);
    const auto due = std::chrono::steady_clock::now() + wait;
    if (closing_ || due + kTryAgainFirst >= st->deadline || retrying_.size() >= kMaxTryingAgain) {
      return false;
    }
    ++st->tries_again;
    st->tried_again_from = node;
    store_.tried_again_.fetch_add(1, std::memory_order_relaxed);
    retrying_.push_back({st, due});
    ArmRetryTimer();
    return true;
  }

  // One timer for every waiting call, ticking every kTryAgainFirst while any waits.
  void ArmRetryTimer() {
    if (retry_armed_) return;
    retry_armed_ = true;
    retry_timer_.expires_after(kTryAgainFirst);
    retry_timer_.async_wait(
        [this, alive = std::weak_ptr<char>(alive_)](const boost::system::error_code& ec) {
          if (ec || alive.expired()) return;
          retry_armed_ = false;
          const auto now = std::chrono::steady_clock::now();
          auto ready = std::stable_partition(retrying_.begin(), retrying_.end(),
                                             [now](const Waiting& w) { return w.due > now; });
          std::vector<Waiting> due(ready, retrying_.end());
          retrying_.erase(ready, retrying_.end());
          if (!retrying_.empty()) ArmRetryTimer();
          for (const Waiting& w : due) {
            // A timer late on a busy loop: no room left for an answer.
            if (w.st->deadline - now < kTryAgainFirst) {
              TryAgainExhausted(w.st, w.st->tried_again_from);
              continue;
            }
            w.st->redirects = 0;  // the deadline bounds its tries
            Send(w.st, Route(w.st->slot), /*asking=*/false);
          }
        });
  }

  void Finish(CallState* st, StoreError error, TimeUs now) {
    if (st->members.empty()) {
      st->caller.Answer(error, st->decisions, st->held, now);
      return Release(st);
    }
    auto decided = st->decisions.begin();
    for (CallState* m : st->members) {
      if (error == StoreError::kNone)
        std::copy_n(decided, m->decisions.size(), m->decisions.begin());
      decided += static_cast<std::ptrdiff_t>(m->decisions.size());
      Finish(m, error, now);
    }
    st->members.clear();
    Release(st);
  }

  // Answers `error` on the loop, never inside CheckAll; the call states are free again now.
  void FailLater(CallState* st, StoreError error) {
    for (CallState* m : st->members) FailLater(m, error);
    st->members.clear();
    if (!st->caller.decided && !st->caller.forgot) return Release(st);
    asio::post(io_, [caller = std::exchange(st->caller, {}), error]() mutable {
      caller.Answer(error, {}, false, 0);
    });
    Release(st);
  }
  void RefuseLater(CallState* st) { FailLater(st, StoreError::kOpen); }

  // Where a slot's call goes: its master, by the slot map. Before the first map every slot
  // points at the first seed; the first seed whose breaker is closed takes them instead
  // (any cluster node answers for a slot, or redirects to its master).
  size_t Route(uint16_t slot) {
    const size_t node = slots_.NodeOf(slot);
    if (slots_.Known()) return node;
    for (size_t i = 0; i < nodes_.size(); ++i) {
      const size_t n = (node + i) % nodes_.size();
      if (Up(n)) return n;
    }
    return node;
  }

  // A cluster node that may answer: not a plain Redis among the seeds, its breaker closed.
  bool Up(size_t n) const {
    return !nodes_[n].not_cluster &&
           nodes_[n].health->breaker.state(SteadyUs()) == CircuitBreaker::State::kClosed;
  }

  // A refresh every SlotMap::kPeriodic at least, traffic or not: a thread idle while the
  // cluster's masters were replaced would otherwise know only nodes that are gone.
  void RefreshNowAndThen() {
    refresh_timer_.expires_after(std::chrono::seconds(1));  // a refresh is due 5 s after the last
    refresh_timer_.async_wait(
        [this, alive = std::weak_ptr<char>(alive_)](const boost::system::error_code& ec) {
          if (ec || alive.expired()) return;
          if (slots_.Due(std::chrono::steady_clock::now())) RequestRefresh();
          RefreshNowAndThen();
        });
  }

  // Asks one node for the slot map (cluster mode), as often as the SlotMap allows.
  void RequestRefresh() {
    if (closing_) return;
    auto now = std::chrono::steady_clock::now();
    size_t node = 0;
    if (!slots_.BeginRefresh(now, nodes_.size(), &node)) return;
    // Nodes other threads have met: with every node this thread knows down, one of them
    // may know the cluster as it is now.
    bool any_up = false;
    for (size_t i = 0; i < nodes_.size() && !any_up; ++i) any_up = Up(i);
    if (!any_up) {
      for (const std::string& a : store_.KnownAddresses()) NodeIndex(a);
    }
    // Ask a node whose breaker is closed, if any: a dead one cannot answer, nor a plain
    // Redis among the seeds.
    for (size_t i = 0; i < nodes_.size(); ++i) {
      size_t n = (node + i) % nodes_.size();
      if (Up(n)) {
        node = n;
        break;
      }
    }
    std::string_view cmd[] = {"CLUSTER", "SLOTS"};
    Pick(node).Call(
        cmd, now + store_.options_.connect_timeout, [this, node](CallError e, const Reply& r) {
          slots_.EndRefresh();
          if (e != CallError::kNone) {
            // The node may be gone with its peers (breakers open only on
            // decisions): the next refresh may ask the nodes others met.
            for (const std::string& a : store_.KnownAddresses()) NodeIndex(a);
            return;
          }
          if (r.is_error()) return RefreshRefused(node, r);
          slots_.Apply(r, nodes_[node].address,
                       [this](std::string_view a) { return NodeIndex(a); });
          const int64_t at = SteadyUs();
          for (size_t i = 0; i < nodes_.size(); ++i) {
            auto& stamp =
                slots_.Serves(i) ? nodes_[i].health->mapped_us : nodes_[i].health->unmapped_us;
            stamp.store(at, std::memory_order_relaxed);
          }
        });
  }

  void RefreshRefused(size_t node, const Reply& r) {
    Node& n = nodes_[node];
    if (r.str.find("cluster support disabled") == std::string::npos) {
      if (g_error_log.Allow()) Log("WARN", "redis " + n.address + " answered " + r.str);
      return;
    }
    if (!n.not_cluster) {
      Log("ERROR", "redis " + n.address + " is not a Redis Cluster node (" + r.str +
                       "): no keys go there; store.addresses of a redis-cluster store lists "
                       "the cluster's nodes");
    }
    n.not_cluster = true;
    // The slots it held were never learned from a cluster node (none names a plain Redis):
    // another seed gets them, and its MOVED replies (or the next refresh) place them.
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (!nodes_[i].not_cluster) {
        slots_.Reassign(node, i);
        break;
      }
    }
    RequestRefresh();
  }

  asio::io_context& io_;
  const RedisStore& store_;
  const uint64_t store_id_;
  std::vector<Node> nodes_;
  SlotMap slots_;
  std::vector<std::unique_ptr<CallState>> free_;
  std::unordered_map<uint16_t, std::string> probe_keys_;  // ProbeKey's, by slot
  bool closing_ = false;                                  // Close() began
  std::vector<CallState*> forming_;                       // this loop turn's requests, not sent yet
  std::vector<CallState*> sending_;                       // Form's scratch
  bool form_posted_ = false;
  asio::steady_timer refresh_timer_;  // RefreshNowAndThen's
  struct Waiting {
    CallState* st;
    std::chrono::steady_clock::time_point due;
  };
  std::vector<Waiting> retrying_;   // answered TRYAGAIN, to send again
  asio::steady_timer retry_timer_;  // ArmRetryTimer's
  bool retry_armed_ = false;
  std::shared_ptr<char> alive_ = std::make_shared<char>();  // tells Form's post the client is gone
};

namespace {
thread_local std::unique_ptr<RedisStore::ThreadClient> t_client;
}  // namespace

RedisStore::RedisStore(RedisStoreOptions options)
    : options_(std::move(options)), sha1_(ScriptSha1()), id_(g_next_store_id.fetch_add(1)) {
  if (options_.tls) {
    tls_ = std::make_shared<TlsContextSlot>(
        MakeTlsContext({options_.tls_ca_file, options_.tls_cert_file, options_.tls_key_file}));
  }
}

bool RedisStore::ReloadTls(std::string* error) {
  return !tls_ ||
         tls_->Reload({options_.tls_ca_file, options_.tls_cert_file, options_.tls_key_file}, error);
}

// The destroying thread's connections go with the store (their callbacks point into it);
// other threads close theirs with CloseThread before their loops end.
RedisStore::~RedisStore() { CloseThread(); }

RedisStore::ThreadClient& RedisStore::Client(asio::io_context& io) {
  if (!t_client || t_client->store_id() != id_ || &t_client->io() != &io) {
    t_client = std::make_unique<ThreadClient>(io, *this);
  }
  return *t_client;
}

void RedisStore::CheckAll(asio::io_context& io, std::span<const RemoteCheck> checks,
                          Callback callback, std::optional<TimeUs> now) {
  if (checks.empty()) {
    asio::post(io, [cb = std::move(callback)] { cb(StoreError::kNone, {}, 0); });
    return;
  }
  Client(io).CheckAll(checks, std::move(callback), now);
}

void RedisStore::Connect(asio::io_context& io) { Client(io).Connect(); }

void RedisStore::Probe(asio::io_context& io, std::function<void()> done) {
  Client(io).Probe(std::move(done));
}

void RedisStore::Forget(asio::io_context& io, const RemoteLimit& limit, std::string_view key,
                        ForgetCallback callback) {
  Client(io).Forget(limit, key, std::move(callback));
}

RedisStore::NodeHealth& RedisStore::HealthFor(std::string_view address) const {
  std::lock_guard lock(health_mu_);
  for (NodeHealth& h : health_) {
    if (h.address == address) return h;
  }
  return health_.emplace_back(std::string(address), options_.breaker_failures,
                              static_cast<int64_t>(options_.breaker_open_for.count()));
}

std::vector<std::string> RedisStore::KnownAddresses() const {
  std::lock_guard lock(health_mu_);
  std::vector<std::string> out;
  out.reserve(health_.size());
  for (const NodeHealth& h : health_) out.push_back(h.address);
  return out;
}

RedisStore::Health RedisStore::health() const {
  Health out;
  int64_t now = SteadyUs();
  std::lock_guard lock(health_mu_);
  for (const NodeHealth& h : health_) {
    if (options_.cluster && h.unmapped_us.load(std::memory_order_relaxed) >
                                h.mapped_us.load(std::memory_order_relaxed)) {
      continue;  // the cluster's newest slot map has no slot on it: no key goes there
    }
    ++out.nodes;
    const int64_t failed = h.failed_us.load(std::memory_order_relaxed);
    const int64_t up = h.up_us.load(std::memory_order_relaxed);
    // Recent: a node no slot sends keys to any more stops being dialed, and is forgotten.
    // Not while another of its connections answers (they say so every half second): one
    // pooled connection that Redis refuses (maxclients) does not make a serving node down.
    const bool unreachable =
        failed > up && now - failed <= kForgetAfterUs && now - up > kAnsweringUs;
    if (unreachable && out.problem.empty()) {
      std::lock_guard why_lock(h.why_mu);
      out.problem = h.address + ": " + h.why;
    }
    CircuitBreaker::State state = h.breaker.state(now);
    if (state != CircuitBreaker::State::kClosed && out.problem.empty()) {
      // Why it opened, as far as known: an error answer, or a connection's failure.
      // An error answer says more than the resets that may follow it (an unauthenticated
      // Redis answers NOAUTH, then closes on a long command).
      const int64_t refused = h.refused_us.load(std::memory_order_relaxed);
      std::lock_guard why_lock(h.why_mu);
      if (refused > 0 && (refused >= failed || now - refused <= kForgetAfterUs)) {
        out.problem = h.address + ": " + h.refused_why;
      } else if (failed > 0 && !h.why.empty()) {
        out.problem = h.address + ": " + h.why;
      }
    }
    const int64_t slot_refused = h.slot_refused_us.load(std::memory_order_relaxed);
    if (slot_refused > 0 && now - slot_refused <= kForgetAfterUs) {
      if (out.slot_refusing++ == 0) {
        std::lock_guard why_lock(h.why_mu);
        out.slot_problem = h.address + ": " + h.slot_refused_why;
      }
    }
    if (state == CircuitBreaker::State::kClosed) {
      if (unreachable) {
        ++out.unreachable;
        if (out.example.empty()) out.example = h.address;
      }
      continue;
    }
    if (options_.cluster &&
        now - h.last_refused_us.load(std::memory_order_relaxed) > kForgetAfterUs) {
      continue;
    }
    ++(state == CircuitBreaker::State::kOpen ? out.open : out.probing);
    if (out.example.empty()) out.example = h.address;
  }
  return out;
}

void RedisStore::CloseThread() {
  if (t_client && t_client->store_id() == id_) {
    t_client->Close();
    t_client.reset();
  }
}

}  // namespace sluice::redis
