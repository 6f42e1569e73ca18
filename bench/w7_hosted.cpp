// bench/w7_hosted.cpp - W7: the same jobs under the loop's own run() and inside other loops.
// Usage: w7_hosted --host native|glib|guest|pump|qt [--quick]; prints RESULT W7 <host>_<metric>.
//   native  event_loop::run_once() in a loop of our own
//   glib    hosts/coro_jobs_glib.hpp under g_main_context_iteration
//   guest   hosts/coro_jobs_guest.hpp under a host that only runs posted functions
//   qt      hosts/coro_jobs_qt.hpp under QCoreApplication::processEvents (built with -DW7_QT)
//   pump    what a user would write without an adapter: a 1 ms GLib timeout calling run_once(0s)
// Metrics: 1 ms sleep lateness p50/p99 (300 sequential sleeps), a threaded_task round trip
// (sequential, and 64 jobs at once), and the CPU a 2 s sleep costs.
#include "bench/common.hpp"
#include "coro_jobs.hpp"
#include "hosts/coro_jobs_glib.hpp"
#include "hosts/coro_jobs_guest.hpp"
#ifdef W7_QT
#include "hosts/coro_jobs_qt.hpp"

#include <QCoreApplication>
#include <QTimer>
#endif

#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

using namespace coro_jobs;
using namespace std::chrono_literals;

namespace {

// A host that runs only posted functions (as SDL_PushEvent or CallAfter would).
struct post_host {
  std::mutex m;
  std::condition_variable cv;
  std::deque<std::function<void()>> q;
  void post(std::function<void()> fn) {
    std::lock_guard<std::mutex> lock(m);
    q.push_back(std::move(fn));
    cv.notify_one();
  }
  void iterate() {
    std::deque<std::function<void()>> batch;
    {
      std::unique_lock<std::mutex> lock(m);
      cv.wait(lock, [&] { return !q.empty(); });
      batch.swap(q);
    }
    for (auto& fn : batch) fn();
  }
};

struct driver {
  std::string host;
  event_loop loop{loop_options{.worker_threads = 2}};
  glib_attachment glib;
  host_attachment guest;
  post_host poster;
  GMainContext* ctx = nullptr;
#ifdef W7_QT
  qt_attachment qt;
#endif

  explicit driver(std::string h) : host(std::move(h)) {
    if (host == "glib" || host == "pump") ctx = g_main_context_new();
    if (host == "glib") glib = attach_to_glib(loop, ctx);
    if (host == "guest")
      guest =
          attach_to_host(loop, [this](std::function<void()> fn) { poster.post(std::move(fn)); });
#ifdef W7_QT
    if (host == "qt") qt = attach_to_qt(loop);
#endif
    if (host == "pump") {
      g_source_set_callback(
          pump_source = g_timeout_source_new(1),
          [](gpointer p) -> gboolean {
            static_cast<event_loop*>(p)->run_once(0s);
            return G_SOURCE_CONTINUE;
          },
          &loop, nullptr);
      g_source_attach(pump_source, ctx);
    }
  }
  GSource* pump_source = nullptr;
  ~driver() {
    glib.reset();
    guest.reset();
    if (pump_source) {
      g_source_destroy(pump_source);
      g_source_unref(pump_source);
    }
    if (ctx) g_main_context_unref(ctx);
  }
  template <class T> void run(job_handle<T>& h) {
    while (!h.done()) {
      if (host == "native") {
        loop.run_once();
      } else if (host == "glib" || host == "pump") {
        g_main_context_iteration(ctx, TRUE);
      } else if (host == "guest") {
        poster.iterate();
#ifdef W7_QT
      } else if (host == "qt") {
        QCoreApplication::processEvents(QEventLoop::WaitForMoreEvents);
#endif
      } else {
        bench::fail("W7", "unknown host");
      }
    }
  }
};

job<> sleeps(int n, std::vector<double>& late) {
  for (int i = 0; i < n; ++i) {
    const auto t0 = bench::clk::now();
    co_await sleep_task(1ms);
    late.push_back(std::chrono::duration<double, std::micro>(bench::clk::now() - t0 - 1ms).count());
  }
}
job<long> trips(int n) {
  long sum = 0;
  for (int i = 0; i < n; ++i) sum += co_await threaded_task(bench::trivial, 0);
  co_return sum;
}
job<long> many_trips(int jobs, int each) {
  std::vector<job_handle<long>> hs;
  for (int j = 0; j < jobs; ++j) hs.push_back(start_job(trips(each)));
  long sum = 0;
  for (auto& h : hs) sum += co_await h;
  co_return sum;
}

}  // namespace

int main(int argc, char** argv) {
  std::string host = "native";
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--host") && i + 1 < argc)
      host = argv[++i];
    else if (!std::strcmp(argv[i], "--quick"))
      quick = true;
  }
#ifdef W7_QT
  int qargc = 1;
  char name[] = "w7";
  char* qargv[] = {name, nullptr};
  QCoreApplication app(qargc, qargv);
#endif
  const int n_sleep = quick ? 30 : 300, n_seq = quick ? 500 : 20000, n_each = quick ? 10 : 200;
  const auto idle = quick ? 200ms : 2000ms;
  bench::loop_thread = std::this_thread::get_id();
  driver d(host);
  const std::string p = host + "_";

  std::vector<double> late;
  auto a = start_job(d.loop, sleeps(n_sleep, late));
  d.run(a);
  bench::check(int(late.size()) == n_sleep, "W7", "missing sleeps");
  bench::check(*std::min_element(late.begin(), late.end()) >= 0, "W7", "a sleep ended early");
  bench::result("W7", (p + "late_p50_us").c_str(), bench::quantile(late, 0.50));
  bench::result("W7", (p + "late_p99_us").c_str(), bench::quantile(late, 0.99));

  auto t0 = bench::clk::now();
  auto b = start_job(d.loop, trips(n_seq));
  d.run(b);
  bench::check(b.result() == n_seq, "W7", "sequential trips: wrong sum");
  bench::result("W7", (p + "seq_us_per_trip").c_str(),
                bench::seconds(bench::clk::now() - t0) * 1e6 / n_seq);

  t0 = bench::clk::now();
  auto c = start_job(d.loop, many_trips(64, n_each));
  d.run(c);
  bench::check(c.result() == 64L * n_each, "W7", "concurrent trips: wrong sum");
  bench::result("W7", (p + "par64_us_per_trip").c_str(),
                bench::seconds(bench::clk::now() - t0) * 1e6 / (64.0 * n_each));

  // Idle: the CPU of one long sleep. A short sleep first lets what came before settle (the
  // workers' spin after their last function, the host's first pass through this path), so the
  // figure is the idle wait's own cost.
  auto nap = [](std::chrono::milliseconds ms) -> job<> { co_await sleep_task(ms); };
  auto settle = start_job(d.loop, nap(50ms));
  d.run(settle);
  const double cpu0 = bench::cpu_seconds();
  auto e = start_job(d.loop, nap(idle));
  d.run(e);
  bench::result("W7", (p + "idle_cpu_ms").c_str(), (bench::cpu_seconds() - cpu0) * 1e3);
  return 0;
}
