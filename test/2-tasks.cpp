// test/2-tasks.cpp - The tasks a job awaits: sleep, threads, callbacks, fds.
// Part of the specification, in the manual's order (the list is in test.cpp).
#include "helpers.hpp"

TEST_SUITE("tasks: sleep") {

TEST_CASE("sleep_task never resumes before its deadline and yields the elapsed time") {
  event_loop loop;
  std::vector<steady_clock::duration> elapsed, measured;
  for (auto d : {1ms, 5ms, 20ms}) {
    start_job(loop, [&, d]() -> job<> {
      const auto t0 = steady_clock::now();
      elapsed.push_back(co_await sleep_task(d));
      measured.push_back(steady_clock::now() - t0);
      CHECK(elapsed.back() >= d);
      CHECK(measured.back() >= d);
    });
  }
  drain(loop);
  CHECK(elapsed.size() == 3);
}

TEST_CASE("sleep_task of zero or a negative duration resumes on the next iteration") {
  event_loop loop;
  std::vector<std::string> order;
  for (std::chrono::nanoseconds d : {0ns, std::chrono::nanoseconds(-5s), std::chrono::nanoseconds::min()}) {
    start_job(loop, [&, d]() -> job<> {
      order.push_back("before");
      auto e = co_await sleep_task(d);
      CHECK(e >= 0ns);
      order.push_back("after");
    });
  }
  loop.run_once();
  CHECK(order == std::vector<std::string>(3, "before"));
  loop.run_once();
  CHECK(order.size() == 6);
}

TEST_CASE("sleep_task of a huge duration saturates instead of wrapping") {
  event_loop loop;
  int resumed = 0;
  auto h1 = start_job(loop, [&]() -> job<> {
    co_await sleep_task(std::chrono::hours::max());
    ++resumed;
  });
  auto h2 = start_job(loop, [&]() -> job<> {
    co_await sleep_task(std::chrono::duration<double>(1e300));
    ++resumed;
  });
  loop.call_later(20ms, [] {});
  CHECK_FALSE(run_until(loop, [&] { return resumed > 0; }, 50ms));  // a wrap would fire at once
  CHECK(loop.stats().timers == 2);
  h1.cancel();
  h2.cancel();
  drain(loop);
  CHECK(resumed == 0);
  CHECK_THROWS_AS(h1.result(), job_cancelled);
}

}  // TEST_SUITE("tasks: sleep")

