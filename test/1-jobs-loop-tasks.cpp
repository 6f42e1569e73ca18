// test/1-jobs-loop-tasks.cpp - jobs, the loop that runs them, and the tasks a job awaits
// (sleep, threads, callbacks, fds).
// Part of the specification, in the manual's order (the list is in test.cpp).
#include "helpers.hpp"

TEST_SUITE("jobs") {

TEST_CASE("a started job does not run until the loop's next iteration") {
  event_loop loop;
  bool ran = false;
  auto h = start_job(loop, [&]() -> job<> {
    ran = true;
    co_return;
  });
  CHECK_FALSE(ran);
  CHECK_FALSE(h.done());
  loop.run_once();
  CHECK(ran);
  CHECK(h.done());
}

TEST_CASE("a job's value is available from its handle once it ends") {
  event_loop loop;
  auto h = start_job(loop, value_of(42));
  drain(loop);
  REQUIRE(h.done());
  CHECK(h.result() == 42);
  CHECK(h.result() == 42);  // a copyable value can be read again
}

TEST_CASE("co_await of a child job yields its value") {
  CHECK(run_job([]() -> job<int> {
          int a = co_await value_of(2);
          int b = co_await value_of(3);
          co_return a* b;
        }) == 6);
}

TEST_CASE("co_await of a child job rethrows its exception with its type") {
  event_loop loop;
  std::string caught;
  start_job(loop, [&]() -> job<> {
    try {
      co_await fails_with("boom");
    } catch (const std::runtime_error& e) {
      caught = e.what();
    }
  });
  drain(loop);
  CHECK(caught == "boom");
}

TEST_CASE("start_job with a capturing lambda keeps its captures alive until the job ends") {
  event_loop loop;
  std::string seen;
  {
    std::string text = "captured";
    start_job(loop, [text, &seen]() -> job<> {
      co_await sleep_task(1ms);  // the lambda temporary is long gone by now
      seen = text;
    });
  }
  drain(loop);
  CHECK(seen == "captured");
}

TEST_CASE("start_job without a loop uses the running loop, else the newest on this thread") {
  SUBCASE("no loop on this thread: std::logic_error") {
    CHECK_THROWS_AS(start_job(value_of(1)), std::logic_error);
  }
  SUBCASE("outside run(): the most recently created loop") {
    event_loop a;
    event_loop b;
    auto h = start_job(value_of(1));
    CHECK_FALSE(a.run_once());
    CHECK(b.run_once() == false);
    CHECK(h.done());
  }
  SUBCASE("inside run(): the running loop") {
    event_loop a;
    event_loop b;
    job_handle<int> inner;
    start_job(a, [&]() -> job<> {
      inner = start_job(value_of(5));
      co_return;
    });
    drain(a);
    REQUIRE(inner.done());  // ran on a, which drained it
    CHECK(inner.result() == 5);
    CHECK_FALSE(b.run_once());
  }
}

struct alignas(64) over_aligned {
  int v;
};

// A job's state is built in a room in front of its root frame (one allocation per job),
// unless the result is large or over-aligned; either way it outlives the frame.
TEST_CASE_FIXTURE(no_live_left, "a result of any size or alignment outlives the job's frame until the last handle goes") {
  event_loop loop;
  auto small = start_job(loop, []() -> job<int> { co_return 1; });
  auto big = start_job(loop, []() -> job<std::array<char, 4096>> {
    std::array<char, 4096> a{};
    a[4095] = 'z';
    co_return a;
  });
  auto aligned = start_job(loop, []() -> job<over_aligned> { co_return over_aligned{3}; });
  {
    auto counted = start_job(loop, []() -> job<live> { co_return live{}; });
    drain(loop);
    REQUIRE(counted.done());
    CHECK(live::count == 1);  // the frame is gone; the state holds the value
    auto copy = counted;
  }
  CHECK(live::count == 0);  // the last handle freed the state and its value
  CHECK(small.result() == 1);
  CHECK(big.result()[4095] == 'z');
  const auto a = aligned.result();
  CHECK(a.v == 3);
  CHECK(reinterpret_cast<std::uintptr_t>(&a) % 64 == 0);
}

// The room in front of a frame lives as long as the job's state: offering it to big frames
// would keep their memory while a handle is held.
TEST_CASE("a handle kept to a finished job does not keep a large frame's memory") {
  event_loop loop;
  std::vector<job_handle<int>> handles;
  const std::size_t before = mallinfo2().uordblks;
  for (int i = 0; i < 100; ++i)
    handles.push_back(start_job(loop, []() -> job<int> {
      std::array<char, 16384> big{};
      big[0] = 1;
      co_await sleep_task(0s);  // big lives in the frame
      co_return big[0] + big[16383];
    }));
  drain(loop);
  const std::size_t after = mallinfo2().uordblks;
  for (auto& h : handles) CHECK(h.result() == 1);
  MESSAGE("heap held by 100 finished jobs with 16 KiB frames: " << (after - before) << " bytes");
  CHECK(after - before < 100 * 16384 / 4);
}

// Runs fn on a thread with a 1 MiB stack (as `ulimit -s 1024`), so that any stack growth
// per await shows up as a crash here rather than passing on the main thread's 8 MiB.
template <class F>
void on_small_stack(F fn) {
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 1 << 20);
  pthread_t t;
  REQUIRE(pthread_create(
              &t, &attr, [](void* p) -> void* { (*static_cast<F*>(p))(); return nullptr; }, &fn) == 0);
  pthread_join(t, nullptr);
  pthread_attr_destroy(&attr);
}

