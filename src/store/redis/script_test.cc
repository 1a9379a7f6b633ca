// sluice.lua against the C++ algorithms, in a real Redis (tests/with_redis.sh starts one and
// sets SLUICE_TEST_REDIS=host:port; without it these tests fail).
//
// The agreement test runs random traces (random policies within the 2^53 bound, times that
// stand still, creep, jump by days and step back, costs from 0 to past the capacity) through
// MemoryStore::CheckAll and through the script with the same explicit times, and compares
// every field of every decision. Then: multi-limit calls (all-or-nothing, duplicates),
// expiries (PXAT, PX, and real expiry), Redis' TIME, the SHA-1, and Redis' CPU per call.
#include "store/redis/script.h"

#include <gtest/gtest.h>

#include <bit>
#include <chrono>
#include <cmath>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include "algo/algo_test_util.h"
#include "algo/fixed_window.h"
#include "algo/gcra.h"
#include "algo/leaky_queue.h"
#include "algo/sliding_window_counter.h"
#include "algo/sliding_window_log.h"
#include "algo/token_bucket.h"
#include "sluice/memory_store.h"
#include "store/redis/resp.h"

namespace sluice {

void PrintTo(const Decision& d, std::ostream* os) {
  *os << "{allowed " << d.allowed << " limit " << d.limit << " remaining " << d.remaining
      << " reset_after " << d.reset_after << " retry_after "
      << (d.retry_after == kNever ? std::string("never") : std::to_string(d.retry_after))
      << " delay " << d.delay << "}";
}

namespace redis {
namespace {

using namespace std::chrono_literals;

constexpr TimeUs kT0 = algo::kNoon;

int64_t g_decisions_compared = 0;
int64_t g_script_calls = 0;

std::string Show(const Decision& d) {
  std::ostringstream os;
  PrintTo(d, &os);
  return os.str();
}

// A blocking client that can also pipeline: enough for tests.
class Client {
 public:
  explicit Client(std::string_view address) : socket_(io_) {
    size_t colon = address.rfind(':');
    if (colon == std::string_view::npos) throw std::runtime_error("address needs host:port");
    boost::asio::ip::tcp::resolver resolver(io_);
    boost::asio::connect(socket_, resolver.resolve(std::string(address.substr(0, colon)),
                                                   std::string(address.substr(colon + 1))));
  }

  Reply Call(std::span<const std::string_view> args) {
    std::string out;
    AppendCommand(out, args);
    std::vector<Reply> replies;
    CallMany(out, 1, replies);
    return std::move(replies[0]);
  }
  Reply Call(std::initializer_list<std::string_view> args) {
    return Call(std::span<const std::string_view>(args.begin(), args.size()));
  }

  // Sends `count` commands (RESP, back to back) in one write; reads their replies.
  void CallMany(std::string_view commands, size_t count, std::vector<Reply>& replies) {
    boost::asio::write(socket_, boost::asio::buffer(commands.data(), commands.size()));
    replies.resize(count);
    size_t pos = 0;
    for (size_t i = 0; i < count;) {
      size_t used = 0;
      ParseStatus st = ParseReply(std::string_view(in_).substr(pos), replies[i], &used);
      if (st == ParseStatus::kOk) {
        pos += used;
        ++i;
        continue;
      }
      if (st == ParseStatus::kProtocolError) throw std::runtime_error("RESP protocol error");
      char buf[65536];
      size_t n = socket_.read_some(boost::asio::buffer(buf));
      in_.append(buf, n);
    }
    in_.erase(0, pos);
  }

 private:
  boost::asio::io_context io_;
  boost::asio::ip::tcp::socket socket_;
  std::string in_;
};

std::string Address() {
  const char* a = std::getenv("SLUICE_TEST_REDIS");
  return a ? a : "";
}

// A key prefix no other run shares.
std::string UniquePrefix() {
  static std::mt19937_64 rng(std::random_device{}());
  return "sluice-script-test:" + std::to_string(rng() % 1000000000) + ":";
}

int64_t Capacity(const Policy& p) {
  switch (p.algorithm) {
    case Algorithm::kTokenBucket:
    case Algorithm::kGcra:
    case Algorithm::kLeakyQueue:
      return p.EffectiveBurst();
    default:
      return p.limit;
  }
}

// Calls f with a value of the algorithm's struct (algo::FixedWindow{}, ...).
template <class F>
auto WithAlgo(Algorithm a, F f) {
  switch (a) {
    case Algorithm::kFixedWindow:
      return f(algo::FixedWindow{});
    case Algorithm::kSlidingWindowLog:
      return f(algo::SlidingWindowLog{});
    case Algorithm::kSlidingWindowCounter:
      return f(algo::SlidingWindowCounter{});
    case Algorithm::kTokenBucket:
      return f(algo::TokenBucket{});
    case Algorithm::kGcra:
      return f(algo::Gcra{});
    case Algorithm::kLeakyQueue:
      break;
  }
  return f(algo::LeakyQueue{});
}

class ScriptTest : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (Address().empty()) return;
    redis_ = new Client(Address());
    prefix_ = UniquePrefix();
  }
  static void TearDownTestSuite() {
    if (redis_ == nullptr) return;
    // Drop this run's keys (they would expire anyway).
    std::string cursor = "0";
    std::string pattern = prefix_ + "*";
    do {
      Reply r = redis_->Call({"SCAN", cursor, "MATCH", pattern, "COUNT", "1000"});
      if (r.type != Reply::Type::kArray || r.elements.size() != 2) break;
      cursor = r.elements[0].str;
      std::vector<std::string_view> del = {"UNLINK"};
      for (const Reply& k : r.elements[1].elements) del.push_back(k.str);
      if (del.size() > 1) redis_->Call(del);
    } while (cursor != "0");
    delete redis_;
    redis_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(redis_, nullptr) << "SLUICE_TEST_REDIS is not set (run through tests/with_redis.sh)";
    Reply r = redis_->Call({"SCRIPT", "LOAD", kScript});
    ASSERT_EQ(r.type, Reply::Type::kString) << r.ToString();
    ASSERT_EQ(r.str, ScriptSha1());
  }

