// rls_loadgen: an asynchronous gRPC load generator for Envoy's rate limit service (RLS v3,
// envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit), as Envoy calls it.
//
// grpc++'s CompletionQueue API: each of T threads owns a completion queue and its share of
// N channels (each channel its own HTTP/2 connection: a local subchannel pool), with at most
// M calls in flight on each channel. Every request is one domain with one descriptor of one
// entry, hits_addend 1; the entry's value is drawn at random over K values ("v0".."v{K-1}")
// so a store sees many keys, or fixed (K = 0).
//
// Two modes:
//   closed  every call is followed at once by the next on its slot, for SECONDS after a
//           warm-up: the maximum throughput; latency from each call's send.
//   open    calls are due on a fixed schedule at RATE/s (call k due at start + k / RATE); a
//           due call goes out on the first free slot. Latency is measured from the due time,
//           so the time a call waited for a slot (queueing) counts: no coordinated omission.
//           Calls go out within a few µs of their due time and answers are seen within
//           50 µs (see RunOpen). Calls still unsent 2 s after the run's end (RATE beyond what
//           the server answers) are counted as `unsent` and enter the percentiles with their
//           wait so far, a lower bound.
//
// Prints one line: rate=<decisions/s> ok=<OK answers> over_limit=<OVER_LIMIT answers>
// errors=<failed calls> p50_ms= p99_ms= p999_ms= max_ms= calls=<measured> unsent=
// total=<every call answered, warm-up included> client_cpu_s=<this process's CPU time>
// mode= threads= channels= outstanding=; on stderr the first error's status and the count
// of each kind. Only calls of the measured window count in rate, ok, over_limit, errors and
// the percentiles (closed: answered within it; open: due within it).
#include <absl/synchronization/mutex.h>
#include <grpcpp/grpcpp.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "envoy/service/ratelimit/v3/rls.grpc.pb.h"

namespace {

namespace rlspb = ::envoy::service::ratelimit::v3;
using Clock = std::chrono::steady_clock;

constexpr const char* kUsage =
    "usage: rls_loadgen HOST:PORT closed SECONDS [options]\n"
    "       rls_loadgen HOST:PORT open RATE SECONDS [options]\n"
    "  closed: maximum throughput, each slot sends its next call when the last is answered\n"
    "  open:   RATE calls/s on a fixed schedule, latency from each call's due time\n"
    "options:\n"
    "  --channels N     gRPC channels, each its own connection (default 4)\n"
    "  --outstanding M  calls in flight per channel at most (default 16)\n"
    "  --threads T      client threads, each with its own completion queue (default 1)\n"
    "  --domain D       RateLimitRequest.domain (default bench)\n"
    "  --key K          the descriptor entry's key (default key)\n"
    "  --values K       its value drawn at random over K values v0..v{K-1} (default 100000)\n"
    "  --value V        a fixed value V instead\n"
    "  --warmup S       closed: seconds of load before measuring (default 1)\n"
    "  --timeout-ms T   deadline of each call (default 5000)\n"
    "prints: rate=<decisions/s> ok= over_limit= errors= p50_ms= p99_ms= p999_ms= max_ms= ...\n";

struct Options {
  std::string target;
  bool open = false;
  double rate = 0;
  double seconds = 0;
  double warmup = 1;
  int channels = 4;
  int outstanding = 16;
  int threads = 1;
  std::string domain = "bench";
  std::string key = "key";
  std::string value;  // fixed when values == 0
  uint64_t values = 100000;
  int timeout_ms = 5000;
};

[[noreturn]] void Usage(const char* why) {
  if (why) std::fprintf(stderr, "rls_loadgen: %s\n", why);
  std::fputs(kUsage, stderr);
  std::exit(2);
}

double ParseDouble(const char* s, const char* what, bool zero_ok = false) {
  char* end = nullptr;
  double v = std::strtod(s, &end);
  if (end == s || *end != '\0' || !(v > 0 || (zero_ok && v == 0)) || v > 1e9) {
    std::string m = std::string("bad ") + what + " '" + s + "'";
    Usage(m.c_str());
  }
  return v;
}

int64_t ParseInt(const char* s, const char* what, int64_t min, int64_t max = 1'000'000) {
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s, s + std::strlen(s), v);
  if (ec != std::errc() || *p != '\0' || v < min || v > max) {
    std::string m = std::string("bad ") + what + " '" + s + "'";
    Usage(m.c_str());
  }
  return v;
}

