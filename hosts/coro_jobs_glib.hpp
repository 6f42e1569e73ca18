// hosts/coro_jobs_glib.hpp - run a coro_jobs::event_loop inside a GLib main context, so that
// its jobs, timers, fd waits and cross-thread completions run from g_main_loop_run(),
// gtk_main() or g_application_run() (GTK 3 and 4). Optional: include it beside
// coro_jobs.hpp and build with `pkg-config --cflags --libs glib-2.0`.
//
//     coro_jobs::event_loop loop;
//     auto attached = coro_jobs::attach_to_glib(loop);   // the default GMainContext
//     start_job(loop, my_job());
//     g_main_loop_run(main_loop);                         // jobs run from here
//
// How: one GSource. Its prepare() asks the loop what to wait for (prepare_host_wait), adds the
// loop's fds to the source (g_source_add_unix_fd: the inbox pipe, the timerfd armed to the
// first deadline, and every fd a job waits on) and returns the timeout; its check() says
// whether poll reported any of them or the time is up; its dispatch() runs one non-blocking
// iteration (run_once(0s)). The timerfd wakes GLib's poll on time although GLib's own
// timeouts are whole milliseconds.
//
// Rules: the context must be iterated on the thread that made the loop. Destroying the
// attachment detaches; destroying the loop first is safe (the source is destroyed with it).
// An exception that leaves run_once here (the error handler threw) cannot cross GLib's C
// frames: it is printed and std::terminate is called.
#ifndef CORO_JOBS_GLIB_HPP
#define CORO_JOBS_GLIB_HPP

#include "coro_jobs.hpp"

#include <glib.h>

#include <climits>
#include <cstdio>
#include <exception>
#include <unordered_map>
#include <utility>

namespace coro_jobs {

/// While it lives, the loop runs inside its GMainContext. Move-only.
class glib_attachment {
 public:
  glib_attachment() noexcept = default;
  glib_attachment(glib_attachment&& o) noexcept : src_(std::exchange(o.src_, nullptr)) {}
  glib_attachment& operator=(glib_attachment&& o) noexcept {
    if (this != &o) {
      reset();
      src_ = std::exchange(o.src_, nullptr);
    }
    return *this;
  }
  glib_attachment(const glib_attachment&) = delete;
  glib_attachment& operator=(const glib_attachment&) = delete;
  ~glib_attachment() { reset(); }
  /// Detaches now (the loop may be used with run() again).
  void reset() noexcept;
  explicit operator bool() const noexcept { return src_ != nullptr; }