  // One script call; fails the test on an unexpected reply.
  static std::vector<Decision> Run(std::span<const std::string> keys,
                                   std::span<const ScriptCheck> checks, std::optional<TimeUs> now,
                                   TimeUs* used_now = nullptr) {
    std::vector<std::string> args = {"EVALSHA", ScriptSha1(), std::to_string(keys.size())};
    args.insert(args.end(), keys.begin(), keys.end());
    AppendScriptArgs(checks, now, [&](std::string_view a) { args.emplace_back(a); });
    std::vector<std::string_view> views(args.begin(), args.end());
    Reply r = redis_->Call(views);
    ++g_script_calls;
    std::vector<Decision> out(checks.size());
    TimeUs t = 0;
    EXPECT_TRUE(ParseScriptReply(r, out, &t)) << r.ToString();
    if (now) {
      EXPECT_EQ(t, *now);
    }
    if (used_now) *used_now = t;
    return out;
  }
  static Decision Run1(const std::string& key, const CompiledLimit& limit,
                       std::optional<TimeUs> now, int64_t cost, TimeUs* used_now = nullptr) {
    ScriptCheck check{&limit, cost};
    return Run(std::span(&key, 1), std::span(&check, 1), now, used_now)[0];
  }
  static std::string Key(std::string_view name) { return prefix_ + std::string(name); }

  static Client* redis_;
  static std::string prefix_;
};

Client* ScriptTest::redis_ = nullptr;
std::string ScriptTest::prefix_;

// Little-endian doubles, as the protocol sends them.
std::string Doubles(std::initializer_list<double> values) {
  std::string out;
  for (double v : values) {
    uint64_t bits = std::bit_cast<uint64_t>(v);
    for (int i = 0; i < 8; ++i) out += static_cast<char>(bits >> (8 * i));
  }
  return out;
}

// Requests decided by a MemoryStore and by the script (pipelined in batches), compared.
class Agreement {
 public:
  struct Check {
    size_t limit;
    std::string key;
    int64_t cost;
  };

  Agreement(Client& redis, std::string prefix) : redis_(redis), prefix_(std::move(prefix)) {
    MemoryStore::Options o;
    o.hash_seed = 42;
    store_ = std::make_unique<MemoryStore>(o);
  }

  size_t AddLimit(const Policy& p) {
    std::string name = "l" + std::to_string(limits_.size());
    Limit* mem = store_->AddLimit(name, p);
    EXPECT_NE(mem, nullptr) << p.ToString();
    limits_.push_back({name, p, CompiledLimit(p), mem});
    return limits_.size() - 1;
  }

  // Where the script keeps limit `limit`'s state for `key`.
  std::string RedisKey(size_t limit, const std::string& key) const {
    return prefix_ + "{" + key + "}:" + limits_[limit].name;
  }

  // Decides one request in memory now and queues its script call.
  void Request(TimeUs now, std::vector<Check> checks) { Requests(now, {std::move(checks)}); }

  // Decides `requests` in memory now, in turn, and queues one script call for them all (more
  // than one: ARGV[2], each one's number of limits, as a Sluice worker sends a loop turn's).
  void Requests(TimeUs now, std::vector<std::vector<Check>> requests) {
    Pending p{now, {}, {}, steps_++, {}};
    std::vector<ScriptCheck> sc;
    std::vector<std::string> keys;
    std::string sizes;
    for (const std::vector<Check>& checks : requests) {
      std::vector<LimitCheck> lc;
      for (const Check& c : checks) {
        lc.push_back({limits_[c.limit].mem, c.key, c.cost});
        sc.push_back({&limits_[c.limit].compiled, c.cost});
        keys.push_back(RedisKey(c.limit, c.key));
        p.checks.push_back(c);
      }
      std::vector<Decision> want(lc.size());
      store_->CheckAll(lc, now, want);
      p.want.insert(p.want.end(), want.begin(), want.end());
      p.sizes.push_back(checks.size());
      sizes += Doubles({static_cast<double>(checks.size())});
    }
    std::vector<std::string> args = {"EVALSHA", ScriptSha1(), std::to_string(keys.size())};
    args.insert(args.end(), keys.begin(), keys.end());
    AppendScriptArgs(sc, now, [&](std::string_view a) { args.emplace_back(a); });
    if (requests.size() > 1) args.push_back(sizes);
    std::vector<std::string_view> views(args.begin(), args.end());
    AppendCommand(commands_, views);
    pending_.push_back(std::move(p));
    if (pending_.size() >= 256) Flush();
  }

  // Sends the queued calls and compares; false after the first disagreement.
  bool Flush() {
    if (pending_.empty()) return ok_;
    redis_.CallMany(commands_, pending_.size(), replies_);
    g_script_calls += static_cast<int64_t>(pending_.size());
    for (size_t i = 0; i < pending_.size() && ok_; ++i) {
      const Pending& p = pending_[i];
      std::vector<Decision> got(p.want.size());
      TimeUs now = 0;
      if (!ParseScriptReply(replies_[i], got, &now) || now != p.now) {
        ADD_FAILURE() << Describe(p) << "unexpected reply " << replies_[i].ToString();
        ok_ = false;
        break;
      }
      for (size_t j = 0; j < got.size(); ++j) {
        ++g_decisions_compared;
        if (got[j] != p.want[j]) {
          ADD_FAILURE() << Describe(p) << "decision " << j << ": script " << Show(got[j])
                        << "\n  C++ " << Show(p.want[j]);
          ok_ = false;
          break;
        }
      }
    }
    commands_.clear();
    pending_.clear();
    return ok_;
  }

  bool ok() const { return ok_; }

 private:
  struct TestLimit {
    std::string name;
    Policy policy;
    CompiledLimit compiled;
    Limit* mem;
  };
  struct Pending {
    TimeUs now;
    std::vector<Check> checks;  // every request's, in turn
    std::vector<Decision> want;
    int64_t step;
    std::vector<size_t> sizes;  // each request's number of checks
  };