TEST_SUITE("tasks: threads") {

TEST_CASE("threaded_task runs f on a worker thread and resumes the job on the loop thread") {
  const auto loop_thread = std::this_thread::get_id();
  std::thread::id f_thread, resumed_on;
  CHECK(run_job([&]() -> job<int> {
          int v = co_await threaded_task([&](int a, int b) {
            f_thread = std::this_thread::get_id();
            return a + b;
          }, 20, 22);
          resumed_on = std::this_thread::get_id();
          co_return v;
        }) == 42);
  CHECK(f_thread != loop_thread);
  CHECK(resumed_on == loop_thread);
}

TEST_CASE("threaded_task rethrows the function's exception with its type at the co_await") {
  event_loop loop;
  std::string caught;
  start_job(loop, [&]() -> job<> {
    try {
      co_await threaded_task([]() -> int { throw std::out_of_range("worker says no"); });
    } catch (const std::out_of_range& e) {
      caught = e.what();
    }
  });
  drain(loop);
  CHECK(caught == "worker says no");  // the recipe would hang here forever
}

TEST_CASE("threaded_task moves move-only arguments and results across threads") {
  CHECK(run_job([]() -> job<int> {
          auto p = co_await threaded_task([](std::unique_ptr<int> q) { return q; }, std::make_unique<int>(8));
          co_return *p;
        }) == 8);
}

TEST_CASE_FIXTURE(no_live_left, "threaded_task passes a stop_token that cancel() requests, and drops the result") {
  event_loop loop;
  std::atomic<bool> started{false}, saw_stop{false};
  auto h = start_job(loop, [&]() -> job<> {
    live guard;
    co_await threaded_task([&](std::stop_token st) {
      started = true;
      loop.post([] {});  // wakes run_until, which waits in the loop
      while (!st.stop_requested()) std::this_thread::yield();
      saw_stop = true;
      return 5;
    });
    FAIL("resumed after cancel");
  });
  CHECK(run_until(loop, [&] { return started.load(); }));
  CHECK(h.cancel());
  CHECK(run_until(loop, [&] { return h.done(); }));
  CHECK_THROWS_AS(h.result(), job_cancelled);
  CHECK(live::count == 0);  // the job's RAII ran
  drain(loop);               // and run() waited for the cancelled function to finish
  CHECK(saw_stop);
  CHECK(loop.stats().outstanding == 0);
}

TEST_CASE("threaded_task uses at most the configured number of worker threads") {
  event_loop loop(loop_options{.worker_threads = 2});
  std::atomic<int> running{0}, peak{0};
  std::mutex m;
  std::set<std::thread::id> threads;
  for (int i = 0; i < 8; ++i) {
    start_job(loop, [&]() -> job<> {
      co_await threaded_task([&] {
        const int now = ++running;
        int p = peak;
        while (now > p && !peak.compare_exchange_weak(p, now)) {
        }
        {
          std::lock_guard<std::mutex> lock(m);
          threads.insert(std::this_thread::get_id());
        }
        std::this_thread::sleep_for(2ms);  // work, not synchronisation
        --running;
      });
    });
  }
  drain(loop);
  CHECK(peak <= 2);
  CHECK(threads.size() <= 2);
}

// Submitted functions wait for the loop's kick at the end of the iteration: it must wake
// every idle worker that has work, or these rendezvous would time out.
TEST_CASE("thread functions submitted in one iteration run side by side on idle workers") {
  event_loop loop(loop_options{.worker_threads = 2});
  for (int round = 0; round < 3; ++round) {  // round 0 starts the threads; later rounds wake them
    std::atomic<int> arrived{0};
    auto meet = [&arrived] {
      ++arrived;
      const auto stop = steady_clock::now() + 5s;
      while (arrived < 2 && steady_clock::now() < stop) std::this_thread::yield();
      return arrived >= 2;
    };
    auto a = start_job(loop, [&]() -> job<bool> { co_return co_await threaded_task(meet); });
    auto b = start_job(loop, [&]() -> job<bool> { co_return co_await threaded_task(meet); });
    REQUIRE(run_until(loop, [&] { return a.done() && b.done(); }));
    CHECK(a.result());
    CHECK(b.result());
  }
}

// Workers are woken at the end of the iteration; an error handler that throws ends the
// iteration early, and must not leave what the iteration submitted waiting for another run().
TEST_CASE("a thread function submitted before the error handler throws starts without another run()") {
  event_loop loop(loop_options{.worker_threads = 1});
  start_job(loop, []() -> job<> {  // starts the worker, which then goes idle (its spin is 50 us)
    co_await threaded_task([] {});
    co_await sleep_task(20ms);
  });
  drain(loop);
  loop.set_error_handler([](std::string_view, std::exception_ptr e) { std::rethrow_exception(e); });
  std::atomic<bool> started{false};
  start_job(loop, [&]() -> job<> {
    co_await sleep_task(0s);  // runs next iteration, beside the report of the job below
    co_await threaded_task([&] { started = true; });
  });
  start_job(loop, []() -> job<> {
    throw std::runtime_error("reported in the next iteration");
    co_return;
  });
  CHECK_THROWS_AS(loop.run(), std::runtime_error);
  const auto stop = steady_clock::now() + 5s;  // the loop is not run: only the worker can act
  while (!started && steady_clock::now() < stop) std::this_thread::yield();
  CHECK(started);
  drain(loop);
}

TEST_CASE("the usable CPU count follows the thread's affinity mask, not the machine's CPU count") {
  unsigned under_mask = 0, expected = 0;
  std::thread t([&] {  // a fresh thread, so that no other thread's mask changes
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(0, &one);
    if (::sched_setaffinity(0, sizeof one, &one) != 0) return;
    cpu_set_t now;
    CPU_ZERO(&now);
    if (::sched_getaffinity(0, sizeof now, &now) == 0) expected = unsigned(CPU_COUNT(&now));
    under_mask = detail::usable_cpus();
  });
  t.join();
  CHECK(expected == 1);
  CHECK(under_mask == expected);
  CHECK(detail::usable_cpus() >= 1);
}

}  // TEST_SUITE("tasks: threads")