TEST_CASE("10,000,000 awaits of child jobs that complete at once run without stack overflow") {
  long result = 0;
  on_small_stack([&] {
    event_loop loop;
    auto h = start_job(loop, []() -> job<long> {
      long sum = 0;
      for (int i = 0; i < 10'000'000; ++i) sum += co_await value_of(1);
      co_return sum;
    });
    loop.run();
    result = h.result();
  });
  CHECK(result == 10'000'000);
}

namespace {
job<int> nested(int depth) {
  if (depth == 0) {
    co_await sleep_task(0s);
    co_return 0;
  }
  co_return 1 + co_await nested(depth - 1);
}
}  // namespace

TEST_CASE("100,000 nested child jobs run without stack overflow") {
  int result = 0;
  on_small_stack([&] {
    event_loop loop;
    auto h = start_job(loop, nested(100'000));
    loop.run();
    result = h.result();
  });
  CHECK(result == 100'000);
}

}  // TEST_SUITE("jobs")

TEST_SUITE("the loop") {

TEST_CASE("run() returns when nothing is pending") {
  event_loop loop;
  CHECK_FALSE(loop.run_once());
  int n = 0;
  loop.post([&] { ++n; });
  loop.run();
  CHECK(n == 1);
  CHECK_FALSE(loop.run_once());
}

TEST_CASE("run_once returns whether anything is still pending") {
  event_loop loop;
  CHECK_FALSE(loop.run_once());
  auto h = start_job(loop, []() -> job<> {
    co_await sleep_task(0s);
    co_await sleep_task(0s);
  });
  CHECK(loop.run_once());        // started, then yielded
  CHECK(loop.run_once());        // yielded again
  CHECK_FALSE(loop.run_once());  // ended
  CHECK(h.done());
}

TEST_CASE("quit() from another thread makes run() return") {
  event_loop loop;
  bool fired = false;
  loop.call_later(1h, [&] { fired = true; });  // keeps run() busy
  std::thread other([&] { loop.quit(); });
  loop.run();  // returns once quit() was seen; a missed wakeup would hang here
  other.join();
  CHECK_FALSE(fired);
}

TEST_CASE("post runs callbacks in FIFO order on the loop thread, from any thread") {
  event_loop loop;
  std::vector<int> order;
  std::set<std::thread::id> threads;
  for (int i = 0; i < 3; ++i) loop.post([&, i] { order.push_back(i); });
  std::thread other([&] {
    for (int i = 3; i < 6; ++i) loop.post([&, i] {
      order.push_back(i);
      threads.insert(std::this_thread::get_id());
    });
  });
  other.join();
  drain(loop);
  CHECK(order == std::vector<int>{0, 1, 2, 3, 4, 5});
  CHECK(threads == std::set<std::thread::id>{std::this_thread::get_id()});
}

namespace {
// 200 rounds of: another thread posts while the loop blocks; a lost wakeup fails a round.
void posts_from_another_thread_wake(event_loop& loop) {
  for (int round = 0; round < 200; ++round) {
    std::atomic<bool> ran{false};
    std::thread other([&] { loop.post([&] { ran = true; }); });
    CHECK(run_until(
        loop, [&] { return ran.load(); }, 5s));
    other.join();
  }
}
}  // namespace

TEST_CASE("a post from another thread wakes a loop that waits in poll on an fd, every time") {
  event_loop loop;
  pipe_fds p;
  auto w = loop.watch(p.r, POLLIN, [](short) {});  // never ready: the loop waits in ppoll
  posts_from_another_thread_wake(loop);
  w.cancel();
}

TEST_CASE("a post from another thread wakes a loop that waits in poll with no fd watched, every time") {
  event_loop loop;
  auto keep = loop.call_later(1h, [] {});  // pending, so the loop blocks
  posts_from_another_thread_wake(loop);
  keep.cancel();
}

TEST_CASE("call_later runs its callback once after the delay, and cancel() removes it") {
  event_loop loop;
  int a = 0, b = 0;
  const auto t0 = steady_clock::now();
  steady_clock::time_point ran_at{};
  auto ha = loop.call_later(20ms, [&] {
    ++a;
    ran_at = steady_clock::now();
  });
  auto hb = loop.call_later(10ms, [&] { ++b; });
  CHECK(hb.cancel());
  CHECK_FALSE(hb.cancel());
  drain(loop);
  CHECK(a == 1);
  CHECK(b == 0);
  CHECK(ran_at - t0 >= 20ms);
  CHECK_FALSE(ha.active());
  CHECK_FALSE(ha.cancel());
}

TEST_CASE("cancelling a timer that is due but has not run yet leaves nothing pending") {
  event_loop loop;
  callback_handle second;
  bool ran2 = false;
  auto first = loop.call_later(5ms, [&] { CHECK(second.cancel()); });
  second = loop.call_later(5ms, [&] { ran2 = true; });  // same deadline: due in the same iteration
  CHECK(run_until(loop, [&] { return !first.active(); }));
  CHECK(loop.stats().timers == 0);
  drain(loop);
  CHECK_FALSE(ran2);
}

TEST_CASE("callbacks set with the same delay fire in the order they were set") {
  event_loop loop;
  std::vector<int> order;
  for (int i = 0; i < 20; ++i) loop.call_later(0ms, [&, i] { order.push_back(i); });
  for (int i = 20; i < 40; ++i) loop.call_later(5ms, [&, i] { order.push_back(i); });
  drain(loop);
  std::vector<int> expected(40);
  for (int i = 0; i < 40; ++i) expected[i] = i;
  CHECK(order == expected);
}

TEST_CASE("one iteration runs only what was ready when it began, so a yielding job cannot starve timers") {
  event_loop loop;
  bool stop = false;
  long yields = 0;
  auto spinner = start_job(loop, [&]() -> job<> {
    while (!stop) {
      co_await sleep_task(0s);
      ++yields;
    }
  });
  loop.call_later(20ms, [&] { stop = true; });
  CHECK(run_until(loop, [&] { return spinner.done(); }));
  CHECK(yields > 0);
}

TEST_CASE("watch calls back while an fd is readable, until cancelled") {
  event_loop loop;
  pipe_fds p;
  int calls = 0;
  short seen = 0;
  callback_handle w = loop.watch(p.r, POLLIN, [&](short revents) {
    ++calls;
    seen = revents;
    if (calls == 3) w.cancel();  // cancelling from inside its own callback is fine
  });
  REQUIRE(::write(p.w, "x", 1) == 1);  // stays readable: we never read it
  CHECK(run_until(loop, [&] { return calls == 3; }));
  CHECK((seen & POLLIN));
  CHECK_FALSE(w.active());
  drain(loop);
  CHECK(calls == 3);
}

TEST_CASE("a watch on an fd that gets closed reports POLLNVAL once and is dropped") {
  event_loop loop;
  auto* p = new pipe_fds;
  int calls = 0;
  short seen = 0;
  auto w = loop.watch(p->r, POLLIN, [&](short revents) {
    ++calls;
    seen = revents;
  });
  delete p;  // closes the fd under the watch
  CHECK(run_until(loop, [&] { return calls > 0; }));
  CHECK((seen & POLLNVAL));
  drain(loop);  // ends: nothing is left to spin on
  CHECK(calls == 1);
  CHECK_FALSE(w.active());
}

TEST_CASE_FIXTURE(no_live_left, "jobs() lists each live job with its name, state and what it waits on for how long") {
  event_loop loop(manual());
  pipe_fds p;
  start_job(loop, after(1h, 0), "sleeper");
  start_job(
      loop, [&]() -> job<> { co_await wait_readable(p.r); }, "reader");
  loop.advance(1ms);
  start_job(loop, after(1ms, 1), "new");
  loop.advance(0ms);
  auto list = loop.jobs();
  // `new` started in the advance(0ms) above; it waits on its sleep too.
  std::map<std::string, job_info> by_name;
  for (auto& i : list) by_name.emplace(i.name, i);
  REQUIRE(by_name.size() == 3);
  CHECK(std::string(by_name["sleeper"].state) == "waiting");
  CHECK(std::string(by_name["sleeper"].waiting_on) == "sleep_task");
  CHECK(by_name["sleeper"].waited == 1ms);
  CHECK(std::string(by_name["reader"].waiting_on) == "wait_readable");
  CHECK(std::string(by_name["new"].waiting_on) == "sleep_task");
  CHECK(by_name["new"].waited == 0ms);
  start_job(loop, after(1ms, 1), "queued");
  CHECK(std::string(loop.jobs().front().state) == "not started");
}

TEST_CASE("the loop makes one blocking wait and uses no measurable CPU while a job sleeps") {
  event_loop loop;
  auto ctx_switches = [] {
    std::ifstream f("/proc/thread-self/status");
    std::string line;
    while (std::getline(f, line))
      if (line.rfind("voluntary_ctxt_switches:", 0) == 0) return std::stol(line.substr(24));
    return -1L;
  };
  auto cpu = [] {
    rusage ru{};
    getrusage(RUSAGE_THREAD, &ru);
    return std::chrono::seconds(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           std::chrono::microseconds(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  };
  auto h = start_job(loop, []() -> job<> { co_await sleep_task(1s); });
  loop.run_once();  // starts the job, which sets its timer
  const long sw0 = ctx_switches();
  const auto cpu0 = cpu();
  drain(loop);
  const long waits = ctx_switches() - sw0;
  const auto used = cpu() - cpu0;
  MESSAGE("1 s sleep: " << waits << " blocking wait(s), "
                        << std::chrono::duration_cast<std::chrono::microseconds>(used).count()
                        << " us CPU");
  CHECK(h.done());
  CHECK(waits >= 1);
  CHECK(waits <= 2);  // one wait; a second only if the kernel woke us a hair early
  CHECK(used < 20ms);
}

// The loop and a worker spin for a few microseconds around a thread function (see
// spin_until in the header); they must go to sleep after it.
TEST_CASE("after a thread function, the loop and its workers use no measurable CPU while a job sleeps") {
  event_loop loop(loop_options{.worker_threads = 2});
  auto process_cpu = [] {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return std::chrono::seconds(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           std::chrono::microseconds(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  };
  std::chrono::microseconds before{}, after{};
  auto h = start_job(loop, [&]() -> job<> {
    co_await threaded_task([] {});
    co_await threaded_task([] {});
    before = process_cpu();
    co_await sleep_task(500ms);
    after = process_cpu();
  });
  drain(loop);
  REQUIRE(h.done());
  const auto used = after - before;
  MESSAGE("500 ms sleep after two thread functions: " << used.count() << " us CPU");
  CHECK(used < 20ms);  // spinning workers would use about a second
}

}  // TEST_SUITE("the loop")

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
  CHECK_FALSE(run_until(
      loop, [&] { return resumed > 0; }, 50ms));  // a wrap would fire at once
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
          },
                                         20, 22);
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
  drain(loop);              // and run() waited for the cancelled function to finish
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
  loop.run_once();                                 // every job waits now
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
  drain(loop);                          // nothing left on the fd: the loop ends
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
