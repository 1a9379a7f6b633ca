#include "store/redis/connection.h"

#include <algorithm>
#include <array>

#include <boost/asio/connect.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

#include "core/log.h"

namespace sluice::redis {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;

std::shared_ptr<asio::ssl::context> MakeTlsContext(const TlsFiles& files) {
  auto tls = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_client);
  tls->set_options(asio::ssl::context::no_sslv2 | asio::ssl::context::no_sslv3 |
                   asio::ssl::context::no_tlsv1 | asio::ssl::context::no_tlsv1_1);
  // Each step names the setting and file it read, for an operator to find.
  auto step = [](std::string_view setting, const std::string& file, auto&& load) {
    try {
      load();
    } catch (const boost::system::system_error& e) {
      throw std::runtime_error("redis TLS setup: store." + std::string(setting) + " " + file +
                               ": " + e.code().message());
    }
  };
  if (files.ca_file.empty()) {
    step("tls (the system's CA paths)", "", [&] { tls->set_default_verify_paths(); });
  } else {
    step("ca_file", files.ca_file, [&] { tls->load_verify_file(files.ca_file); });
  }
  if (!files.cert_file.empty()) {
    step("cert_file", files.cert_file, [&] { tls->use_certificate_chain_file(files.cert_file); });
    // An encrypted key would have OpenSSL ask for its passphrase on the terminal, if any:
    // the reload (or start) would wait there, with the process' signals taken meanwhile.
    bool encrypted = false;
    tls->set_password_callback([&encrypted](size_t, asio::ssl::context::password_purpose) {
      encrypted = true;
      return std::string();
    });
    try {
      tls->use_private_key_file(files.key_file, asio::ssl::context::pem);
    } catch (const boost::system::system_error& e) {
      throw std::runtime_error("redis TLS setup: store.key_file " + files.key_file + ": " +
                               (encrypted ? "the key is encrypted (Sluice reads unencrypted "
                                            "PEM keys only; decrypt it with `openssl pkey`)"
                                          : e.code().message()));
    }
  }
  return tls;
}

bool TlsContextSlot::Reload(const TlsFiles& files, std::string* error) {
  std::shared_ptr<asio::ssl::context> fresh;
  try {
    fresh = MakeTlsContext(files);
  } catch (const std::exception& e) {
    *error = e.what();
    return false;
  }
  std::lock_guard lock(mu_);
  context_ = std::move(fresh);
  return true;
}

std::string VerifyFailure(SSL* ssl) {
  long result = SSL_get_verify_result(ssl);  // NOLINT(runtime/int): OpenSSL's type
  if (result == X509_V_OK) return "";
  return std::string(" (") + X509_verify_cert_error_string(result) + ")";
}

namespace {
const Reply kNoReply;
constexpr std::chrono::milliseconds kMinBackoff{10};
constexpr std::chrono::milliseconds kMaxBackoff{200};
// How recent an error answer must be to be named as the reason of the close after it.
constexpr std::chrono::seconds kErrorNamesClose{1};
// How often a connection that keeps answering tells on_reachability so.
constexpr std::chrono::milliseconds kUsableSaidEvery{500};
LogLimiter g_connect_log;
}  // namespace

Connection::Connection(asio::io_context& io, ConnectionOptions options)
    : io_(io), options_(std::move(options)), socket_(io), timer_(io), backoff_timer_(io) {}

Connection::~Connection() {
  boost::system::error_code ec;
  Lowest().close(ec);
}

std::string Connection::address() const {
  return options_.host + ":" + std::to_string(options_.port);
}

void Connection::Start() {
  if (state_ == State::kIdle) Connect();
}