TEST_SUITE("tasks: callbacks") {

TEST_CASE("callback_task resumes the job with the value given to task_return from another thread") {
  event_loop loop;
  std::thread worker;
  auto h = start_job(loop, [&]() -> job<std::string> {
    co_return co_await callback_task<std::string>([&](task_return<std::string> done) {
      worker = std::thread([done] { done("from a thread"); });
    });
  });
  drain(loop);
  worker.join();
  CHECK(h.result() == "from a thread");
}

TEST_CASE("a second task_return call does nothing but report a std::logic_error") {
  event_loop loop;
  error_log errors(loop);
  auto h = start_job(loop, []() -> job<int> {
    co_return co_await callback_task<int>([](task_return<int> done) {
      done(1);
      done(2);
    });
  });
  drain(loop);
  CHECK(h.result() == 1);
  REQUIRE(errors.names.size() == 1);
  CHECK(errors.names[0] == "task_return");
  CHECK(errors.whats[0].find("more than once") != std::string::npos);
}

TEST_CASE("a task_return destroyed without being called fails the job instead of hanging") {
  CHECK_THROWS_AS(run_job([]() -> job<> { co_await callback_task<>([](task_return<>) {}); }), std::logic_error);
}

TEST_CASE("task_return can deliver an exception with fail()") {
  CHECK_THROWS_AS(run_job([]() -> job<int> {
                    co_return co_await callback_task<int>([](task_return<int> done) {
                      done.fail(std::make_exception_ptr(std::range_error("failed")));
                    });
                  }),
                  std::range_error);
}

TEST_CASE("a callback_task whose start throws rethrows at the co_await") {
  event_loop loop;
  auto h = start_job(loop, []() -> job<> {
    co_await callback_task<>([](task_return<>) { throw std::domain_error("no start"); });
  });
  drain(loop);
  CHECK_THROWS_AS(h.result(), std::domain_error);
  CHECK(loop.stats().outstanding == 0);
}

namespace {
// sleep_task's public behaviour, written by a user with callback_task and call_later.
auto my_sleep(event_loop& loop, std::chrono::milliseconds d) {
  return callback_task<steady_clock::duration>(
      [&loop, d, t0 = steady_clock::now()](task_return<steady_clock::duration> done) {
        auto timer = loop.call_later(d, [done, t0] { done(steady_clock::now() - t0); });
        return [timer]() mutable { timer.cancel(); };  // the canceller
      });
}
}  // namespace

TEST_CASE("a sleep written with callback_task behaves like sleep_task, cancellation included") {
  event_loop loop;
  steady_clock::duration slept{};
  auto a = start_job(loop, [&]() -> job<> { slept = co_await my_sleep(loop, 10ms); });
  auto b = start_job(loop, [&]() -> job<> { co_await my_sleep(loop, 1h); });
  CHECK(run_until(loop, [&] { return a.done(); }));
  CHECK(slept >= 10ms);
  CHECK(loop.stats().timers == 1);
  CHECK(b.cancel());
  drain(loop);  // the canceller removed the hour-long timer, or this would not end
  CHECK(loop.stats().timers == 0);
  CHECK_THROWS_AS(b.result(), job_cancelled);
}

}  // TEST_SUITE("tasks: callbacks")

