// hosts/test_glib.cpp - the adapter cases under a real GMainContext (Debian libglib2.0-dev).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "hosts/coro_jobs_glib.hpp"

#include <doctest/doctest.h>

#include <functional>
#include <memory>
#include <thread>

namespace {

// Iterates its own GMainContext; counts each iteration that was allowed to block.
struct host {
  GMainContext* ctx = g_main_context_new();
  coro_jobs::glib_attachment attachment;
  long blocking = 0;
  std::vector<std::unique_ptr<std::function<void()>>> fns;

  ~host() {
    attachment.reset();
    while (g_main_context_iteration(ctx, FALSE)) {
    }
    g_main_context_unref(ctx);
  }
  void attach(coro_jobs::event_loop& l) { attachment = coro_jobs::attach_to_glib(l, ctx); }
  void detach() { attachment.reset(); }
  long waits() const { return blocking; }
  GSourceFunc once() {
    return [](gpointer p) -> gboolean {
      (*static_cast<std::function<void()>*>(p))();
      return G_SOURCE_REMOVE;
    };
  }
  void add(GSource* s, std::function<void()> fn) {
    fns.push_back(std::make_unique<std::function<void()>>(std::move(fn)));
    g_source_set_callback(s, once(), fns.back().get(), nullptr);
    g_source_attach(s, ctx);
    g_source_unref(s);
  }
  void after(std::chrono::milliseconds d, std::function<void()> fn) {
    add(g_timeout_source_new(guint(d.count())), std::move(fn));
  }
  void idle(std::function<void()> fn) { add(g_idle_source_new(), std::move(fn)); }
  template <class Pred> bool run_until(Pred pred, std::chrono::milliseconds limit) {
    bool expired = false;
    GSource* timeout = g_timeout_source_new(guint(limit.count()));
    g_source_set_callback(
        timeout,
        [](gpointer p) -> gboolean { return *static_cast<bool*>(p) = true, G_SOURCE_REMOVE; },
        &expired, nullptr);
    g_source_attach(timeout, ctx);
    while (!pred() && !expired) {
      ++blocking;
      g_main_context_iteration(ctx, TRUE);
    }
    if (!expired) g_source_destroy(timeout);
    g_source_unref(timeout);
    return pred();
  }
};

}  // namespace

#define HOST_NAME "glib adapter"
#include "hosts/test_common.hpp"

TEST_SUITE("glib adapter") {

// A nested g_main_loop_run on ctx for ms milliseconds, as gtk_dialog_run runs one.
static void run_nested_loop(GMainContext* ctx, guint ms) {
  GMainLoop* nested = g_main_loop_new(ctx, FALSE);
  GSource* end = g_timeout_source_new(ms);
  g_source_set_callback(
      end,
      [](gpointer p) -> gboolean {
        return g_main_loop_quit(static_cast<GMainLoop*>(p)), G_SOURCE_REMOVE;
      },
      nested, nullptr);
  g_source_attach(end, ctx);
  g_source_unref(end);
  g_main_loop_run(nested);
  g_main_loop_unref(nested);
}

TEST_CASE(
    "a job step that runs a nested GLib loop holds the loop, and the watchdog names the job") {
  coro_jobs::event_loop loop;
  host h;
  h.attach(loop);
  std::string who;
  loop.set_watchdog(50ms,
                    [&](std::string_view w, std::chrono::steady_clock::duration) { who = w; });
  int other_steps = 0, other_steps_during = -1;
  auto other = coro_jobs::start_job(loop, [](int& n) -> coro_jobs::job<> {
    for (; n < 100; ++n) co_await coro_jobs::sleep_task(1ms);
  }(other_steps));
  auto modal = coro_jobs::start_job(
      loop,
      [](host& h, int& others, int& seen) -> coro_jobs::job<> {
        co_await coro_jobs::sleep_task(5ms);
        const int before = others;
        run_nested_loop(h.ctx, 100);  // what gtk_dialog_run does
        seen = others - before;       // the other job's steps during the nested loop
      }(h, other_steps, other_steps_during),
      "modal");
  REQUIRE(h.run_until([&] { return modal.done() && other.done(); }, deadline));
  CHECK(other_steps_during == 0);  // other jobs waited
  CHECK(who == "modal");
}

// The source may recurse (no fd churn per dispatch), so prepare() must drop its fds while a
// job runs a nested loop: with a watched fd readable all along, that loop would spin otherwise.
TEST_CASE("a nested GLib loop with a watched fd readable does not spin") {
  coro_jobs::event_loop loop;
  host h;
  h.attach(loop);
  static long polls;
  polls = 0;
  GPollFunc original = g_main_context_get_poll_func(h.ctx);
  static GPollFunc real;
  real = original;
  g_main_context_set_poll_func(h.ctx,
                               [](GPollFD* f, guint n, gint t) { return ++polls, real(f, n, t); });
  int p[2];
  REQUIRE(::pipe(p) == 0);
  auto reader = coro_jobs::start_job(loop, [](int fd) -> coro_jobs::job<short> {
    co_return co_await coro_jobs::wait_readable(fd);
  }(p[0]));
  bool posted = false, posted_inside = true;
  long cpu = -1, rounds = -1;
  auto j =
      coro_jobs::start_job(loop,
                           [](coro_jobs::event_loop& l, host& h, int wfd, bool& posted,
                              bool& inside, long& cpu, long& rounds) -> coro_jobs::job<> {
                             co_await coro_jobs::sleep_task(1ms);
                             std::thread t([&l, &posted] { l.post([&posted] { posted = true; }); });
                             t.join();
                             // The reader's fd is readable for all of the nested loop.
                             REQUIRE(::write(wfd, "x", 1) == 1);
                             const long cpu0 = cpu_us(), polls0 = polls;
                             run_nested_loop(h.ctx, 100);
                             rounds = polls - polls0;
                             cpu = cpu_us() - cpu0;
                             inside = posted;
                           }(loop, h, p[1], posted, posted_inside, cpu, rounds));
  REQUIRE(h.run_until([&] { return j.done() && posted && reader.done(); }, deadline));
  ::close(p[0]);
  ::close(p[1]);
  g_main_context_set_poll_func(h.ctx, original);
  CHECK_FALSE(posted_inside);  // no run_once inside run_once: the post waited for the step
  MESSAGE("a 100 ms nested loop with an fd readable: ", rounds, " polls, CPU: ", cpu, " us");
  // The fds were out of the poll set, else poll would return at once (thousands of times).
  CHECK(rounds < 20);
  CHECK(cpu < 50000);
}

}  // TEST_SUITE
