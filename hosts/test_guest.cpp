// hosts/test_guest.cpp - the adapter cases for the guest mode, under a host written here: a
// thread-safe queue of functions and its own timers, as a toolkit without fds would be.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "hosts/coro_jobs_guest.hpp"

#include <doctest/doctest.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>

namespace {

struct host {
  std::mutex m;
  std::condition_variable cv;
  std::deque<std::function<void()>> posted;  // guarded by m
  // Touched on the host thread only.
  std::multimap<std::chrono::steady_clock::time_point, std::function<void()>> timers;
  long blocking = 0;
  coro_jobs::host_attachment attachment;

  void post(std::function<void()> fn) {
    std::lock_guard<std::mutex> lock(m);
    posted.push_back(std::move(fn));
    cv.notify_one();
  }
  void attach(coro_jobs::event_loop& l) {
    attachment =
        coro_jobs::attach_to_host(l, [this](std::function<void()> fn) { post(std::move(fn)); });
  }
  void detach() { attachment.reset(); }
  long waits() const { return blocking; }
  void after(std::chrono::milliseconds d, std::function<void()> fn) {
    timers.emplace(std::chrono::steady_clock::now() + d, std::move(fn));
  }
  void idle(std::function<void()> fn) { post(std::move(fn)); }
  // One host iteration: wait for a posted function or the first timer, then run what is due.
  void iterate(std::chrono::steady_clock::time_point until) {
    std::deque<std::function<void()>> batch;
    {
      std::unique_lock<std::mutex> lock(m);
      if (!timers.empty()) until = std::min(until, timers.begin()->first);
      if (posted.empty()) {
        ++blocking;
        cv.wait_until(lock, until, [&] { return !posted.empty(); });
      }
      batch.swap(posted);
    }
    for (auto& fn : batch) fn();
    const auto now = std::chrono::steady_clock::now();
    while (!timers.empty() && timers.begin()->first <= now) {
      auto fn = std::move(timers.begin()->second);
      timers.erase(timers.begin());
      fn();
    }
  }
  template <class Pred> bool run_until(Pred pred, std::chrono::milliseconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!pred() && std::chrono::steady_clock::now() < end) iterate(end);
    return pred();
  }
  ~host() {
    attachment.reset();
    posted.clear();
  }
};

}  // namespace

#define HOST_NAME "guest mode"
#include "hosts/test_common.hpp"

TEST_SUITE("guest mode: its own") {

// With work ready after a dispatch there is no wait to make: the next dispatch is posted
// from the host's thread, and the helper thread is not woken for it (W7 guest round trip).
TEST_CASE(
    "a guest loop with work ready posts its next dispatch itself, not through the helper thread") {
  event_loop loop;
  std::atomic<int> from_helper{0};
  const auto host_thread = std::this_thread::get_id();
  host h;
  h.attachment = attach_to_host(loop, [&](std::function<void()> fn) {
    if (std::this_thread::get_id() != host_thread) ++from_helper;
    h.post(std::move(fn));
  });
  int turns = 0;
  auto j = start_job(loop, [](int& turns) -> job<> {
    for (; turns < 100; ++turns) co_await next_iteration();
  }(turns));
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  CHECK(turns == 100);
  CHECK(from_helper.load() <= 1);  // at most the first, if the start landed while the helper waited
}

}  // TEST_SUITE
