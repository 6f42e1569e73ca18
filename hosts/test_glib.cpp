// hosts/test_glib.cpp - the adapter cases under a real GMainContext (Debian libglib2.0-dev).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "hosts/coro_jobs_glib.hpp"

#include <doctest/doctest.h>

#include <functional>
#include <memory>

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
  template <class Pred>
  bool run_until(Pred pred, std::chrono::milliseconds limit) {
    bool expired = false;
    GSource* timeout = g_timeout_source_new(guint(limit.count()));
    g_source_set_callback(
        timeout, [](gpointer p) -> gboolean { return *static_cast<bool*>(p) = true, G_SOURCE_REMOVE; }, &expired,
        nullptr);
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

TEST_CASE("a job step that runs a nested GLib loop holds the loop, and the watchdog names the job") {
  coro_jobs::event_loop loop;
  host h;
  h.attach(loop);
  std::string who;
  loop.set_watchdog(50ms, [&](std::string_view w, std::chrono::steady_clock::duration) { who = w; });
  int other_steps = 0, other_steps_during = -1;
  auto other = coro_jobs::start_job(loop, [](int& n) -> coro_jobs::job<> {
    for (; n < 100; ++n) co_await coro_jobs::sleep_task(1ms);
  }(other_steps));
  auto modal = coro_jobs::start_job(loop, [](host& h, int& others, int& seen) -> coro_jobs::job<> {
    co_await coro_jobs::sleep_task(5ms);
    const int before = others;
    GMainLoop* nested = g_main_loop_new(h.ctx, FALSE);  // what gtk_dialog_run does
    GSource* end = g_timeout_source_new(100);
    g_source_set_callback(end, [](gpointer p) -> gboolean { return g_main_loop_quit(static_cast<GMainLoop*>(p)), G_SOURCE_REMOVE; }, nested, nullptr);
    g_source_attach(end, h.ctx);
    g_source_unref(end);
    g_main_loop_run(nested);
    g_main_loop_unref(nested);
    seen = others - before;  // the other job's steps during the nested loop
  }(h, other_steps, other_steps_during), "modal");
  REQUIRE(h.run_until([&] { return modal.done() && other.done(); }, deadline));
  CHECK(other_steps_during == 0);  // other jobs waited
  CHECK(who == "modal");
}

}  // TEST_SUITE
