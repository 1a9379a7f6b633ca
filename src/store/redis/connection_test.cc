// Connection against a loopback peer that plays Redis by hand: what reaches the wire, and
// which reply goes to which call, when calls time out before they could be written.
#include "store/redis/connection.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <atomic>
#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/ip/tcp.hpp>

namespace sluice::redis {
namespace {

using namespace std::chrono_literals;
using tcp = boost::asio::ip::tcp;

struct Outcome {
  std::optional<CallError> error;
  std::string reply;
  Connection::Callback Record() {
    return [this](CallError e, const Reply& r) {
      error = e;
      if (e == CallError::kNone) reply = r.str;
    };
  }
};

template <class Pred>
void RunUntil(boost::asio::io_context& io, Pred done, std::chrono::milliseconds limit) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (!done() && std::chrono::steady_clock::now() < end) {
    io.run_one_for(5ms);
    if (io.stopped()) io.restart();
  }
}

// Reads from `fd` until nothing has come for `quiet`.
std::string Drain(int fd, std::chrono::milliseconds quiet) {
  timeval tv{0, static_cast<suseconds_t>(std::chrono::microseconds(quiet).count())};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string got;
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  return got;
}

// A loopback peer that plays Redis by hand: it accepts one connection at a time into
// `peer` (Accept again for the next), and gives the options that reach it.
struct Peer {
  explicit Peer(boost::asio::io_context& io)
      : server(io, {boost::asio::ip::make_address("127.0.0.1"), 0}), peer(io) {
    Accept();
  }
  void Accept() {
    accepted = false;
    peer = tcp::socket(server.get_executor());
    server.async_accept(peer, [this](const boost::system::error_code& ec) { accepted = !ec; });
  }
  ConnectionOptions Options() const {
    ConnectionOptions o;
    o.host = "127.0.0.1";
    o.port = server.local_endpoint().port();
    return o;
  }
  tcp::acceptor server;
  tcp::socket peer;
  bool accepted = false;
};

// A connection is usable once Redis answered its first command (PING here): an answer
// that comes past that command's deadline still decides, a refusal as a failure and a PONG
// as reachable.
TEST(Connection, ALateAnswerToTheFirstCommandStillDecides) {
  for (const char* answer : {"-NOAUTH Authentication required.\r\n", "+PONG\r\n"}) {
    SCOPED_TRACE(answer);
    boost::asio::io_context io;
    Peer redis(io);
    ConnectionOptions o = redis.Options();
    o.connect_timeout = 30ms;  // the PING's deadline
    std::vector<std::string> reachability;
    o.on_reachability = [&](std::string_view why) { reachability.emplace_back(why); };
    auto c = std::make_shared<Connection>(io, o);
    c->Start();
    RunUntil(
        io, [&] { return redis.accepted; }, 2s);
    ASSERT_TRUE(redis.accepted);
    RunUntil(
        io, [] { return false; }, 100ms);  // past the PING's deadline
    EXPECT_TRUE(reachability.empty());
    boost::asio::write(redis.peer, boost::asio::buffer(std::string_view(answer)));
    RunUntil(
        io, [&] { return !reachability.empty(); }, 2s);
    ASSERT_FALSE(reachability.empty());
    if (answer[0] == '-') {
      EXPECT_EQ(reachability.front(), "PING: NOAUTH Authentication required.");
    } else {
      EXPECT_EQ(reachability.front(), "");
    }
    c->Close();
  }
}

// A call that times out while its command is still unwritten (Redis is not reading, and a
// large write ahead of it cannot finish) is taken back: its bytes never reach Redis, so a
// request answered by its fail mode spends nothing there once Redis reads again; and the
// replies that do come go to the calls they answer.
TEST(Connection, ACallPastItsDeadlineIsNeverWrittenIfItWasNotYet) {
  boost::asio::io_context io;
  Peer redis(io);
  bool& accepted = redis.accepted;
  tcp::socket& peer = redis.peer;
  ConnectionOptions o = redis.Options();
  o.stall_timeout = 20s;
  auto c = std::make_shared<Connection>(io, o);
  auto now = std::chrono::steady_clock::now();
  // More than loopback's socket buffers hold: its write waits for the peer to read.
  std::string big(48 << 20, 'x');
  Outcome set, late, ping;
  std::string_view set_args[] = {"SET", "big", big};
  c->Call(set_args, now + 20s, set.Record());
  RunUntil(
      io, [&] { return accepted; }, 2s);
  ASSERT_TRUE(accepted);
  RunUntil(
      io, [] { return false; }, 100ms);  // the write starts and blocks
  std::string_view late_args[] = {"INCR", "dropme"};
  c->Call(late_args, std::chrono::steady_clock::now() + 30ms, late.Record());
  RunUntil(
      io, [&] { return late.error.has_value(); }, 2s);
  ASSERT_TRUE(late.error.has_value());
  EXPECT_EQ(*late.error, CallError::kTimeout);
  std::string_view ping_args[] = {"PING"};
  c->Call(ping_args, std::chrono::steady_clock::now() + 20s, ping.Record());

  // Redis reads again: everything still held is written, and it answers in order. The
  // connection's writes run until the reader has had nothing for 500 ms, however long the
  // 48 MB take on a loaded machine.
  std::string got;
  std::atomic<bool> drained{false};
  std::thread reader([&] {
    got = Drain(peer.native_handle(), 500ms);
    drained = true;
  });
  RunUntil(
      io, [&] { return drained.load(); }, 60s);
  reader.join();
  EXPECT_EQ(got.find("dropme"), std::string::npos) << "the late call reached Redis";
  // The connection's own PING (its first command, OnSecured) comes first.
  EXPECT_EQ(got.find("PING"), got.find("*1\r\n$4\r\nPING\r\n") + 8);
  EXPECT_LT(got.find("PING"), got.find("SET"));
  EXPECT_GT(got.rfind("PING"), got.find(std::string(1000, 'x')));  // after the big one
  boost::asio::write(peer, boost::asio::buffer(std::string_view("+PONG\r\n+OK\r\n+PONG\r\n")));
  RunUntil(
      io, [&] { return set.error && ping.error; }, 2s);
  ASSERT_TRUE(set.error && ping.error);
  EXPECT_EQ(*set.error, CallError::kNone);
  EXPECT_EQ(set.reply, "OK");
  EXPECT_EQ(*ping.error, CallError::kNone);
  EXPECT_EQ(ping.reply, "PONG");
  c->Close();
}

// A connection that was up and drops holds the calls made in its first backoff for the
// redial. They still end at their deadlines, and they are dialled for even when the slot
// map names the node no longer (`redial` false): an ASK sends calls to a node importing a
// slot, which no slot of the map names yet. Before, a held call outlived its deadline and,
// with no redial, waited for some later call to the node.
TEST(Connection, CallsHeldForTheRedialEndAtTheirDeadlinesAndAreDialledFor) {
  boost::asio::io_context io;
  Peer redis(io);
  ConnectionOptions o = redis.Options();
  o.redial = [] { return false; };
  auto c = std::make_shared<Connection>(io, o);
  Outcome first;
  std::string_view ping_args[] = {"PING"};
  c->Call(ping_args, std::chrono::steady_clock::now() + 2s, first.Record());
  RunUntil(
      io, [&] { return redis.accepted; }, 2s);
  ASSERT_TRUE(redis.accepted);
  // The connection's own PING, then the call's.
  boost::asio::write(redis.peer, boost::asio::buffer(std::string_view("+PONG\r\n+PONG\r\n")));
  RunUntil(
      io, [&] { return first.error.has_value(); }, 2s);
  ASSERT_EQ(first.error, CallError::kNone);

  // The peer drops the connection (CLIENT KILL, an idle timeout), and waits for the next.
  redis.Accept();
  RunUntil(
      io, [&] { return c->ready() == false; }, 2s);
  ASSERT_FALSE(c->ready());
  Outcome quick, patient;
  auto t0 = std::chrono::steady_clock::now();
  c->Call(ping_args, t0 + 3ms, quick.Record());   // ends inside the 10 ms backoff
  c->Call(ping_args, t0 + 5s, patient.Record());  // waits for the redial
  RunUntil(
      io, [&] { return quick.error.has_value(); }, 2s);
  ASSERT_EQ(quick.error, CallError::kTimeout);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 500ms);
  RunUntil(
      io, [&] { return redis.accepted; }, 2s);
  ASSERT_TRUE(redis.accepted) << "the held call was not dialled for";
  std::string got;
  const std::string ping = "*1\r\n$4\r\nPING\r\n";
  while (got.size() < 2 * ping.size()) {
    RunUntil(
        io, [] { return false; }, 20ms);
    char buf[256];
    boost::system::error_code ec;
    redis.peer.non_blocking(true);
    size_t n = redis.peer.read_some(boost::asio::buffer(buf), ec);
    if (!ec) got.append(buf, n);
    ASSERT_LT(std::chrono::steady_clock::now() - t0, 3s);
  }
  RunUntil(
      io, [] { return false; }, 50ms);  // a third command, if one were sent, would be here
  {
    char buf[256];
    boost::system::error_code ec;
    size_t n = redis.peer.read_some(boost::asio::buffer(buf), ec);
    if (!ec) got.append(buf, n);
  }
  // The redialled connection's PING and the patient call's.
  EXPECT_EQ(got, ping + ping) << "the timed-out call was written";
  boost::asio::write(redis.peer, boost::asio::buffer(std::string_view("+PONG\r\n+PONG\r\n")));
  RunUntil(
      io, [&] { return patient.error.has_value(); }, 2s);
  EXPECT_EQ(patient.error, CallError::kNone);
  EXPECT_EQ(patient.reply, "PONG");
  c->Close();
}

}  // namespace
}  // namespace sluice::redis