Options Parse(int argc, char** argv) {
  if (argc < 4) Usage(nullptr);
  Options o;
  o.target = argv[1];
  if (o.target.find(':') == std::string::npos) Usage("the target is HOST:PORT");
  std::string mode = argv[2];
  int i = 3;
  if (mode == "closed") {
    o.seconds = ParseDouble(argv[i++], "SECONDS");
  } else if (mode == "open") {
    if (argc < 5) Usage("open needs RATE and SECONDS");
    o.open = true;
    o.rate = ParseDouble(argv[i++], "RATE");
    o.seconds = ParseDouble(argv[i++], "SECONDS");
  } else {
    Usage("the mode is closed or open");
  }
  for (; i < argc; ++i) {
    std::string a = argv[i];
    static const char* const kOptions[] = {"--channels", "--outstanding", "--threads",
                                           "--domain",   "--key",         "--values",
                                           "--value",    "--warmup",      "--timeout-ms"};
    if (std::find(std::begin(kOptions), std::end(kOptions), a) == std::end(kOptions)) {
      Usage(("unknown option " + a).c_str());
    }
    if (i + 1 >= argc) Usage(("missing the value of " + a).c_str());
    const char* v = argv[++i];
    if (a == "--channels") {
      o.channels = static_cast<int>(ParseInt(v, "--channels", 1));
    } else if (a == "--outstanding") {
      o.outstanding = static_cast<int>(ParseInt(v, "--outstanding", 1));
    } else if (a == "--threads") {
      o.threads = static_cast<int>(ParseInt(v, "--threads", 1));
    } else if (a == "--domain") {
      o.domain = v;
    } else if (a == "--key") {
      o.key = v;
    } else if (a == "--values") {
      o.values = static_cast<uint64_t>(ParseInt(v, "--values", 0, int64_t{1} << 62));
      if (o.values == 0 && o.value.empty()) o.value = "v0";
    } else if (a == "--value") {
      o.value = v;
      o.values = 0;
    } else if (a == "--warmup") {
      o.warmup = ParseDouble(v, "--warmup", true);
    } else if (a == "--timeout-ms") {
      o.timeout_ms = static_cast<int>(ParseInt(v, "--timeout-ms", 1, 3'600'000));
    } else {
      Usage(("unknown option " + a).c_str());
    }
  }
  if (o.threads > o.channels) Usage("--threads must not exceed --channels");
  return o;
}

struct Results {
  std::vector<uint64_t> latencies_ns;  // of the measured calls
  uint64_t ok = 0, over_limit = 0, errors = 0, unsent = 0;
  uint64_t total = 0;  // every call answered in the run, warm-up and drain included
  std::map<std::string, uint64_t> error_kinds;
  std::string first_error;
};

// One slot: a call in flight, or free. A ClientContext serves one call only: each call
// gets a new one.
struct Call {
  rlspb::RateLimitService::Stub* stub = nullptr;
  std::unique_ptr<grpc::ClientContext> ctx;
  rlspb::RateLimitRequest request;
  rlspb::RateLimitResponse response;
  grpc::Status status;
  std::unique_ptr<grpc::ClientAsyncResponseReader<rlspb::RateLimitResponse>> reader;
  Clock::time_point due;  // where its latency is measured from
};

class Worker {
 public:
  Worker(const Options& o, int index, std::vector<std::shared_ptr<grpc::Channel>> channels)
      : o_(o), channels_(std::move(channels)), rng_(0x9E3779B97F4A7C15ull * (index + 1)) {
    for (auto& ch : channels_) stubs_.push_back(rlspb::RateLimitService::NewStub(ch));
    for (auto& stub : stubs_) {
      for (int m = 0; m < o.outstanding; ++m) {
        auto c = std::make_unique<Call>();
        c->stub = stub.get();
        c->request.set_domain(o.domain);
        c->request.set_hits_addend(1);
        auto* entry = c->request.add_descriptors()->add_entries();
        entry->set_key(o.key);
        entry->set_value(o.value);
        calls_.push_back(std::move(c));
      }
    }
    // Interleave the channels in the free list, so a partly busy run spreads over them.
    std::vector<Call*> order;
    for (int m = 0; m < o.outstanding; ++m) {
      for (size_t s = 0; s < stubs_.size(); ++s) {
        order.push_back(
            calls_[s * static_cast<size_t>(o.outstanding) + static_cast<size_t>(m)].get());
      }
    }
    free_.assign(order.rbegin(), order.rend());  // popped from the back: channel 0 first
  }

  // Closed loop between `start` and `end` (completions counted in that window).
  void RunClosed(Clock::time_point start, Clock::time_point end) {
    for (auto& c : calls_) Issue(*c, Clock::now());
    size_t in_flight = calls_.size();
    void* tag = nullptr;
    bool ok = false;
    while (in_flight > 0 && cq_.Next(&tag, &ok)) {
      auto* c = static_cast<Call*>(tag);
      ++results_.total;
      Clock::time_point now = Clock::now();
      if (now >= start && now < end) Record(*c, now);
      if (now < end) {
        Issue(*c, now);
      } else {
        --in_flight;
      }
    }
  }

