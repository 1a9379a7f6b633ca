#include "server/reloader.h"

#include <boost/asio/post.hpp>

namespace sluice::server {

Reloader::Reloader()
    : keep_running_(boost::asio::make_work_guard(io_)), thread_([this] { io_.run(); }) {}

Reloader::~Reloader() { Stop(); }

void Reloader::Stop() {
  keep_running_.reset();
  io_.stop();
  if (thread_.joinable()) thread_.join();
}

void Reloader::Post(std::function<void()> work) { boost::asio::post(io_, std::move(work)); }

}  // namespace sluice::server