TEST_SUITE("tasks: fds") {

TEST_CASE("wait_readable resumes when the fd becomes readable") {
  event_loop loop;
  pipe_fds p;
  short revents = 0;
  auto h = start_job(loop, [&]() -> job<> { revents = co_await wait_readable(p.r); });
  loop.call_later(5ms, [&] { REQUIRE(::write(p.w, "x", 1) == 1); });
  drain(loop);
  CHECK(h.done());
  CHECK((revents & POLLIN));
}

TEST_CASE("wait_writable resumes when the fd can be written") {
  event_loop loop;
  pipe_fds p;
  short revents = 0;
  start_job(loop, [&]() -> job<> { revents = co_await wait_writable(p.w); });
  drain(loop);
  CHECK((revents & POLLOUT));
}

TEST_CASE("an fd closed while waited on fails the wait with EBADF and does not make the loop spin") {
  event_loop loop;
  auto* p = new pipe_fds;
  int code = 0;
  start_job(loop, [&]() -> job<> {
    try {
      co_await wait_readable(p->r);
    } catch (const std::system_error& e) {
      code = e.code().value();
    }
  });
  loop.call_later(5ms, [&] { delete p; });
  int iterations = 0;
  while (loop.run_once() && iterations < 1000) ++iterations;
  CHECK(code == EBADF);
  CHECK(iterations < 10);
}

// Lowers the soft RLIMIT_NOFILE (the hard limit stays) for one test, and restores it. ppoll
// fails with EINVAL when it is given more entries than this limit. Make the fds a test needs
// before lowering it.
struct file_limit {
  rlimit old{};
  explicit file_limit(rlim_t soft) {
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &old) == 0);
    rlimit lower = old;
    lower.rlim_cur = std::min(soft, old.rlim_cur);
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &lower) == 0);
  }
  ~file_limit() { ::setrlimit(RLIMIT_NOFILE, &old); }
  file_limit(const file_limit&) = delete;
  file_limit& operator=(const file_limit&) = delete;
};

struct socket_pair {
  int fd[2] = {-1, -1};
  socket_pair() { REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fd) == 0); }
  ~socket_pair() {
    ::close(fd[0]);
    ::close(fd[1]);
  }
};

TEST_CASE("300 jobs waiting on one pipe all resume under a file limit of 256") {
  event_loop loop;
  pipe_fds p;
  const file_limit limit(256);
  constexpr int n = 300;
  int resumed = 0;
  for (int i = 0; i < n; ++i)
    start_job(loop, [&]() -> job<> {
      co_await wait_readable(p.r);
      ++resumed;
    });
  loop.run_once();  // every job waits now
  CHECK(loop.stats().fd_waits == std::size_t(n));  // one per wait, though they share an entry
  REQUIRE(::write(p.w, "x", 1) == 1);
  bool all = false;
  CHECK_NOTHROW(all = run_until(loop, [&] { return resumed == n; }));
  CHECK(all);
  CHECK(resumed == n);
  CHECK(loop.stats().fd_waits == 0);
}

TEST_CASE("watches and waits on one fd all fire; cancelled ones drop their events from its entry") {
  event_loop loop;
  socket_pair s;
  const int fd = s.fd[0];  // always writable; readable once the other end writes
  const file_limit limit(256);
  constexpr int n = 150;  // watches, and as many readers: 300 on one fd
  std::vector<int> watch_calls(n, 0);
  std::vector<callback_handle> watches;
  for (int i = 0; i < n; ++i)
    watches.push_back(loop.watch(fd, POLLIN, [&watch_calls, i](short) { ++watch_calls[std::size_t(i)]; }));
  int readers_resumed = 0, writers_resumed = 0, writers_cancelled = 0;
  for (int i = 0; i < n; ++i)
    start_job(loop, [&]() -> job<> {
      const short ev = co_await wait_readable(fd);
      readers_resumed += (ev & POLLIN) != 0;
    });
  std::vector<job_handle<>> writers;
  for (int i = 0; i < 50; ++i)
    writers.push_back(start_job(loop, [&]() -> job<> {
      try {
        co_await wait_writable(fd);
        ++writers_resumed;
      } catch (const job_cancelled&) {
        ++writers_cancelled;
        throw;
      }
    }));
  loop.run_once();  // every job waits now: the fd is writable, but no poll has seen it yet
  CHECK(loop.stats().fd_waits == std::size_t(2 * n + 50));
  for (auto& w : writers) CHECK(w.cancel());
  CHECK(loop.stats().fd_waits == std::size_t(2 * n));
  bool unwound = false;
  CHECK_NOTHROW(unwound = run_until(loop, [&] { return writers_cancelled == 50; }));
  CHECK(unwound);
  CHECK(writers_resumed == 0);

  // Only POLLIN is left on the fd, and nothing is readable: the loop sleeps until a timer.
  // (A POLLOUT left behind would wake every poll at once, since the fd is writable.)
  bool fired = false;
  loop.call_later(20ms, [&] { fired = true; });
  const auto before = loop.stats().iterations;
  CHECK_NOTHROW(run_until(loop, [&] { return fired; }));
  CHECK(fired);
  CHECK(loop.stats().iterations - before <= 3);
  CHECK(readers_resumed == 0);
  CHECK(std::count(watch_calls.begin(), watch_calls.end(), 0) == n);

  for (int i = 0; i < n; i += 2) CHECK(watches[std::size_t(i)].cancel());  // every other one
  CHECK(loop.stats().fd_waits == std::size_t(n + n / 2));
  REQUIRE(::write(s.fd[1], "x", 1) == 1);  // never read: the watches fire every iteration
  auto live_watches_called = [&] {
    for (int i = 1; i < n; i += 2)
      if (watch_calls[std::size_t(i)] == 0) return false;
    return true;
  };
  bool all = false;
  CHECK_NOTHROW(all = run_until(loop, [&] { return readers_resumed == n && live_watches_called(); }));
  CHECK(all);
  for (int i = 0; i < n; i += 2) CHECK(watch_calls[std::size_t(i)] == 0);
  CHECK(writers_resumed == 0);
  CHECK(loop.stats().fd_waits == std::size_t(n / 2));
  for (auto& w : watches) w.cancel();
  REQUIRE(loop.stats().fd_waits == 0);  // else drain() would block on what is left
  drain(loop);  // nothing left on the fd: the loop ends
}

