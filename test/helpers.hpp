// test/helpers.hpp - what every file of the specification shares (the files are listed in
// ../test.cpp). Every wait is bounded: run_until() and drain() fail a check instead of hanging.
#pragma once
#include <doctest/doctest.h>

#include "allocations.hpp"
#include "coro_jobs.hpp"

#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace coro_jobs;
using namespace std::chrono_literals;
using std::chrono::steady_clock;

// Drives the loop until pred() holds. A guard timer wakes a blocked iteration at the
// deadline, so a hang becomes a failed check.
template <class Pred>
bool run_until(event_loop& loop, Pred pred, std::chrono::milliseconds limit = 10s) {
  bool expired = false;
  auto guard = loop.call_later(limit, [&] { expired = true; });
  while (!pred() && !expired) loop.run_once();
  guard.cancel();
  return pred();
}

// Runs the loop until nothing is pending, failing if that takes longer than limit. (A
// guard timer would keep the loop pending, so the deadline is checked per iteration.)
inline void drain(event_loop& loop, std::chrono::milliseconds limit = 10s) {
  const auto stop = steady_clock::now() + limit;
  bool idle = false;
  while (steady_clock::now() < stop)
    if (!loop.run_once()) {
      idle = true;
      break;
    }
  CHECK(idle);
}

// Runs one job to its end on a fresh loop (drained, with drain's deadline) and returns its
// result, or rethrows its error: for tests whose whole subject is what one job body yields.
template <class Body>
auto run_job(Body body) {
  event_loop loop;
  auto h = start_job(loop, std::move(body));
  drain(loop);
  REQUIRE(h.done());
  return h.result();
}

// Unblocks a wait that must not happen: if `done` is not set within 10 s, calls `rescue`, so
// that a regression fails the test instead of hanging it.
struct rescuer {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  std::atomic<bool> fired{false};
  std::thread t;
  template <class F>
  explicit rescuer(F rescue) : t([this, rescue] {
                                 std::unique_lock<std::mutex> lock(m);
                                 if (!cv.wait_for(lock, 10s, [this] { return done; })) {
                                   fired = true;
                                   rescue();
                                 }
                               }) {}
  ~rescuer() {
    {
      std::lock_guard<std::mutex> lock(m);
      done = true;
    }
    cv.notify_one();
    t.join();
  }
};

// Counts live instances: every frame that holds one must be destroyed by the end.
struct live {
  static inline int count = 0;
  live() { ++count; }
  live(const live&) { ++count; }
  ~live() { --count; }
};

// The fixture of every test that makes `live` objects (TEST_CASE_FIXTURE(no_live_left, ...)):
// the count starts at zero, and none may be left once the test's loops and handles are gone.
struct no_live_left {
  no_live_left() { live::count = 0; }
  ~no_live_left() { CHECK_MESSAGE(live::count == 0, "live objects left at the end of the test"); }
  no_live_left(const no_live_left&) = delete;
  no_live_left& operator=(const no_live_left&) = delete;
};

// Collects what reaches the loop's error handler.
struct error_log {
  std::vector<std::string> names, whats;
  explicit error_log(event_loop& loop) {
    loop.set_error_handler([this](std::string_view name, std::exception_ptr e) {
      names.emplace_back(name);
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        whats.emplace_back(x.what());
      }
    });
  }
};

// Runs fn with stderr sent to a temporary file, and returns what was written there.
template <class F>
std::string stderr_of(F fn) {
  std::fflush(stderr);
  const int saved = ::dup(2);
  char path[] = "/tmp/coro_jobs_stderrXXXXXX";
  const int fd = ::mkstemp(path);
  REQUIRE(fd >= 0);
  ::dup2(fd, 2);
  fn();
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  ::close(fd);
  std::ifstream f(path);
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  ::unlink(path);
  return text;
}

struct pipe_fds {
  int r = -1, w = -1;
  pipe_fds() {
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    r = fds[0];
    w = fds[1];
  }
  ~pipe_fds() {
    if (r >= 0) ::close(r);
    if (w >= 0) ::close(w);
  }
};

inline loop_options manual() {
  loop_options o;
  o.manual_clock = true;
  return o;
}
inline job<int> after(std::chrono::milliseconds d, int v) {
  live guard;
  co_await sleep_task(d);
  co_return v;
}
inline job<int> fail_after(std::chrono::milliseconds d, std::string what) {
  live guard;
  co_await sleep_task(d);
  throw std::runtime_error(what);
}
inline job<int> value_of(int v) { co_return v; }
inline job<> set_flag(bool& flag) {
  flag = true;
  co_return;
}
inline job<int> fails_with(std::string what) {
  co_await sleep_task(0s);
  throw std::runtime_error(what);
}
