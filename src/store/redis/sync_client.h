// SyncClient: a blocking Redis client for tests and tools only (one command at a time over
// one socket). The service itself talks to Redis through RedisConnection, asynchronously.
//
// Thread-safety: one thread at a time.
#ifndef SLUICE_STORE_REDIS_SYNC_CLIENT_H_
#define SLUICE_STORE_REDIS_SYNC_CLIENT_H_

#include <cstdlib>
#include <initializer_list>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>

#include "store/redis/resp.h"

namespace sluice::redis {

class SyncClient {
 public:
  // `address` is "host:port".
  explicit SyncClient(std::string_view address) : socket_(io_) {
    size_t colon = address.rfind(':');
    if (colon == std::string_view::npos) throw std::runtime_error("address needs host:port");
    boost::asio::ip::tcp::resolver resolver(io_);
    boost::asio::connect(socket_, resolver.resolve(std::string(address.substr(0, colon)),
                                                   std::string(address.substr(colon + 1))));
  }
  // The address in $SLUICE_TEST_REDIS (set by tests/with_redis.sh), or "" when unset.
  static std::string TestAddress() {
    const char* a = std::getenv("SLUICE_TEST_REDIS");
    return a ? a : "";
  }

  Reply Call(std::span<const std::string_view> args) {
    std::string out;
    AppendCommand(out, args);
    boost::asio::write(socket_, boost::asio::buffer(out));
    Reply reply;
    for (;;) {
      size_t used = 0;
      ParseStatus st = ParseReply(in_, reply, &used);
      if (st == ParseStatus::kOk) {
        in_.erase(0, used);
        return reply;
      }
      if (st == ParseStatus::kProtocolError) throw std::runtime_error("RESP protocol error");
      char buf[16384];
      size_t n = socket_.read_some(boost::asio::buffer(buf));
      in_.append(buf, n);
    }
  }
  Reply Call(std::initializer_list<std::string_view> args) {
    return Call(std::span<const std::string_view>(args.begin(), args.size()));
  }

 private:
  boost::asio::io_context io_;
  boost::asio::ip::tcp::socket socket_;
  std::string in_;
};

}  // namespace sluice::redis

#endif  // SLUICE_STORE_REDIS_SYNC_CLIENT_H_
