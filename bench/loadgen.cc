// loadgen: an open-loop HTTP load generator for latency at a fixed request rate.
//
// wrk is closed-loop: a slow answer delays the next request, so it under-reports tail
// latency at a given load. Here each of C connections sends on a fixed schedule (request k of
// connection i is due at start + (k*C + i) / rate); if the previous answer is late the next
// request goes as soon as it arrives, and every latency is measured from the request's due
// time, so queueing delay is counted rather than hidden (no coordinated omission).
//
// Usage: loadgen HOST PORT PATH RATE SECONDS [CONNECTIONS] [options]
//   --key-header NAME --keys N  send header NAME: k<seq % N> (N = 0: a new key per request)
//   --id-header NAME            send header NAME: <seq>, a number unique in the run
//   --first-id N                number requests from N (default 0)
//   --ok-ids FILE               write the seq of every 2xx answer, one per line
//   --every SECONDS             also print the line below for each such slice of the run
// Prints: rate=<answers received within the run / SECONDS> p50_ms=.. p99_ms=.. p999_ms=.. max_ms=..
// errors=.. sent=..
//         answered=.. status_2xx=.. status_429=.. status_other=.. [client_cpu_pct=..: the
//         generator's CPU over its wall time, on the last line only]
// Every request sent gets exactly one answer or counts as an error (a connection that
// breaks or answers garbage), so sent == answered + errors is checked by the caller.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <sys/resource.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>

namespace asio = boost::asio;
namespace http = boost::beast::http;
using Clock = std::chrono::steady_clock;
using tcp = asio::ip::tcp;

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
    if (!key_header.empty()) {
      out += key_header + ": k" + std::to_string(keys == 0 ? id : id % keys) + "\r\n";
    }
    if (!id_header.empty()) out += id_header + ": " + std::to_string(id) + "\r\n";
    out += tail;
  }
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(asio::io_context& ctx, Run& run, tcp::endpoint ep, Clock::time_point first)
      : socket_(ctx), timer_(ctx), run_(run), ep_(ep), due_(first) {}

  void Start() {
    socket_.async_connect(ep_, [self = shared_from_this()](boost::system::error_code ec) {
      if (ec) {
        ++self->run_.At(self->due_).errors;
        return;
      }
      socket_opt(self->socket_);
      self->Wait();
    });
  }

  // A connection the server closed (e.g. after its keep-alive request cap): count the
  // failed request, open a new connection and keep to the schedule.
  void Reconnect() {
    ++run_.At(due_).errors;
    boost::system::error_code ignored;
    socket_.close(ignored);
    buffer_.clear();
    due_ += run_.interval;
    Start();
  }

 private:
  static void socket_opt(tcp::socket& s) {
    boost::system::error_code ec;
    s.set_option(tcp::no_delay(true), ec);
  }
  void Wait() {
    if (due_ >= run_.end) return;
    timer_.expires_at(due_);
    timer_.async_wait([self = shared_from_this()](boost::system::error_code) { self->Send(); });
  }
  void Send() {
    id_ = run_.seq++;
    ++run_.sent;
    run_.Build(request_, id_);
    asio::async_write(socket_, asio::buffer(request_),
                      [self = shared_from_this()](boost::system::error_code ec, size_t) {
                        if (ec) return self->Reconnect();
                        self->Receive();
                      });
  }
  void Receive() {
    parser_.emplace();
    http::async_read(
        socket_, buffer_, *parser_,
        [self = shared_from_this()](boost::system::error_code ec, size_t) {
          if (ec) return self->Reconnect();
          auto us =
              std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - self->due_);
          Slice& slice = self->run_.At(self->due_);
          if (Clock::now() < self->run_.end) ++self->run_.answered_in_time;
          slice.latencies_us.push_back(static_cast<uint32_t>(us.count()));
          unsigned status = self->parser_->get().result_int();
          if (status / 100 == 2) {
            ++slice.ok;
            if (self->run_.ok_ids) {
              std::fprintf(self->run_.ok_ids, "%llu\n", static_cast<unsigned long long>(self->id_));
            }
          } else if (status == 429) {
            ++slice.limited;
          } else {
            ++slice.other;
          }
          self->due_ += self->run_.interval;
          self->Wait();  // at once if already due
        });
  }

  tcp::socket socket_;
  asio::steady_timer timer_;
  Run& run_;
  tcp::endpoint ep_;
  Clock::time_point due_;
  uint64_t id_ = 0;
  std::string request_;
  boost::beast::flat_buffer buffer_;
  std::optional<http::response_parser<http::string_body>> parser_;
};

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
    } else {
      std::fprintf(stderr, "loadgen: unknown option %s\n", flag.c_str());
      return 2;
    }
  }
  run.head = "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\n";
  run.tail = "\r\n";
  run.interval = std::chrono::nanoseconds(static_cast<int64_t>(1e9 * conns / rate));
  run.slice = std::chrono::nanoseconds(static_cast<int64_t>(every * 1e9));
  const Clock::time_point started = Clock::now();
  asio::io_context ctx(1);
  tcp::endpoint ep(asio::ip::make_address(host), port);
  run.start = Clock::now() + std::chrono::milliseconds(200);
  run.end = run.start + std::chrono::nanoseconds(static_cast<int64_t>(seconds * 1e9));
  for (int i = 0; i < conns; ++i) {
    auto offset = std::chrono::nanoseconds(static_cast<int64_t>(1e9 * i / rate));
    std::make_shared<Connection>(ctx, run, ep, run.start + offset)->Start();
  }
  // Returns as soon as every answer is in; a request still unanswered a minute after the
  // end counts as sent but not answered.
  ctx.run_until(run.end + std::chrono::seconds(60));
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
