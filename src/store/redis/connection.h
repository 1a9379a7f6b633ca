// Connection: one pipelined connection from a worker thread to one Redis node.
//
// Commands from any number of concurrent requests are appended to one output buffer and
// written together (while one write is in flight the next batch accumulates): sent at once
// when the socket takes them, which it almost always does, or by an asynchronous write of
// what it did not take. Replies are matched to callers in order, so one connection carries
// many decisions per round trip.
// Every call has a deadline: a call that passes it is answered kTimeout at once and its
// late reply is read and dropped. A connection whose oldest call waits longer than the
// stall timeout, or whose socket fails, is closed; its pending calls are answered
// kConnection and it reconnects by itself with a short backoff (capped at 200 ms, so
// decisions return to Redis well within a second of its return). Calls made in the first
// backoff after a working connection dropped wait for the redial, up to their deadlines;
// in later ones they fail at once. TLS is optional; AUTH (password, or ACL user and
// password) is sent first on every new connection.
//
// Ownership: the worker's RedisClient owns connections through shared_ptr; pending I/O keeps
// a connection alive until its handlers have run. Thread-safety: none; everything runs on
// the io_context the connection was made with.
#ifndef SLUICE_STORE_REDIS_CONNECTION_H_
#define SLUICE_STORE_REDIS_CONNECTION_H_

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/steady_timer.hpp>

#include "store/redis/resp.h"

namespace sluice::redis {

enum class CallError : uint8_t {
  kNone,
  kTimeout,     // the deadline passed (Redis slow, or unreachable and not yet known dead)
  kConnection,  // not connected, or the connection failed before the reply came
};

using SteadyTime = std::chrono::steady_clock::time_point;

class TlsContextSlot;  // below

struct ConnectionOptions {
  std::string host;
  uint16_t port = 6379;
  std::string username;  // empty: AUTH with the password only
  std::string password;  // empty: no AUTH
  std::chrono::microseconds connect_timeout{200'000};
  std::chrono::microseconds stall_timeout{1'000'000};
  // TLS when set (shared by all connections of a store): handshake after connect, the
  // server's certificate checked against `tls_server_name` (default: host) if verifying.
  std::shared_ptr<TlsContextSlot> tls;
  std::string tls_server_name;
  bool tls_verify = true;
  // Asked before each redial after a failure (on the connection's loop); false leaves the
  // connection idle until its next call. Unset: always redial.
  std::function<bool()> redial;
  // Told, on the connection's loop, when it becomes usable (connected, secured and
  // authenticated: `why` empty), again every half second or so while it answers, and each
  // time it fails (`why` says how): for /readyz, which must not call a store ok while no
  // connection to it comes up, nor down while one of its connections serves.
  std::function<void(std::string_view why)> on_reachability;
};

// TLS to Redis as configured (store.tls), for the connections that share one context.
struct TlsFiles {
  std::string ca_file;    // empty: the system's CA paths
  std::string cert_file;  // a client certificate (with key_file), when Redis asks for one
  std::string key_file;
};
// A TLS 1.2+ client context; throws std::runtime_error naming the file that did not load
// (or the key that does not match the certificate).
std::shared_ptr<boost::asio::ssl::context> MakeTlsContext(const TlsFiles& files);

// The TLS context a store's connections take as they (re)connect, swapped when its files
// are read again (certificate rotation): a connection keeps the one it connected with.
// Thread-safety: any thread; the lock is taken per connect, never per call.
class TlsContextSlot {
 public:
  explicit TlsContextSlot(std::shared_ptr<boost::asio::ssl::context> context)
      : context_(std::move(context)) {}
  std::shared_ptr<boost::asio::ssl::context> Get() const {
    std::lock_guard lock(mu_);
    return context_;
  }
  // Reads `files` again (MakeTlsContext) and takes the new context; on an error (*error)
  // keeps the current one.
  bool Reload(const TlsFiles& files, std::string* error);

 private:
  mutable std::mutex mu_;
  std::shared_ptr<boost::asio::ssl::context> context_;
};

// Why the server's certificate was refused after a failed handshake ("certificate has
// expired", "hostname mismatch", ...) in parentheses with a leading space; empty when
// verification was not what failed.
std::string VerifyFailure(SSL* ssl);

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  // Runs exactly once, on the connection's io_context, never inside Call. `reply` is
  // valid only during the call and only when error is kNone (it may be a Redis error reply).
  using Callback = std::function<void(CallError error, const Reply& reply)>;