  std::string Describe(const Pending& p) const {
    std::ostringstream os;
    os << "step " << p.step << " at T0" << (p.now >= kT0 ? "+" : "") << p.now - kT0 << ":";
    size_t request = 0, left = 0;
    for (const Check& c : p.checks) {
      if (left == 0 && p.sizes.size() > 1) {
        os << "\n request " << request;
        left = p.sizes[request++];
      }
      if (left > 0) --left;
      os << "\n  " << limits_[c.limit].name << " (" << limits_[c.limit].policy.ToString()
         << ") key " << c.key << " cost " << c.cost;
    }
    os << "\n";
    return os.str();
  }

  Client& redis_;
  std::string prefix_;
  std::unique_ptr<MemoryStore> store_;
  std::vector<TestLimit> limits_;
  std::string commands_;
  std::vector<Pending> pending_;
  std::vector<Reply> replies_;
  int64_t steps_ = 0;
  bool ok_ = true;
};

// The largest value of p.*field (limit or burst) with which ScriptExact(p) holds.
Policy LargestExact(Policy p, int64_t Policy::*field) {
  int64_t lo = 0, hi = int64_t{1} << 62;
  while (lo < hi) {
    p.*field = lo + (hi - lo + 1) / 2;
    if (ScriptExact(p)) {
      lo = p.*field;
    } else {
      hi = p.*field - 1;
    }
  }
  for (p.*field = lo; p.*field > 0 && !ScriptExact(p); --(p.*field)) {
  }
  return p;
}

// A random policy the script must decide exactly: small, odd, extreme and near-bound ones.
Policy RandomPolicy(Algorithm a, std::mt19937_64& rng) {
  static constexpr DurationUs kPeriods[] = {
      kMillisecond, 10 * kMillisecond, 7777,        kSecond,  1234567, kMinute, kMinute, kHour,
      kDay,         7 * kDay,          3650 * kDay, 999999937};
  static constexpr int64_t kLimits[] = {0, 1, 1, 2, 3, 3, 5, 7, 7, 10, 60, 100, 1000};
  auto pick = [&](auto& list) { return list[rng() % std::size(list)]; };
  for (;;) {
    Policy p{a, 0, pick(kPeriods), 0};
    const int64_t most = LargestExact(p, &Policy::limit).limit;  // with burst 0
    switch (rng() % 10) {
      case 0:
        p.limit = static_cast<int64_t>(rng() % 1000000) + 1;
        break;
      case 1:
        p.limit = most - static_cast<int64_t>(rng() % 3);
        break;
      case 2:
        p.limit = static_cast<int64_t>(rng() % static_cast<uint64_t>(most + 1));
        break;
      default:
        p.limit = pick(kLimits);
    }
    switch (rng() % 8) {
      case 0:
        p.burst = pick(kLimits);
        break;
      case 1:
        p.burst = static_cast<int64_t>(rng() % static_cast<uint64_t>(3 * p.limit + 4));
        break;
      case 2:
        p.burst = LargestExact(p, &Policy::burst).burst - static_cast<int64_t>(rng() % 3);
        break;
      default:
        break;  // 0: the limit
    }
    if (p.Validate().ok() && ScriptExact(p)) return p;
  }
}

int64_t RandomCost(std::mt19937_64& rng, int64_t capacity) {
  switch (rng() % 12) {
    case 0:
    case 1:
      return 0;
    case 2:
      return static_cast<int64_t>(rng() % static_cast<uint64_t>(capacity + 2));
    case 3:
      return capacity + 1;
    case 4:
      return capacity;
    case 5:
      return rng() % 4 == 0 ? -3 : int64_t{1} << (50 + rng() % 13);  // clamped / huge
    case 6:
      return 2;
    default:
      return 1;
  }
}

// The next time of a trace: stands still, creeps, jumps (by up to ~3 years) or steps back,
// kept within 1e15..3.5e15 (years 2001..2080).
TimeUs NextTime(std::mt19937_64& rng, TimeUs now, DurationUs period) {
  auto upto = [&](int64_t n) { return static_cast<int64_t>(rng() % static_cast<uint64_t>(n)); };
  switch (rng() % 24) {
    case 0:
    case 1:
      now -= upto(period);
      break;
    case 2:
      now -= upto(2 * period) + upto(kDay);
      break;
    case 3:
    case 4:
      now += upto(3 * period + 1);
      break;
    case 5:
      now += upto(int64_t{10000000000000});  // up to ~4 months
      break;
    case 6:
      now += rng() % 8 == 0 ? upto(int64_t{100000000000000}) : period;  // ~3 years; one period
      break;
    case 7:
    case 8:
    case 9:
    case 10:
    case 11:
      break;  // the same microsecond
    default:
      now += upto(period / 8 + 1);
  }
  if (now > 3500000000000000) now -= 2000000000000000;
  if (now < 1000000000000000) now += 1000000000000000;
  return now;
}

// Named policies every run checks, before the random ones.
std::vector<Policy> EdgePolicies(Algorithm a) {
  return {
      {a, 7, kMinute, 0},
      {a, 3, 10 * kMillisecond, 0},
      {a, 0, kSecond, 0},
      {a, 0, kSecond, 5},
      {a, 1, kMillisecond, 0},
      {a, 5, kSecond, 1},
      {a, 10, kMinute, 25},
      {a, 1, 3650 * kDay, 0},
      {a, 2, 3650 * kDay, 2},
      {a, 999, kMillisecond, 0},
      {a, 1000, kMillisecond, 0},
      {a, 1001, kMillisecond, 1},
      {a, 28, 3650 * kDay, 28},
      {a, 1000000, kDay, 0},
      LargestExact({a, 0, kMinute, 0}, &Policy::limit),
      LargestExact({a, 0, 3650 * kDay, 0}, &Policy::limit),
      LargestExact({a, 1, kMinute, 0}, &Policy::burst),
      LargestExact({a, 7, kSecond, 0}, &Policy::burst),
      LargestExact({a, 0, 1234567, 1000}, &Policy::limit),
  };
}

class ScriptAgreementTest : public ScriptTest, public testing::WithParamInterface<Algorithm> {};

TEST_P(ScriptAgreementTest, RandomTracesDecideAsTheAlgorithms) {
  const Algorithm a = GetParam();
  const int64_t before = g_decisions_compared;
  std::vector<Policy> edge = EdgePolicies(a);
  constexpr int kSeeds = 120;
  for (int seed = 0; seed < kSeeds; ++seed) {
    std::mt19937_64 rng(static_cast<uint64_t>(seed) * 1000003 + static_cast<uint64_t>(a));
    Policy p = seed < static_cast<int>(edge.size()) ? edge[static_cast<size_t>(seed)]
                                                    : RandomPolicy(a, rng);
    if (!ScriptExact(p)) p = RandomPolicy(a, rng);  // an edge policy beyond this algorithm's bound
    SCOPED_TRACE(testing::Message() << p.ToString() << " seed " << seed);
    Agreement ag(*redis_, Key(std::string(AlgorithmName(a)) + ":" + std::to_string(seed) + ":"));
    size_t limit = ag.AddLimit(p);
    TimeUs now = kT0 + static_cast<TimeUs>(rng() % static_cast<uint64_t>(p.period));
    const int steps = 300;
    for (int i = 0; i < steps; ++i) {
      now = NextTime(rng, now, p.period);
      ag.Request(now, {{limit, "k", RandomCost(rng, Capacity(p))}});
    }
    if (!ag.Flush()) return;
  }
  std::cout << "[ agreement ] " << AlgorithmName(a) << ": " << g_decisions_compared - before
            << " decisions compared, all equal\n";
}

INSTANTIATE_TEST_SUITE_P(All, ScriptAgreementTest, testing::ValuesIn(kAllAlgorithms),
                         [](const testing::TestParamInfo<Algorithm>& param) {
                           return std::string(AlgorithmName(param.param));
                         });

// A random algorithm with a small limit (min_limit .. min_limit + limits - 1), a short period
// and sometimes a burst: every limit of a request is sometimes the one to reject.
Policy SmallPolicy(std::mt19937_64& rng, int64_t min_limit, uint64_t limits) {
  Algorithm a = kAllAlgorithms[rng() % std::size(kAllAlgorithms)];
  // Braced initialization evaluates in order: the draws stay those of the seed.
  return Policy{a, min_limit + static_cast<int64_t>(rng() % limits),
                (1 + static_cast<int64_t>(rng() % 100)) * kMillisecond,
                rng() % 3 == 0 ? static_cast<int64_t>(rng() % 15) : 0};
}

TEST_F(ScriptTest, MultiLimitCallsDecideAsCheckAll) {
  const int64_t before = g_decisions_compared;
  for (int seed = 0; seed < 300; ++seed) {
    std::mt19937_64 rng(static_cast<uint64_t>(seed) + 77);
    Agreement ag(*redis_, Key("multi:" + std::to_string(seed) + ":"));
    std::vector<Policy> policies;
    size_t n = 2 + rng() % 2;
    for (size_t i = 0; i < n; ++i) {
      Policy p = SmallPolicy(rng, 0, 12);
      if (rng() % 5 == 0) p = RandomPolicy(p.algorithm, rng);
      policies.push_back(p);
      ag.AddLimit(p);
    }
    TimeUs now = kT0 + static_cast<TimeUs>(rng() % kSecond);
    for (int step = 0; step < 200; ++step) {
      now = NextTime(rng, now, policies[0].period);
      std::vector<Agreement::Check> checks;
      size_t k = 1 + rng() % 4;
      for (size_t i = 0; i < k; ++i) {
        size_t l = i < n && rng() % 4 != 0 ? i : rng() % n;  // sometimes a limit twice
        int64_t cost = rng() % 3 == 0 ? RandomCost(rng, Capacity(policies[l])) : 1;
        checks.push_back({l, rng() % 6 == 0 ? "b" : "a", cost});
      }
      ag.Request(now, std::move(checks));
    }
    if (!ag.Flush()) return;
  }
  std::cout << "[ agreement ] multi-limit: " << g_decisions_compared - before
            << " decisions compared, all equal\n";
}

// Several requests in one call (ARGV[2]) decide as they would one call each, in turn: the
// same key in several of them, a request that rejects (spends nothing) among admitting
// ones, one limit and several per request.
TEST_F(ScriptTest, GroupedCallsDecideAsTheirRequestsInTurn) {
  const int64_t before = g_decisions_compared;
  for (int seed = 0; seed < 150; ++seed) {
    std::mt19937_64 rng(static_cast<uint64_t>(seed) + 991);
    Agreement ag(*redis_, Key("grouped:" + std::to_string(seed) + ":"));
    std::vector<Policy> policies;
    size_t n = 1 + rng() % 3;
    for (size_t i = 0; i < n; ++i) {
      Policy p = SmallPolicy(rng, 1, 10);
      policies.push_back(p);
      ag.AddLimit(p);
    }
    TimeUs now = kT0 + static_cast<TimeUs>(rng() % kSecond);
    for (int step = 0; step < 60; ++step) {
      now = NextTime(rng, now, policies[0].period);
      std::vector<std::vector<Agreement::Check>> requests(1 + rng() % 6);
      for (auto& checks : requests) {
        size_t k = 1 + rng() % 3;
        std::string key = std::string(1, static_cast<char>('a' + rng() % 3));
        for (size_t i = 0; i < k; ++i) {
          size_t l = rng() % n;
          int64_t cost = rng() % 4 == 0 ? RandomCost(rng, Capacity(policies[l])) : 1;
          checks.push_back({l, key, cost});
        }
      }
      ag.Requests(now, std::move(requests));
    }
    if (!ag.Flush()) return;
  }
  std::cout << "[ agreement ] grouped calls: " << g_decisions_compared - before
            << " decisions compared, all equal\n";
}

// A key under Sluice's prefix that holds another type (something else wrote there) reads as
// no state: its request is decided as on a fresh key, which it then replaces, and the other
// requests of the same call are decided as ever (an error would have failed them all).
TEST_F(ScriptTest, AKeyOfAnotherTypeIsDecidedAsAFreshKey) {
  for (Algorithm a : kAllAlgorithms) {
    SCOPED_TRACE(std::string(AlgorithmName(a)));
    Agreement ag(*redis_, Key("foreign:" + std::string(AlgorithmName(a)) + ":"));
    size_t l = ag.AddLimit(Policy{a, 3, kSecond, 0});
    size_t m = ag.AddLimit(Policy::FixedWindow(5, kSecond));
    ASSERT_EQ(redis_->Call({"RPUSH", ag.RedisKey(l, "list"), "x"}).integer, 1);
    ASSERT_EQ(redis_->Call({"HSET", ag.RedisKey(l, "hash"), "f", "v"}).integer, 1);
    ASSERT_EQ(redis_->Call({"SADD", ag.RedisKey(m, "hash"), "v"}).integer, 1);
    ag.Request(kT0, {{l, "list", 1}});
    ag.Requests(kT0 + 1, {{{l, "a", 1}},
                          {{l, "list", 2}},
                          {{l, "hash", 1}, {m, "hash", 1}},
                          {{l, "a", 1}},
                          {{l, "list", 1}}});
    ag.Requests(kT0 + 2, {{{l, "list", 1}}, {{l, "hash", 2}, {m, "hash", 1}}});
    ASSERT_TRUE(ag.Flush());
    for (const std::string& key : {ag.RedisKey(l, "list"), ag.RedisKey(l, "hash")}) {
      EXPECT_EQ(redis_->Call({"TYPE", key}).str, "string") << key;
    }
  }
}

// sliding_window_counter keeps the low 32 bits of its window index and rebuilds the rest
// from now (an int32 distance): both sides must alias alike at exactly 2^31 and 2^32
// windows, which random traces never hit.
TEST_F(ScriptTest, SlidingWindowCounterIndexWrapsAlike) {
  const int64_t before = g_decisions_compared;
  for (DurationUs w : {kMillisecond, DurationUs{7777}}) {
    Agreement ag(*redis_, Key("wrap:" + std::to_string(w) + ":"));
    size_t l = ag.AddLimit(Policy::SlidingWindowCounter(5, w));
    const TimeUs base = kT0 / w * w;
    const int64_t two31 = int64_t{1} << 31;
    for (int64_t windows : {int64_t{0}, two31, two31 - 1, two31 + 1, 2 * two31, 2 * two31 - 1,
                            2 * two31 + 1, -two31, -two31 + 1, int64_t{1}, int64_t{-1}}) {
      for (DurationUs offset : {DurationUs{0}, w / 2, w - 1}) {
        std::string key = "k" + std::to_string(windows) + "_" + std::to_string(offset);
        ag.Request(base + w / 3, {{l, key, 2}});
        ag.Request(base + w / 3, {{l, key, 1}});
        TimeUs t = base + windows * w + offset;
        ag.Request(t, {{l, key, 0}});
        ag.Request(t, {{l, key, 2}});
        ag.Request(t, {{l, key, 4}});
        ag.Request(t + w, {{l, key, 1}});
      }
    }
    ASSERT_TRUE(ag.Flush());
  }
  std::cout << "[ agreement ] index wrap: " << g_decisions_compared - before
            << " decisions compared, all equal\n";
}

TEST_F(ScriptTest, AllOrNothing) {
  CompiledLimit roomy(Policy::FixedWindow(10, kMinute));
  CompiledLimit tight(Policy::Gcra(1, kMinute));
  std::vector<std::string> keys = {Key("aon:roomy"), Key("aon:tight")};
  std::vector<ScriptCheck> checks = {{&roomy, 2}, {&tight, 1}};
  std::vector<Decision> d = Run(keys, checks, kT0);
  EXPECT_TRUE(d[0].allowed && d[1].allowed);
  EXPECT_EQ(d[0].remaining, 8);
  d = Run(keys, checks, kT0 + 1);  // tight rejects: roomy spends nothing, reports a peek
  EXPECT_TRUE(d[0].allowed);
  EXPECT_EQ(d[0].remaining, 8);
  EXPECT_FALSE(d[1].allowed);
  EXPECT_EQ(d[1].retry_after, kMinute - 1);
  // A key checked twice is one check of the summed cost: 4 + 4 fill the window's last 8,
  // then 4 + 1 do not fit (and both report the same decision).
  std::vector<std::string> same = {Key("aon:roomy"), Key("aon:roomy")};
  std::vector<ScriptCheck> twice = {{&roomy, 4}, {&roomy, 4}};
  d = Run(same, twice, kT0 + 2);
  EXPECT_TRUE(d[0].allowed);
  EXPECT_EQ(d[0], d[1]);
  EXPECT_EQ(d[0].remaining, 0);
  twice[1].cost = 1;
  d = Run(same, twice, kT0 + 3);
  EXPECT_FALSE(d[0].allowed);
  EXPECT_EQ(d[0], d[1]);
}

// The state's expiry (computed by the C++ algorithm) after one spending call at `at`.
TimeUs ExpiresAfterHit(const Policy& p, TimeUs at, int64_t cost) {
  return WithAlgo(p.algorithm, [&](auto algo) {
    algo::Runner<decltype(algo)> r(p);
    EXPECT_TRUE(r.Hit(at, cost).allowed);
    return r.ExpiresAt(at);
  });
}

int64_t CeilMs(TimeUs t) { return (t + 999) / 1000; }
// The milliseconds the script adds to a PXAT expiry written at Redis' time `now`: that
// time's millisecond within its second, so that keys whose windows end together do not all
// expire in the same millisecond.
int64_t SpreadMs(TimeUs now) { return now % 1'000'000 / 1000; }

TEST_F(ScriptTest, WrittenKeysExpireWhenTheStateIsFresh) {
  for (Algorithm a : kAllAlgorithms) {
    SCOPED_TRACE(std::string(AlgorithmName(a)));
    Policy p{a, 5, kSecond, 0};
    CompiledLimit c(p);
    // Redis' TIME: PXAT at the state's expiry, to the millisecond, plus the spread.
    std::string key = Key("ttl:time:" + std::string(AlgorithmName(a)));
    TimeUs now = 0;
    ASSERT_TRUE(Run1(key, c, std::nullopt, 2, &now).allowed);
    TimeUs expires = ExpiresAfterHit(p, now, 2);
    EXPECT_GT(expires, now);
    const int64_t expires_ms = CeilMs(expires) + SpreadMs(now);
    Reply at = redis_->Call({"PEXPIRETIME", key});
    EXPECT_EQ(at.integer, expires_ms);
    EXPECT_GT(redis_->Call({"PTTL", key}).integer, 0);
    // A peek and a rejection write nothing: the expiry stays, and an unknown key stays
    // unknown (as in the memory store, they cannot be used to fill Redis).
    Run1(key, c, std::nullopt, 0);
    Run1(key, c, std::nullopt, 100);
    EXPECT_EQ(redis_->Call({"PEXPIRETIME", key}).integer, expires_ms);
    std::string unknown = key + ":unknown";
    Run1(unknown, c, std::nullopt, 0);
    Run1(unknown, c, std::nullopt, 6);
    EXPECT_EQ(redis_->Call({"EXISTS", unknown}).integer, 0);
    // A second spend: the expiry follows the state's ExpiresAt, which stays where it was for
    // fixed_window and sliding_window_counter within one window (the script's SET KEEPTTL).
    TimeUs now2 = 0;
    ASSERT_TRUE(Run1(key, c, std::nullopt, 1, &now2).allowed);
    TimeUs expires2 = WithAlgo(a, [&](auto algo) {
      algo::Runner<decltype(algo)> r(p);
      EXPECT_TRUE(r.Hit(now, 2).allowed);
      EXPECT_TRUE(r.Hit(now2, 1).allowed);
      return r.ExpiresAt(now2);
    });
    // A kept expiry keeps its spread too; a new one gets the spread of its own write.
    EXPECT_EQ(redis_->Call({"PEXPIRETIME", key}).integer,
              expires2 == expires ? expires_ms : CeilMs(expires2) + SpreadMs(now2));

    // An explicit now: PX from it plus a minute, whatever Redis' clock says.
    std::string key2 = Key("ttl:explicit:" + std::string(AlgorithmName(a)));
    auto set_at = std::chrono::steady_clock::now();
    ASSERT_TRUE(Run1(key2, c, kT0, 2).allowed);
    int64_t px = CeilMs(ExpiresAfterHit(p, kT0, 2) - kT0) + 60000;
    int64_t pttl = redis_->Call({"PTTL", key2}).integer;
    // Less by the time that passed between the script and PTTL, however long a loaded
    // machine took (+2 ms: Redis' clock counts whole milliseconds).
    int64_t passed_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::steady_clock::now() - set_at)
                            .count();
    EXPECT_LE(pttl, px);
    EXPECT_GE(pttl, px - passed_ms - 2) << passed_ms << " ms passed";
  }
  // The one state that never expires: a token bucket that never refills (a lifetime quota).
  CompiledLimit once(Policy::TokenBucket(5, 0, kSecond));
  std::string key = Key("ttl:never");
  ASSERT_TRUE(Run1(key, once, std::nullopt, 1).allowed);
  EXPECT_EQ(redis_->Call({"PTTL", key}).integer, -1);
}