void Connection::Connect() {
  state_ = State::kConnecting;
  handshaking_ = false;
  ++epoch_;
  boost::system::error_code ec;
  Lowest().close(ec);
  if (options_.tls) {
    tls_context_ = options_.tls->Get();
    tls_ = std::make_shared<asio::ssl::stream<tcp::socket>>(io_, *tls_context_);
    const std::string& name =
        options_.tls_server_name.empty() ? options_.host : options_.tls_server_name;
    boost::system::error_code not_ip;
    asio::ip::make_address(name, not_ip);
    if (not_ip) {
      // SNI names a host, never an address (RFC 6066 3); SSL_set_tlsext_host_name without
      // the macro's C cast.
      SSL_ctrl(tls_->native_handle(), SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name,
               const_cast<char*>(name.c_str()));
    }
    if (options_.tls_verify) {
      tls_->set_verify_mode(asio::ssl::verify_peer);
      // OpenSSL's own check, so a failure says which ("hostname mismatch", "IP address
      // mismatch") rather than an unspecified verification error.
      if (not_ip) {
        SSL_set1_host(tls_->native_handle(), name.c_str());
      } else {
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(tls_->native_handle()), name.c_str());
      }
    } else {
      tls_->set_verify_mode(asio::ssl::verify_none);
    }
  } else {
    socket_ = tcp::socket(io_);
  }
  connect_deadline_ = std::chrono::steady_clock::now() + options_.connect_timeout;
  ArmTimer();  // the connect timeout bounds a name's resolution too
  const auto connected = [self = shared_from_this(), epoch = epoch_](
                             const boost::system::error_code& err, const auto&...) {
    if (epoch != self->epoch_) return;
    if (err) return self->Fail("connect: " + err.message());
    self->OnConnected();
  };
  const asio::ip::address ip = asio::ip::make_address(options_.host, ec);
  if (!ec) return Lowest().async_connect(tcp::endpoint(ip, options_.port), connected);
  // A name (a cluster announcing hostnames, a Kubernetes service) resolves once per
  // (re)connect, off the loop: asio's resolver waits on DNS in a thread of its own, so a
  // slow server holds this connection only, never the worker's requests.
  resolver_.emplace(io_);  // (an earlier attempt's was cancelled when it ended)
  resolver_->async_resolve(
      options_.host, std::to_string(options_.port),
      [self = shared_from_this(), epoch = epoch_, connected](
          const boost::system::error_code& err, const tcp::resolver::results_type& endpoints) {
        if (epoch != self->epoch_) return;
        if (err) return self->Fail("cannot resolve " + self->options_.host + ": " + err.message());
        asio::async_connect(self->Lowest(), endpoints, connected);
      });
}

void Connection::OnConnected() {
  boost::system::error_code ec;
  Lowest().set_option(tcp::no_delay(true), ec);
  // Flush's direct send must not block the loop on a full socket buffer.
  Lowest().non_blocking(true, ec);
  if (!tls_) return OnSecured();
  handshaking_ = true;
  tls_->async_handshake(asio::ssl::stream_base::client, [self = shared_from_this(), epoch = epoch_,
                                                         stream = tls_](
                                                            const boost::system::error_code& err) {
    if (epoch != self->epoch_) return;
    if (err)
      return self->Fail("TLS handshake: " + err.message() + VerifyFailure(stream->native_handle()));
    self->OnSecured();
  });
}

void Connection::OnSecured() {
  state_ = State::kReady;
  handshaking_ = false;
  greeted_ = false;
  last_error_.clear();
  // The connection is usable once Redis has answered on it: AUTH, or a PING without one. A
  // connection that only connected may be to a TLS port spoken to in clear, or to a Redis
  // that requires a password (NOAUTH), which a decision would find out only by failing.
  // A username alone is an ACL user without a password (`nopass`): AUTH names it all the
  // same, or the connection would run as the `default` user.
  std::string first;
  const bool auth = !options_.password.empty() || !options_.username.empty();
  greeting_ = auth ? "AUTH" : "PING";
  if (!auth) {
    AppendCommand(first, {"PING"});
  } else if (options_.username.empty()) {
    AppendCommand(first, {"AUTH", options_.password});
  } else {
    AppendCommand(first, {"AUTH", options_.username, options_.password});
  }
  out_.insert(0, first);
  auto now = std::chrono::steady_clock::now();
  pending_.push_front({now + options_.connect_timeout, now,
                       [self = shared_from_this(), auth](CallError err, const Reply& r) {
                         // Timed out: the connection's stall limit decides, and an answer
                         // that comes late still makes it usable (Read).
                         if (err != CallError::kNone) return;
                         if (r.is_error()) return self->Fail((auth ? "AUTH: " : "PING: ") + r.str);
                         self->Usable();
                       },
                       first.size(), /*droppable=*/false});
  ++unsent_;
  Read();
  Flush();
}