  // Open loop: call k of this worker due at first + k * interval, for due times before end;
  // sending stops at stop (calls due but not yet sent then are `unsent`). The thread waits in
  // the completion queue while the next due time is over 1.5 ms away (gRPC's timers have a
  // 1 ms grain); nearer, it polls the queue and sleeps at most kNap between polls, on the
  // kernel's high-resolution timers: it never spins, so it leaves the core to others and is
  // woken promptly, and an answer waits at most kNap to be seen.
  void RunOpen(Clock::time_point first, std::chrono::nanoseconds interval, Clock::time_point end,
               Clock::time_point stop) {
    constexpr Clock::duration kNap = std::chrono::microseconds(50);
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);  // sleep to the microsecond, not 50 µs
    Clock::time_point next = first;
    void* tag = nullptr;
    bool ok = false;
    for (;;) {
      Clock::time_point now = Clock::now();
      while (next < end && next <= now && !free_.empty() && now < stop) {
        Call* c = free_.back();
        free_.pop_back();
        Issue(*c, next);
        ++in_flight_;
        next += interval;
      }
      bool more = next < end && now < stop;
      if (!more && in_flight_ == 0) break;
      gpr_timespec deadline = gpr_inf_past(GPR_CLOCK_MONOTONIC);
      bool far = !more || free_.empty() || next - now > std::chrono::microseconds(1500);
      if (far) {
        auto wait = !more || free_.empty() ? Clock::duration(std::chrono::milliseconds(50))
                                           : next - now - std::chrono::milliseconds(1);
        deadline =
            gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                         gpr_time_from_nanos(std::chrono::nanoseconds(wait).count(), GPR_TIMESPAN));
      }
      auto st = cq_.AsyncNext(&tag, &ok, deadline);
      if (st == grpc::CompletionQueue::SHUTDOWN) break;
      if (st == grpc::CompletionQueue::TIMEOUT) {
        if (!far) {
          auto d = std::min<Clock::duration>(next - Clock::now(), kNap);
          if (d > Clock::duration::zero()) std::this_thread::sleep_for(d);
        }
        continue;
      }
      auto* c = static_cast<Call*>(tag);
      ++results_.total;
      Record(*c, Clock::now());
      free_.push_back(c);
      --in_flight_;
    }
    // Due in the window but never sent: their wait so far is a lower bound of their latency.
    Clock::time_point now = Clock::now();
    for (; next < end; next += interval) {
      ++results_.unsent;
      results_.latencies_ns.push_back(static_cast<uint64_t>((now - next).count()));
    }
  }

  // Shuts the completion queue down and drains it (once).
  void ShutdownQueue() {
    if (shut_) return;
    shut_ = true;
    cq_.Shutdown();
    void* tag = nullptr;
    bool ok = false;
    while (cq_.Next(&tag, &ok)) {
    }
  }

  Results& results() { return results_; }

 private:
  void Issue(Call& c, Clock::time_point due) {
    c.ctx = std::make_unique<grpc::ClientContext>();
    c.ctx->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(o_.timeout_ms));
    if (o_.values > 0) {
      char buf[24];
      buf[0] = 'v';
      auto r = std::to_chars(buf + 1, buf + sizeof buf, Next() % o_.values);
      c.request.mutable_descriptors(0)->mutable_entries(0)->set_value(
          buf, static_cast<size_t>(r.ptr - buf));
    }
    c.response.Clear();
    c.due = due;
    c.reader = c.stub->AsyncShouldRateLimit(c.ctx.get(), c.request, &cq_);
    c.reader->Finish(&c.response, &c.status, &c);
  }

  void Record(Call& c, Clock::time_point now) {
    results_.latencies_ns.push_back(static_cast<uint64_t>((now - c.due).count()));
    if (!c.status.ok()) {
      ++results_.errors;
      std::string kind = "grpc status " + std::to_string(c.status.error_code());
      if (results_.first_error.empty()) {
        results_.first_error = kind + ": " + c.status.error_message();
      }
      ++results_.error_kinds[kind];
      return;
    }
    switch (c.response.overall_code()) {
      case rlspb::RateLimitResponse::OK:
        ++results_.ok;
        break;
      case rlspb::RateLimitResponse::OVER_LIMIT:
        ++results_.over_limit;
        break;
      default:
        ++results_.errors;
        if (results_.first_error.empty()) results_.first_error = "overall_code UNKNOWN";
        ++results_.error_kinds["overall_code UNKNOWN"];
        break;
    }
  }

  uint64_t Next() {  // splitmix64
    uint64_t z = (rng_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  const Options& o_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<rlspb::RateLimitService::Stub>> stubs_;
  grpc::CompletionQueue cq_;
  std::vector<std::unique_ptr<Call>> calls_;
  std::vector<Call*> free_;
  size_t in_flight_ = 0;  // open loop
  bool shut_ = false;
  uint64_t rng_;
  Results results_;
};

}  // namespace

