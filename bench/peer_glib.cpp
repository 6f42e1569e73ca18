// bench/peer_glib.cpp - the GLib main loop side of the benchmark.
// Usage: peer_glib [--quick] [--only W1,...]; prints RESULT <workload> <metric> <value>.
// GLib has no coroutines: a "job" is a small heap struct driven by its callbacks (idle
// sources, timeout sources, a GThreadPool whose completions attach an idle source back to
// the loop's GMainContext).
#include <glib.h>

#include <atomic>
#include <thread>
#include <vector>

#include "common.hpp"

using bench::clk;

namespace {

GMainLoop* main_loop;

void run_loop() {
  main_loop = g_main_loop_new(nullptr, FALSE);
  g_main_loop_run(main_loop);
  g_main_loop_unref(main_loop);
  main_loop = nullptr;
}

// ---- W1: switches --------------------------------------------------------------------

struct yielder {
  int left;
  long* count;
  int* running;
};

gboolean yield_step(gpointer p) {
  auto* y = static_cast<yielder*>(p);
  ++*y->count;
  if (--y->left > 0) return G_SOURCE_CONTINUE;  // dispatched again next iteration
  if (--*y->running == 0) g_main_loop_quit(main_loop);
  return G_SOURCE_REMOVE;
}

void w1(const bench::options& o) {
  const int jobs = o.n.w1_jobs, yields = o.n.w1_yields;
  const double switches = double(jobs) * yields;
  std::vector<yielder> ys(static_cast<std::size_t>(jobs));
  long count = 0;
  int running = jobs;
  const auto t0 = clk::now();
  for (auto& y : ys) {
    y = {yields, &count, &running};
    g_idle_add(yield_step, &y);
  }
  run_loop();
  const auto t1 = clk::now();
  bench::check(count == long(switches), "W1", "glib: wrong number of switches");
  bench::result("W1", "ns_per_switch", bench::seconds(t1 - t0) * 1e9 / switches);
}

// ---- W2: a million timers ------------------------------------------------------------

struct sleeper {
  clk::time_point t0;
  int ms;
  float* late_ms;
  long* left;
};

gboolean sleeper_fired(gpointer p) {
  auto* s = static_cast<sleeper*>(p);
  const auto t1 = clk::now();
  *s->late_ms =
      std::chrono::duration<float, std::milli>(t1 - s->t0 - std::chrono::milliseconds(s->ms))
          .count();
  if (--*s->left == 0) g_main_loop_quit(main_loop);
  delete s;
  return G_SOURCE_REMOVE;
}

void w2(const bench::options& o) {
  const int n = o.n.w2_jobs;
  const auto delay = bench::delays(n, o.n.w2_max_ms);
  std::vector<float> late(static_cast<std::size_t>(n), -1e9f);
  long left = n;
  main_loop = g_main_loop_new(nullptr, FALSE);
  const long rss0 = bench::peak_rss();
  const auto t0 = clk::now();
  for (int i = 0; i < n; ++i) {
    const int ms = delay[std::size_t(i)];
    g_timeout_add(guint(ms), sleeper_fired,
                  new sleeper{clk::now(), ms, &late[std::size_t(i)], &left});
  }
  g_main_loop_run(main_loop);
  const auto t1 = clk::now();
  const long rss1 = bench::peak_rss();
  g_main_loop_unref(main_loop);
  bench::check(left == 0, "W2", "not every job ended");
  bench::report_w2(n, bench::seconds(t1 - t0), rss0, rss1, late);
}

// ---- W3: threaded round trips --------------------------------------------------------

using bench::loop_thread;
using bench::off_loop;
using bench::trivial;

struct tripper {
  int i = 0, n = 0, r = 0;
  long* sum;
  int* running;
  GThreadPool* pool;
};

gboolean trip_done(gpointer p);

void trip_start(tripper* t) { g_thread_pool_push(t->pool, t, nullptr); }

void trip_work(gpointer p, gpointer) {  // on a pool thread
  auto* t = static_cast<tripper*>(p);
  t->r = trivial(t->i);
  GSource* s = g_idle_source_new();
  g_source_set_callback(s, trip_done, t, nullptr);
  g_source_attach(s, nullptr);  // the default context: the loop's; wakes it
  g_source_unref(s);
}

gboolean trip_done(gpointer p) {  // back on the loop thread
  auto* t = static_cast<tripper*>(p);
  if (std::this_thread::get_id() != loop_thread) bench::fail("W3", "resumed off the loop thread");
  *t->sum += t->r - t->i;
  if (++t->i < t->n)
    trip_start(t);
  else if (--*t->running == 0)
    g_main_loop_quit(main_loop);
  return G_SOURCE_REMOVE;
}

double trips(GThreadPool* pool, int jobs, int each) {
  std::vector<tripper> ts(static_cast<std::size_t>(jobs));
  long sum = 0;
  int running = jobs;
  off_loop = 0;
  const auto t0 = clk::now();
  for (auto& t : ts) {
    t.n = each;
    t.sum = &sum;
    t.running = &running;
    t.pool = pool;
    trip_start(&t);
  }
  run_loop();
  const auto t1 = clk::now();
  const long total = long(jobs) * each;
  bench::check(sum == total && off_loop == total, "W3", "wrong count or thread");
  return bench::seconds(t1 - t0) * 1e6 / double(total);
}

void w3(const bench::options& o) {
  loop_thread = std::this_thread::get_id();
  GThreadPool* pool = g_thread_pool_new(trip_work, nullptr, 2, FALSE, nullptr);
  bench::result("W3", "seq_us_per_trip", trips(pool, 1, o.n.w3_seq));
  bench::result("W3", "par64_us_per_trip", trips(pool, o.n.w3_jobs, o.n.w3_each));
  g_thread_pool_free(pool, FALSE, TRUE);
}

// ---- W4: timer precision -------------------------------------------------------------

struct precise {
  int left;
  guint ms;
  clk::time_point t0;
  std::vector<double>* late_us;
};

gboolean precise_fired(gpointer p) {
  auto* s = static_cast<precise*>(p);
  s->late_us->push_back(std::chrono::duration<double, std::micro>(clk::now() - s->t0 -
                                                                  std::chrono::milliseconds(s->ms))
                            .count());
  if (--s->left == 0) {
    g_main_loop_quit(main_loop);
  } else {
    s->t0 = clk::now();
    g_timeout_add(s->ms, precise_fired, s);  // a new sleep from now, as the others do
  }
  return G_SOURCE_REMOVE;
}

void sleeps(int n, guint ms, std::vector<double>& late) {
  precise s{n, ms, clk::now(), &late};
  g_timeout_add(ms, precise_fired, &s);
  run_loop();
}

void w4(const bench::options& o) {
  std::vector<double> a, b;
  a.reserve(std::size_t(o.n.w4_short));
  b.reserve(std::size_t(o.n.w4_long));
  sleeps(o.n.w4_short, 1, a);
  sleeps(o.n.w4_long, 10, b);
  bench::check(int(a.size()) == o.n.w4_short && int(b.size()) == o.n.w4_long, "W4",
               "missing sleeps");
  bench::report_lateness_us("W4", "1ms", a);
  bench::report_lateness_us("W4", "10ms", b);
}

// ---- W5: idle ------------------------------------------------------------------------

gboolean idle_done(gpointer p) {
  *static_cast<bool*>(p) = true;
  g_main_loop_quit(main_loop);
  return G_SOURCE_REMOVE;
}

void w5(const bench::options& o) {
  bool done = false;
  main_loop = g_main_loop_new(nullptr, FALSE);
  const double cpu0 = bench::cpu_seconds();
  const long blocks0 = bench::thread_blocks();
  g_timeout_add(guint(o.n.w5_ms), idle_done, &done);
  g_main_loop_run(main_loop);
  const long blocks1 = bench::thread_blocks();
  const double cpu1 = bench::cpu_seconds();
  g_main_loop_unref(main_loop);
  bench::check(done, "W5", "the timeout did not fire");
  bench::report_w5(cpu1 - cpu0, blocks1 - blocks0, blocks1 - blocks0);
}

}  // namespace

int main(int argc, char** argv) { return bench::run_workloads(argc, argv, w1, w2, w3, w4, w5); }
