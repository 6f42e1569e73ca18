// test/1-jobs-and-the-loop.cpp - Jobs, and the loop that runs them.
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
          co_return a * b;
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
  REQUIRE(pthread_create(&t, &attr, [](void* p) -> void* { (*static_cast<F*>(p))(); return nullptr; }, &fn) == 0);
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
  CHECK(loop.run_once());   // started, then yielded
  CHECK(loop.run_once());   // yielded again
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
    CHECK(run_until(loop, [&] { return ran.load(); }, 5s));
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
  start_job(loop, [&]() -> job<> { co_await wait_readable(p.r); }, "reader");
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
