// hosts/coro_jobs_guest.hpp - run a coro_jobs::event_loop as a guest of any host loop that
// offers only a thread-safe "run this on your thread" (SDL_PushEvent, wxWidgets CallAfter,
// Win32 PostMessage, an editor's plugin API), as Trio's guest mode does. C++20 and POSIX.
//
//     auto guest = coro_jobs::attach_to_host(loop, [](std::function<void()> fn) {
//       my_toolkit_run_on_ui_thread(std::move(fn));   // thread-safe, returns at once
//     });
//
// How: a helper thread makes the loop's blocking wait (ppoll on the fds and timeout that
// prepare_host_wait gave), then posts one dispatch to the host's thread, which runs a
// non-blocking iteration (run_once(0s)) and hands the helper the next wait. Jobs, callbacks
// and every loop function run on the host's thread only; the helper touches nothing of the
// loop's but a copy of its pollfds. One dispatch is in flight at a time.
//
// Cost per wakeup: one wake of the helper thread, one post to the host and a
// condition-variable handoff back to the helper (README: W7). When work is ready after a
// dispatch (a zero timeout), the next dispatch is posted at once and the helper sleeps on.
//
// Rules: post_to_host_thread must be callable from any thread and must not run fn inline.
// Destroying the attachment (on the host's thread) stops and joins the helper; destroying
// the loop first is safe. A dispatch still queued in the host then does nothing.
#ifndef CORO_JOBS_GUEST_HPP
#define CORO_JOBS_GUEST_HPP

#include "coro_jobs.hpp"

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

namespace coro_jobs {

namespace guest_detail {

struct state : std::enable_shared_from_this<state> {
  event_loop* loop = nullptr;  // the host thread's; null once detached or the loop is gone
  std::function<void(std::function<void()>)> post;
  std::mutex m;
  std::condition_variable cv;
  std::vector<pollfd> fds;  // guarded by m: the wait the helper makes next
  std::chrono::steady_clock::duration timeout{};
  enum class phase { dispatching, armed, stopping } at = phase::dispatching;  // guarded by m
  std::atomic<bool> ready{false};    // at != dispatching, readable without the lock
  int stop_rfd = -1, stop_wfd = -1;  // wakes the helper's ppoll when stopping
  std::thread helper;

  ~state() {
    if (stop_rfd >= 0) ::close(stop_rfd);
    if (stop_wfd >= 0) ::close(stop_wfd);
  }

  // Host thread: hand the helper the next wait. Work is ready (a zero timeout, as after a
  // thread function's result the loop spun for): no wait to make, so the next dispatch is
  // posted from here, without waking the helper (README: W7, the guest round trip).
  void arm() {
    const auto w = loop->prepare_host_wait();
    if (w.timeout == w.timeout.zero()) return post_dispatch();
    std::lock_guard<std::mutex> lock(m);
    if (at == phase::stopping) return;
    fds.assign(w.fds.begin(), w.fds.end());
    timeout = w.timeout;
    at = phase::armed;
    ready.store(true, std::memory_order_release);
    cv.notify_one();
  }
  // Host thread: the helper's wait ended.
  void dispatch() {
    if (!loop) return;
    try {
      loop->run_once(std::chrono::seconds(0));
    } catch (...) {  // the error handler threw: the host gets it, and the helper waits on
      if (loop) arm();
      throw;
    }
    if (loop) arm();
  }
  // Helper thread.
  void wait_loop() {
    std::vector<pollfd> mine;
    for (;;) {
      std::chrono::steady_clock::duration t;
      // The host's dispatch is often microseconds away: spin briefly before sleeping, as
      // the loop does for a worker's result (coro_jobs.hpp, NOTES: spin before block).
      detail::spin_until([this] { return ready.load(std::memory_order_acquire); });
      {
        std::unique_lock<std::mutex> lock(m);
        cv.wait(lock, [&] { return at != phase::dispatching; });
        ready.store(false, std::memory_order_relaxed);
        if (at == phase::stopping) return;
        mine = fds;
        t = timeout;
        at = phase::dispatching;
      }
      mine.push_back({stop_rfd, POLLIN, 0});
      timespec ts{}, *tsp = nullptr;
      if (t >= t.zero()) {
        const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t).count();
        ts.tv_sec = time_t(ns / 1000000000);
        ts.tv_nsec = long(ns % 1000000000);
        tsp = &ts;
      }
      while (::ppoll(mine.data(), nfds_t(mine.size()), tsp, nullptr) < 0 && errno == EINTR) {
      }
      if (mine.back().revents) return;  // stopping
      post_dispatch();
    }
  }
  // Either thread: one non-blocking iteration, on the host's thread.
  void post_dispatch() {
    post([w = weak_from_this()] {
      if (auto s = w.lock()) s->dispatch();
    });
  }
  // Host thread: stops and joins the helper; the loop is let go.
  void stop() noexcept {
    {
      std::lock_guard<std::mutex> lock(m);
      at = phase::stopping;
      ready.store(true, std::memory_order_release);
      cv.notify_one();
    }
    const char c = 1;
    [[maybe_unused]] auto n = ::write(stop_wfd, &c, 1);
    if (helper.joinable()) helper.join();
    loop = nullptr;
  }
};

}  // namespace guest_detail

/// While it lives, the loop runs as a guest of the host whose post function it was given.
/// Move-only.
class host_attachment {
 public:
  host_attachment() noexcept = default;
  host_attachment(host_attachment&&) noexcept = default;
  host_attachment& operator=(host_attachment&& o) noexcept {
    if (this != &o) {
      reset();
      st_ = std::move(o.st_);
    }
    return *this;
  }
  ~host_attachment() { reset(); }
  /// Detaches now: stops the helper thread (the loop may be used with run() again).
  void reset() noexcept {
    auto st = std::move(st_);
    if (!st || !st->loop) return;
    event_loop* l = st->loop;
    st->stop();
    l->detach_host();
  }
  explicit operator bool() const noexcept { return st_ != nullptr; }

 private:
  friend host_attachment attach_to_host(event_loop&, std::function<void(std::function<void()>)>);
  std::shared_ptr<guest_detail::state> st_;
};

/// Attaches loop to a host that runs posted functions on the loop's thread.
/// std::invalid_argument for an empty post function; std::logic_error if the loop is
/// attached already or this is not the loop's thread.
inline host_attachment attach_to_host(
    event_loop& loop, std::function<void(std::function<void()>)> post_to_host_thread) {
  if (!post_to_host_thread)
    throw std::invalid_argument("coro_jobs: attach_to_host needs a post function");
  auto st = std::make_shared<guest_detail::state>();
  st->post = std::move(post_to_host_thread);
  int p[2];
  if (::pipe(p) != 0) throw std::system_error(errno, std::generic_category(), "coro_jobs: pipe");
  st->stop_rfd = p[0];
  st->stop_wfd = p[1];
  for (int fd : p) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  std::weak_ptr<guest_detail::state> w = st;
  loop.attach_host([w] {
    if (auto s = w.lock()) s->stop();
  });
  st->loop = &loop;
  try {
    st->arm();
    st->helper = std::thread([s = st.get()] { s->wait_loop(); });
  } catch (...) {
    st->loop = nullptr;
    loop.detach_host();
    throw;
  }
  host_attachment a;
  a.st_ = std::move(st);
  return a;
}

}  // namespace coro_jobs

#endif  // CORO_JOBS_GUEST_HPP
