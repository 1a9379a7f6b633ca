// Reloader: runs config reloads on a thread of its own, one at a time, in the order they
// were asked for.
//
// A reload reads, parses and compiles a whole file; a large one takes a second or more.
// Run where it is asked for (the file watcher's tick and SIGHUP on a worker's loop, POST
// /v1/reload on whichever worker holds the admin connection), it would hold that worker's
// requests for all of it. Here the workers only post the work, and the new rules are
// swapped in when ready. One thread also orders the reloads: each reads the file afresh,
// so the last one asked for applies the newest file.
//
// Thread-safety: Post from any thread. Stop, or the destructor, lets the reload in progress
// finish, drops those still queued and joins the thread: stop it before anything its work
// uses is destroyed.
#ifndef SLUICE_SERVER_RELOADER_H_
#define SLUICE_SERVER_RELOADER_H_

#include <functional>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

namespace sluice::server {

class Reloader {
 public:
  Reloader();
  ~Reloader();
  Reloader(const Reloader&) = delete;
  Reloader& operator=(const Reloader&) = delete;

  // Queues `work` to run on the reload thread after the work queued before it.
  void Post(std::function<void()> work);

  // Lets the work in progress finish, drops what is queued and joins the thread; work
  // posted later is dropped too. From any thread but the reload thread; idempotent.
  void Stop();

 private:
  boost::asio::io_context io_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> keep_running_;
  std::thread thread_;
};

}  // namespace sluice::server

#endif  // SLUICE_SERVER_RELOADER_H_
