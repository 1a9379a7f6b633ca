#include "server/reloader.h"

#include <exception>
#include <string>

#include <boost/asio/post.hpp>

#include "core/log.h"

namespace sluice::server {

Reloader::Reloader()
    : keep_running_(boost::asio::make_work_guard(io_)), thread_([this] { io_.run(); }) {}

Reloader::~Reloader() { Stop(); }

void Reloader::Stop() {
  keep_running_.reset();
  io_.stop();
  if (thread_.joinable()) thread_.join();
}

void Reloader::Post(std::function<void()> work) {
  // A reload that throws (out of memory building a huge rule set) fails alone: the thread,
  // and the process, go on with the rules they have.
  boost::asio::post(io_, [work = std::move(work)] {
    try {
      work();
    } catch (const std::exception& e) {
      Log("ERROR", std::string("a reload failed, the running rules stay: ") + e.what());
    }
  });
}

}  // namespace sluice::server
