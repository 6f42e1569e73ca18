// hosts/test_common.hpp - the same cases for every host adapter. The including file defines
// `struct host` with:
//   void attach(event_loop&)                       attach the loop to this host
//   void detach()                                  drop the attachment
//   bool run_until(pred, std::chrono::milliseconds deadline)  iterate the host until pred()
//                                                  or the deadline; returns pred()
//   void after(std::chrono::milliseconds d, fn)    a host timer: fn() on the host's thread
//   void idle(fn)                                  a host idle callback: fn() once, soon
//   long waits()                                   blocking waits the host has made so far
// and HOST_NAME, then includes this file.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

using namespace coro_jobs;
using namespace std::chrono_literals;

namespace {

constexpr auto deadline = 10s;  // a hang fails instead of sticking

long cpu_us() {
  rusage r{};
  getrusage(RUSAGE_SELF, &r);
  return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1000000L + r.ru_utime.tv_usec +
         r.ru_stime.tv_usec;
}

struct counted {  // an RAII object in a job's frame
  static inline int live = 0;
  counted() { ++live; }
  counted(const counted&) = delete;
  ~counted() { --live; }
};

}  // namespace

TEST_SUITE(HOST_NAME) {

TEST_CASE("a job's sleep ends, no earlier than asked, under the host loop") {
  event_loop loop;
  host h;
  h.attach(loop);
  auto j = start_job(loop, []() -> job<std::chrono::steady_clock::duration> {
    co_return co_await sleep_task(20ms);
  }());
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  CHECK(j.result() >= 20ms);
}

TEST_CASE("a threaded_task round trip completes under the host loop") {
  event_loop loop;
  host h;
  h.attach(loop);
  const auto host_thread = std::this_thread::get_id();
  auto j = start_job(loop, [](std::thread::id me) -> job<bool> {
    auto worker = co_await threaded_task([] { return std::this_thread::get_id(); });
    co_return worker != me&& std::this_thread::get_id() == me;
  }(host_thread));
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  CHECK(j.result());
}

TEST_CASE("a post from another thread wakes the idle host loop") {
  event_loop loop;
  host h;
  h.attach(loop);
  bool ran = false;
  std::thread t([&] { loop.post([&] { ran = true; }); });
  REQUIRE(h.run_until([&] { return ran; }, deadline));
  t.join();
}

TEST_CASE("a task_return called from another thread resumes its job under the host loop") {
  event_loop loop;
  host h;
  h.attach(loop);
  std::thread t;
  auto j = start_job(loop, [](std::thread& t) -> job<int> {
    co_return co_await callback_task<int>(
        [&t](task_return<int> ret) { t = std::thread([ret] { ret(42); }); });
  }(t));
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  CHECK(j.result() == 42);
  t.join();
}

TEST_CASE("wait_readable on a pipe resumes when another thread writes to it, under the host loop") {
  event_loop loop;
  host h;
  h.attach(loop);
  int p[2];
  REQUIRE(::pipe(p) == 0);
  auto j =
      start_job(loop, [](int fd) -> job<short> { co_return co_await wait_readable(fd); }(p[0]));
  REQUIRE(h.run_until([&] { return loop.stats().fd_waits == 1; }, deadline));
  std::thread t([&] { CHECK(::write(p[1], "x", 1) == 1); });
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  CHECK((j.result() & POLLIN) != 0);
  t.join();
  ::close(p[0]);
  ::close(p[1]);
}

TEST_CASE("call_later runs its callback under the host loop") {
  event_loop loop;
  host h;
  h.attach(loop);
  bool ran = false;
  auto cb = loop.call_later(5ms, [&] { ran = true; });
  REQUIRE(h.run_until([&] { return ran; }, deadline));
  CHECK_FALSE(cb.active());
}

TEST_CASE("cancelling a sleeping job from a host callback unwinds it") {
  event_loop loop;
  host h;
  h.attach(loop);
  auto j = start_job(loop, []() -> job<> {
    counted c;
    co_await sleep_task(1h);
  }());
  h.after(10ms, [&] { j.cancel(); });
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  CHECK_THROWS_AS(j.result(), job_cancelled);
  CHECK(counted::live == 0);
  CHECK(loop.stats().timers == 0);
}

TEST_CASE("with_timeout times out under the host loop") {
  event_loop loop;
  host h;
  h.attach(loop);
  auto j = start_job(loop, []() -> job<> { co_await with_timeout(10ms, sleep_task(1h)); }());
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  CHECK_THROWS_AS(j.result(), timeout_error);
}

TEST_CASE("a job scope closed from a host callback has unwound its jobs when cancel_all returns") {
  event_loop loop;
  host h;
  h.attach(loop);
  job_scope scope(loop);
  for (int i = 0; i < 3; ++i)
    scope.start([]() -> job<> {
      counted c;
      co_await sleep_task(1h);
    }());
  REQUIRE(h.run_until([&] { return counted::live == 3; }, deadline));
  std::size_t closed = 0;
  int live_after = -1;
  h.after(5ms, [&] {
    closed = scope.cancel_all();
    live_after = counted::live;
  });
  REQUIRE(h.run_until([&] { return live_after >= 0; }, deadline));
  CHECK(closed == 3);
  CHECK(live_after == 0);
}

TEST_CASE("the host's own timers and idle callbacks interleave with jobs") {
  event_loop loop;
  host h;
  h.attach(loop);
  int ticks = 0, steps = 0;
  bool idled = false;
  auto j = start_job(loop, [](int& steps) -> job<> {
    for (int i = 0; i < 5; ++i) {
      co_await sleep_task(5ms);
      ++steps;
    }
  }(steps));
  std::function<void()> tick = [&] {
    ++ticks;
    if (!j.done()) h.after(2ms, tick);
  };
  h.after(2ms, tick);
  h.idle([&] { idled = true; });
  REQUIRE(h.run_until([&] { return j.done() && idled; }, deadline));
  CHECK(steps == 5);
  CHECK(ticks >= 2);  // the host kept running its own timers while the job slept
}

TEST_CASE("destroying the loop while attached is safe, and the host goes on") {
  auto loop = std::make_unique<event_loop>();
  host h;
  h.attach(*loop);
  auto j = start_job(*loop, []() -> job<> {
    counted c;
    co_await sleep_task(1h);
  }());
  REQUIRE(h.run_until([&] { return counted::live == 1; }, deadline));
  loop.reset();  // the attachment outlives the loop
  CHECK(counted::live == 0);
  bool later = false;
  h.after(1ms, [&] { later = true; });
  REQUIRE(h.run_until([&] { return later; }, deadline));
  h.detach();
}

TEST_CASE("an idle host makes few blocking waits and uses no CPU while a job sleeps 500 ms") {
  event_loop loop;
  host h;
  h.attach(loop);
  auto j = start_job(loop, []() -> job<> { co_await sleep_task(500ms); }());
  REQUIRE(h.run_until([&] { return loop.stats().timers == 1; }, deadline));
  const long waits0 = h.waits(), cpu0 = cpu_us();
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  const long waits = h.waits() - waits0, cpu = cpu_us() - cpu0;
  MESSAGE("blocking waits: ", waits, ", CPU: ", cpu, " us over 500 ms");
  CHECK(waits <= 4);    // one wait for the sleep, give or take a dispatch
  CHECK(cpu < 100000);  // a spinning host would burn all 500 ms
}

TEST_CASE("run() while attached, and attaching twice, are std::logic_error") {
  event_loop loop;
  host h;
  h.attach(loop);
  CHECK_THROWS_AS(loop.run(), std::logic_error);
  CHECK_THROWS_AS(loop.attach_host([] {}), std::logic_error);
  h.detach();
  loop.run();  // detached: the loop's own run() works again
}

TEST_CASE("leaving the host loop with jobs pending keeps them for its next run") {
  event_loop loop;
  host h;
  h.attach(loop);
  int steps = 0;
  auto j = start_job(loop, [](int& steps) -> job<> {
    for (; steps < 6; ++steps) co_await sleep_task(2ms);
  }(steps));
  REQUIRE(h.run_until([&] { return steps >= 2; }, deadline));
  CHECK_FALSE(j.done());
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  CHECK(steps == 6);
}

}  // TEST_SUITE
