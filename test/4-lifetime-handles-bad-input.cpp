// test/4-lifetime-handles-bad-input.cpp - What the loop's end destroys, handles, and bad input.
// Part of the specification, in the manual's order (the list is in test.cpp).
#include "helpers.hpp"

TEST_SUITE("lifetime") {

TEST_CASE_FIXTURE(no_live_left, "destroying a loop with pending work destroys every job frame, and late abandoned workers are harmless") {
  std::atomic<bool> release{false}, started{false};
  std::atomic<int> finished{0};
  std::optional<task_return<int>> late;
  job_handle<> sleeping;
  {
    event_loop loop;
    pipe_fds p;
    sleeping = start_job(loop, [](live) -> job<> { co_await sleep_task(1h); }(live{}));
    start_job(loop, [&]() -> job<> {
      live guard;
      co_await wait_readable(p.r);
    });
    start_job(loop, [&]() -> job<> {
      live guard;
      co_await threaded_task(abandon_on_cancel, [&] {
        started = true;
        loop.post([] {});  // wakes run_until, which waits in the loop
        while (!release) std::this_thread::yield();
        ++finished;
      });
    });
    start_job(loop, [&]() -> job<int> {
      live guard;
      co_return co_await callback_task<int>([&](task_return<int> r) { late = r; });
    });
    REQUIRE(run_until(loop, [&] { return started.load() && late.has_value(); }));
    start_job(loop, [](live) -> job<> { co_return; }(live{}));  // never even started
    CHECK(live::count == 5);
  }
  CHECK(live::count == 0);
  CHECK(sleeping.done());
  CHECK_THROWS_AS(sleeping.result(), job_cancelled);
  release = true;
  (*late)(1);  // nobody to deliver to
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (finished == 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  CHECK(finished == 1);
}

TEST_CASE_FIXTURE(no_live_left, "a job frame destroyed with the loop may call now(), post() and start_job on it") {
  struct calls_loop {
    event_loop& loop;
    bool& ran;
    ~calls_loop() {
      (void)loop.now();
      loop.post([] {});  // dropped: the loop is closing
      auto h = start_job(loop, value_of(1));  // destroyed unstarted with the loop
      ran = static_cast<bool>(h);
    }
  };
  bool ran = false;
  {
    event_loop loop;
    start_job(loop, [&]() -> job<> {
      calls_loop c{loop, ran};
      live l;
      co_await sleep_task(std::chrono::hours(1));
    });
    CHECK(run_until(loop, [&] { return live::count == 1; }));
  }
  CHECK(ran);
  CHECK(live::count == 0);
}

TEST_CASE("destroying the loop waits for a running thread function that honours its stop token") {
  std::atomic<bool> started{false}, returned{false};
  {
    event_loop loop;
    start_job(loop, [&]() -> job<> {
      co_await threaded_task([&](std::stop_token st) {
        started = true;
        loop.post([] {});  // wakes run_until, which waits in the loop
        while (!st.stop_requested()) std::this_thread::yield();
        std::this_thread::sleep_for(10ms);
        returned = true;
      });
    });
    REQUIRE(run_until(loop, [&] { return started.load(); }));
  }
  CHECK(returned);
}

TEST_CASE_FIXTURE(no_live_left, "destroying a loop with 100,000 nested jobs pending does not overflow the stack") {
  {
    event_loop loop;
    struct deep {
      static job<> dive(int n) {
        live guard;
        if (n == 0)
          co_await sleep_task(1h);
        else
          co_await dive(n - 1);
      }
    };
    start_job(loop, deep::dive(100'000));
    loop.run_once();
    CHECK(live::count == 100'001);
  }
  CHECK(live::count == 0);
}

}  // TEST_SUITE("lifetime")

TEST_SUITE("handles") {

TEST_CASE("moving a job_handle leaves the source empty and the target referring to the job") {
  event_loop loop;
  auto a = start_job(loop, value_of(3));
  job_handle<int> b = std::move(a);
  CHECK_FALSE(a);
  CHECK(b);
  job_handle<int> c;
  c = std::move(b);
  CHECK_FALSE(b);
  CHECK_FALSE(a.cancel());
  drain(loop);
  CHECK(c.result() == 3);
}

TEST_CASE("cancel() of an empty job_handle returns false") {
  job_handle<> none;
  CHECK_FALSE(none);
  CHECK_FALSE(none.cancel());
}

TEST_CASE("a move-only result can be taken from the handle once") {
  event_loop loop;
  auto h = start_job(loop, []() -> job<std::unique_ptr<int>> { co_return std::make_unique<int>(7); });
  drain(loop);
  auto p = h.result();
  REQUIRE(p);
  CHECK(*p == 7);
  CHECK_THROWS_AS(h.result(), std::logic_error);
}

TEST_CASE("co_await of a job_handle yields the job's result, to several awaiters") {
  event_loop loop;
  auto target = start_job(loop, []() -> job<int> {
    co_await sleep_task(5ms);
    co_return 9;
  });
  std::vector<int> got;
  for (int i = 0; i < 3; ++i)
    start_job(loop, [&, target]() -> job<> { got.push_back(co_await target); });
  drain(loop);
  CHECK(got == std::vector<int>{9, 9, 9});
}

TEST_CASE("a job_handle destroyed on another thread is released on the loop thread, its error reported once") {
  event_loop loop;
  error_log log(loop);
  auto h = start_job(loop, fails_with("lost"), "worker");
  drain(loop);
  CHECK(log.names.empty());  // the handle may still read it
  std::thread([moved = std::move(h)]() mutable { job_handle<int> dying = std::move(moved); }).join();
  CHECK(log.names.empty());  // not on the other thread
  CHECK(run_until(loop, [&] { return log.names.size() == 1; }));
  CHECK(log.names[0] == "worker");
  CHECK(log.whats[0] == "lost");
}

}  // TEST_SUITE("handles")

TEST_SUITE("bad input") {

TEST_CASE("start_job of an empty or moved-from job throws std::invalid_argument") {
  event_loop loop;
  job<int> j = value_of(1);
  job<int> moved = std::move(j);
  CHECK_THROWS_AS(start_job(loop, std::move(j)), std::invalid_argument);
  CHECK_THROWS_AS(start_job(loop, job<>{}), std::invalid_argument);
  start_job(loop, std::move(moved));
  drain(loop);
}

TEST_CASE("an empty job_handle throws std::invalid_argument, also when awaited") {
  event_loop loop;
  job_handle<int> empty;
  CHECK_THROWS_AS(empty.done(), std::invalid_argument);
  CHECK_FALSE(empty.cancel());
  CHECK_THROWS_AS(empty.result(), std::invalid_argument);
  bool threw = false;
  start_job(loop, [&]() -> job<> {
    try {
      co_await empty;
    } catch (const std::invalid_argument&) {
      threw = true;
    }
  });
  drain(loop);
  CHECK(threw);
}

TEST_CASE("result() of a job that has not ended throws std::logic_error") {
  event_loop loop;
  auto h = start_job(loop, value_of(1));
  CHECK_THROWS_AS(h.result(), std::logic_error);
  drain(loop);
}

TEST_CASE("loop functions called from a foreign thread throw std::logic_error") {
  event_loop loop;
  auto h = start_job(loop, value_of(1));
  std::vector<bool> threw;
  std::thread other([&] {
    auto check = [&](auto fn) {
      try {
        fn();
        threw.push_back(false);
      } catch (const std::logic_error&) {
        threw.push_back(true);
      }
    };
    check([&] { loop.run_once(); });
    check([&] { loop.run(); });
    check([&] { loop.call_later(1ms, [] {}); });
    check([&] { loop.watch(0, POLLIN, [](short) {}); });
    check([&] { start_job(loop, value_of(2)); });
    check([&] { h.cancel(); });
    check([&] { loop.set_error_handler({}); });
  });
  other.join();
  CHECK(threw == std::vector<bool>(7, true));
  drain(loop);
  CHECK(h.result() == 1);
}

TEST_CASE("copying a job_handle on another thread throws std::logic_error") {
  event_loop loop;
  auto h = start_job(loop, value_of(1));
  bool threw = false;
  std::thread([&] {
    try {
      job_handle<int> copy(h);
    } catch (const std::logic_error&) {
      threw = true;
    }
  }).join();
  CHECK(threw);
  drain(loop);
}

TEST_CASE_FIXTURE(no_live_left, "job_scope::cancel_all and size called from another thread throw std::logic_error") {
  event_loop loop;
  job_scope scope(loop);
  scope.start(after(1h, 1));
  bool cancel_threw = false, size_threw = false;
  std::thread([&] {
    try {
      scope.cancel_all();
    } catch (const std::logic_error&) {
      cancel_threw = true;
    }
    try {
      (void)scope.size();
    } catch (const std::logic_error&) {
      size_threw = true;
    }
  }).join();
  CHECK(cancel_threw);
  CHECK(size_threw);
  CHECK(scope.size() == 1);
}

TEST_CASE("run() called inside a job throws std::logic_error") {
  event_loop loop;
  int threw = 0;
  start_job(loop, [&]() -> job<> {
    try {
      loop.run();
    } catch (const std::logic_error&) {
      ++threw;
    }
    try {
      loop.run_once();
    } catch (const std::logic_error&) {
      ++threw;
    }
    co_return;
  });
  drain(loop);
  CHECK(threw == 2);
}

TEST_CASE("advance() needs a manual clock, a non-negative duration and the loop's thread") {
  event_loop real;
  CHECK_THROWS_AS(real.advance(1s), std::logic_error);
  event_loop loop(manual());
  CHECK_THROWS_AS(loop.advance(-1s), std::invalid_argument);
  loop.advance(std::chrono::hours::max());  // saturates
  std::thread other([&] { CHECK_THROWS_AS(loop.advance(1s), std::logic_error); });
  other.join();
}

// A coroutine type of someone else's: it runs eagerly and keeps the exception it ends with.
struct foreign_coroutine {
  struct promise_type {
    std::exception_ptr* out;
    explicit promise_type(std::exception_ptr& e, event_loop&) : out(&e) {}
    foreign_coroutine get_return_object() { return {}; }
    std::suspend_never initial_suspend() noexcept { return {}; }
    std::suspend_never final_suspend() noexcept { return {}; }
    void return_void() {}
    void unhandled_exception() { *out = std::current_exception(); }
  };
};
foreign_coroutine sleep_outside_a_job(std::exception_ptr&, event_loop&) { co_await sleep_task(1ms); }
foreign_coroutine thread_outside_a_job(std::exception_ptr&, event_loop&) {
  co_await threaded_task([] { return 1; });
}

TEST_CASE("co_await of a task outside a coro_jobs job throws std::logic_error") {
  event_loop loop;
  std::exception_ptr slept, threaded;
  sleep_outside_a_job(slept, loop);
  thread_outside_a_job(threaded, loop);
  REQUIRE(slept);
  REQUIRE(threaded);
  CHECK_THROWS_AS(std::rethrow_exception(slept), std::logic_error);
  CHECK_THROWS_AS(std::rethrow_exception(threaded), std::logic_error);
  CHECK(loop.stats().timers == 0);
  CHECK(loop.stats().outstanding == 0);
}

TEST_CASE("a job cannot co_await its own handle") {
  event_loop loop;
  bool threw = false;
  job_handle<> self;
  self = start_job(loop, [&]() -> job<> {
    try {
      co_await self;
    } catch (const std::logic_error&) {
      threw = true;
    }
  });
  drain(loop);
  CHECK(threw);
}

TEST_CASE("when_all or with_timeout of a job's own handle throws std::logic_error instead of hanging") {
  event_loop loop(manual());
  job_handle<> self;
  bool threw = false;
  self = start_job(loop, [&]() -> job<> {
    try {
      co_await with_timeout(1s, self);
    } catch (const std::logic_error&) {
      threw = true;
    }
  });
  loop.advance(1ms);
  CHECK(threw);
  CHECK(self.done());
}

TEST_CASE("watch of a bad fd throws std::system_error with EBADF") {
  event_loop loop;
  int fd = -1;
  SUBCASE("negative") { fd = -1; }
  SUBCASE("closed") {
    pipe_fds p;
    fd = p.r;
  }
  try {
    loop.watch(fd, POLLIN, [](short) {});
    FAIL("no exception");
  } catch (const std::system_error& e) {
    CHECK(e.code().value() == EBADF);
  }
}

TEST_CASE("wait_readable of a bad fd throws std::system_error with EBADF at the co_await") {
  event_loop loop;
  int closed_fd;
  {
    pipe_fds p;
    closed_fd = p.r;
  }
  std::vector<int> codes;
  for (int fd : {-1, closed_fd}) {
    start_job(loop, [&, fd]() -> job<> {
      try {
        co_await wait_readable(fd);
      } catch (const std::system_error& e) {
        codes.push_back(e.code().value());
      }
    });
  }
  drain(loop);
  CHECK(codes == std::vector<int>{EBADF, EBADF});
}

TEST_CASE("an allocation failing in start_job throws std::bad_alloc and leaves no job behind" *
          doctest::skip(!can_fail_allocations)) {
  // Fails the first allocation inside start_job, then the second, ... until one succeeds.
  int failures = 0;
  bool started = false;
  for (int nth = 1; nth <= 10 && !started; ++nth) {
    event_loop loop;
    bool ran = false;
    job<> j = set_flag(ran);  // the frame (and the state's room) exist before start_job
    fail_alloc_in = nth;
    try {
      start_job(loop, std::move(j), "a name too long for the small-string buffer");
      started = true;
    } catch (const std::bad_alloc&) {
      ++failures;
    }
    fail_alloc_in = 0;
    drain(loop);
    INFO("allocation " << nth << std::string(started ? " succeeded" : " failed"));
    CHECK(loop.stats().jobs == 0u);  // it ended, or it was never there
    CHECK(ran == started);
  }
  CHECK(started);
  CHECK(failures >= 2);  // the name and the ready queue at least
}

// Fails the first allocation from the co_await on, then the second, ...: each lands in another
// step of making the frames and starting the three branches. A started branch points into the
// awaiter's frame (its group and result slots), so it must be cancelled and its frame
// destroyed before the error leaves that frame; it used to be left queued, and ran later on
// freed memory (a heap-use-after-free under ASan, and still counted in stats() at the catch).
TEST_CASE_FIXTURE(no_live_left, "an allocation failing while when_all or when_any starts its branches unwinds the started ones before the awaiter gets std::bad_alloc" *
          doctest::skip(!can_fail_allocations)) {
  auto child = [](int v) -> job<int> {
    live l;
    co_await sleep_task(1ms);
    co_return v;
  };
  for (const bool any : {false, true}) {
    int failures = 0;
    bool succeeded = false;
    for (int nth = 1; nth <= 100 && !succeeded; ++nth) {
      CAPTURE(any);
      CAPTURE(nth);
      event_loop loop;
      std::string outcome = "not run";
      std::size_t jobs_at_catch = 0;
      int live_at_catch = 0;
      int sum = 0;
      start_job(loop, [&]() -> job<> {
        live l;
        try {
          fail_alloc_in = nth;  // counts until this job first suspends (see run_once below)
          if (any) {
            auto r = co_await when_any(child(1), sleep_task(1h), child(3));
            sum = r.index() == 0 ? std::get<0>(r) : -1;
          } else {
            auto r = co_await when_all(child(1), sleep_task(1ms), child(3));
            sum = std::get<0>(r) + std::get<2>(r) + (std::get<1>(r) >= 1ms ? 0 : -100);
          }
          outcome = "value";
        } catch (const std::bad_alloc&) {
          outcome = "bad_alloc";
          jobs_at_catch = loop.stats().jobs;  // this job only: no branch left behind
          live_at_catch = live::count;
        }
      });
      loop.run_once();  // the job alone: it runs until it suspends in the when_all, or ends
      const bool failed = fail_alloc_in == 0;
      fail_alloc_in = 0;
      drain(loop);
      CHECK(outcome == (failed ? "bad_alloc" : "value"));
      if (failed) {
        CHECK(jobs_at_catch == 1u);
        CHECK(live_at_catch == 1);
        ++failures;
      } else {
        CHECK(sum == (any ? 1 : 4));
        succeeded = true;
      }
      CHECK(loop.stats().jobs == 0u);
      CHECK(loop.stats().timers == 0u);
      CHECK(live::count == 0);
    }
    CHECK(succeeded);
    CHECK(failures >= 7);  // two child frames, the when_all frame, three branch frames, ...
  }
}

TEST_CASE("a second co_await of a job object that another job awaits throws std::invalid_argument") {
  event_loop loop;
  job<int> j = []() -> job<int> {
    co_await sleep_task(1ms);
    co_return 7;
  }();
  int first = 0;
  bool second_threw = false;
  auto a = start_job(loop, [&]() -> job<> { first = co_await std::move(j); });
  auto b = start_job(loop, [&]() -> job<> {
    try {
      co_await std::move(j);
    } catch (const std::invalid_argument&) {
      second_threw = true;
    }
  });
  drain(loop);
  CHECK(second_threw);
  CHECK(first == 7);
  CHECK(a.done());
  CHECK(b.done());
}

TEST_CASE("task_return::fail(nullptr) throws std::invalid_argument at the call") {
  bool threw = false;
  CHECK(run_job([&]() -> job<int> {
          co_return co_await callback_task<int>([&](task_return<int> done) {
            try {
              done.fail(nullptr);
            } catch (const std::invalid_argument&) {
              threw = true;
            }
            done(7);  // the task was still pending
          });
        }) == 7);
  CHECK(threw);
}

}  // TEST_SUITE("bad input")
