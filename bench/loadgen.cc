// loadgen: an open-loop HTTP load generator for latency at a fixed request rate.
//
// wrk is closed-loop: a slow answer delays the next request, so it under-reports tail
// latency at a given load. Here each of C connections sends on a fixed schedule (request k of
// connection i is due at start + (k*C + i) / rate); if the previous answer is late the next
// request goes as soon as it arrives, and every latency is measured from the request's due
// time, so queueing delay is counted rather than hidden (no coordinated omission).
//
// A light client matters: on two cores the generator shares the machine with the server,
// and at 80% of a server's peak a generator that costs as much per request as the server
// spends its own core, and its own lag is in the latencies. So this is one thread and one
// epoll loop (level-triggered) over plain non-blocking sockets: a request is one send of
// bytes built once per request, an answer one recv in the common case, parsed only as far
// as its framing (status, Content-Length or chunks); the loop waits in epoll_pwait2, whose
// timeout is the next due time to the nanosecond, so there is no timer to program. (An
// Asio and Beast version spent a timer update, a speculative read that found nothing, and
// a parser's allocations per request: three system calls more.)
//
// Usage: loadgen HOST PORT PATH RATE SECONDS [CONNECTIONS] [options]
//   --key-header NAME --keys N  send header NAME: k<seq % N> (N = 0: a new key per request)
//   --id-header NAME            send header NAME: <seq>, a number unique in the run
//   --first-id N                number requests from N (default 0)
//   --ok-ids FILE               write the seq of every 2xx answer, one per line
//   --every SECONDS             also print the line below for each such slice of the run
//   --tick-us U                 wake once every U µs (sending what is due, reading what has
//                               come) instead of for each request and answer: less of the
//                               generator's own CPU; up to 2U µs more in each latency
// Prints: rate=<answers received within the run / SECONDS> p50_ms=.. p99_ms=.. p999_ms=.. max_ms=..
// errors=.. sent=..
//         answered=.. status_2xx=.. status_429=.. status_other=.. [client_cpu_pct=..: the
//         generator's CPU over its wall time, on the last line only]
// Every request sent gets exactly one answer or counts as an error (a connection that
// breaks or answers garbage), so sent == answered + errors is checked by the caller.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

using Clock = std::chrono::steady_clock;

namespace {

struct Slice {
  std::vector<uint32_t> latencies_us;
  uint64_t errors = 0, ok = 0, limited = 0, other = 0;
};

struct Run {
  std::string head, tail;  // the request around its per-request headers
  std::string key_header, id_header;
  uint64_t keys = 1;
  FILE* ok_ids = nullptr;
  uint64_t seq = 0;
  Clock::time_point start, end;
  std::chrono::nanoseconds interval;  // between requests of one connection
  std::chrono::microseconds tick{0};  // 0: wake for each due request and answer
  std::chrono::nanoseconds slice{0};  // 0: one slice, the whole run
  std::vector<Slice> slices{1};
  uint64_t sent = 0;
  uint64_t answered_in_time = 0;  // answers that arrived before `end`: the achieved rate

