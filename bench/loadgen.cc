// loadgen: an open-loop HTTP load generator for latency at a fixed request rate.
//
// wrk is closed-loop: a slow answer delays the next request, so it under-reports tail
// latency at a given load. Here each of C connections sends on a fixed schedule (request k of
// connection i is due at start + (k*C + i) / rate); if the previous answer is late the next
// request goes as soon as it arrives, and every latency is measured from the request's due
// time, so queueing delay is counted rather than hidden (no coordinated omission).
//
// Usage: loadgen HOST PORT PATH RATE SECONDS [CONNECTIONS]
// Prints: rate=<achieved/s> p50_ms=.. p99_ms=.. p999_ms=.. max_ms=.. errors=..
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

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

struct Run {
  std::string request;
  Clock::time_point start, end;
  std::chrono::nanoseconds interval;  // between requests of one connection
  std::vector<uint32_t> latencies_us;
  uint64_t errors = 0;
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(asio::io_context& ctx, Run& run, tcp::endpoint ep, Clock::time_point first)
      : socket_(ctx), timer_(ctx), run_(run), ep_(ep), due_(first) {}

  void Start() {
    socket_.async_connect(ep_, [self = shared_from_this()](boost::system::error_code ec) {
      if (ec) {
        ++self->run_.errors;
        return;
      }
      socket_opt(self->socket_);
      self->Wait();
    });
  }

  // A connection the server closed (e.g. after its keep-alive request cap): count the
  // failed request, open a new connection and keep to the schedule.
  void Reconnect() {
    ++run_.errors;
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
    asio::async_write(socket_, asio::buffer(run_.request),
                      [self = shared_from_this()](boost::system::error_code ec, size_t) {
                        if (ec) return self->Reconnect();
                        self->Receive();
                      });
  }
  void Receive() {
    parser_.emplace();
    http::async_read(socket_, buffer_, *parser_,
                     [self = shared_from_this()](boost::system::error_code ec, size_t) {
                       if (ec) return self->Reconnect();
                       auto us = std::chrono::duration_cast<std::chrono::microseconds>(
                           Clock::now() - self->due_);
                       self->run_.latencies_us.push_back(static_cast<uint32_t>(us.count()));
                       self->due_ += self->run_.interval;
                       self->Wait();  // at once if already due
                     });
  }

  tcp::socket socket_;
  asio::steady_timer timer_;
  Run& run_;
  tcp::endpoint ep_;
  Clock::time_point due_;
  boost::beast::flat_buffer buffer_;
  std::optional<http::response_parser<http::string_body>> parser_;
};

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: loadgen HOST PORT PATH RATE SECONDS [CONNECTIONS]\n");
    return 2;
  }
  std::string host = argv[1], path = argv[3];
  auto port = static_cast<unsigned short>(std::atoi(argv[2]));
  double rate = std::atof(argv[4]), seconds = std::atof(argv[5]);
  int conns = argc > 6 ? std::atoi(argv[6]) : 64;
  Run run;
  run.request = "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\n\r\n";
  run.interval = std::chrono::nanoseconds(static_cast<int64_t>(1e9 * conns / rate));
  asio::io_context ctx(1);
  tcp::endpoint ep(asio::ip::make_address(host), port);
  run.start = Clock::now() + std::chrono::milliseconds(200);
  run.end = run.start + std::chrono::nanoseconds(static_cast<int64_t>(seconds * 1e9));
  run.latencies_us.reserve(static_cast<size_t>(rate * seconds * 1.1));
  for (int i = 0; i < conns; ++i) {
    auto offset = std::chrono::nanoseconds(static_cast<int64_t>(1e9 * i / rate));
    std::make_shared<Connection>(ctx, run, ep, run.start + offset)->Start();
  }
  ctx.run_until(run.end + std::chrono::seconds(5));
  auto& l = run.latencies_us;
  std::sort(l.begin(), l.end());
  auto pct = [&](double p) {
    return l.empty()
               ? 0.0
               : l[std::min(l.size() - 1, static_cast<size_t>(p * static_cast<double>(l.size())))] /
                     1000.0;
  };
  std::printf("rate=%.0f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_ms=%.3f errors=%llu\n",
              static_cast<double>(l.size()) / seconds, pct(0.5), pct(0.99), pct(0.999),
              l.empty() ? 0.0 : l.back() / 1000.0, static_cast<unsigned long long>(run.errors));
  return 0;
}
