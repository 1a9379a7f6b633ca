// RedisStore against a real Redis (tests/with_redis.sh starts one and sets
// SLUICE_TEST_REDIS): the same decisions as the memory store, pipelining, NOSCRIPT
// recovery, expiries, deadlines, connection failures and ACL authentication.
#include "store/redis/redis_store.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/ip/tcp.hpp>

#include "sluice/memory_store.h"
#include "store/redis/sync_client.h"

namespace sluice::redis {
namespace {

using namespace std::chrono_literals;

std::string Address() {
  std::string a = SyncClient::TestAddress();
  if (a.empty()) ADD_FAILURE() << "SLUICE_TEST_REDIS is not set (run through tests/with_redis.sh)";
  return a;
}

// A key prefix no other run shares.
std::string UniquePrefix() {
  static std::mt19937_64 rng(std::random_device{}());
  return "sluicetest:" + std::to_string(rng() % 1000000000) + ":";
}

RedisStoreOptions Options() {
  RedisStoreOptions o;
  o.addresses = {Address()};
  o.timeout = 2s;
  o.key_prefix = UniquePrefix();
  return o;
}

struct Result {
  bool done = false;
  StoreError error = StoreError::kNone;
  std::vector<Decision> decisions;
  TimeUs now = 0;
};

// Runs `io` until `done()` or the time is up.
template <class Pred>
void RunUntil(boost::asio::io_context& io, Pred done, std::chrono::milliseconds limit = 5s) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (!done() && std::chrono::steady_clock::now() < end) {
    io.run_one_for(10ms);
    if (io.stopped()) io.restart();
  }
}

Result Call(RedisStore& store, boost::asio::io_context& io, std::span<const RemoteCheck> checks,
            std::optional<TimeUs> now = std::nullopt) {
  Result r;
  store.CheckAll(
      io, checks,
      [&](StoreError e, std::span<const Decision> d, TimeUs t) {
        r.done = true;
        r.error = e;
        r.decisions.assign(d.begin(), d.end());
        r.now = t;
      },
      now);
  EXPECT_FALSE(r.done) << "the callback must not run inside CheckAll";
  RunUntil(io, [&] { return r.done; });
  EXPECT_TRUE(r.done);
  return r;
}

std::string Describe(const Decision& d) {
  return "{allowed " + std::to_string(d.allowed) + ", limit " + std::to_string(d.limit) +
         ", remaining " + std::to_string(d.remaining) + ", reset_after " +
         std::to_string(d.reset_after) + ", retry_after " + std::to_string(d.retry_after) +
         ", delay " + std::to_string(d.delay) + "}";
}

// A loopback address whose connections are refused (a port just closed).
std::string RefusingAddress(boost::asio::io_context& io) {
  boost::asio::ip::tcp::acceptor a(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
  return "127.0.0.1:" + std::to_string(a.local_endpoint().port());
}

TEST(RedisStore, DecidesLikeTheMemoryStoreForEveryAlgorithm) {
  boost::asio::io_context io;
  RedisStore store(Options());
  MemoryStore memory;
  std::mt19937_64 rng(7);
  const TimeUs t0 = SystemClock::Instance().Now();
  size_t compared = 0;
  for (Algorithm a : kAllAlgorithms) {
    for (Policy p : {Policy{a, 5, kSecond, 0}, Policy{a, 7, kMinute, 3},
                     Policy{a, 100, 10 * kMillisecond, 0}, Policy{a, 1, kHour, 0}}) {
      SCOPED_TRACE(p.ToString());
      std::string name = std::string(AlgorithmName(a)) + "/" + p.ToString();
      Limit* local = memory.AddLimit(name, p);
      RemoteLimit remote = MakeRemoteLimit(name, p);
      TimeUs t = t0;
      for (int i = 0; i < 150; ++i) {
        t += static_cast<int64_t>(rng() % static_cast<uint64_t>(p.period / 3 + 1));
        std::string key = "k" + std::to_string(rng() % 2);
        int64_t cost = static_cast<int64_t>(rng() % 3);
        LimitCheck lc{local, key, cost};
        Decision want;
        memory.CheckAll({&lc, 1}, t, {&want, 1});
        RemoteCheck rc{&remote, key, cost};
        Result got = Call(store, io, {&rc, 1}, t);
        ASSERT_EQ(got.error, StoreError::kNone);
        ASSERT_EQ(got.decisions.size(), 1u);
        ASSERT_EQ(got.decisions[0], want)
            << "step " << i << " at +" << (t - t0) << "us cost " << cost << ": redis "
            << Describe(got.decisions[0]) << " memory " << Describe(want);
        EXPECT_EQ(got.now, t);
        ++compared;
      }
    }
  }
  // Several limits of one request: all-or-nothing, in one script call.
  Limit* burst = memory.AddLimit("multi/burst", Policy::TokenBucket(3, 1, kSecond));
  Limit* hourly = memory.AddLimit("multi/hourly", Policy::FixedWindow(5, kHour));
  RemoteLimit rburst = MakeRemoteLimit("multi/burst", burst->policy());
  RemoteLimit rhourly = MakeRemoteLimit("multi/hourly", hourly->policy());
  TimeUs t = t0;
  for (int i = 0; i < 40; ++i) {
    t += static_cast<int64_t>(rng() % 700'000);
    LimitCheck lc[] = {{burst, "u", 1}, {hourly, "u", 1}};
    Decision want[2];
    memory.CheckAll(lc, t, want);
    RemoteCheck rc[] = {{&rburst, "u", 1}, {&rhourly, "u", 1}};
    Result got = Call(store, io, rc, t);
    ASSERT_EQ(got.error, StoreError::kNone);
    ASSERT_EQ(got.decisions.size(), 2u);
    EXPECT_EQ(got.decisions[0], want[0]) << i;
    EXPECT_EQ(got.decisions[1], want[1]) << i;
    compared += 2;
  }
  std::printf("compared %zu decisions\n", compared);
}

TEST(RedisStore, PipelinedCallsAdmitExactlyTheLimit) {
  boost::asio::io_context io;
  RedisStore store(Options());
  RemoteLimit limit = MakeRemoteLimit("pipelined", Policy::SlidingWindowLog(500, kHour));
  int answered = 0, admitted = 0, errors = 0;
  RemoteCheck rc{&limit, "same-key", 1};
  for (int i = 0; i < 1000; ++i) {  // all sent before any reply is read
    store.CheckAll(io, {&rc, 1}, [&](StoreError e, std::span<const Decision> d, TimeUs) {
      ++answered;
      if (e != StoreError::kNone) {
        ++errors;
      } else if (d[0].allowed) {
        ++admitted;
      }
    });
  }
  RunUntil(
      io, [&] { return answered == 1000; }, 20s);
  EXPECT_EQ(answered, 1000);
  EXPECT_EQ(errors, 0);
  EXPECT_EQ(admitted, 500);
}

// Redis' count of calls of `command` so far (INFO commandstats).
int64_t CommandCalls(SyncClient& redis, const std::string& command) {
  std::string info = redis.Call({"INFO", "commandstats"}).str;
  std::string field = "cmdstat_" + command + ":calls=";
  size_t at = info.find(field);
  return at == std::string::npos ? 0 : std::stoll(info.substr(at + field.size()));
}

// The requests of one loop turn go to Redis in script calls of 16 as they come (the rest in
// one at the turn's end), and each is decided as it would be alone, in turn: all or nothing
// by itself, seeing what those before it spent, in its call or an earlier one.
TEST(RedisStore, OneLoopTurnsRequestsShareScriptCalls) {
  boost::asio::io_context io;
  RedisStore store(Options());
  MemoryStore memory;
  SyncClient redis(Address());
  Limit* each = memory.AddLimit("turn/each", Policy::FixedWindow(5, kHour));
  Limit* pair = memory.AddLimit("turn/pair", Policy::FixedWindow(8, kHour));
  RemoteLimit reach = MakeRemoteLimit("turn/each", each->policy());
  RemoteLimit rpair = MakeRemoteLimit("turn/pair", pair->policy());
  const std::string keys[] = {"x", "y", "z"};
  const int kRequests = 40;
  std::vector<Result> got(kRequests);
  std::vector<std::vector<Decision>> want(kRequests);
  const TimeUs now = SystemClock::Instance().Now();
  const int64_t evalsha_before = CommandCalls(redis, "evalsha");
  for (int i = 0; i < kRequests; ++i) {
    const std::string& key = keys[i % 3];
    size_t n = i % 2 == 0 ? 2 : 1;
    LimitCheck lc[] = {{each, key, 1}, {pair, key, 1}};
    want[i].resize(n);
    memory.CheckAll({lc, n}, now, want[i]);
    RemoteCheck rc[] = {{&reach, key, 1}, {&rpair, key, 1}};
    store.CheckAll(io, {rc, n}, [&got, i](StoreError e, std::span<const Decision> d, TimeUs) {
      got[i] = {true, e, {d.begin(), d.end()}, 0};
    });
  }
  RunUntil(io, [&] { return std::all_of(got.begin(), got.end(), [](auto& r) { return r.done; }); });
  EXPECT_EQ(CommandCalls(redis, "evalsha") - evalsha_before, 3);  // 16, 16 and 8
  int admitted = 0;
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_TRUE(got[i].done) << i;
    ASSERT_EQ(got[i].error, StoreError::kNone) << i;
    ASSERT_EQ(got[i].decisions.size(), want[i].size()) << i;
    for (size_t j = 0; j < want[i].size(); ++j) {
      EXPECT_EQ(got[i].decisions[j].allowed, want[i][j].allowed) << i << "/" << j;
      EXPECT_EQ(got[i].decisions[j].remaining, want[i][j].remaining) << i << "/" << j;
    }
    admitted += got[i].decisions[0].allowed && got[i].decisions.back().allowed;
  }
  EXPECT_EQ(admitted, 15);  // 5 per key for `each`; `pair` (8) never binds first

  // A Redis that lost the script: the one call is sent again by EVAL, for all its requests.
  ASSERT_EQ(redis.Call({"SCRIPT", "FLUSH"}).str, "OK");
  const int64_t eval_before = CommandCalls(redis, "eval");
  std::vector<Result> again(10);
  for (int i = 0; i < 10; ++i) {
    std::string key = "w" + std::to_string(i);
    RemoteCheck rc{&reach, key, 1};
    store.CheckAll(io, {&rc, 1}, [&again, i](StoreError e, std::span<const Decision> d, TimeUs) {
      again[i] = {true, e, {d.begin(), d.end()}, 0};
    });
  }
  RunUntil(io,
           [&] { return std::all_of(again.begin(), again.end(), [](auto& r) { return r.done; }); });
  EXPECT_EQ(CommandCalls(redis, "eval") - eval_before, 1);
  for (const Result& r : again) {
    ASSERT_EQ(r.error, StoreError::kNone);
    EXPECT_EQ(r.decisions[0].remaining, 4);
  }
}

// With the node's breaker open, every request of a turn is answered kOpen, none lost.
TEST(RedisStore, AnOpenBreakerAnswersEveryRequestOfATurn) {
  boost::asio::io_context io;
  RedisStoreOptions o = Options();
  o.addresses = {RefusingAddress(io)};
  o.breaker_failures = 1;
  o.breaker_open_for = 60s;
  RedisStore store(o);
  RemoteLimit limit = MakeRemoteLimit("open", Policy::FixedWindow(3, kMinute));
  RemoteCheck rc{&limit, "erin", 1};
  EXPECT_EQ(Call(store, io, {&rc, 1}).error, StoreError::kConnection);  // opens the breaker
  std::vector<StoreError> errors;
  for (int i = 0; i < 7; ++i) {
    store.CheckAll(io, {&rc, 1},
                   [&](StoreError e, std::span<const Decision>, TimeUs) { errors.push_back(e); });
  }
  RunUntil(io, [&] { return errors.size() == 7; });
  EXPECT_EQ(errors, std::vector<StoreError>(7, StoreError::kOpen));
  store.CloseThread();
}

// Requests gathered for the next call are answered, not lost, when the thread closes first.
TEST(RedisStore, ClosingTheThreadAnswersRequestsNotSentYet) {
  boost::asio::io_context io;
  RedisStore store(Options());
  RemoteLimit limit = MakeRemoteLimit("closing", Policy::FixedWindow(3, kMinute));
  RemoteCheck rc{&limit, "frank", 1};
  std::vector<StoreError> errors;
  for (int i = 0; i < 3; ++i) {
    store.CheckAll(io, {&rc, 1},
                   [&](StoreError e, std::span<const Decision>, TimeUs) { errors.push_back(e); });
  }
  EXPECT_TRUE(errors.empty());
  store.CloseThread();
  EXPECT_EQ(errors, std::vector<StoreError>(3, StoreError::kConnection));
  RunUntil(
      io, [] { return false; }, 50ms);  // the turn's pending send finds the client gone
  EXPECT_EQ(errors.size(), 3u);
}

TEST(RedisStore, UsesRedisTimeAndExpiresKeys) {
  boost::asio::io_context io;
  RedisStoreOptions o = Options();
  RedisStore store(o);
  RemoteLimit limit = MakeRemoteLimit("expiring", Policy::FixedWindow(3, kMinute));
  RemoteCheck rc{&limit, "alice", 1};
  Result r = Call(store, io, {&rc, 1});
  ASSERT_EQ(r.error, StoreError::kNone);
  EXPECT_NEAR(static_cast<double>(r.now), static_cast<double>(SystemClock::Instance().Now()), 2e6);
  EXPECT_EQ(r.decisions[0].remaining, 2);
  SyncClient redis(Address());
  // One key per limit and client, tagged with the client so a cluster keeps them together.
  std::string key = o.key_prefix + "{alice}:" + limit.id;
  Reply ttl = redis.Call({"PTTL", key});
  EXPECT_GT(ttl.integer, 0) << ttl.ToString();
  EXPECT_LE(ttl.integer, 60'000 + 999);  // the window's end, and the script's spread
}

TEST(RedisStore, LoadsTheScriptAgainAfterRedisLosesIt) {
  boost::asio::io_context io;
  RedisStore store(Options());
  RemoteLimit limit = MakeRemoteLimit("flushed", Policy::Gcra(10, kSecond));
  RemoteCheck rc{&limit, "bob", 1};
  ASSERT_EQ(Call(store, io, {&rc, 1}).error, StoreError::kNone);
  SyncClient redis(Address());
  EXPECT_EQ(redis.Call({"SCRIPT", "FLUSH"}).str, "OK");
  Result r = Call(store, io, {&rc, 1});  // NOSCRIPT, then EVAL
  EXPECT_EQ(r.error, StoreError::kNone);
  EXPECT_EQ(r.decisions[0].remaining, 8);
  Reply exists = redis.Call({"SCRIPT", "EXISTS", store.sha1()});
  ASSERT_EQ(exists.elements.size(), 1u);
  EXPECT_EQ(exists.elements[0].integer, 1) << "the script's SHA-1 must be Redis' own";
}

TEST(RedisStore, ASilentRedisAnswersTimeoutByTheDeadline) {
  boost::asio::io_context io;
  boost::asio::ip::tcp::acceptor silent(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
  boost::asio::ip::tcp::socket accepted(io);
  silent.async_accept(accepted, [](const boost::system::error_code&) {});
  RedisStoreOptions o = Options();
  o.addresses = {"127.0.0.1:" + std::to_string(silent.local_endpoint().port())};
  o.timeout = 30ms;
  RedisStore store(o);
  RemoteLimit limit = MakeRemoteLimit("silent", Policy::FixedWindow(3, kMinute));
  RemoteCheck rc{&limit, "carol", 1};
  auto start = std::chrono::steady_clock::now();
  Result r = Call(store, io, {&rc, 1});
  auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(r.error, StoreError::kTimeout);
  EXPECT_GE(took, 25ms);
  EXPECT_LT(took, 500ms);
  store.CloseThread();
}

TEST(RedisStore, NoRedisAnswersConnectionError) {
  boost::asio::io_context io;
  RedisStoreOptions o = Options();
  o.addresses = {RefusingAddress(io)};
  RedisStore store(o);
  RemoteLimit limit = MakeRemoteLimit("refused", Policy::FixedWindow(3, kMinute));
  RemoteCheck rc{&limit, "dave", 1};
  Result r = Call(store, io, {&rc, 1});
  EXPECT_EQ(r.error, StoreError::kConnection);
  store.CloseThread();
}

TEST(RedisStore, AuthenticatesAsAnAclUser) {
  SyncClient admin(Address());
  ASSERT_EQ(
      admin.Call({"ACL", "SETUSER", "sluicetest", "reset", "on", ">s3cret", "~*", "+@all"}).str,
      "OK");
  RemoteLimit limit = MakeRemoteLimit("acl", Policy::FixedWindow(3, kMinute));
  RemoteCheck rc{&limit, "erin", 1};
  {
    boost::asio::io_context io;
    RedisStoreOptions o = Options();
    o.username = "sluicetest";
    o.password = "s3cret";
    RedisStore store(o);
    EXPECT_EQ(Call(store, io, {&rc, 1}).error, StoreError::kNone);
    store.CloseThread();
  }
  {
    boost::asio::io_context io;
    RedisStoreOptions o = Options();
    o.username = "sluicetest";
    o.password = "wrong";
    RedisStore store(o);
    EXPECT_NE(Call(store, io, {&rc, 1}).error, StoreError::kNone);
    store.CloseThread();
  }
  admin.Call({"ACL", "DELUSER", "sluicetest"});
}

}  // namespace
}  // namespace sluice::redis