 private:
  friend glib_attachment attach_to_glib(event_loop& loop, GMainContext* context);
  GSource* src_ = nullptr;  // holds a reference
};

/// Attaches loop to context (nullptr: the default context). std::logic_error if the loop is
/// attached already or this is not the loop's thread.
glib_attachment attach_to_glib(event_loop& loop, GMainContext* context = nullptr);

namespace glib_detail {

struct source {
  GSource base;      // first: GLib allocates and frees the whole struct
  event_loop* loop;  // null once the loop is gone
  std::unordered_map<int, std::pair<short, gpointer>>* fds;  // fd -> events, GLib's tag
  std::chrono::steady_clock::time_point due;                 // the wait's end (max: none)
  unsigned generation;
  bool dispatching;  // inside run_once: a nested GLib loop must not re-enter it
};

[[noreturn]] inline void fail(const char* where) noexcept {
  try {
    throw;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "coro_jobs: %s under GLib threw: %s\n", where, e.what());
  } catch (...) {
    std::fprintf(stderr, "coro_jobs: %s under GLib threw\n", where);
  }
  std::terminate();
}

// The source's fds become the loop's: added, changed or removed as its waits come and go.
inline void sync_fds(source* s, std::span<const pollfd> fds) {
  auto& mine = *s->fds;
  for (const pollfd& p : fds) {
    auto [it, fresh] = mine.try_emplace(p.fd, p.events, nullptr);
    if (fresh)
      it->second.second = g_source_add_unix_fd(&s->base, p.fd, GIOCondition(p.events));
    else if (it->second.first != p.events)
      g_source_modify_unix_fd(&s->base, it->second.second, GIOCondition(p.events));
    it->second.first = p.events;
  }
  if (mine.size() == fds.size()) return;
  // Some fd is no longer the loop's: find which (rare, O(fds) when it happens).
  std::unordered_map<int, bool> live;
  for (const pollfd& p : fds) live[p.fd] = true;
  for (auto it = mine.begin(); it != mine.end();) {
    if (live.count(it->first)) {
      ++it;
      continue;
    }
    g_source_remove_unix_fd(&s->base, it->second.second);
    it = mine.erase(it);
  }
}

inline gboolean prepare(GSource* g, gint* timeout) {
  auto* s = reinterpret_cast<source*>(g);
  *timeout = -1;
  if (!s->loop) return FALSE;
  if (s->dispatching) {  // a job runs a nested GLib loop: drop the fds until it returns, or an
    sync_fds(s, {});  // fd left readable would make that loop spin (re-added by the next prepare)
    return FALSE;
  }
  try {
    const auto w = s->loop->prepare_host_wait();
    sync_fds(s, w.fds);
    const auto now = std::chrono::steady_clock::now();
    s->due = w.timeout < w.timeout.zero() ? std::chrono::steady_clock::time_point::max()
                                          : now + w.timeout;
    if (w.timeout == w.timeout.zero()) {
      *timeout = 0;
      return TRUE;
    }
    if (w.timeout > w.timeout.zero()) {  // whole ms, rounded up: never early
      const auto ms =
          (std::chrono::duration_cast<std::chrono::microseconds>(w.timeout).count() + 999) / 1000;
      *timeout = gint(std::min<long long>(ms, INT_MAX));
    }
    return FALSE;
  } catch (...) {
    fail("prepare_host_wait");
  }
}

inline gboolean check(GSource* g) {
  auto* s = reinterpret_cast<source*>(g);
  if (!s->loop || s->dispatching) return FALSE;
  for (const auto& [fd, ev] : *s->fds)
    if (g_source_query_unix_fd(g, ev.second) != 0) return TRUE;
  return std::chrono::steady_clock::now() >= s->due;
}

inline gboolean dispatch(GSource* g, GSourceFunc, gpointer) {
  auto* s = reinterpret_cast<source*>(g);
  if (!s->loop || s->dispatching) return G_SOURCE_CONTINUE;  // never run_once inside run_once
  try {
    s->dispatching = true;
    s->loop->run_once(std::chrono::seconds(0));
    s->dispatching = false;
  } catch (...) {
    fail("run_once");
  }
  return G_SOURCE_CONTINUE;
}

inline void finalize(GSource* g) {
  auto* s = reinterpret_cast<source*>(g);
  delete s->fds;
  s->fds = nullptr;
}

inline GSourceFuncs funcs = {prepare, check, dispatch, finalize, nullptr, nullptr};

}  // namespace glib_detail

inline glib_attachment attach_to_glib(event_loop& loop, GMainContext* context) {
  GSource* g = g_source_new(&glib_detail::funcs, sizeof(glib_detail::source));
  auto* s = reinterpret_cast<glib_detail::source*>(g);
  s->loop = nullptr;
  s->due = std::chrono::steady_clock::time_point::max();
  s->dispatching = false;
  try {
    s->fds = new std::unordered_map<int, std::pair<short, gpointer>>();
    // The loop's destructor lets go of the source before it tears down.
    loop.attach_host([g] {
      reinterpret_cast<glib_detail::source*>(g)->loop = nullptr;
      if (!g_source_is_destroyed(g)) g_source_destroy(g);
    });
  } catch (...) {
    g_source_unref(g);
    throw;
  }
  s->loop = &loop;
  g_source_set_name(g, "coro_jobs");
  // Without it GLib blocks the source around each dispatch: it takes the source's fds out of
  // the context and puts them back, each time writing the context's wakeup eventfd (4 writes
  // and a read per iteration with 2 fds; round trip 15.3 us against 6.87 us native). Nested
  // loops are handled in prepare() instead (NOTES: glib can recurse).
  g_source_set_can_recurse(g, TRUE);
  g_source_attach(g, context);
  glib_attachment a;
  a.src_ = g;
  return a;
}

inline void glib_attachment::reset() noexcept {
  GSource* g = std::exchange(src_, nullptr);
  if (!g) return;
  auto* s = reinterpret_cast<glib_detail::source*>(g);
  if (event_loop* l = std::exchange(s->loop, nullptr)) l->detach_host();
  if (!g_source_is_destroyed(g)) g_source_destroy(g);
  g_source_unref(g);
}

}  // namespace coro_jobs

#endif  // CORO_JOBS_GLIB_HPP