  Connection(boost::asio::io_context& io, ConnectionOptions options);
  ~Connection();

  // Starts connecting (also done by the first Call).
  void Start();
  // Sends a command; `callback` gets its reply or an error by `deadline`.
  void Call(std::span<const std::string_view> args, SteadyTime deadline, Callback callback);
  // Answers every pending call kConnection and stops reconnecting.
  void Close();
  // Writes the commands queued so far now, rather than once the handlers ready now have
  // run. Never runs a callback.
  void WriteNow() { Flush(); }

  bool ready() const { return state_ == State::kReady; }
  // Ready, and Redis has answered it: a connection only just up may yet be refused (at
  // maxclients Redis accepts, answers the first command with an error, and closes).
  bool answering() const { return state_ == State::kReady && greeted_; }
  const ConnectionOptions& options() const { return options_; }
  std::string address() const;

 private:
  enum class State { kIdle, kConnecting, kReady, kBackoff, kClosed };
  struct Pending {
    SteadyTime deadline;
    SteadyTime sent;
    Callback callback;      // empty once answered (timed out)
    size_t bytes = 0;       // its command's length in out_ while not yet written
    bool droppable = true;  // may be taken back unwritten at its deadline (not AUTH)
  };

  void Connect();
  void OnConnected();
  void OnSecured();
  void Usable();  // connected, secured and authenticated
  boost::asio::ip::tcp::socket& Lowest() { return tls_ ? tls_->next_layer() : socket_; }
  void Fail(std::string_view why);
  void Flush();
  void Read();
  void ArmTimer();
  void ArmAt(SteadyTime at);
  void OnTimer();
  void DropUnsentLate(SteadyTime now);
  void Deliver(CallError error, const Reply& reply, Pending& p);

  boost::asio::io_context& io_;
  ConnectionOptions options_;
  State state_ = State::kIdle;
  boost::asio::ip::tcp::socket socket_;
  // With TLS, the stream that wraps socket_'s replacement; shared with pending handlers,
  // since an SSL stream must outlive its operations.
  std::shared_ptr<boost::asio::ssl::stream<boost::asio::ip::tcp::socket>> tls_;
  std::shared_ptr<boost::asio::ssl::context> tls_context_;  // tls_'s, kept while it lives
  boost::asio::steady_timer timer_;                         // deadlines and the connect timeout
  bool timer_armed_ = false;
  SteadyTime timer_at_{};
  SteadyTime connect_deadline_{};
  boost::asio::steady_timer backoff_timer_;
  // A name's resolution in progress (literal IPs have none). Cancelled when the attempt
  // ends: the io_context's one resolver thread would otherwise run every stale lookup,
  // each delaying the next connection's, while a slow DNS holds them.
  std::optional<boost::asio::ip::tcp::resolver> resolver_;
  std::chrono::milliseconds backoff_{0};
  bool hold_in_backoff_ = false;  // calls made in this backoff wait for the redial (Fail)
  std::deque<Pending> pending_;
  std::string out_;      // commands not yet written
  size_t unsent_ = 0;    // the last unsent_ of pending_ are those in out_, in order
  std::string writing_;  // the batch being written
  bool write_in_flight_ = false;
  bool flush_posted_ = false;
  std::array<char, 16384> read_buf_;
  std::string in_;  // bytes read, not yet parsed
  // This connection's last error answer, to name a close that follows it closely (Redis
  // says why, then closes): when it came, cleared by a good answer.
  std::string last_error_;
  SteadyTime last_error_at_;
  SteadyTime usable_said_;     // when on_reachability last heard this connection answers
  size_t in_start_ = 0;        // first unparsed byte of in_
  Reply reply_;                // reused for every reply
  uint64_t epoch_ = 0;         // bumped on each (re)connect: handlers of an old socket stand down
  bool handshaking_ = false;   // connected, the TLS handshake under way
  bool greeted_ = false;       // Redis answered this connection's first command (AUTH or PING)
  const char* greeting_ = "";  // that command's name
};

}  // namespace sluice::redis

#endif  // SLUICE_STORE_REDIS_CONNECTION_H_