TEST_F(ScriptTest, ExpiredStateDecidesLikeAFreshKey) {
  int compared = 0;
  for (Algorithm a : kAllAlgorithms) {
    SCOPED_TRACE(std::string(AlgorithmName(a)));
    for (int trial = 0; trial < 40; ++trial) {
      std::mt19937_64 rng(static_cast<uint64_t>(trial) * 31 + static_cast<uint64_t>(a));
      Policy p{a, 1 + static_cast<int64_t>(rng() % 5),
               (1 + static_cast<int64_t>(rng() % 20)) * kMillisecond,
               static_cast<int64_t>(rng() % 4)};
      CompiledLimit c(p);
      std::string used = Key("exp:" + std::string(AlgorithmName(a)) + ":" + std::to_string(trial));
      // A short history, replayed on the C++ algorithm for its expiry.
      TimeUs expires = WithAlgo(a, [&](auto algo) {
        algo::Runner<decltype(algo)> r(p);
        TimeUs t = kT0;
        for (int i = 0; i < 6; ++i) {
          t += static_cast<TimeUs>(rng() % 3000);
          int64_t cost = static_cast<int64_t>(rng() % 3);
          EXPECT_EQ(Run1(used, c, t, cost), r.Hit(t, cost));
        }
        return r.ExpiresAt(t);
      });
      // From the expiry on, the old state decides as a fresh key's.
      TimeUs at = std::max(expires, kT0) +
                  (trial % 2 == 0 ? 0 : static_cast<TimeUs>(rng() % (3 * p.period)));
      // Days later too, but within 2^31 windows: sliding_window_counter keeps the low 32
      // bits of its window index, in C++ as in Lua (stores drop its state long before).
      if (trial % 4 == 3) at += 10 * kDay;
      int64_t cost = 1 + static_cast<int64_t>(rng() % 2);
      std::string fresh = used + ":fresh";
      Decision want = WithAlgo(a, [&](auto algo) {
        algo::Runner<decltype(algo)> r(p);
        return r.Hit(at, cost);
      });
      EXPECT_EQ(Run1(used, c, at, cost), want) << p.ToString() << " at +" << at - kT0;
      EXPECT_EQ(Run1(fresh, c, at, cost), want);
      compared += 2;
    }
  }
  g_decisions_compared += compared;
}

