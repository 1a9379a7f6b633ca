// Fuzzes Sluice's gRPC server with the bytes one client connection sends: the HTTP/2
// connection preface and frames (nghttp2), then what grpc_server.cc adds (the method by
// :path, the 5-byte message prefix, message bounds, trailers), ShouldRateLimit and
// grpc.health.v1 decided on the in-memory store, and the answer as it goes on the wire.
//
// The server listens on 127.0.0.1 on this thread's own loop, as a worker's; each input is
// written on a fresh loopback connection; once neither side has more to do, the client ends
// its sending side. Properties:
// - the server reads it all and closes the connection, within a bounded time (no hang, no
//   connection left open after its client is gone);
// - what the server wrote is whole HTTP/2 frames: the server's SETTINGS first, no frame
//   torn at the end, none over the 16 KiB frame size a client has not raised.
//
// Input: the byte stream of one connection, the client preface included (the seeds are
// real grpcio calls).
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/buffer.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>

#include "fuzz/fuzz_fixture.h"
#include "server/rls.h"

namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

struct Server {
  Server() {
    sluice::server::RlsGrpcOptions o;
    o.address = "127.0.0.1:0";
    std::string error;
    grpc = sluice::server::RlsGrpcServer::Start(fixture.rls, {&io}, o, &port, &error);
    if (!grpc) sluice::fuzz::Fail("the gRPC server did not start: " + error);
  }
  sluice::fuzz::Fixture fixture;
  asio::io_context io;
  int port = 0;
  std::unique_ptr<sluice::server::RlsGrpcServer> grpc;
};

// Whether `out` is whole HTTP/2 frames, the first a SETTINGS frame on stream 0.
void CheckFrames(const std::string& out) {
  size_t at = 0;
  bool first = true;
  while (at < out.size()) {
    if (out.size() - at < 9) sluice::fuzz::Fail("a torn frame header at the end of the output");
    auto byte = [&](size_t i) { return static_cast<uint8_t>(out[at + i]); };
    size_t length = size_t{byte(0)} << 16 | size_t{byte(1)} << 8 | byte(2);
    uint8_t type = byte(3);
    uint32_t stream =
        (uint32_t{byte(5)} << 24 | uint32_t{byte(6)} << 16 | uint32_t{byte(7)} << 8 | byte(8)) &
        0x7fffffffu;
    if (first && (type != 0x4 || stream != 0)) {
      sluice::fuzz::Fail("the server's first frame is not SETTINGS on stream 0");
    }
    first = false;
    if (length > 16384) sluice::fuzz::Fail("a frame over the default 16 KiB frame size");
    if (out.size() - at - 9 < length) sluice::fuzz::Fail("a torn frame at the end of the output");
    at += 9 + length;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Server& server = *new Server();
  asio::io_context& io = server.io;
  tcp::socket client(io);
  boost::system::error_code ec;
  const tcp::endpoint to{asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(server.port)};
  do {  // libFuzzer's SIGALRM (its -timeout check) may interrupt the blocking connect
    if (client.is_open()) client.close(ec);
    client.connect(to, ec);
  } while (ec == asio::error::interrupted);
  if (ec) sluice::fuzz::Fail("cannot connect to the gRPC server: " + ec.message());

  bool written = false, ended = false;
  std::string out;
  std::vector<char> buf(16384);
  asio::async_write(client, asio::buffer(data, size),
                    [&](const boost::system::error_code&, size_t) { written = true; });
  std::function<void()> read = [&] {
    client.async_read_some(asio::buffer(buf), [&](const boost::system::error_code& e, size_t n) {
      out.append(buf.data(), n);
      if (e) {
        ended = true;  // closed by the server (EOF or reset)
      } else {
        read();
      }
    });
  };
  read();
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!written && !ended && std::chrono::steady_clock::now() < deadline) {
    io.run_one_for(std::chrono::milliseconds(50));
  }
  // Until nothing is left to do on either side (loopback bytes are readable at once): the
  // server has read the input and written its answers. Then the client ends its side.
  while (io.poll() > 0) {
  }
  client.shutdown(tcp::socket::shutdown_send, ec);
  while (!ended && std::chrono::steady_clock::now() < deadline) {
    io.run_one_for(std::chrono::milliseconds(50));
  }
  if (!ended) sluice::fuzz::Fail("the server kept the connection open after its client's end");
  // The server's side of the connection is closed; let its handlers finish.
  while (io.poll_one() > 0) {
  }
  if (!out.empty()) CheckFrames(out);
  return 0;
}