TEST_CASE("a woken fd wait that cancels other waits on its fd and waits on it again is safe") {
  // 100 trios on one pipe: a and b wait to read, c to write (a pipe's read end never is).
  // Whichever of a and b runs first cancels the other (woken by the same poll, not yet
  // resumed) and c (still waiting), drops their handles (so their frames are freed as they
  // end), then waits on the fd again. No cancelled one gets past its co_await, and ASan
  // checks that no freed wait is left in the fd's entry.
  event_loop loop;
  pipe_fds p;
  const file_limit limit(256);
  constexpr int n = 100;
  std::vector<job_handle<>> a(n), b(n), c(n);
  int first = 0, again = 0, past_await = 0, cancelled = 0;
  auto reader = [&](int i, bool is_a) -> job<> {
    try {
      co_await wait_readable(p.r);
      ++past_await;
      ++first;
      job_handle<>& other = (is_a ? b : a)[std::size_t(i)];
      CHECK(other.cancel());
      CHECK(c[std::size_t(i)].cancel());
      other = {};
      c[std::size_t(i)] = {};
      co_await wait_readable(p.r);
      ++again;
    } catch (const job_cancelled&) {
      ++cancelled;
      throw;
    }
  };
  for (int i = 0; i < n; ++i) {
    a[std::size_t(i)] = start_job(loop, [&reader, i] { return reader(i, true); });
    b[std::size_t(i)] = start_job(loop, [&reader, i] { return reader(i, false); });
    c[std::size_t(i)] = start_job(loop, [&]() -> job<> {
      try {
        co_await wait_writable(p.r);
        ++past_await;
      } catch (const job_cancelled&) {
        ++cancelled;
        throw;
      }
    });
  }
  loop.run_once();
  CHECK(loop.stats().fd_waits == std::size_t(3 * n));
  REQUIRE(::write(p.w, "x", 1) == 1);  // never read: the second waits fire too
  bool all = false;
  CHECK_NOTHROW(all = run_until(loop, [&] { return again == n && cancelled == 2 * n; }));
  CHECK(all);
  CHECK(first == n);
  CHECK(past_await == n);  // only the winners: no cancelled wait resumed normally
  CHECK(cancelled == 2 * n);
  int winners_done = 0;
  for (int i = 0; i < n; ++i) {
    const std::size_t k = std::size_t(i);
    winners_done += (a[k] ? a[k] : b[k]).done();
  }
  CHECK(winners_done == n);
  // One more wait on the fd (still readable): its dispatch walks the fd's list, where a
  // cancelled wait left behind would be freed memory (ASan).
  bool last = false;
  start_job(loop, [&]() -> job<> {
    co_await wait_readable(p.r);
    last = true;
  });
  CHECK_NOTHROW(run_until(loop, [&] { return last; }));
  CHECK(last);
  REQUIRE(loop.stats().fd_waits == 0);  // else drain() would block on what is left
  drain(loop);
}

}  // TEST_SUITE("tasks: fds")