  Slice& At(Clock::time_point due) {
    size_t i = slice.count() == 0 || due < start ? 0 : static_cast<size_t>((due - start) / slice);
    if (i >= slices.size()) slices.resize(i + 1);
    return slices[i];
  }
  // The bytes of the next request, numbered `id`.
  void Build(std::string& out, uint64_t id) const {
    out = head;
    char num[24];
    if (!key_header.empty()) {
      auto r = std::to_chars(num, num + sizeof num, keys == 0 ? id : id % keys);
      out.append(key_header).append(": k").append(num, r.ptr).append("\r\n");
    }
    if (!id_header.empty()) {
      auto r = std::to_chars(num, num + sizeof num, id);
      out.append(id_header).append(": ").append(num, r.ptr).append("\r\n");
    }
    out += tail;
  }
};

bool IEqualsPrefix(std::string_view line, std::string_view name) {
  if (line.size() < name.size()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    char c = line[i];
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    if (c != name[i]) return false;
  }
  return true;
}

std::string_view Trim(std::string_view v) {
  while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
  while (!v.empty() && (v.back() == ' ' || v.back() == '\t' || v.back() == '\r')) {
    v.remove_suffix(1);
  }
  return v;
}

// What is known of an answer's framing once its head is in.
struct Framing {
  size_t head = 0;  // bytes of the head, blank line included; 0: not in yet
  int status = 0;
  std::optional<size_t> length;  // Content-Length
  bool chunked = false;
  bool close = false;  // Connection: close
};

// Parses the head at the start of `in`, if it is all there. False: garbage.
bool ParseHead(std::string_view in, Framing& f) {
  size_t end = in.find("\r\n\r\n");
  if (end == std::string_view::npos) return true;  // not yet
  f.head = end + 4;
  std::string_view head = in.substr(0, end + 2);
  if (head.size() < 12 || !head.starts_with("HTTP/1.")) return false;
  auto [p, ec] = std::from_chars(head.data() + 9, head.data() + 12, f.status);
  if (ec != std::errc()) return false;
  size_t pos = head.find("\r\n") + 2;
  while (pos < head.size()) {
    size_t eol = head.find("\r\n", pos);
    std::string_view line = head.substr(pos, eol - pos);
    pos = eol + 2;
    if (IEqualsPrefix(line, "content-length:")) {
      std::string_view v = Trim(line.substr(15));
      size_t n = 0;
      auto r = std::from_chars(v.data(), v.data() + v.size(), n);
      if (r.ec != std::errc() || r.ptr != v.data() + v.size()) return false;
      f.length = n;
    } else if (IEqualsPrefix(line, "transfer-encoding:")) {
      f.chunked = Trim(line.substr(18)).ends_with("chunked");
    } else if (IEqualsPrefix(line, "connection:")) {
      std::string_view v = Trim(line.substr(11));
      f.close = v.size() == 5 && IEqualsPrefix(v, "close");
    }
  }
  return true;
}

// The whole answer's size if `body` (what follows the head) holds every chunk; 0: not yet;
// nullopt: garbage.
std::optional<size_t> ChunkedSize(std::string_view body) {
  size_t pos = 0;
  for (;;) {
    size_t eol = body.find("\r\n", pos);
    if (eol == std::string_view::npos) return 0;
    std::string_view line = body.substr(pos, eol - pos);
    line = line.substr(0, line.find(';'));
    size_t n = 0;
    auto r = std::from_chars(line.data(), line.data() + line.size(), n, 16);
    if (r.ec != std::errc()) return std::nullopt;
    pos = eol + 2;
    if (n == 0) {  // the last chunk, then trailers up to a blank line
      size_t blank = body.find("\r\n", pos);
      while (blank != std::string_view::npos && blank != pos) {
        pos = blank + 2;
        blank = body.find("\r\n", pos);
      }
      return blank == std::string_view::npos ? 0 : blank + 2;
    }
    if (body.size() < pos + n + 2) return 0;
    pos += n + 2;
  }
}

struct Conn {
  int fd = -1;
  Clock::time_point due;  // of its next request, or of the one in flight
  bool busy = false;      // a request in flight
  uint64_t id = 0;
  std::string in;  // the answer's bytes so far
  Framing framing;
};

class Generator {
 public:
  Generator(Run& run, sockaddr_in addr) : run_(run), addr_(addr) {}

  bool Open(Conn& c) {
    c.fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c.fd < 0) return false;
    if (connect(c.fd, reinterpret_cast<const sockaddr*>(&addr_), sizeof addr_) != 0) {
      close(c.fd);
      c.fd = -1;
      return false;
    }
    int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(c.fd, F_SETFL, fcntl(c.fd, F_GETFL) | O_NONBLOCK);
    epoll_event ev{};
    ev.events = EPOLLIN;  // level-triggered: one recv per wake-up is enough
    ev.data.ptr = &c;
    epoll_ctl(epoll_, EPOLL_CTL_ADD, c.fd, &ev);
    return true;
  }

  int Loop(std::vector<Conn>& conns) {
    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);  // wake to the microsecond, not 50 µs
    for (Conn& c : conns) {
      if (!Open(c)) {
        std::fprintf(stderr, "loadgen: cannot connect\n");
        return 1;
      }
    }
    const Clock::time_point give_up = run_.end + std::chrono::seconds(60);
    std::vector<epoll_event> events(conns.size());
    for (;;) {
      Clock::time_point now = Clock::now();
      Clock::time_point next = Clock::time_point::max();
      bool busy = false;
      for (Conn& c : conns) {
        if (!c.busy && c.due < run_.end) {
          if (c.due <= now) {
            Send(c);
          } else {
            next = std::min(next, c.due);
          }
        }
        busy |= c.busy;
      }
      if ((!busy && next == Clock::time_point::max()) || now > give_up) break;
      if (run_.tick.count() > 0 && next != Clock::time_point::max()) {
        // Ticked: read what has come, then sleep out the tick. A request goes out up to a
        // tick late and its answer is read up to a tick late; both count in its latency.
        timespec zero{0, 0};
        int n =
            epoll_pwait2(epoll_, events.data(), static_cast<int>(events.size()), &zero, nullptr);
        for (int i = 0; i < n; ++i) Read(*static_cast<Conn*>(events[i].data.ptr));
        // With requests out, the next tick reads their answers; with none, the next due
        // request is the first thing to do.
        std::this_thread::sleep_until(busy ? now + run_.tick : std::max(next, now + run_.tick));
        continue;
      }
      auto wait = next == Clock::time_point::max() ? Clock::duration(std::chrono::milliseconds(50))
                                                   : next - now;
      wait = std::min(wait, Clock::duration(give_up - now));
      auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(wait).count();
      timespec ts{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
      int n = epoll_pwait2(epoll_, events.data(), static_cast<int>(events.size()), &ts, nullptr);
      for (int i = 0; i < n; ++i) Read(*static_cast<Conn*>(events[i].data.ptr));
    }
    return 0;
  }

