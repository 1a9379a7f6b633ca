// rls_loadgen: an asynchronous gRPC load generator for Envoy's rate limit service (RLS v3,
// envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit), as Envoy calls it.
//
// gRPC over HTTP/2 with nghttp2, the HTTP/2 library Envoy's own codec grew from: each of T
// threads runs an epoll loop over its share of N connections, with at most M calls in flight
// on each. A call is a POST to the method's path (content-type application/grpc, te:
// trailers, grpc-timeout) with one length-prefixed message; it succeeds on grpc-status 0 in
// its trailers and a response that parses, and is an error otherwise (the status, a reset
// stream, a lost connection, or no answer by its deadline). A light client matters here:
// grpc++'s client spent about 50 µs of CPU per call on this machine, so it, not the server,
// bounded every figure; and a send for each frame nghttp2 hands over (a call's HEADERS,
// then its DATA) held the peak to a quarter of what one send per connection and loop turn
// reaches. Every request is one domain with one descriptor of one entry, hits_addend 1; the
// entry's value is drawn at random over K values ("v0".."v{K-1}") so a store sees many
// keys, or fixed (K = 0).
//
// Two modes:
//   closed  every call is followed at once by the next on its slot, for SECONDS after a
//           warm-up: the maximum throughput; latency from each call's send.
//   open    calls are due on a fixed schedule at RATE/s (call k due at start + k / RATE); a
//           due call goes out on the first free slot. Latency is measured from the due time,
//           so the time a call waited for a slot (queueing) counts: no coordinated omission.
//           The schedule runs for a warm-up first, as the closed mode's does: the calls due
//           in it are not measured (new connections and a cold server, whose first hundreds
//           of milliseconds are a start, not the steady load a limiter lives under).
//           Calls go out within a few µs of their due time and answers are seen within
//           50 µs (see RunOpen). With --tick-us U the thread wakes once per U µs instead of
//           once per call and sends the calls due by then in one write per connection, as a
//           busy client does: a call goes out and its answer is read up to U µs late, and
//           both delays count in its latency. Calls still unsent 2 s after the run's end
//           (RATE beyond what the server answers) are counted as `unsent` and enter the
//           percentiles with their wait so far, a lower bound.
//
// Prints one line: rate=<decisions/s> ok=<OK answers> over_limit=<OVER_LIMIT answers>
// errors=<failed calls> p50_ms= p99_ms= p999_ms= max_ms= calls=<measured> unsent=
// total=<every call answered, warm-up included> client_cpu_s=<this process's CPU time>
// mode= threads= channels= outstanding=; on stderr the first error and the count of each
// kind. Only calls of the measured window count in rate, ok, over_limit, errors and the
// percentiles (closed: answered within it; open: due within it).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
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

#include "envoy/service/ratelimit/v3/rls.pb.h"