TEST_F(ScriptTest, RedisExpiresIdleKeys) {
  int64_t last_ms = 0;  // Redis' time when the last key expires
  for (Algorithm a : kAllAlgorithms) {
    SCOPED_TRACE(std::string(AlgorithmName(a)));
    Policy p{a, 2, 10 * kMillisecond, 0};
    CompiledLimit c(p);
    std::string key = Key("idle:" + std::string(AlgorithmName(a)));
    TimeUs now = 0;
    ASSERT_TRUE(Run1(key, c, std::nullopt, 1, &now).allowed);
    EXPECT_EQ(redis_->Call({"EXISTS", key}).integer, 1);
    // At the state's ExpiresAt (a 10 ms window ends within 20 ms), plus the spread.
    int64_t at_ms = redis_->Call({"PEXPIRETIME", key}).integer;
    EXPECT_EQ(at_ms, CeilMs(ExpiresAfterHit(p, now, 1)) + SpreadMs(now));
    last_ms = std::max(last_ms, at_ms);
  }
  Reply time = redis_->Call({"TIME"});
  ASSERT_EQ(time.elements.size(), 2u) << time.ToString();
  int64_t redis_ms =
      std::stoll(time.elements[0].str) * 1000 + std::stoll(time.elements[1].str) / 1000;
  std::this_thread::sleep_for(
      std::chrono::milliseconds(std::max<int64_t>(last_ms - redis_ms, 0) + 5));
  for (Algorithm a : kAllAlgorithms) {
    SCOPED_TRACE(std::string(AlgorithmName(a)));
    CompiledLimit c(Policy{a, 2, 10 * kMillisecond, 0});
    std::string key = Key("idle:" + std::string(AlgorithmName(a)));
    EXPECT_EQ(redis_->Call({"EXISTS", key}).integer, 0);
    // Gone, so it decides as a fresh key.
    std::string fresh = key + ":fresh";
    TimeUs now = kT0 + 123456;
    EXPECT_EQ(Run1(key, c, now, 1), Run1(fresh, c, now, 1));
  }
}