 private:
  void Send(Conn& c) {
    c.id = run_.seq++;
    ++run_.sent;
    run_.Build(request_, c.id);
    c.busy = true;
    c.in.clear();
    c.framing = Framing{};
    ssize_t w = send(c.fd, request_.data(), request_.size(), MSG_NOSIGNAL);
    if (w != static_cast<ssize_t>(request_.size())) Fail(c);  // a few bytes: all or broken
  }

  // The request in flight failed (or the connection broke): counted, and a new connection
  // keeps to the schedule.
  void Fail(Conn& c) {
    if (c.busy) {
      ++run_.At(c.due).errors;
      c.busy = false;
      c.due += run_.interval;
    }
    Reopen(c);
  }

  void Reopen(Conn& c) {
    epoll_ctl(epoll_, EPOLL_CTL_DEL, c.fd, nullptr);
    close(c.fd);
    c.fd = -1;
    if (!Open(c)) {
      // The server is gone: the rest of this connection's schedule fails.
      for (; c.due < run_.end; c.due += run_.interval) {
        ++run_.sent;
        ++run_.At(c.due).errors;
      }
    }
  }

  void Read(Conn& c) {
    if (c.fd < 0) return;
    char buf[64 * 1024];
    ssize_t r = recv(c.fd, buf, sizeof buf, 0);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (r <= 0 || !c.busy) return Fail(c);  // closed, broken, or bytes nobody asked for
    c.in.append(buf, static_cast<size_t>(r));
    Framing& f = c.framing;
    if (f.head == 0) {
      if (!ParseHead(c.in, f)) return Fail(c);
      if (f.head == 0) return;
    }
    size_t whole = 0;
    if (f.chunked) {
      std::optional<size_t> body = ChunkedSize(std::string_view(c.in).substr(f.head));
      if (!body) return Fail(c);
      if (*body == 0) return;
      whole = f.head + *body;
    } else {
      whole = f.head + f.length.value_or(0);  // no length and no chunks: no body (GET)
    }
    if (c.in.size() < whole) return;
    if (c.in.size() > whole) return Fail(c);  // more than one answer to one request
    Answered(c);
  }

  void Answered(Conn& c) {
    Clock::time_point now = Clock::now();
    auto us = std::chrono::duration_cast<std::chrono::microseconds>(now - c.due);
    Slice& slice = run_.At(c.due);
    if (now < run_.end) ++run_.answered_in_time;
    slice.latencies_us.push_back(static_cast<uint32_t>(us.count()));
    int status = c.framing.status;
    if (status / 100 == 2) {
      ++slice.ok;
      if (run_.ok_ids) std::fprintf(run_.ok_ids, "%llu\n", static_cast<unsigned long long>(c.id));
    } else if (status == 429) {
      ++slice.limited;
    } else {
      ++slice.other;
    }
    c.busy = false;
    c.due += run_.interval;
    if (c.framing.close) Reopen(c);
  }

  Run& run_;
  sockaddr_in addr_;
  int epoll_ = -1;
  std::string request_;
};

}  // namespace