void Connection::Usable() {
  usable_said_ = std::chrono::steady_clock::now();
  if (options_.on_reachability) options_.on_reachability("");
}

void Connection::Call(std::span<const std::string_view> args, SteadyTime deadline,
                      Callback callback) {
  if (state_ == State::kIdle) Connect();
  if (state_ == State::kClosed || (state_ == State::kBackoff && !hold_in_backoff_)) {
    asio::post(io_, [cb = std::move(callback)] { cb(CallError::kConnection, kNoReply); });
    return;
  }
  size_t before = out_.size();
  AppendCommand(out_, args);
  pending_.push_back(
      {deadline, std::chrono::steady_clock::now(), std::move(callback), out_.size() - before});
  ++unsent_;
  // Written once the handlers that are ready now have run: the commands of every request
  // this loop turn decides go out in one write, and Redis reads and answers them as one
  // batch (a system call per batch, not per command, on both sides).
  if (!flush_posted_) {
    flush_posted_ = true;
    asio::post(io_, [self = shared_from_this()] {
      self->flush_posted_ = false;
      self->Flush();
    });
  }
  ArmAt(deadline);
}

void Connection::Flush() {
  if (write_in_flight_ || state_ != State::kReady || out_.empty()) return;
  unsent_ = 0;
  if (!tls_) {
    // A send the socket takes whole needs no asynchronous operation (nor its completion
    // handler, which would hold back the next batch until the loop runs it). An error is
    // left to the asynchronous write to meet and report, so no callback runs in here.
    boost::system::error_code ec;
    size_t n = socket_.write_some(asio::buffer(out_), ec);
    if (!ec && n == out_.size()) return out_.clear();
    if (!ec) out_.erase(0, n);
  }
  std::swap(out_, writing_);
  write_in_flight_ = true;
  auto done = [self = shared_from_this(), epoch = epoch_, stream = tls_](
                  const boost::system::error_code& ec, size_t) {
    if (epoch != self->epoch_) return;
    self->write_in_flight_ = false;
    self->writing_.clear();
    if (ec) return self->Fail("write: " + ec.message());
    self->Flush();
  };
  if (tls_) {
    asio::async_write(*tls_, asio::buffer(writing_), std::move(done));
  } else {
    asio::async_write(socket_, asio::buffer(writing_), std::move(done));
  }
}

