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
