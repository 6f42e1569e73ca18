// test/5-manual-clock-and-composition.cpp - The manual clock, and when_all, when_any, with_timeout.
// Part of the specification, in the manual's order (the list is in test.cpp).
#include "helpers.hpp"

TEST_SUITE("manual clock") {

TEST_CASE("a manual clock moves only through advance(), so a 3 s sleep ends at exactly 3 s") {
  event_loop loop(manual());
  steady_clock::duration slept{};
  auto h = start_job(loop, [&]() -> job<> { slept = co_await sleep_task(3s); });
  const auto t0 = loop.now();
  loop.advance(2999ms);
  CHECK_FALSE(h.done());
  CHECK(loop.now() - t0 == 2999ms);
  loop.advance(1ms);
  CHECK(h.done());
  CHECK(slept == 3s);
}

TEST_CASE("advance() runs timers in deadline order with the clock at each deadline") {
  event_loop loop(manual());
  std::vector<std::pair<int, steady_clock::duration>> fired;
  const auto t0 = loop.now();
  loop.call_later(30ms, [&] { fired.push_back({3, loop.now() - t0}); });
  loop.call_later(10ms, [&] {
    fired.push_back({1, loop.now() - t0});
    loop.call_later(10ms, [&] { fired.push_back({2, loop.now() - t0}); });  // due within the advance
  });
  loop.advance(1s);
  REQUIRE(fired.size() == 3);
  CHECK(fired[0] == std::pair<int, steady_clock::duration>{1, 10ms});
  CHECK(fired[1] == std::pair<int, steady_clock::duration>{2, 20ms});
  CHECK(fired[2] == std::pair<int, steady_clock::duration>{3, 30ms});
}

TEST_CASE("advance() moves the clock even while a job keeps yielding until a timer fires") {
  event_loop loop(manual());
  bool flag = false;
  auto t = loop.call_later(10ms, [&] { flag = true; });
  auto h = start_job(loop, [&]() -> job<> {
    while (!flag) co_await sleep_task(0s);
  });
  loop.advance(20ms);
  CHECK(h.done());
}

TEST_CASE("a call_later(0) that re-arms itself does not keep advance() from returning") {
  event_loop loop(manual());
  int calls = 0;
  const int give_up = 200000;  // the old advance() returned only when the callback gave up
  std::function<void()> again = [&] {
    if (++calls < give_up) loop.call_later(0s, again);
  };
  loop.call_later(0s, again);
  loop.advance(1ms);
  CHECK(calls < give_up);
  CHECK(calls > 0);
  calls = give_up;  // stop re-arming
  drain(loop);
}

TEST_CASE("advance(hours::max()) never makes a never deadline fall due") {
  event_loop loop(manual());
  bool fired = false;
  auto h = start_job(loop, []() -> job<> { co_await sleep_task(std::chrono::hours::max()); });
  auto t = loop.call_later(std::chrono::hours::max(), [&] { fired = true; });
  loop.run_once();
  loop.advance(std::chrono::hours::max());
  loop.advance(std::chrono::hours::max());
  CHECK_FALSE(h.done());
  CHECK_FALSE(fired);
  CHECK(h.cancel());
  drain(loop);
}

TEST_CASE_FIXTURE(no_live_left, "run() on a manual clock returns when only timers are left, instead of spinning") {
  event_loop loop(manual());
  auto h = start_job(loop, after(1s, 1));
  loop.run();
  CHECK_FALSE(h.done());
  CHECK(loop.stats().timers == 1);
  loop.advance(1s);
  CHECK(h.result() == 1);
}

TEST_CASE("advance() runs a due timeout without blocking in poll while an fd is watched") {
  event_loop loop(manual());
  pipe_fds p;
  bool timed_out = false;
  start_job(loop, [&]() -> job<> {
    try {
      co_await with_timeout(1s, wait_readable(p.r));
    } catch (const timeout_error&) {
      timed_out = true;
    }
  });
  loop.run_once();
  rescuer r([&] { CHECK(::write(p.w, "x", 1) == 1); });
  loop.advance(1s);
  CHECK(timed_out);
  CHECK_FALSE(r.fired.load());
}

TEST_CASE("advance() runs a due timeout without blocking while a thread function runs") {
  event_loop loop(manual());
  std::atomic<bool> started{false}, release{false};
  bool timed_out = false;
  start_job(loop, [&]() -> job<> {
    try {
      co_await with_timeout(1s, threaded_task([&](std::stop_token st) {
                              started = true;
                              while (!st.stop_requested() && !release) std::this_thread::yield();
                            }));
    } catch (const timeout_error&) {
      timed_out = true;
    }
  });
  rescuer r([&] { release = true; });
  loop.run_once();
  loop.advance(1s);
  drain(loop);
  CHECK(timed_out);
  CHECK_FALSE(r.fired.load());
}

TEST_CASE("on a manual clock the loop blocks for a thread function instead of spinning") {
  event_loop loop(manual());
  std::atomic<bool> go{false};
  auto t = loop.call_later(1h, [] {});
  auto h = start_job(loop, [&]() -> job<> {
    co_await threaded_task([&] {
      while (!go) std::this_thread::yield();
    });
  });
  loop.run_once();  // starts the job and its thread function
  std::thread release([&] {
    std::this_thread::sleep_for(50ms);  // the behaviour under test is the loop's wait meanwhile
    go = true;
  });
  const auto before = loop.stats().iterations;
  loop.run();  // returns once only the timer is left
  release.join();
  CHECK(h.done());
  CHECK(loop.stats().iterations - before < 100);
}

}  // TEST_SUITE("manual clock")