int main(int argc, char** argv) {
  Options o = Parse(argc, argv);
  // Debian builds Abseil without NDEBUG, so every absl::Mutex gRPC takes also updates a
  // lock-order graph for deadlock detection: a debugging aid that costs the client CPU.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);

  // Channels with identical arguments would share one connection: a local subchannel pool
  // gives each its own.
  std::vector<std::vector<std::shared_ptr<grpc::Channel>>> per_worker(
      static_cast<size_t>(o.threads));
  for (int i = 0; i < o.channels; ++i) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("sluice.rls_loadgen.channel", i);
    auto ch = grpc::CreateCustomChannel(o.target, grpc::InsecureChannelCredentials(), args);
    if (!ch->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(5))) {
      std::fprintf(stderr, "rls_loadgen: cannot connect to %s\n", o.target.c_str());
      return 1;
    }
    per_worker[static_cast<size_t>(i % o.threads)].push_back(std::move(ch));
  }
  std::vector<std::unique_ptr<Worker>> workers;
  for (int t = 0; t < o.threads; ++t) {
    workers.push_back(
        std::make_unique<Worker>(o, t, std::move(per_worker[static_cast<size_t>(t)])));
  }

  auto secs = [](double s) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
  };
  Clock::time_point begin = Clock::now() + std::chrono::milliseconds(50);
  Clock::time_point start = begin + (o.open ? Clock::duration::zero() : secs(o.warmup));
  Clock::time_point end = start + secs(o.seconds);
  std::vector<std::thread> threads;
  for (int t = 0; t < o.threads; ++t) {
    Worker* w = workers[static_cast<size_t>(t)].get();
    if (o.open) {
      // Worker t takes calls t, t + T, t + 2T, ... of the schedule.
      auto interval = std::chrono::nanoseconds(static_cast<int64_t>(1e9 * o.threads / o.rate));
      auto first = start + std::chrono::nanoseconds(static_cast<int64_t>(1e9 * t / o.rate));
      Clock::time_point stop = end + std::chrono::seconds(2);
      threads.emplace_back([=] { w->RunOpen(first, interval, end, stop); });
    } else {
      threads.emplace_back([=] {
        std::this_thread::sleep_until(begin);
        w->RunClosed(start, end);
      });
    }
  }
  for (auto& th : threads) th.join();
  for (auto& w : workers) w->ShutdownQueue();

  Results all;
  for (auto& w : workers) {
    Results& r = w->results();
    all.latencies_ns.insert(all.latencies_ns.end(), r.latencies_ns.begin(), r.latencies_ns.end());
    all.ok += r.ok;
    all.over_limit += r.over_limit;
    all.errors += r.errors;
    all.unsent += r.unsent;
    all.total += r.total;
    for (auto& [k, n] : r.error_kinds) all.error_kinds[k] += n;
    if (all.first_error.empty()) all.first_error = r.first_error;
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto tv = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
  };
  double cpu_s = tv(ru.ru_utime) + tv(ru.ru_stime);
  auto& l = all.latencies_ns;
  std::sort(l.begin(), l.end());
  auto pct = [&](double p) {
    if (l.empty()) return 0.0;
    size_t i = std::min(l.size() - 1, static_cast<size_t>(p * static_cast<double>(l.size())));
    return static_cast<double>(l[i]) / 1e6;
  };
  if (all.errors > 0) {
    std::fprintf(stderr, "rls_loadgen: %llu errors, the first: %s\n",
                 static_cast<unsigned long long>(all.errors), all.first_error.c_str());
    for (auto& [k, n] : all.error_kinds) {
      std::fprintf(stderr, "  %s: %llu\n", k.c_str(), static_cast<unsigned long long>(n));
    }
  }
  std::printf(
      "rate=%.0f ok=%llu over_limit=%llu errors=%llu p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f "
      "max_ms=%.3f calls=%zu unsent=%llu total=%llu client_cpu_s=%.2f mode=%s threads=%d "
      "channels=%d outstanding=%d\n",
      static_cast<double>(all.ok + all.over_limit) / o.seconds,
      static_cast<unsigned long long>(all.ok), static_cast<unsigned long long>(all.over_limit),
      static_cast<unsigned long long>(all.errors), pct(0.5), pct(0.99), pct(0.999),
      l.empty() ? 0.0 : static_cast<double>(l.back()) / 1e6, l.size(),
      static_cast<unsigned long long>(all.unsent), static_cast<unsigned long long>(all.total),
      cpu_s, o.open ? "open" : "closed", o.threads, o.channels, o.outstanding);
  return all.errors > 0 && all.ok + all.over_limit == 0 ? 1 : 0;
}