void Connection::Read() {
  auto on_read = [self = shared_from_this(), epoch = epoch_, stream = tls_](
                     const boost::system::error_code& ec, size_t n) {
    if (epoch != self->epoch_) return;
    if (ec) {
      // Redis answers why, then closes (maxclients): the close names that answer.
      // A TLS port spoken to in clear resets (or closes) the connection before any answer.
      const char* hint = !self->greeted_ && !self->tls_ && self->last_error_.empty()
                             ? " before answering (does it expect TLS? see store.tls)"
                             : "";
      if (ec != asio::error::eof) return self->Fail("read: " + ec.message() + hint);
      // An error answer names the close only when it came just before: a NOSCRIPT or MOVED
      // minutes earlier says nothing of why Redis went away.
      const bool named =
          !self->last_error_.empty() &&
          std::chrono::steady_clock::now() - self->last_error_at_ <= kErrorNamesClose;
      return self->Fail(named ? "closed by Redis after: " + self->last_error_
                              : std::string("closed by Redis") + hint);
    }
    self->in_.append(self->read_buf_.data(), n);
    for (;;) {
      size_t used = 0;
      ParseStatus st =
          ParseReply(std::string_view(self->in_).substr(self->in_start_), self->reply_, &used);
      if (st == ParseStatus::kIncomplete) break;
      if (st == ParseStatus::kProtocolError) return self->Fail("malformed reply");
      self->in_start_ += used;
      if (self->pending_.empty()) {
        // Redis says why it drops a connection it will not serve (maxclients, a kill).
        return self->Fail(self->reply_.is_error() ? "reply to no command: " + self->reply_.str
                                                  : std::string("reply to no command"));
      }
      Pending p = std::move(self->pending_.front());
      self->pending_.pop_front();
      if (self->reply_.is_error()) {
        self->last_error_ = self->reply_.str;
        self->last_error_at_ = std::chrono::steady_clock::now();
      } else {
        self->last_error_.clear();
        // Still answering: said now and then (not per reply: the record is shared by every
        // worker), so a node one of whose pooled connections fails is not taken as down.
        if (self->greeted_ && p.sent - self->usable_said_ >= kUsableSaidEvery) self->Usable();
      }
      if (!self->greeted_) {  // the answer to AUTH or PING (OnSecured)
        self->greeted_ = true;
        if (!p.callback) {  // it came past its deadline: what its callback would have done
          if (self->reply_.is_error()) {
            return self->Fail(std::string(self->greeting_) + ": " + self->reply_.str);
          }
          self->Usable();
        }
      }
      // Redis answers: back to fast retries (not on an error: a refused AUTH must back off).
      if (!self->reply_.is_error()) self->backoff_ = std::chrono::milliseconds{0};
      if (p.callback) p.callback(CallError::kNone, self->reply_);
      if (epoch != self->epoch_) return;  // the callback closed the connection
    }
    if (self->in_start_ == self->in_.size()) {
      self->in_.clear();
      self->in_start_ = 0;
    } else if (self->in_start_ > 65536) {
      self->in_.erase(0, self->in_start_);
      self->in_start_ = 0;
    }
    self->Read();
  };
  if (tls_) {
    tls_->async_read_some(asio::buffer(read_buf_), std::move(on_read));
  } else {
    socket_.async_read_some(asio::buffer(read_buf_), std::move(on_read));
  }
}

void Connection::ArmTimer() {
  // The earliest of: the connect deadline, any pending call's deadline (AUTH and topology
  // calls carry their own, so deadlines are not ordered along the queue), and the stall
  // limit of the oldest call, which only a connection can have stalled on (calls held in a
  // backoff have gone nowhere yet). O(pending): run per timer expiry, not per call.
  SteadyTime at = SteadyTime::max();
  if (state_ == State::kConnecting) at = connect_deadline_;
  for (const Pending& p : pending_) {
    if (p.callback) at = std::min(at, p.deadline);
  }
  if (!pending_.empty() && state_ != State::kBackoff) {
    at = std::min(at, pending_.front().sent + options_.stall_timeout);
  }
  if (at != SteadyTime::max()) ArmAt(at);
}

void Connection::ArmAt(SteadyTime at) {
  if (timer_armed_ && timer_at_ <= at) return;
  timer_armed_ = true;
  timer_at_ = at;
  timer_.expires_at(at);
  timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec == asio::error::operation_aborted) return;  // re-armed earlier, or closed
    self->timer_armed_ = false;
    self->OnTimer();
  });
}

void Connection::OnTimer() {
  if (state_ == State::kClosed) return;
  auto now = std::chrono::steady_clock::now();
  if (state_ == State::kBackoff) {
    // Calls held for the redial (all unwritten) still end at their deadlines: the redial
    // may be later than they can wait, or, for a node the slot map no longer names, never.
    uint64_t epoch = epoch_;
    DropUnsentLate(now);
    if (epoch == epoch_ && state_ == State::kBackoff) ArmTimer();
    return;
  }
  if (state_ == State::kConnecting && now >= connect_deadline_) {
    return Fail(handshaking_ ? "TLS handshake timed out (does the server speak TLS on this port?)"
                             : "connect timed out");
  }
  uint64_t epoch = epoch_;
  DropUnsentLate(now);
  if (epoch != epoch_) return;
  for (size_t i = 0; i < pending_.size(); ++i) {
    Pending& p = pending_[i];
    if (!p.callback || p.deadline > now) continue;
    auto cb = std::move(p.callback);
    p.callback = nullptr;
    cb(CallError::kTimeout, kNoReply);  // the reply, if it comes, is read and dropped
    if (epoch != epoch_) return;
  }
  if (!pending_.empty() && pending_.front().sent + options_.stall_timeout <= now) {
    return Fail(
        "no reply for " +
        std::to_string(
            std::chrono::duration_cast<std::chrono::milliseconds>(options_.stall_timeout).count()) +
        " ms");
  }
  ArmTimer();
}

