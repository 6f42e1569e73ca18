// bench/peer_asio.cpp - the Asio (C++20 coroutines) side of the benchmark.
// Usage: peer_asio [--quick] [--only W1,...]; prints RESULT <workload> <metric> <value>.
// A job is a co_spawn'ed awaitable<void> on one io_context run by the main thread.
#include <asio/async_result.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/thread_pool.hpp>
#include <asio/use_awaitable.hpp>

#include <atomic>
#include <thread>
#include <vector>

#include "common.hpp"

using asio::awaitable;
using asio::use_awaitable;
using bench::clk;

namespace {

// ---- W1: switches --------------------------------------------------------------------

awaitable<void> yielder(int n, long& count) {
  auto ex = co_await asio::this_coro::executor;
  for (int i = 0; i < n; ++i) {
    co_await asio::post(ex, use_awaitable);  // back of the io_context's queue
    ++count;
  }
}

void w1(const bench::options& o) {
  const int jobs = o.n.w1_jobs, yields = o.n.w1_yields;
  const double switches = double(jobs) * yields;
  asio::io_context io(1);
  long count = 0;
  const auto t0 = clk::now();
  for (int j = 0; j < jobs; ++j) asio::co_spawn(io, yielder(yields, count), asio::detached);
  io.run();
  const auto t1 = clk::now();
  bench::check(count == long(switches), "W1", "asio: wrong number of switches");
  bench::result("W1", "ns_per_switch", bench::seconds(t1 - t0) * 1e9 / switches);
}

// ---- W2: a million timers ------------------------------------------------------------

awaitable<void> sleeper(int ms, float* late_ms, long& done) {
  const auto t0 = clk::now();
  asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::milliseconds(ms));
  co_await t.async_wait(use_awaitable);
  const auto t1 = clk::now();
  *late_ms =
      std::chrono::duration<float, std::milli>(t1 - t0 - std::chrono::milliseconds(ms)).count();
  ++done;
}

void w2(const bench::options& o) {
  const int n = o.n.w2_jobs;
  const auto delay = bench::delays(n, o.n.w2_max_ms);
  std::vector<float> late(static_cast<std::size_t>(n), -1e9f);
  long done = 0;
  asio::io_context io(1);
  const long rss0 = bench::peak_rss();
  const auto t0 = clk::now();
  for (int i = 0; i < n; ++i)
    asio::co_spawn(io, sleeper(delay[std::size_t(i)], &late[std::size_t(i)], done), asio::detached);
  io.run();
  const auto t1 = clk::now();
  const long rss1 = bench::peak_rss();
  bench::check(done == n, "W2", "not every job ended");
  bench::report_w2(n, bench::seconds(t1 - t0), rss0, rss1, late);
}

// ---- W3: threaded round trips --------------------------------------------------------

using bench::loop_thread;
using bench::off_loop;
using bench::trivial;

// co_await on_pool(pool, x, use_awaitable): trivial(x) runs on the pool; the completion is
// posted back to the awaiting coroutine's executor (the io_context), which a work guard
// keeps alive meanwhile.
template <class Token> auto on_pool(asio::thread_pool& pool, int x, Token&& token) {
  return asio::async_initiate<Token, void(int)>(
      [&pool, x](auto handler) {
    auto ex = asio::get_associated_executor(handler);
    auto work = asio::make_work_guard(ex);
    asio::post(pool, [handler = std::move(handler), work = std::move(work), x]() mutable {
      const int r = trivial(x);
      auto home = work.get_executor();
      asio::post(home, [handler = std::move(handler), r]() mutable { std::move(handler)(r); });
      work.reset();
    });
      },
      token);
}

awaitable<void> round_trips(asio::thread_pool& pool, int n, long& sum) {
  for (int i = 0; i < n; ++i) {
    sum += co_await on_pool(pool, i, use_awaitable) - i;
    if (std::this_thread::get_id() != loop_thread) bench::fail("W3", "resumed off the loop thread");
  }
}

void w3(const bench::options& o) {
  loop_thread = std::this_thread::get_id();
  asio::thread_pool pool(2);
  {
    asio::io_context io(1);
    long sum = 0;
    off_loop = 0;
    const auto t0 = clk::now();
    asio::co_spawn(io, round_trips(pool, o.n.w3_seq, sum), asio::detached);
    io.run();
    const auto t1 = clk::now();
    bench::check(sum == o.n.w3_seq && off_loop == o.n.w3_seq, "W3",
                 "sequential: wrong count or thread");
    bench::result("W3", "seq_us_per_trip", bench::seconds(t1 - t0) * 1e6 / o.n.w3_seq);
  }
  {
    asio::io_context io(1);
    long sum = 0;
    off_loop = 0;
    const long total = long(o.n.w3_jobs) * o.n.w3_each;
    const auto t0 = clk::now();
    for (int j = 0; j < o.n.w3_jobs; ++j)
      asio::co_spawn(io, round_trips(pool, o.n.w3_each, sum), asio::detached);
    io.run();
    const auto t1 = clk::now();
    bench::check(sum == total && off_loop == total, "W3", "concurrent: wrong count or thread");
    bench::result("W3", "par64_us_per_trip", bench::seconds(t1 - t0) * 1e6 / double(total));
  }
  pool.join();
}

// ---- W4: timer precision -------------------------------------------------------------

awaitable<void> precise(int n, std::chrono::milliseconds d, std::vector<double>& late_us) {
  asio::steady_timer t(co_await asio::this_coro::executor);
  for (int i = 0; i < n; ++i) {
    const auto t0 = clk::now();
    t.expires_after(d);
    co_await t.async_wait(use_awaitable);
    late_us.push_back(std::chrono::duration<double, std::micro>(clk::now() - t0 - d).count());
  }
}

void w4(const bench::options& o) {
  std::vector<double> a, b;
  a.reserve(std::size_t(o.n.w4_short));
  b.reserve(std::size_t(o.n.w4_long));
  {
    asio::io_context io(1);
    asio::co_spawn(io, precise(o.n.w4_short, std::chrono::milliseconds(1), a), asio::detached);
    io.run();
  }
  {
    asio::io_context io(1);
    asio::co_spawn(io, precise(o.n.w4_long, std::chrono::milliseconds(10), b), asio::detached);
    io.run();
  }
  bench::check(int(a.size()) == o.n.w4_short && int(b.size()) == o.n.w4_long, "W4",
               "missing sleeps");
  bench::report_lateness_us("W4", "1ms", a);
  bench::report_lateness_us("W4", "10ms", b);
}

// ---- W5: idle ------------------------------------------------------------------------

awaitable<void> idle(std::chrono::milliseconds d, bool& done) {
  asio::steady_timer t(co_await asio::this_coro::executor, d);
  co_await t.async_wait(use_awaitable);
  done = true;
}

void w5(const bench::options& o) {
  asio::io_context io(1);
  bool done = false;
  const double cpu0 = bench::cpu_seconds();
  const long blocks0 = bench::thread_blocks();
  asio::co_spawn(io, idle(std::chrono::milliseconds(o.n.w5_ms), done), asio::detached);
  io.run();
  const long blocks1 = bench::thread_blocks();
  const double cpu1 = bench::cpu_seconds();
  bench::check(done, "W5", "the job did not end");
  bench::report_w5(cpu1 - cpu0, blocks1 - blocks0, blocks1 - blocks0);
}

}  // namespace

int main(int argc, char** argv) { return bench::run_workloads(argc, argv, w1, w2, w3, w4, w5); }
