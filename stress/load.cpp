// stress/load.cpp - load: many jobs, many threads, many wakeups, signals, a blocked loop.
#include "common.hpp"

#include <memory>
#include <vector>

using namespace stress;

namespace {

struct sleep_counts {
  long done = 0, early = 0;
};

job<> sleeper(std::chrono::milliseconds d, sleep_counts& c) {
  live_frame f;
  const auto t0 = steady_clock::now();
  const auto slept = co_await sleep_task(d);
  if (steady_clock::now() - t0 < d || slept < d) ++c.early;
  ++c.done;
}

}  // namespace

TEST_CASE("a million concurrent sleeping jobs all finish, none early, and every frame is freed") {
  const long n = sized(1'000'000, 1'000'000, 100'000);
  live_frame::live = 0;
  sleep_counts c;
  stopwatch w;
  {
    event_loop loop;
    for (long i = 0; i < n; ++i) start_job(loop, sleeper(std::chrono::milliseconds(1 + i % 250), c));
    CHECK(run_until(
        loop, [&] { return c.done == n; }, 180s));
    CHECK(c.done == n);
    CHECK(c.early == 0);
    CHECK(live_frame::live == 0);
    CHECK(all_zero(loop.stats()));
    INFO(to_string(loop.stats()));
  }
  CHECK(live_frame::live == 0);
  STRESS_REPORT(n << " sleeping jobs (1..250 ms)", w);
}

TEST_CASE("100,000 threaded round trips each deliver their own result exactly once") {
  const long jobs = 20, per_job = sized(5'000, 5'000, 500);
  const long n = jobs * per_job;
  std::vector<std::atomic<int>> ran(static_cast<std::size_t>(n));
  std::vector<int> received(static_cast<std::size_t>(n), 0);
  long wrong = 0, finished = 0;
  stopwatch w;
  {
    event_loop loop;
    for (long j = 0; j < jobs; ++j) {
      start_job(loop, [&, j]() -> job<> {
        live_frame f;
        for (long k = 0; k < per_job; ++k) {
          const long id = j * per_job + k;
          const long got = co_await threaded_task([&ran](long i) {
            ++ran[static_cast<std::size_t>(i)];
            return i;
          },
                                                  id);
          if (got != id) ++wrong;
          ++received[static_cast<std::size_t>(got >= 0 && got < n ? got : 0)];
        }
        ++finished;
      });
    }
    CHECK(run_until(
        loop, [&] { return finished == jobs; }, 180s));
    CHECK(drain(loop));
    CHECK(all_zero(loop.stats()));
  }
  long bad = wrong;
  for (long i = 0; i < n; ++i) bad += (ran[std::size_t(i)] != 1) + (received[std::size_t(i)] != 1);
  CHECK(bad == 0);
  CHECK(live_frame::live == 0);
  STRESS_REPORT(n << " threaded round trips by " << jobs << " jobs", w);
}

TEST_CASE("16 threads make a million cross-thread completions while the loop sleeps on a long timer") {
  constexpr int writers = 16;
  const long total = sized(1'000'000, 1'000'000, 100'000);
  const long callbacks = total / 10;  // task_return from callback_task; the rest are posts
  const long posts = total - callbacks;
  std::vector<unsigned char> delivered(static_cast<std::size_t>(total), 0);  // loop thread only
  std::vector<task_return<long>> returns;
  returns.reserve(static_cast<std::size_t>(callbacks));
  long delivered_count = 0, duplicates = 0;
  std::atomic<long> slowest_call_us{0};
  std::atomic<int> writers_done{0};
  stopwatch w;
  double drain_after_writers_ms = 0;
  {
    event_loop loop;
    auto long_timer = loop.call_later(1h, [] {});
    for (long i = 0; i < callbacks; ++i) {
      start_job(loop, [&, i]() -> job<> {
        const long v = co_await callback_task<long>([&](task_return<long> r) { returns.push_back(r); });
        if (v != i) ++duplicates;  // a wrong value counts as a fault too
        if (delivered[std::size_t(v)]++) ++duplicates;
        ++delivered_count;
      });
    }
    REQUIRE(run_until(
        loop, [&] { return long(returns.size()) == callbacks; }, 120s));
    // Now only the 1 h timer and the waiting callbacks are pending: the loop blocks in poll.
    std::atomic<bool> go{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < writers; ++t) {
      threads.emplace_back([&, t] {
        while (!go.load()) std::this_thread::yield();
        long slowest = 0;
        auto timed = [&](auto&& fn) {
          const auto t0 = steady_clock::now();
          fn();
          const long us = long(std::chrono::duration_cast<std::chrono::microseconds>(steady_clock::now() - t0).count());
          slowest = std::max(slowest, us);
        };
        for (long i = t; i < callbacks; i += writers) timed([&] { returns[std::size_t(i)](i); });
        for (long i = callbacks + t; i < total; i += writers) {
          timed([&] {
            loop.post([&delivered, &duplicates, &delivered_count, i] {
              if (delivered[std::size_t(i)]++) ++duplicates;
              ++delivered_count;
            });
          });
        }
        long prev = slowest_call_us.load();
        while (slowest > prev && !slowest_call_us.compare_exchange_weak(prev, slowest)) {
        }
        ++writers_done;
      });
    }
    go = true;
    stopwatch since_writers;
    bool writers_were_done = false;
    CHECK(run_until(
        loop, [&] {
          if (!writers_were_done && writers_done == writers) {
            writers_were_done = true;
            since_writers = stopwatch{};
          }
          return delivered_count == total;
        },
        180s));
    drain_after_writers_ms = since_writers.ms();
    for (auto& t : threads) t.join();
    CHECK(long_timer.cancel());
    returns.clear();
    CHECK(drain(loop));
    CHECK(all_zero(loop.stats()));
    const auto st = loop.stats();
    MESSAGE("iterations " << st.iterations << ", polls " << st.polls << ", slowest writer call "
                          << slowest_call_us.load() << " us, loop done "
                          << long(drain_after_writers_ms) << " ms after the last writer");
  }
  long missing = 0;
  for (auto d : delivered) missing += d != 1;
  CHECK(missing == 0);
  CHECK(duplicates == 0);
  CHECK(delivered_count == total);
  // Loose bounds: a writer never waits for the loop, and the loop keeps up.
  CHECK(slowest_call_us.load() < 2'000'000);
  CHECK(drain_after_writers_ms < 20'000);
  STRESS_REPORT(total << " completions from " << writers << " threads (" << callbacks
                      << " task_return, " << posts << " post)",
                w);
}

TEST_CASE("writers never block: a million posts from 16 threads complete while the loop is not running") {
  constexpr int writers = 16;
  const long total = sized(1'000'000, 1'000'000, 100'000);
  std::vector<unsigned char> delivered(static_cast<std::size_t>(total), 0);
  long count = 0;
  std::atomic<int> done{0};
  stopwatch w;
  event_loop loop;
  std::vector<std::thread> threads;
  for (int t = 0; t < writers; ++t)
    threads.emplace_back([&, t] {
      for (long i = t; i < total; i += writers)
        loop.post([&delivered, &count, i] {
          ++delivered[std::size_t(i)];
          ++count;
        });
      ++done;
    });
  // Nobody drives the loop meanwhile: the writers must finish on their own.
  const bool finished = wait_for_condition([&] { return done.load() == writers; }, 120s);
  CHECK(finished);
  if (!finished) loop.post([] {});  // (would only hang the join below; the check failed)
  for (auto& t : threads) t.join();
  const double writers_ms = w.ms();
  CHECK(run_until(
      loop, [&] { return count == total; }, 120s));
  long bad = 0;
  for (auto d : delivered) bad += d != 1;
  CHECK(bad == 0);
  CHECK(drain(loop));
  MESSAGE("writers finished in " << long(writers_ms) << " ms with the loop stopped; polls "
                                 << loop.stats().polls);
  STRESS_REPORT(total << " posts from " << writers << " threads into a stopped loop", w);
}

TEST_CASE("a job that never yields for 200 ms makes 100 timers late, but they fire in order and none is lost") {
  event_loop loop;
  constexpr int n = 100;
  struct rec {
    steady_clock::time_point deadline, fired;
    int order = -1;
  };
  std::vector<rec> recs(n);
  int fired = 0;
  steady_clock::time_point busy_end{};
  // Odd timers are sleeping jobs; they set their timers on the first iteration.
  for (int i = 1; i < n; i += 2) {
    start_job(loop, [&, i]() -> job<> {
      const auto d = std::chrono::milliseconds(i + 1);
      recs[i].deadline = steady_clock::now() + d;
      co_await sleep_task(d);
      recs[i].fired = steady_clock::now();
      recs[i].order = fired++;
    });
  }
  loop.run_once();
  std::vector<callback_handle> handles;
  for (int i = 0; i < n; i += 2) {
    const auto d = std::chrono::milliseconds(i + 1);
    recs[i].deadline = steady_clock::now() + d;
    handles.push_back(loop.call_later(d, [&, i] {
      recs[i].fired = steady_clock::now();
      recs[i].order = fired++;
    }));
  }
  stopwatch w;
  start_job(loop, [&]() -> job<> {
    const auto until = steady_clock::now() + 200ms;
    while (steady_clock::now() < until) {  // busy: this is the workload, not a wait
    }
    busy_end = steady_clock::now();
    co_return;
  });
  CHECK(run_until(
      loop, [&] { return fired == n; }, 20s));
  CHECK(drain(loop));
  int lost = 0, early = 0, before_busy_end = 0, out_of_order = 0;
  std::vector<int> by_order(n, -1);
  for (int i = 0; i < n; ++i) {
    if (recs[i].order < 0) {
      ++lost;
      continue;
    }
    by_order[std::size_t(recs[i].order)] = i;
    early += recs[i].fired < recs[i].deadline;
    before_busy_end += recs[i].fired < busy_end;
  }
  for (int k = 1; k < n; ++k) {
    const int a = by_order[std::size_t(k - 1)], b = by_order[std::size_t(k)];
    // Deadlines are 1 ms apart; allow the microseconds between reading the clock and setting.
    if (a >= 0 && b >= 0 && recs[b].deadline + 200us < recs[a].deadline) ++out_of_order;
  }
  CHECK(lost == 0);
  CHECK(early == 0);
  CHECK(before_busy_end == 0);
  CHECK(out_of_order == 0);
  CHECK(all_zero(loop.stats()));
  STRESS_REPORT(n << " timers (1..100 ms) behind a 200 ms busy job", w);
}

namespace {
std::atomic<long> sigusr1_count{0};
extern "C" void on_sigusr1(int) { sigusr1_count.fetch_add(1, std::memory_order_relaxed); }
}  // namespace

TEST_CASE("a 200 ms sleep ends at about 200 ms while SIGUSR1 without SA_RESTART arrives thousands of times") {
  struct sigaction sa {
  }, old{};
  sa.sa_handler = on_sigusr1;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: every signal interrupts ppoll with EINTR
  REQUIRE(::sigaction(SIGUSR1, &sa, &old) == 0);
  sigusr1_count = 0;
  event_loop loop;
  std::atomic<bool> stop{false};
  std::atomic<long> sent{0};
  const pthread_t loop_thread = ::pthread_self();
  std::chrono::nanoseconds elapsed{}, reported{};
  auto h = start_job(loop, [&]() -> job<> {
    const auto t0 = steady_clock::now();
    reported = co_await sleep_task(200ms);
    elapsed = steady_clock::now() - t0;
  });
  loop.run_once();  // the job has set its timer
  std::thread killer([&] {
    while (!stop.load()) {
      ::pthread_kill(loop_thread, SIGUSR1);
      ++sent;
      std::this_thread::yield();
    }
  });
  const auto st0 = loop.stats();
  CHECK(run_until(
      loop, [&] { return h.done(); }, 10s));
  stop = true;
  killer.join();
  const auto st1 = loop.stats();
  CHECK(drain(loop));
  ::sigaction(SIGUSR1, &old, nullptr);
  const long ms = long(std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count());
  MESSAGE("sent " << sent.load() << " SIGUSR1, handled " << sigusr1_count.load() << "; slept " << ms
                  << " ms; iterations during the sleep " << st1.iterations - st0.iterations);
  CHECK(elapsed >= 200ms);
  CHECK(reported >= 200ms);
  CHECK(elapsed < 1s);
  CHECK(sigusr1_count.load() >= 100);           // "thousands" on an idle machine; loose under load
  CHECK(st1.iterations - st0.iterations <= 3);  // EINTR is retried inside the one wait
}

TEST_CASE("after bursts of posts from several threads, a long idle wait costs only a poll or two") {
  constexpr int threads_n = 4;
  const int rounds = int(sized(20, 20, 10));
  const long per_thread = sized(20'000, 20'000, 2'000);
  event_loop loop;
  long max_idle_polls = 0, count = 0;
  stopwatch w;
  for (int r = 0; r < rounds; ++r) {
    const long expect = count + threads_n * per_thread;
    auto keep_pending = loop.call_later(1h, [] {});  // so the loop waits for the writers
    std::vector<std::thread> ts;
    for (int t = 0; t < threads_n; ++t)
      ts.emplace_back([&] {
        for (long i = 0; i < per_thread; ++i) loop.post([&] { ++count; });
      });
    CHECK(run_until(
        loop, [&] { return count == expect; }, 60s));
    for (auto& t : ts) t.join();
    keep_pending.cancel();
    // Whatever the writers left behind (a late byte in the wakeup pipe) is there now.
    const auto p0 = loop.stats().polls;
    bool fired = false;
    loop.call_later(50ms, [&] { fired = true; });
    CHECK(run_until(
        loop, [&] { return fired; }, 10s));
    max_idle_polls = std::max<long>(max_idle_polls, long(loop.stats().polls - p0));
  }
  CHECK(drain(loop));
  MESSAGE("most polls during a 50 ms idle wait: " << max_idle_polls);
  CHECK(max_idle_polls <= 4);
  STRESS_REPORT(rounds << " rounds of " << threads_n << "x" << per_thread << " posts + 50 ms idle", w);
}