// `answered` is the number of answers that count for the rate (those in time, for the run).
void Print(const char* label, Slice& s, double seconds, uint64_t sent, uint64_t answered,
           const std::string& extra = "") {
  auto& l = s.latencies_us;
  std::sort(l.begin(), l.end());
  auto pct = [&](double p) {
    return l.empty()
               ? 0.0
               : l[std::min(l.size() - 1, static_cast<size_t>(p * static_cast<double>(l.size())))] /
                     1000.0;
  };
  std::printf(
      "%srate=%.0f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_ms=%.3f errors=%llu sent=%llu "
      "answered=%zu status_2xx=%llu status_429=%llu status_other=%llu%s\n",
      label, static_cast<double>(answered) / seconds, pct(0.5), pct(0.99), pct(0.999),
      l.empty() ? 0.0 : l.back() / 1000.0, static_cast<unsigned long long>(s.errors),
      static_cast<unsigned long long>(sent), l.size(), static_cast<unsigned long long>(s.ok),
      static_cast<unsigned long long>(s.limited), static_cast<unsigned long long>(s.other),
      extra.c_str());
}

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr,
                 "usage: loadgen HOST PORT PATH RATE SECONDS [CONNECTIONS] [--key-header NAME "
                 "--keys N] [--id-header NAME] [--first-id N] [--ok-ids FILE] [--every SECONDS]\n");
    return 2;
  }
  std::string host = argv[1], path = argv[3];
  auto port = static_cast<unsigned short>(std::atoi(argv[2]));
  double rate = std::atof(argv[4]), seconds = std::atof(argv[5]);
  int conns = 64, first_flag = 6;
  if (argc > 6 && argv[6][0] != '-') {
    conns = std::atoi(argv[6]);
    first_flag = 7;
  }
  if (rate <= 0 || seconds <= 0 || conns <= 0) {
    std::fprintf(stderr, "loadgen: RATE, SECONDS and CONNECTIONS must be positive\n");
    return 2;
  }
  Run run;
  double every = 0;
  for (int i = first_flag; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--key-header") {
      run.key_header = value;
    } else if (flag == "--keys") {
      run.keys = std::strtoull(value.c_str(), nullptr, 10);
    } else if (flag == "--id-header") {
      run.id_header = value;
    } else if (flag == "--ok-ids") {
      run.ok_ids = std::fopen(value.c_str(), "w");
      if (!run.ok_ids) {
        std::perror(value.c_str());
        return 2;
      }
    } else if (flag == "--first-id") {
      run.seq = std::strtoull(value.c_str(), nullptr, 10);
    } else if (flag == "--every") {
      every = std::atof(value.c_str());
    } else if (flag == "--tick-us") {
      run.tick = std::chrono::microseconds(std::strtoull(value.c_str(), nullptr, 10));
    } else {
      std::fprintf(stderr, "loadgen: unknown option %s\n", flag.c_str());
      return 2;
    }
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    std::fprintf(stderr, "loadgen: HOST must be an IPv4 address: %s\n", host.c_str());
    return 2;
  }
  run.head = "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\n";
  run.tail = "\r\n";
  run.interval = std::chrono::nanoseconds(static_cast<int64_t>(1e9 * conns / rate));
  run.slice = std::chrono::nanoseconds(static_cast<int64_t>(every * 1e9));
  const Clock::time_point started = Clock::now();
  run.start = Clock::now() + std::chrono::milliseconds(200);
  run.end = run.start + std::chrono::nanoseconds(static_cast<int64_t>(seconds * 1e9));
  std::vector<Conn> connections(static_cast<size_t>(conns));
  for (int i = 0; i < conns; ++i) {
    connections[static_cast<size_t>(i)].due =
        run.start + std::chrono::nanoseconds(static_cast<int64_t>(1e9 * i / rate));
  }
  // Returns as soon as every answer is in; a request still unanswered a minute after the
  // end counts as sent but not answered.
  Generator generator(run, addr);
  if (int rc = generator.Loop(connections); rc != 0) return rc;
  for (Conn& c : connections) {
    if (c.fd >= 0) close(c.fd);
  }
  if (run.ok_ids) std::fclose(run.ok_ids);
  Slice all;
  for (size_t i = 0; i < run.slices.size(); ++i) {
    Slice& s = run.slices[i];
    all.latencies_us.insert(all.latencies_us.end(), s.latencies_us.begin(), s.latencies_us.end());
    all.errors += s.errors;
    all.ok += s.ok;
    all.limited += s.limited;
    all.other += s.other;
    if (every > 0) {
      std::string label = "slice=" + std::to_string(i) + " ";
      Print(label.c_str(), s, every, s.latencies_us.size() + s.errors, s.latencies_us.size());
    }
  }
  // How busy the generator itself was: near 100%, its own lag is in the latencies.
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto secs = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
  };
  double wall = std::chrono::duration<double>(Clock::now() - started).count();
  char cpu[64];
  std::snprintf(cpu, sizeof cpu, " client_cpu_pct=%.0f",
                100 * (secs(ru.ru_utime) + secs(ru.ru_stime)) / wall);
  Print("", all, seconds, run.sent, run.answered_in_time, cpu);
  return 0;
}