TEST_SUITE("composition") {

TEST_CASE_FIXTURE(no_live_left, "when_all yields a tuple of every result, with std::monostate for void") {
  event_loop loop(manual());
  std::optional<std::tuple<int, std::monostate, int, std::string>> got;
  auto other = start_job(loop, after(5ms, 9));
  start_job(loop, [&]() -> job<> {
    got = co_await when_all(after(20ms, 1), []() -> job<> { co_await sleep_task(10ms); }(), other,
                            callback_task<std::string>([&](task_return<std::string> r) {
                              loop.call_later(15ms, [r] { r("cb"); });
                            }));
  });
  loop.advance(19ms);
  CHECK_FALSE(got);
  loop.advance(1ms);
  REQUIRE(got);
  CHECK(std::get<0>(*got) == 1);
  CHECK(std::get<2>(*got) == 9);
  CHECK(std::get<3>(*got) == "cb");
  CHECK(live::count == 0);
}

TEST_CASE_FIXTURE(no_live_left, "when_all runs a threaded task beside timers") {
  event_loop loop;
  std::optional<std::tuple<int, int>> got;
  start_job(loop, [&]() -> job<> {
    got = co_await when_all(threaded_task([] { return 6; }), after(1ms, 7));
  });
  CHECK(run_until(loop, [&] { return got.has_value(); }));
  CHECK(*got == std::tuple{6, 7});
}

TEST_CASE_FIXTURE(no_live_left, "the first error in when_all cancels the others, waits for their unwinding, then is rethrown") {
  event_loop loop(manual());
  error_log log(loop);
  int live_at_catch = -1;
  std::string what;
  start_job(loop, [&]() -> job<> {
    try {
      co_await when_all(after(1h, 1), fail_after(10ms, "boom"), after(2h, 2));
    } catch (const std::runtime_error& e) {
      live_at_catch = live::count;
      what = e.what();
    }
  });
  loop.advance(10ms);
  CHECK(what == "boom");
  CHECK(live_at_catch == 0);
  CHECK(loop.stats().timers == 0);
  CHECK(log.whats.empty());
}

TEST_CASE_FIXTURE(no_live_left, "a second error in when_all while it unwinds reaches the error handler") {
  event_loop loop(manual());
  error_log log(loop);
  std::string what;
  auto stubborn = []() -> job<int> {  // fails again while being cancelled
    try {
      co_await sleep_task(1h);
    } catch (const job_cancelled&) {
      throw std::runtime_error("second");
    }
    co_return 0;
  };
  start_job(loop, [&]() -> job<> {
    try {
      co_await when_all(fail_after(10ms, "first"), stubborn());
    } catch (const std::runtime_error& e) {
      what = e.what();
    }
  });
  loop.advance(10ms);
  CHECK(what == "first");
  REQUIRE(log.whats.size() == 1);
  CHECK(log.whats[0] == "second");
  CHECK(log.names[0] == "when_all");
}

TEST_CASE_FIXTURE(no_live_left, "cancelling a job waiting in when_all cancels every branch and unwinds them first") {
  event_loop loop(manual());
  std::atomic<bool> stop_seen{false}, started{false};
  int live_at_cancel = -1;
  auto h = start_job(loop, [&]() -> job<> {
    try {
      co_await when_all(after(1h, 1), threaded_task([&](std::stop_token st) {
                          started = true;
                          while (!st.stop_requested()) std::this_thread::yield();
                          stop_seen = true;
                        }));
    } catch (const job_cancelled&) {
      live_at_cancel = live::count;
      throw;
    }
  });
  loop.advance(1ms);
  CHECK(h.cancel());
  loop.advance(1ms);
  CHECK(h.done());
  CHECK_THROWS_AS(h.result(), job_cancelled);
  CHECK(live_at_cancel == 0);
  drain(loop);  // a function still queued at the cancel never runs; a running one sees stop
  CHECK(stop_seen.load() == started.load());
  CHECK(loop.stats().outstanding == 0);
}

TEST_CASE_FIXTURE(no_live_left, "when_any yields the index and value of the first to finish, after the losers unwound") {
  event_loop loop(manual());
  std::optional<std::variant<int, int, steady_clock::duration>> got;
  int live_after = -1;
  start_job(loop, [&]() -> job<> {
    got = co_await when_any(after(30ms, 1), after(20ms, 2), sleep_task(1h));
    live_after = live::count;
  });
  loop.advance(25ms);
  REQUIRE(got);
  CHECK(got->index() == 1);
  CHECK(std::get<1>(*got) == 2);
  CHECK(live_after == 0);
  CHECK(loop.stats().timers == 0);
}

TEST_CASE_FIXTURE(no_live_left, "when_any rethrows the error of the first to end") {
  event_loop loop(manual());
  std::string what;
  start_job(loop, [&]() -> job<> {
    try {
      co_await when_any(after(30ms, 1), fail_after(10ms, "first"));
    } catch (const std::runtime_error& e) {
      what = e.what();
    }
  });
  loop.advance(1s);
  CHECK(what == "first");
}

TEST_CASE_FIXTURE(no_live_left, "cancelling a job waiting in when_any cancels every branch") {
  event_loop loop(manual());
  auto h = start_job(loop, [&]() -> job<int> {
    auto r = co_await when_any(after(1h, 1), after(2h, 2));
    co_return int(r.index());
  });
  loop.advance(1ms);
  CHECK(live::count == 2);
  h.cancel();
  loop.advance(1ms);
  CHECK_THROWS_AS(h.result(), job_cancelled);
  CHECK(live::count == 0);
  CHECK(loop.stats().jobs == 0);
}

TEST_CASE_FIXTURE(no_live_left, "cancelling a job before when_all's branches began ends it without running them") {
  event_loop loop(manual());
  auto h = start_job(loop, []() -> job<> { co_await when_all(after(1h, 1), after(1h, 2)); });
  loop.run_once();  // the job starts, its branches are queued
  h.cancel();
  loop.advance(1ms);
  CHECK_THROWS_AS(h.result(), job_cancelled);
  CHECK(live::count == 0);
  CHECK(loop.stats().jobs == 0);
}

TEST_CASE_FIXTURE(no_live_left, "with_timeout yields the value when the work finishes in time") {
  event_loop loop(manual());
  auto h = start_job(loop, []() -> job<int> { co_return co_await with_timeout(1s, after(10ms, 5)); });
  loop.advance(10ms);
  CHECK(h.result() == 5);
  CHECK(loop.stats().timers == 0);  // the timeout's timer is gone
}

TEST_CASE_FIXTURE(no_live_left, "with_timeout cancels the work and throws timeout_error when time runs out") {
  event_loop loop(manual());
  int live_at_catch = -1;
  bool timed_out = false;
  start_job(loop, [&]() -> job<> {
    try {
      co_await with_timeout(100ms, after(1h, 5));
    } catch (const timeout_error&) {
      timed_out = true;
      live_at_catch = live::count;
    }
  });
  loop.advance(99ms);
  CHECK_FALSE(timed_out);
  loop.advance(1ms);
  CHECK(timed_out);
  CHECK(live_at_catch == 0);
}

TEST_CASE("with_timeout stops a threaded task through its stop token") {
  // A manual clock, so that the timeout fires only once the function runs: with a real
  // 1 ms timeout a slow worker start let it fire first, and the function was withdrawn
  // from the queue unrun (the test then waited for it in vain).
  event_loop loop(manual());
  std::atomic<bool> started{false}, stopped{false}, release{false};
  bool timed_out = false;
  start_job(loop, [&]() -> job<> {
    try {
      co_await with_timeout(1ms, threaded_task([&](std::stop_token st) {
                              started = true;
                              while (!st.stop_requested() && !release) std::this_thread::yield();
                              stopped = st.stop_requested();
                            }));
    } catch (const timeout_error&) {
      timed_out = true;
    }
  });
  rescuer r([&] { release = true; });
  // The job, with_timeout's and when_any's branches start: then the function is submitted.
  for (int i = 0; i < 10 && loop.stats().ready > 0; ++i) loop.run_once();
  const auto stop = steady_clock::now() + 10s;
  while (!started && steady_clock::now() < stop) std::this_thread::yield();
  REQUIRE(started);
  loop.advance(1ms);
  drain(loop);
  CHECK(timed_out);
  CHECK(stopped);
  CHECK_FALSE(r.fired.load());
}

TEST_CASE("a cancel of the job waiting in with_timeout stays job_cancelled") {
  event_loop loop(manual());
  auto h = start_job(loop, []() -> job<> { co_await with_timeout(1s, sleep_task(1h)); });
  loop.advance(10ms);
  h.cancel();
  loop.advance(10ms);
  CHECK_THROWS_AS(h.result(), job_cancelled);
}

TEST_CASE_FIXTURE(no_live_left, "a completion and a timeout due in the same iteration: the work set first wins") {
  event_loop loop(manual());
  auto h = start_job(loop, []() -> job<int> { co_return co_await with_timeout(1s, after(1000ms, 5)); });
  loop.advance(1s);  // both timers are due at once; the work's was set first
  CHECK(h.result() == 5);
}

TEST_CASE_FIXTURE(no_live_left, "a timeout and a completion due in the same iteration: the timeout set first wins") {
  event_loop loop(manual());
  auto late = []() -> job<int> {
    co_await sleep_task(0s);          // sets its timer one iteration after the timeout's
    co_return co_await after(1000ms, 5);
  };
  auto h = start_job(loop, [&]() -> job<int> { co_return co_await with_timeout(1s, late()); });
  loop.advance(1s);
  CHECK_THROWS_AS(h.result(), timeout_error);
}

TEST_CASE("jobs() lists branches and shielded waits under their parent's name, at every level") {
  event_loop loop;
  pipe_fds p;
  auto top = start_job(loop, [&]() -> job<> {
    co_await when_all(wait_readable(p.r), when_any(wait_readable(p.r), sleep_task(1h)));
  }, "top");
  auto unnamed = start_job(loop, [&]() -> job<> { co_await shielded(with_timeout(1h, wait_readable(p.r))); });
  REQUIRE(run_until(loop, [&] { return loop.stats().fd_waits == 3; }));
  std::vector<std::string> names;
  for (const job_info& i : loop.jobs()) names.push_back(i.name);
  std::sort(names.begin(), names.end());
  CHECK(names == std::vector<std::string>{"", "job/shielded", "job/shielded/when_any[0]",
                                          "job/shielded/when_any[1]", "top", "top/when_all[0]",
                                          "top/when_all[1]", "top/when_all[1]/when_any[0]",
                                          "top/when_all[1]/when_any[1]"});
  REQUIRE(::write(p.w, "x", 1) == 1);
  drain(loop);
  CHECK(top.done());
  CHECK(unnamed.done());
}

}  // TEST_SUITE("composition")