TEST_F(ScriptTest, UsesRedisTimeWithoutAnExplicitNow) {
  CompiledLimit c(Policy::Gcra(100, kSecond));
  for (int i = 0; i < 3; ++i) {
    TimeUs now = 0;
    Decision d = Run1(Key("time"), c, std::nullopt, 1, &now);
    EXPECT_TRUE(d.allowed);
    TimeUs host = std::chrono::duration_cast<std::chrono::microseconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count();
    EXPECT_LT(std::abs(host - now), kSecond) << "Redis' now " << now << ", host " << host;
  }
}

TEST(ScriptProtocol, ArgumentsAndReply) {
  CompiledLimit g(Policy::Gcra(7, kMinute, 3));
  EXPECT_EQ(g.number(0), 4);
  EXPECT_EQ(g.number(1), 3);
  EXPECT_EQ(g.number(2), 8571429);
  EXPECT_EQ(g.number(3), 25714287);
  EXPECT_EQ(g.record(), std::string(1, '\4') + Doubles({3, 8571429, 25714287}));
  CompiledLimit tb(Policy::TokenBucket(20, 6, kMinute));
  EXPECT_EQ(tb.number(0), 3);
  EXPECT_EQ(tb.number(1), 20);
  EXPECT_EQ(tb.number(2), 10000000);
  EXPECT_EQ(tb.number(3), 1);
  CompiledLimit fw(Policy::FixedWindow(100, kSecond));
  EXPECT_EQ(fw.record(), std::string(1, '\0') + Doubles({100, 1000000, 0}));
  std::vector<std::string> args;
  std::vector<ScriptCheck> checks = {{&fw, 3}, {&g, -4}, {&tb, int64_t{1} << 60}};
  AppendScriptArgs(checks, std::nullopt, [&](std::string_view a) { args.emplace_back(a); });
  ASSERT_EQ(args.size(), 1u);
  EXPECT_EQ(args[0], Doubles({-1}) + std::string(fw.record()) + Doubles({3}) +
                         std::string(g.record()) + Doubles({0}) + std::string(tb.record()) +
                         Doubles({4503599627370496.0}));
  args.clear();
  AppendScriptArgs(std::span(checks).first(1), TimeUs{1700000000123456},
                   [&](std::string_view a) { args.emplace_back(a); });
  ASSERT_EQ(args.size(), 1u);
  EXPECT_EQ(args[0], Doubles({1700000000123456}) + std::string(fw.record()) + Doubles({3}));
  // Past 8 checks the args string is built on the heap: the same bytes.
  std::vector<ScriptCheck> many(11, {&tb, 2});
  args.clear();
  AppendScriptArgs(many, TimeUs{5}, [&](std::string_view a) { args.emplace_back(a); });
  ASSERT_EQ(args.size(), 1u);
  std::string want = Doubles({5});
  for (int i = 0; i < 11; ++i) want += std::string(tb.record()) + Doubles({2});
  EXPECT_EQ(args[0], want);

  std::string reply = Doubles({1234}) + std::string(1, '\1') + Doubles({5, 4, 100, 0, 0}) +
                      std::string(1, '\0') + Doubles({3, 0, -1, -1, 0});
  std::vector<Decision> out(2);
  TimeUs now = 0;
  ASSERT_TRUE(ParseScriptReply(reply, out, &now));
  EXPECT_EQ(now, 1234);
  EXPECT_EQ(out[0], (Decision{true, 5, 4, 100, 0, 0}));
  EXPECT_EQ(out[1], (Decision{false, 3, 0, kNever, kNever, 0}));
  Reply bulk;
  bulk.type = Reply::Type::kString;
  bulk.str = reply;
  out.assign(2, Decision{});
  ASSERT_TRUE(ParseScriptReply(bulk, out, &now));
  EXPECT_EQ(out[1], (Decision{false, 3, 0, kNever, kNever, 0}));
  // Not a reply the script gives: the wrong length, type, flag or number; now stays.
  now = 7;
  EXPECT_FALSE(ParseScriptReply(std::string_view(reply).substr(1), out, &now));
  EXPECT_FALSE(ParseScriptReply(std::string_view(reply).substr(0, 8 + 41), out, &now));
  bulk.type = Reply::Type::kStatus;
  EXPECT_FALSE(ParseScriptReply(bulk, out, &now));
  std::string bad = reply;
  bad[8 + 41] = 2;  // the second allowed
  EXPECT_FALSE(ParseScriptReply(bad, out, &now));
  for (double v : {0.5, 1e19, -1e19, std::nan("")}) {
    bad = reply;
    bad.replace(8 + 1 + 8, 8, Doubles({v}));  // the first remaining
    EXPECT_FALSE(ParseScriptReply(bad, out, &now)) << v;
    bad = reply;
    bad.replace(0, 8, Doubles({v}));  // now
    EXPECT_FALSE(ParseScriptReply(bad, out, &now)) << v;
  }
  EXPECT_EQ(now, 7);
}