namespace {

namespace rlspb = ::envoy::service::ratelimit::v3;
using Clock = std::chrono::steady_clock;

constexpr char kMethod[] = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

constexpr const char* kUsage =
    "usage: rls_loadgen HOST:PORT closed SECONDS [options]\n"
    "       rls_loadgen HOST:PORT open RATE SECONDS [options]\n"
    "  closed: maximum throughput, each slot sends its next call when the last is answered\n"
    "  open:   RATE calls/s on a fixed schedule, latency from each call's due time\n"
    "options:\n"
    "  --channels N     HTTP/2 connections (default 4)\n"
    "  --outstanding M  calls in flight per channel at most (default 16)\n"
    "  --threads T      client threads, each with its own share of the connections (default 1)\n"
    "  --domain D       RateLimitRequest.domain (default bench)\n"
    "  --key K          the descriptor entry's key (default key)\n"
    "  --values K       its value drawn at random over K values v0..v{K-1} (default 100000)\n"
    "  --value V        a fixed value V instead\n"
    "  --warmup S       seconds of load before measuring (default 1)\n"
    "  --timeout-ms T   deadline of each call (default 5000)\n"
    "  --tick-us U      open: wake once every U µs, sending the calls due by then together\n"
    "                   and reading the answers come by then (default 0: wake for each call)\n"
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
  int tick_us = 0;  // open loop: 0 wakes for each due call, else once per tick
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
    static const char* const kOptions[] = {"--channels",   "--outstanding", "--threads", "--domain",
                                           "--key",        "--values",      "--value",   "--warmup",
                                           "--timeout-ms", "--tick-us"};
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
    } else if (a == "--tick-us") {
      o.tick_us = static_cast<int>(ParseInt(v, "--tick-us", 0, 1'000'000));
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

struct Worker;
struct Connection;

// One slot: a call in flight, or free.
struct Call {
  Connection* conn = nullptr;
  int32_t stream = 0;
  rlspb::RateLimitRequest request;
  std::string out;  // the request's DATA: prefix and message
  size_t out_sent = 0;
  std::string body;  // the answer's DATA
  int grpc_status = -1;
  std::string grpc_message;
  Clock::time_point due;  // where its latency is measured from
  Clock::time_point deadline;
};

struct Connection {
  Worker* worker = nullptr;
  int fd = -1;
  nghttp2_session* session = nullptr;
  std::string pending;  // bytes nghttp2 produced that the socket has not taken
  size_t pending_sent = 0;
  bool dead = false;
  bool want_out = false;  // registered for EPOLLOUT
};

struct Worker {
  Worker(const Options& o, int index, std::vector<int> fds);
  ~Worker();
  void RunClosed(Clock::time_point start, Clock::time_point end);
  void RunOpen(Clock::time_point first, std::chrono::nanoseconds interval,
               Clock::time_point measured, Clock::time_point end, Clock::time_point stop);
  Results& results() { return results_; }

  void Issue(Call& c, Clock::time_point due);
  void Done(Call& c, const char* failure);
  void Record(Call& c, Clock::time_point now, const char* failure);
  void Poll(std::chrono::nanoseconds timeout);  // one epoll wait and the I/O it reports
  void Flush(Connection& conn);
  void Fail(Connection& conn, const char* why);
  void ExpireLate(Clock::time_point now);
  uint64_t Next() {  // splitmix64
    uint64_t z = (rng_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  const Options& o_;
  int epoll_ = -1;
  std::vector<std::unique_ptr<Connection>> conns_;
  std::vector<std::unique_ptr<Call>> calls_;
  std::vector<Call*> free_;  // open loop
  size_t in_flight_ = 0;
  bool closed_loop_ = false;
  Clock::time_point start_, end_;  // the measured window (open: of due times, from start_)
  uint64_t rng_;
  Results results_;
  std::string timeout_header_;
  std::string authority_;
};

std::string_view View(const uint8_t* p, size_t n) {
  return std::string_view(reinterpret_cast<const char*>(p), n);
}

nghttp2_nv Nv(std::string_view name, std::string_view value) {
  return nghttp2_nv{reinterpret_cast<uint8_t*>(const_cast<char*>(name.data())),
                    reinterpret_cast<uint8_t*>(const_cast<char*>(value.data())), name.size(),
                    value.size(), NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE};
}

Call* CallOf(nghttp2_session* s, int32_t stream) {
  return static_cast<Call*>(nghttp2_session_get_stream_user_data(s, stream));
}

int OnHeader(nghttp2_session* s, const nghttp2_frame* frame, const uint8_t* name, size_t namelen,
             const uint8_t* value, size_t valuelen, uint8_t, void*) {
  Call* c = CallOf(s, frame->hd.stream_id);
  if (!c) return 0;
  auto n = View(name, namelen);
  auto v = View(value, valuelen);
  if (n == "grpc-status") {
    int code = -1;
    std::from_chars(v.data(), v.data() + v.size(), code);
    c->grpc_status = code;
  } else if (n == "grpc-message") {
    c->grpc_message.assign(v);
  }
  return 0;
}

int OnData(nghttp2_session* s, uint8_t, int32_t stream, const uint8_t* data, size_t len, void*) {
  if (Call* c = CallOf(s, stream)) c->body.append(reinterpret_cast<const char*>(data), len);
  return 0;
}

int OnClose(nghttp2_session* s, int32_t stream, uint32_t error_code, void*) {
  Call* c = CallOf(s, stream);
  if (!c || c->stream != stream) return 0;
  c->stream = 0;
  c->conn->worker->Done(*c, error_code != 0 && c->grpc_status < 0 ? "stream reset" : nullptr);
  return 0;
}

ssize_t ReadRequest(nghttp2_session*, int32_t, uint8_t* buf, size_t length, uint32_t* flags,
                    nghttp2_data_source* source, void*) {
  auto* c = static_cast<Call*>(source->ptr);
  size_t n = std::min(length, c->out.size() - c->out_sent);
  std::memcpy(buf, c->out.data() + c->out_sent, n);
  c->out_sent += n;
  if (c->out_sent == c->out.size()) *flags |= NGHTTP2_DATA_FLAG_EOF;
  return static_cast<ssize_t>(n);
}

nghttp2_session_callbacks* Callbacks() {
  static nghttp2_session_callbacks* cb = [] {
    nghttp2_session_callbacks* c = nullptr;
    nghttp2_session_callbacks_new(&c);
    nghttp2_session_callbacks_set_on_header_callback(c, OnHeader);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(c, OnData);
    nghttp2_session_callbacks_set_on_stream_close_callback(c, OnClose);
    return c;
  }();
  return cb;
}

Worker::Worker(const Options& o, int index, std::vector<int> fds)
    : o_(o), rng_(0x9E3779B97F4A7C15ull * static_cast<uint64_t>(index + 1)) {
  epoll_ = epoll_create1(EPOLL_CLOEXEC);
  timeout_header_ = std::to_string(o.timeout_ms) + "m";
  authority_ = o.target;
  for (int fd : fds) {
    auto conn = std::make_unique<Connection>();
    conn->worker = this;
    conn->fd = fd;
    // As the server does: no HTTP messaging rules, which check what a proxy passes on.
    // The generator shares a core with the server in scripts/bench-redis, so its own cost
    // per call is taken from the server's.
    static nghttp2_option* options = [] {
      nghttp2_option* opt = nullptr;
      nghttp2_option_new(&opt);
      nghttp2_option_set_no_http_messaging(opt, 1);
      return opt;
    }();
    nghttp2_session_client_new2(&conn->session, Callbacks(), conn.get(), options);
    nghttp2_settings_entry settings[] = {{NGHTTP2_SETTINGS_ENABLE_PUSH, 0}};
    nghttp2_submit_settings(conn->session, NGHTTP2_FLAG_NONE, settings, 1);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = conn.get();
    epoll_ctl(epoll_, EPOLL_CTL_ADD, fd, &ev);
    conns_.push_back(std::move(conn));
  }
  // Slots interleaved over the connections, so a partly busy open run spreads over them.
  for (int m = 0; m < o.outstanding; ++m) {
    for (auto& conn : conns_) {
      auto c = std::make_unique<Call>();
      c->conn = conn.get();
      c->request.set_domain(o.domain);
      c->request.set_hits_addend(1);
      auto* entry = c->request.add_descriptors()->add_entries();
      entry->set_key(o.key);
      entry->set_value(o.value);
      calls_.push_back(std::move(c));
    }
  }
  for (auto it = calls_.rbegin(); it != calls_.rend(); ++it) free_.push_back(it->get());
}

Worker::~Worker() {
  for (auto& conn : conns_) {
    nghttp2_session_del(conn->session);
    close(conn->fd);
  }
  close(epoll_);
}

void Worker::Issue(Call& c, Clock::time_point due) {
  ++in_flight_;
  c.due = due;
  c.deadline = Clock::now() + std::chrono::milliseconds(o_.timeout_ms);
  c.body.clear();
  c.grpc_status = -1;
  c.grpc_message.clear();
  if (c.conn->dead) return Done(c, "connection lost");
  if (o_.values > 0) {
    char buf[24];
    buf[0] = 'v';
    auto r = std::to_chars(buf + 1, buf + sizeof buf, Next() % o_.values);
    c.request.mutable_descriptors(0)->mutable_entries(0)->set_value(
        buf, static_cast<size_t>(r.ptr - buf));
  }
  size_t n = c.request.ByteSizeLong();
  c.out.resize(5 + n);
  c.out[0] = 0;
  for (int i = 0; i < 4; ++i) c.out[1 + i] = static_cast<char>(n >> (24 - 8 * i));
  c.request.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(c.out.data() + 5));
  c.out_sent = 0;
  nghttp2_nv head[] = {Nv(":method", "POST"),
                       Nv(":scheme", "http"),
                       Nv(":path", kMethod),
                       Nv(":authority", authority_),
                       Nv("content-type", "application/grpc"),
                       Nv("te", "trailers"),
                       Nv("grpc-timeout", timeout_header_)};
  nghttp2_data_provider body;
  body.source.ptr = &c;
  body.read_callback = ReadRequest;
  int32_t id = nghttp2_submit_request(c.conn->session, nullptr, head, std::size(head), &body, &c);
  if (id < 0) return Done(c, "cannot start a stream");
  c.stream = id;
}

// A call ended: answered, failed, or given up. Closed loop: its slot goes again.
void Worker::Done(Call& c, const char* failure) {
  --in_flight_;
  ++results_.total;
  Clock::time_point now = Clock::now();
  if (!closed_loop_) {
    if (c.due >= start_) Record(c, now, failure);  // not a warm-up call
    free_.push_back(&c);
    return;
  }
  if (now >= start_ && now < end_) Record(c, now, failure);
  if (now < end_ && !c.conn->dead) Issue(c, now);
}

void Worker::Record(Call& c, Clock::time_point now, const char* failure) {
  results_.latencies_ns.push_back(static_cast<uint64_t>((now - c.due).count()));
  rlspb::RateLimitResponse response;
  std::string kind;
  if (failure) {
    kind = failure;
  } else if (c.grpc_status != 0) {
    kind = "grpc status " + std::to_string(c.grpc_status);
    if (results_.first_error.empty()) results_.first_error = kind + ": " + c.grpc_message;
  } else if (c.body.size() < 5 ||
             !response.ParseFromArray(c.body.data() + 5, static_cast<int>(c.body.size() - 5))) {
    kind = "malformed response";
  } else if (response.overall_code() == rlspb::RateLimitResponse::OK) {
    ++results_.ok;
    return;
  } else if (response.overall_code() == rlspb::RateLimitResponse::OVER_LIMIT) {
    ++results_.over_limit;
    return;
  } else {
    kind = "overall_code UNKNOWN";
  }
  ++results_.errors;
  if (results_.first_error.empty()) results_.first_error = kind;
  ++results_.error_kinds[kind];
}

void Worker::Fail(Connection& conn, const char* why) {
  if (conn.dead) return;
  conn.dead = true;
  epoll_ctl(epoll_, EPOLL_CTL_DEL, conn.fd, nullptr);
  for (auto& c : calls_) {
    if (c->conn == &conn && c->stream != 0) {
      c->stream = 0;
      Done(*c, why);
    }
  }
}

void Worker::Flush(Connection& conn) {
  if (conn.dead) return;
  for (;;) {
    if (conn.pending_sent == conn.pending.size()) {
      // Every frame nghttp2 has ready (it hands them over one at a time) goes out in one
      // send: a call's HEADERS and DATA, and the calls due together.
      conn.pending.clear();
      conn.pending_sent = 0;
      for (;;) {
        const uint8_t* data = nullptr;
        ssize_t n = nghttp2_session_mem_send(conn.session, &data);
        if (n < 0) return Fail(conn, "HTTP/2 error");
        if (n == 0) break;
        conn.pending.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
      }
      if (conn.pending.empty()) break;
    }
    ssize_t w = send(conn.fd, conn.pending.data() + conn.pending_sent,
                     conn.pending.size() - conn.pending_sent, MSG_NOSIGNAL);
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (w <= 0) return Fail(conn, "connection lost");
    conn.pending_sent += static_cast<size_t>(w);
  }
  bool want = conn.pending_sent < conn.pending.size();
  if (want != conn.want_out) {
    conn.want_out = want;
    epoll_event ev{};
    ev.events = EPOLLIN | (want ? EPOLLOUT : 0u);
    ev.data.ptr = &conn;
    epoll_ctl(epoll_, EPOLL_CTL_MOD, conn.fd, &ev);
  }
}

void Worker::Poll(std::chrono::nanoseconds timeout) {
  for (auto& conn : conns_) Flush(*conn);  // what Issue queued
  epoll_event events[64];
  timespec ts{static_cast<time_t>(timeout.count() / 1'000'000'000),
              static_cast<long>(timeout.count() % 1'000'000'000)};
  int n = epoll_pwait2(epoll_, events, 64, &ts, nullptr);
  uint8_t buf[64 * 1024];
  for (int i = 0; i < n; ++i) {
    auto* conn = static_cast<Connection*>(events[i].data.ptr);
    if (conn->dead) continue;
    if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
      for (;;) {
        ssize_t r = recv(conn->fd, buf, sizeof buf, 0);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (r <= 0) {
          Fail(*conn, "connection lost");
          break;
        }
        if (nghttp2_session_mem_recv(conn->session, buf, static_cast<size_t>(r)) < 0) {
          Fail(*conn, "HTTP/2 error");
          break;
        }
        if (static_cast<size_t>(r) < sizeof buf) break;
      }
    }
    Flush(*conn);
  }
}

void Worker::ExpireLate(Clock::time_point now) {
  for (auto& c : calls_) {
    if (c->stream != 0 && now > c->deadline) {
      nghttp2_submit_rst_stream(c->conn->session, NGHTTP2_FLAG_NONE, c->stream, NGHTTP2_CANCEL);
      nghttp2_session_set_stream_user_data(c->conn->session, c->stream, nullptr);
      c->stream = 0;
      Done(*c, "no answer by the deadline");
    }
  }
}

// Closed loop between `start` and `end` (completions counted in that window).
void Worker::RunClosed(Clock::time_point start, Clock::time_point end) {
  closed_loop_ = true;
  start_ = start;
  end_ = end;
  Clock::time_point now = Clock::now();
  for (auto& c : calls_) Issue(*c, now);
  Clock::time_point check = now + std::chrono::milliseconds(100);
  while (in_flight_ > 0) {
    Poll(std::chrono::milliseconds(50));
    now = Clock::now();
    if (now > check) {
      ExpireLate(now);
      check = now + std::chrono::milliseconds(100);
    }
  }
}

// Open loop: call k of this worker due at first + k * interval, for due times before end;
// sending stops at stop (calls due but not yet sent then are `unsent`). Between due times
// the thread waits in epoll_pwait2, whose timeout is to the nanosecond (with timer slack
// 1 ns): it wakes for an answer or for the next due call, one system call either way, and
// never spins, so it leaves the core to others. (A poll followed by a sleep took twice the
// system calls, and the client, not the server, became the bound.)
void Worker::RunOpen(Clock::time_point first, std::chrono::nanoseconds interval,
                     Clock::time_point measured, Clock::time_point end, Clock::time_point stop) {
  prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);  // wake to the microsecond, not 50 µs
  start_ = measured;
  Clock::time_point next = first;
  Clock::time_point check = Clock::now();
  const auto tick = std::chrono::microseconds(o_.tick_us);
  for (;;) {
    Clock::time_point now = Clock::now();
    while (next < end && next <= now && !free_.empty() && now < stop) {
      Call* c = free_.back();
      free_.pop_back();
      Issue(*c, next);
      next += interval;
    }
    bool more = next < end && now < stop;
    if (!more && in_flight_ == 0) break;
    if (now > check) {
      ExpireLate(now);
      check = now + std::chrono::milliseconds(100);
    }
    if (tick.count() > 0 && more && !free_.empty()) {
      // Ticked: send what is due, read what has come, then sleep out the tick. A call goes
      // out up to a tick late and its answer is seen up to a tick late, and both count in
      // its latency, which is measured from its due time.
      Poll(std::chrono::nanoseconds::zero());
      // With calls out, the next tick reads their answers; with none, the next due call
      // is the first thing to do.
      std::this_thread::sleep_until(in_flight_ > 0 ? now + tick : std::max(next, now + tick));
      continue;
    }
    Clock::duration wait = !more || free_.empty() ? Clock::duration(std::chrono::milliseconds(50))
                                                  : std::max(next - now, Clock::duration::zero());
    Poll(std::chrono::duration_cast<std::chrono::nanoseconds>(wait));
  }
  // Due in the window but never sent: their wait so far is a lower bound of their latency.
  Clock::time_point now = Clock::now();
  for (; next < end; next += interval) {
    if (next < start_) continue;
    ++results_.unsent;
    results_.latencies_ns.push_back(static_cast<uint64_t>((now - next).count()));
  }
}

// A connected, non-blocking TCP socket to HOST:PORT, or -1.
int Connect(const std::string& target) {
  auto colon = target.rfind(':');
  std::string host = target.substr(0, colon), port = target.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0) return -1;
  int fd = -1;
  for (addrinfo* a = res; a && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(res);
  if (fd < 0) return -1;
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return fd;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = Parse(argc, argv);
  std::vector<std::vector<int>> per_worker(static_cast<size_t>(o.threads));
  for (int i = 0; i < o.channels; ++i) {
    int fd = Connect(o.target);
    if (fd < 0) {
      std::fprintf(stderr, "rls_loadgen: cannot connect to %s\n", o.target.c_str());
      return 1;
    }
    per_worker[static_cast<size_t>(i % o.threads)].push_back(fd);
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
  Clock::time_point start = begin + secs(o.warmup);
  Clock::time_point end = start + secs(o.seconds);
  std::vector<std::thread> threads;
  for (int t = 0; t < o.threads; ++t) {
    Worker* w = workers[static_cast<size_t>(t)].get();
    if (o.open) {
      // Worker t takes calls t, t + T, t + 2T, ... of the schedule.
      auto interval = std::chrono::nanoseconds(static_cast<int64_t>(1e9 * o.threads / o.rate));
      auto first = begin + std::chrono::nanoseconds(static_cast<int64_t>(1e9 * t / o.rate));
      Clock::time_point stop = end + std::chrono::seconds(2);
      threads.emplace_back([=] { w->RunOpen(first, interval, start, end, stop); });
    } else {
      threads.emplace_back([=] {
        std::this_thread::sleep_until(begin);
        w->RunClosed(start, end);
      });
    }
  }
  for (auto& th : threads) th.join();

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