// Calls past their deadline whose commands are still unwritten (the connection is being
// made, or Redis stopped reading and the previous write has not finished) are taken back:
// Redis never runs them, so a request already answered by its fail mode spends nothing
// there once Redis is back. A command already written cannot be taken back; see
// docs/design.md on timeouts.
void Connection::DropUnsentLate(SteadyTime now) {
  if (unsent_ == 0) return;
  size_t first = pending_.size() - unsent_, kept_to = first, offset = 0;
  std::string kept;
  std::vector<Callback> late;
  for (size_t i = first; i < pending_.size(); ++i) {
    Pending& p = pending_[i];
    if (p.droppable && p.deadline <= now) {
      if (p.callback) late.push_back(std::move(p.callback));
    } else {
      kept.append(out_, offset, p.bytes);
      if (kept_to != i) pending_[kept_to] = std::move(p);
      ++kept_to;
    }
    offset += p.bytes;
  }
  if (late.empty() && kept_to == pending_.size()) return;
  pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(kept_to), pending_.end());
  unsent_ = kept_to - first;
  out_ = std::move(kept);
  uint64_t epoch = epoch_;
  for (Callback& cb : late) {
    cb(CallError::kTimeout, kNoReply);
    if (epoch != epoch_) return;  // the callback closed the connection
  }
}

void Connection::Fail(std::string_view why) {
  if (state_ == State::kClosed) return;
  if (options_.on_reachability) options_.on_reachability(why);
  if (g_connect_log.Allow()) {
    Log("WARN", "redis " + address() + ": " + std::string(why) + "; reconnecting");
  }
  ++epoch_;
  boost::system::error_code ec;
  Lowest().close(ec);
  if (resolver_) resolver_->cancel();
  timer_.cancel();
  timer_armed_ = false;
  const bool was_ready = state_ == State::kReady;
  state_ = State::kBackoff;
  write_in_flight_ = false;
  out_.clear();
  unsent_ = 0;
  writing_.clear();
  in_.clear();
  in_start_ = 0;
  auto failed = std::move(pending_);
  pending_.clear();
  // A connection that was up and answering (no backoff since its last reply) was most
  // likely dropped, not refused: by an idle timeout, a proxy, CLIENT KILL. Calls made
  // during its first, short backoff wait for the redial (up to their deadlines)
  // instead of failing at once, so the drop costs only the calls it caught. Later
  // backoffs, and those of a connection that never came up, fail calls at once.
  hold_in_backoff_ = was_ready && backoff_.count() == 0;
  backoff_ = std::clamp(backoff_ * 2, kMinBackoff, kMaxBackoff);
  backoff_timer_.expires_after(backoff_);
  backoff_timer_.async_wait(
      [self = shared_from_this(), epoch = epoch_](const boost::system::error_code& err) {
        if (err || epoch != self->epoch_ || self->state_ != State::kBackoff) return;
        // Calls held for the redial dial regardless: an ASK sends calls to a node no slot
        // of the map names (it is importing one), and they wait for it.
        if (self->options_.redial && !self->options_.redial() && self->pending_.empty()) {
          self->state_ = State::kIdle;  // the next call dials
          return;
        }
        self->Connect();
      });
  for (Pending& p : failed) {
    if (p.callback) p.callback(CallError::kConnection, kNoReply);
  }
}

void Connection::Close() {
  if (state_ == State::kClosed) return;
  ++epoch_;
  state_ = State::kClosed;
  boost::system::error_code ec;
  Lowest().close(ec);
  if (resolver_) resolver_->cancel();
  timer_.cancel();
  backoff_timer_.cancel();
  out_.clear();
  unsent_ = 0;
  auto failed = std::move(pending_);
  pending_.clear();
  for (Pending& p : failed) {
    if (p.callback) p.callback(CallError::kConnection, kNoReply);
  }
}

}  // namespace sluice::redis