TEST(ScriptProtocol, Sha1MatchesKnownVectors) {
  EXPECT_EQ(Sha1Hex(""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
  EXPECT_EQ(Sha1Hex("abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
  EXPECT_EQ(Sha1Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
  EXPECT_EQ(Sha1Hex(std::string(1000000, 'a')), "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
  EXPECT_EQ(ScriptSha1(), Sha1Hex(kScript));
  EXPECT_EQ(ScriptSha1().size(), 40u);
}

TEST_F(ScriptTest, Sha1MatchesRedis) {
  // SetUp checked kScript's; here every length around the 55/56/64-byte padding edges.
  for (size_t n = 0; n < 200; ++n) {
    std::string script = "return 1 --" + std::string(n, 'x');
    Reply r = redis_->Call({"SCRIPT", "LOAD", script});
    EXPECT_EQ(r.str, Sha1Hex(script)) << n;
  }
}

double InfoField(const std::string& info, std::string_view field) {
  size_t at = info.find(std::string(field) + ":");
  if (at == std::string::npos) return -1;
  return std::stod(info.substr(at + field.size() + 1));
}

// Redis' CPU per call: main-thread CPU time (INFO cpu) and the time inside EVALSHA (INFO
// commandstats) over 20k calls pipelined 200 at a time over 1000 client keys, each case
// measured three times (the least is printed: other processes only add). Next to a floor:
// a script that only reads the time, gets the key and sets it with an expiry, the calls any
// such script makes. Printed, not asserted.
TEST_F(ScriptTest, RedisCpuPerCall) {
  constexpr int kCalls = 20000, kBatch = 200, kKeys = 1000;
  auto cpu = [&] {
    std::string info = redis_->Call({"INFO", "cpu"}).str;
    return InfoField(info, "used_cpu_user_main_thread") +
           InfoField(info, "used_cpu_sys_main_thread");
  };
  auto evalsha_usec = [&] {  // cmdstat_evalsha:calls=N,usec=M,...
    std::string info = redis_->Call({"INFO", "commandstats"}).str;
    size_t at = info.find("cmdstat_evalsha:calls=");
    if (at == std::string::npos) return std::pair<double, double>(0, 0);
    std::string line = info.substr(at, info.find('\r', at) - at);
    return std::pair<double, double>(std::stod(line.substr(line.find("calls=") + 6)),
                                     std::stod(line.substr(line.find("usec=") + 5)));
  };
  // `add_call(commands, j)` appends the j-th call.
  auto measure = [&](const std::string& name, auto add_call) {
    double best_cpu = 1e9, best_script = 1e9;
    std::string commands;
    std::vector<Reply> replies;
    for (int round = 0; round < 3; ++round) {
      double cpu0 = cpu();
      auto [calls0, usec0] = evalsha_usec();
      for (int i = 0; i < kCalls; i += kBatch) {
        commands.clear();
        for (int j = i; j < i + kBatch; ++j) add_call(commands, j);
        redis_->CallMany(commands, kBatch, replies);
        for (const Reply& r : replies) ASSERT_EQ(r.type, Reply::Type::kString) << r.ToString();
      }
      best_cpu = std::min(best_cpu, (cpu() - cpu0) * 1e6 / kCalls);
      auto [calls1, usec1] = evalsha_usec();
      best_script = std::min(best_script, (usec1 - usec0) / (calls1 - calls0));
      g_script_calls += kCalls;
    }
    std::cout << "[ redis cpu ] " << name << ": " << best_cpu << " us main-thread CPU per call, "
              << best_script << " us inside EVALSHA\n";
  };

  const std::string floor_script =
      "local t = redis.call('TIME') local s = redis.call('GET', KEYS[1]) "
      "redis.call('SET', KEYS[1], '0123456789abcdefghijklmnopqrstuvwx', 'PXAT', "
      "string.format('%d', math.ceil((t[1] * 1000000 + t[2] + 60000000) / 1000))) "
      "return struct.pack('<dBddddd', 1, 2, 3, 4, 5, 6, 7)";
  const std::string floor_sha = Sha1Hex(floor_script);
  ASSERT_EQ(redis_->Call({"SCRIPT", "LOAD", floor_script}).str, floor_sha);
  measure("floor (TIME, GET, SET PXAT only)", [&](std::string& out, int j) {
    std::string key = Key("cpu-floor:" + std::to_string(j % kKeys));
    AppendCommand(out, {"EVALSHA", floor_sha, "1", key});
  });

  struct Case {
    const char* name;
    std::vector<Policy> policies;
  };
  const Case cases[] = {
      {"sliding_window_counter", {Policy::SlidingWindowCounter(1000000, kMinute)}},
      {"gcra", {Policy::Gcra(1000000, kSecond)}},
      {"gcra + sliding_window_counter + token_bucket",
       {Policy::Gcra(1000000, kSecond), Policy::SlidingWindowCounter(1000000, kMinute),
        Policy::TokenBucket(1000000, 1000000, kSecond)}},
  };
  for (const Case& cs : cases) {
    std::vector<CompiledLimit> compiled(cs.policies.begin(), cs.policies.end());
    std::vector<ScriptCheck> checks;
    for (const CompiledLimit& c : compiled) checks.push_back({&c, 1});
    std::vector<std::string> args;
    measure(cs.name, [&](std::string& out, int j) {
      args = {"EVALSHA", ScriptSha1(), std::to_string(checks.size())};
      for (size_t l = 0; l < checks.size(); ++l) {
        args.push_back(
            Key("{cpu" + std::to_string(j % kKeys) + "}:" + cs.name + std::to_string(l)));
      }
      AppendScriptArgs(checks, std::nullopt, [&](std::string_view a) { args.emplace_back(a); });
      std::vector<std::string_view> views(args.begin(), args.end());
      AppendCommand(out, views);
    });
  }
}

class Report : public testing::Environment {
 public:
  void TearDown() override {
    std::cout << "[ agreement ] " << g_decisions_compared << " decisions compared field by field; "
              << g_script_calls << " script calls\n";
  }
};
const auto* const kReport = testing::AddGlobalTestEnvironment(new Report);

}  // namespace
}  // namespace redis
}  // namespace sluice
