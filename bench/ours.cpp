// bench/ours.cpp - the coro_jobs side of the benchmark (see bench/README.md).
// Usage: ours [--quick] [--only W1,W2,W3,W4,W5]; prints RESULT <workload> <metric> <value>.
#include "coro_jobs.hpp"

#include <malloc.h>

#include <atomic>
#include <coroutine>
#include <thread>
#include <vector>

#include "common.hpp"

using namespace coro_jobs;
using namespace std::chrono_literals;
using bench::clk;

namespace {

// ---- W1: switches --------------------------------------------------------------------

job<void> yielder(int n, long& count) {
  for (int i = 0; i < n; ++i) {
    co_await sleep_task(0s);  // a plain yield: no timer, no clock read (see sleep_op)
    ++count;
  }
}

// The baseline: the least a coroutine switch can cost. A hand-written coroutine type whose
// only await pushes its handle onto a std::vector; the "loop" resumes the queue's snapshot.
struct bare {
  struct promise_type {
    bare get_return_object() noexcept {
      return {std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() noexcept { return {}; }
    std::suspend_always final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { std::terminate(); }
  };
  std::coroutine_handle<promise_type> h;
};
std::vector<std::coroutine_handle<>>* bare_queue;
struct bare_yield {
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) const { bare_queue->push_back(h); }
  void await_resume() const noexcept {}
};
bare bare_yielder(int n, long& count) {
  for (int i = 0; i < n; ++i) {
    co_await bare_yield{};
    ++count;
  }
}

void w1(const bench::options& o) {
  const int jobs = o.n.w1_jobs, yields = o.n.w1_yields;
  const double switches = double(jobs) * yields;
  {
    event_loop loop(loop_options{.worker_threads = 2});
    long count = 0;
    const auto t0 = clk::now();
    for (int j = 0; j < jobs; ++j) start_job(loop, yielder(yields, count));
    loop.run();
    const auto t1 = clk::now();
    bench::check(count == long(switches), "W1", "ours: wrong number of switches");
    bench::result("W1", "ns_per_switch", bench::seconds(t1 - t0) * 1e9 / switches);
  }
  {
    std::vector<std::coroutine_handle<>> queue, running;
    std::vector<bare> frames;
    bare_queue = &queue;
    long count = 0;
    const auto t0 = clk::now();
    for (int j = 0; j < jobs; ++j) {
      frames.push_back(bare_yielder(yields, count));
      queue.push_back(frames.back().h);
    }
    while (!queue.empty()) {
      running.swap(queue);
      for (auto h : running) h.resume();
      running.clear();
    }
    const auto t1 = clk::now();
    for (auto& f : frames) f.h.destroy();
    bench::check(count == long(switches), "W1", "bare: wrong number of switches");
    bench::result("W1", "bare_ns_per_switch", bench::seconds(t1 - t0) * 1e9 / switches);
  }
}

// ---- W2: a million timers ------------------------------------------------------------

job<void> sleeper(int ms, float* late_ms, long& done) {
  const auto t0 = clk::now();
  co_await sleep_task(std::chrono::milliseconds(ms));
  const auto t1 = clk::now();
  *late_ms =
      std::chrono::duration<float, std::milli>(t1 - t0 - std::chrono::milliseconds(ms)).count();
  ++done;
}

// The floor under W2's memory target, for this compiler: the frame of W2's job body (1) over
// a promise and an awaiter that hold nothing, (2) over the least a cancellable sleep needs
// (the promise knows its job; the awaiter its job and its timer); and (3) what coro_jobs
// puts on the heap per started job (frame and state, malloc's headers included). Their
// awaiters do not really suspend (await_suspend returns false), so each body runs through.
std::size_t last_frame = 0;  // what the last floor frame asked operator new for

template <class State, class Await> struct floor_task {
  struct promise_type {
    [[no_unique_address]] State state;
    static void* operator new(std::size_t n) {
      last_frame = n;
      return ::operator new(n);
    }
    static void operator delete(void* p) noexcept { ::operator delete(p); }
    floor_task get_return_object() {
      return {std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_never initial_suspend() noexcept { return {}; }
    std::suspend_always final_suspend() noexcept { return {}; }
    void return_void() {}
    void unhandled_exception() {}
  };
  std::coroutine_handle<promise_type> h;
};
struct no_state {};
struct job_link {
  void* job = nullptr;
};
struct one_word {  // remembers the duration only
  long d;
  explicit one_word(long x) : d(x) {}
  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<>) const noexcept { return false; }
  long await_resume() const noexcept { return d; }
};
struct cancellable {  // and the job to resume and the timer to withdraw
  void* job = nullptr;
  std::uint64_t timer = 0;
  long d;
  explicit cancellable(long x) : d(x) {}
  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<>) const noexcept { return false; }
  long await_resume() const noexcept { return d; }
};
// Not inlined, or clang would elide the very allocation being measured.
template <class State, class Await>
[[gnu::noinline]] floor_task<State, Await> floor_body(int ms, float* late_ms,
                                                      long& done) {  // as sleeper()
  const auto t0 = clk::now();
  co_await Await(ms);
  *late_ms = std::chrono::duration<float, std::milli>(clk::now() - t0).count();
  ++done;
}
template <class State, class Await> std::size_t floor_frame() {
  float late = 0;
  long done = 0;
  floor_body<State, Await>(1, &late, done).h.destroy();
  bench::check(done == 1, "W2", "a floor body did not run through");
  return last_frame;
}

job<void> sleeper(int ms, float* late_ms, long& done);

void w2_floor() {
  bench::result("W2", "floor_frame_bytes", double(floor_frame<no_state, one_word>()));
  bench::result("W2", "floor_cancellable_frame_bytes",
                double(floor_frame<job_link, cancellable>()));
  event_loop loop;
  float late = 0;
  long done = 0;
  const int n = 1000;
  for (int i = 0; i < n; ++i) start_job(loop, sleeper(0, &late, done));  // grows the ready queue
  loop.run();
  const std::size_t before = mallinfo2().uordblks;
  for (int i = 0; i < n; ++i) start_job(loop, sleeper(0, &late, done));
  const std::size_t after = mallinfo2().uordblks;
  loop.run();
  bench::check(done == 2 * n, "W2", "floor: not every job ended");
  bench::result("W2", "heap_per_job_bytes", double(after - before) / n);
}

void w2(const bench::options& o) {
  w2_floor();
  const int n = o.n.w2_jobs;
  const auto delay = bench::delays(n, o.n.w2_max_ms);
  std::vector<float> late(static_cast<std::size_t>(n),
                          -1e9f);  // touched now, so not counted as growth
  long done = 0;
  event_loop loop(loop_options{.worker_threads = 2});
  const long rss0 = bench::peak_rss();
  const auto t0 = clk::now();
  for (int i = 0; i < n; ++i)
    start_job(loop, sleeper(delay[std::size_t(i)], &late[std::size_t(i)], done));
  loop.run();
  const auto t1 = clk::now();
  const long rss1 = bench::peak_rss();
  bench::check(done == n, "W2", "not every job ended");
  bench::report_w2(n, bench::seconds(t1 - t0), rss0, rss1, late);
}

// ---- W3: threaded round trips --------------------------------------------------------

using bench::loop_thread;
using bench::off_loop;
using bench::trivial;

job<void> round_trips(int n, long& sum) {
  for (int i = 0; i < n; ++i) {
    sum += co_await threaded_task(trivial, i) - i;
    if (std::this_thread::get_id() != loop_thread) bench::fail("W3", "resumed off the loop thread");
  }
}

void w3(const bench::options& o) {
  loop_thread = std::this_thread::get_id();
  event_loop loop(loop_options{.worker_threads = 2});  // two worker threads, as for every peer
  {
    long sum = 0;
    off_loop = 0;
    const auto t0 = clk::now();
    start_job(loop, round_trips(o.n.w3_seq, sum));
    loop.run();
    const auto t1 = clk::now();
    bench::check(sum == o.n.w3_seq && off_loop == o.n.w3_seq, "W3",
                 "sequential: wrong count or thread");
    bench::result("W3", "seq_us_per_trip", bench::seconds(t1 - t0) * 1e6 / o.n.w3_seq);
  }
  {
    long sum = 0;
    off_loop = 0;
    const long total = long(o.n.w3_jobs) * o.n.w3_each;
    const auto t0 = clk::now();
    for (int j = 0; j < o.n.w3_jobs; ++j) start_job(loop, round_trips(o.n.w3_each, sum));
    loop.run();
    const auto t1 = clk::now();
    bench::check(sum == total && off_loop == total, "W3", "concurrent: wrong count or thread");
    bench::result("W3", "par64_us_per_trip", bench::seconds(t1 - t0) * 1e6 / double(total));
  }
}

// ---- W4: timer precision -------------------------------------------------------------

job<void> precise(int n, std::chrono::milliseconds d, std::vector<double>& late_us) {
  for (int i = 0; i < n; ++i) {
    const auto t0 = clk::now();
    co_await sleep_task(d);
    late_us.push_back(std::chrono::duration<double, std::micro>(clk::now() - t0 - d).count());
  }
}

void w4(const bench::options& o) {
  event_loop loop(loop_options{.worker_threads = 2});
  std::vector<double> a, b;
  a.reserve(std::size_t(o.n.w4_short));
  b.reserve(std::size_t(o.n.w4_long));
  start_job(loop, precise(o.n.w4_short, 1ms, a));
  loop.run();
  start_job(loop, precise(o.n.w4_long, 10ms, b));
  loop.run();
  bench::check(int(a.size()) == o.n.w4_short && int(b.size()) == o.n.w4_long, "W4",
               "missing sleeps");
  bench::check(
      *std::min_element(a.begin(), a.end()) >= 0 && *std::min_element(b.begin(), b.end()) >= 0,
      "W4", "a sleep ended early");
  bench::report_lateness_us("W4", "1ms", a);
  bench::report_lateness_us("W4", "10ms", b);
}

// ---- W5: idle ------------------------------------------------------------------------

job<void> idle(std::chrono::milliseconds d, bool& done) {
  co_await sleep_task(d);
  done = true;
}

void w5(const bench::options& o) {
  event_loop loop(loop_options{.worker_threads = 2});
  bool done = false;
  const auto polls0 = loop.stats().polls;
  const double cpu0 = bench::cpu_seconds();
  const long blocks0 = bench::thread_blocks();
  start_job(loop, idle(std::chrono::milliseconds(o.n.w5_ms), done));
  loop.run();
  const long blocks1 = bench::thread_blocks();
  const double cpu1 = bench::cpu_seconds();
  bench::check(done, "W5", "the job did not end");
  bench::report_w5(cpu1 - cpu0, long(loop.stats().polls - polls0), blocks1 - blocks0);
}

}  // namespace

int main(int argc, char** argv) { return bench::run_workloads(argc, argv, w1, w2, w3, w4, w5); }
