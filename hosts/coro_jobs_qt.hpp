// hosts/coro_jobs_qt.hpp - run a coro_jobs::event_loop inside Qt 6's event loop, so that its
// jobs, timers, fd waits and cross-thread completions run from QCoreApplication::exec(),
// QApplication::exec(), QEventLoop::exec() or processEvents() on the loop's thread.
// Optional: include it beside coro_jobs.hpp and build with
// `pkg-config --cflags --libs Qt6Core` and -fPIC (Qt's headers require it). No moc needed.
//
//     QCoreApplication app(argc, argv);
//     coro_jobs::event_loop loop;
//     auto attached = coro_jobs::attach_to_qt(loop);   // this thread's event dispatcher
//     start_job(loop, my_job());
//     return app.exec();                                // jobs run from here
//
// How: before Qt blocks (QAbstractEventDispatcher::aboutToBlock) and after each dispatch,
// the adapter asks the loop what to wait for (prepare_host_wait) and mirrors it: one
// QSocketNotifier per (fd, Read), (fd, Write) and (fd, Exception) that the pollfds ask for
// (POLLIN, POLLOUT, POLLPRI): the inbox pipe that every cross-thread wakeup writes, the
// timerfd armed to the first deadline (Linux: microsecond wakeups although Qt's timers are
// whole milliseconds), and every fd a job waits on; plus one single-shot Qt::PreciseTimer to
// the timeout (0 when work is ready, stopped when there is no limit), the fallback where
// there is no timerfd. A notifier's activated() or the timer's timeout() runs a
// non-blocking iteration (run_once(0s)), and more while work is ready, for up to 100 us. Both dispatchers work (Qt's GLib one, the default on
// Debian, and QT_NO_GLIB=1's poll one): aboutToBlock comes before either computes its wait.
//
// Rules: attach on the loop's thread, which must have a Qt event dispatcher (the
// QCoreApplication's thread, or a QThread); destroy the attachment before the
// QCoreApplication. Destroying the attachment detaches (also from inside a job); destroying
// the loop first is safe (its notifiers and timer go with it). A job step that runs a nested
// Qt loop (QDialog::exec, QEventLoop::exec) holds the loop like any blocking call: other
// jobs wait until it returns (the adapter does not call run_once inside run_once, and turns
// its notifiers off meanwhile so the nested loop does not spin); await the dialog's answer
// with callback_task instead. An fd a job waits on must not also have a QSocketNotifier of
// the program's for the same type (Qt allows one per fd and type). An exception that leaves
// the loop here (the error handler threw) cannot cross Qt's event loop: it is printed and
// std::terminate is called.
#ifndef CORO_JOBS_QT_HPP
#define CORO_JOBS_QT_HPP

#include "coro_jobs.hpp"

#include <QAbstractEventDispatcher>
#include <QObject>
#include <QSocketNotifier>
#include <QTimer>

#include <array>
#include <climits>
#include <cstdio>
#include <exception>
#include <unordered_map>
#include <utility>

namespace coro_jobs {

namespace qt_detail {
struct state;
}

/// While it lives, the loop runs inside its thread's Qt event loop. Move-only.
class qt_attachment {
 public:
  qt_attachment() noexcept = default;
  qt_attachment(qt_attachment&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  qt_attachment& operator=(qt_attachment&& o) noexcept {
    if (this != &o) {
      reset();
      s_ = std::exchange(o.s_, nullptr);
    }
    return *this;
  }
  qt_attachment(const qt_attachment&) = delete;
  qt_attachment& operator=(const qt_attachment&) = delete;
  ~qt_attachment() { reset(); }
  /// Detaches now (the loop may be used with run() again).
  void reset() noexcept;
  explicit operator bool() const noexcept { return s_ != nullptr; }

 private:
  friend qt_attachment attach_to_qt(event_loop& loop);
  qt_detail::state* s_ = nullptr;
};

/// Attaches loop to the current thread's Qt event dispatcher. std::logic_error if the loop is
/// attached already, this is not the loop's thread, or the thread has no Qt event dispatcher.
qt_attachment attach_to_qt(event_loop& loop);

namespace qt_detail {

[[noreturn]] inline void fail(const char* where) noexcept {
  try {
    throw;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "coro_jobs: %s under Qt threw: %s\n", where, e.what());
  } catch (...) {
    std::fprintf(stderr, "coro_jobs: %s under Qt threw\n", where);
  }
  std::terminate();
}

struct state {
  using clock = std::chrono::steady_clock;
  static constexpr auto batch = std::chrono::microseconds(100);  // Qt waits no longer for it
  static constexpr std::array<std::pair<short, QSocketNotifier::Type>, 3> kinds{
      {{POLLIN, QSocketNotifier::Read},
       {POLLOUT, QSocketNotifier::Write},
       {POLLPRI, QSocketNotifier::Exception}}};
  struct entry {
    std::array<QSocketNotifier*, 3> n{};  // by kinds' index; children of ctx
    unsigned seen = 0;                    // the last sync that found the fd
  };

  event_loop* loop = nullptr;  // null once detached or the loop is gone
  QObject* ctx = nullptr;      // owns the notifiers and the timer; ends the aboutToBlock link
  QTimer* timer = nullptr;
  std::unordered_map<int, entry> fds;
  clock::time_point timer_at{};  // when the active timer fires, no earlier
  unsigned generation = 0;
  bool dispatching = false;  // inside run_once: a nested Qt loop must not re-enter it
  bool orphaned = false;     // the attachment went away during a dispatch: free after it

  // Lets go of Qt: notifiers, timer and the aboutToBlock connection.
  void release() noexcept {
    delete std::exchange(ctx, nullptr);
    timer = nullptr;
    fds.clear();
  }

  void dispatch() noexcept {
    if (!loop) return;
    if (dispatching) {  // a job runs a nested Qt loop: stay quiet until it returns
      suspend();
      return;
    }
    dispatching = true;
    // While work is ready (a zero timeout) and for at most `batch`, iterate again here: a pass
    // through Qt's dispatch costs about 3 us, as much as an iteration (W7 qt round trip).
    const auto until = clock::now() + batch;
    event_loop::host_wait w{};
    try {
      do {
        loop->run_once(std::chrono::seconds(0));
        if (!loop) break;  // detached from inside a job
        w = loop->prepare_host_wait();
      } while (w.timeout == w.timeout.zero() && clock::now() < until);
    } catch (...) {
      fail("run_once");
    }
    dispatching = false;
    if (orphaned) {
      delete this;
      return;
    }
    if (!loop) return;
    try {  // the set of fds and the first deadline may have changed
      sync(w.fds);
      arm(w.timeout);
    } catch (...) {
      fail("prepare_host_wait");
    }
  }

  void prepare() noexcept {
    if (!loop || dispatching) return;
    try {
      const auto w = loop->prepare_host_wait();
      sync(w.fds);
      arm(w.timeout);
    } catch (...) {
      fail("prepare_host_wait");
    }
  }

  void suspend() noexcept {
    for (auto& [fd, e] : fds)
      for (QSocketNotifier* n : e.n)
        if (n) n->setEnabled(false);
    if (timer) timer->stop();
  }

  // One notifier per (fd, kind) the pollfds ask for: created, re-enabled, turned off or
  // deleted as the loop's waits come and go.
  void sync(std::span<const pollfd> want) {
    ++generation;
    for (const pollfd& p : want) {
      entry& e = fds[p.fd];
      e.seen = generation;
      for (std::size_t k = 0; k < kinds.size(); ++k) {
        QSocketNotifier*& n = e.n[k];
        const bool on = (p.events & kinds[k].first) != 0;
        if (on && !n) {
          n = new QSocketNotifier(p.fd, kinds[k].second, ctx);
          QObject::connect(n, &QSocketNotifier::activated, ctx, [this] { dispatch(); });
        } else if (n && n->isEnabled() != on) {
          n->setEnabled(on);
        }
      }
    }
    if (fds.size() == want.size()) return;
    for (auto it = fds.begin(); it != fds.end();) {  // an fd is no longer the loop's
      if (it->second.seen == generation) {
        ++it;
        continue;
      }
      for (QSocketNotifier* n : it->second.n) delete n;  // Qt allows it inside its activated()
      it = fds.erase(it);
    }
  }

  // The timer, to the timeout: restarted only when it would fire early or over 1 ms late.
  void arm(clock::duration timeout) {
    if (timeout < timeout.zero()) {
      timer->stop();
      return;
    }
    const auto now = clock::now(), due = now + timeout;
    if (timer->isActive() && (timer_at >= due || timeout == timeout.zero()) &&
        timer_at <= due + std::chrono::milliseconds(1))
      return;
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(timeout).count();
    const auto ms =
        std::chrono::milliseconds(std::min<long long>((us + 999) / 1000, INT_MAX));  // never early
    timer->start(ms);
    timer_at = now + ms;
  }
};

}  // namespace qt_detail

inline qt_attachment attach_to_qt(event_loop& loop) {
  QAbstractEventDispatcher* dispatcher = QAbstractEventDispatcher::instance();
  if (!dispatcher)
    throw std::logic_error(
        "coro_jobs: attach_to_qt on a thread without a Qt event dispatcher (make the QCoreApplication first)");
  auto* s = new qt_detail::state;
  try {
    s->ctx = new QObject;
    s->timer = new QTimer(s->ctx);
    s->timer->setSingleShot(true);
    s->timer->setTimerType(Qt::PreciseTimer);
    QObject::connect(s->timer, &QTimer::timeout, s->ctx, [s] { s->dispatch(); });
    QObject::connect(dispatcher, &QAbstractEventDispatcher::aboutToBlock, s->ctx,
                     [s] { s->prepare(); });
    // The loop's destructor lets go of Qt's objects before it tears down.
    loop.attach_host([s] {
      s->loop = nullptr;
      s->release();
    });
  } catch (...) {
    s->release();
    delete s;
    throw;
  }
  s->loop = &loop;
  s->prepare();  // notifiers in place before the first aboutToBlock (or a non-blocking processEvents)
  qt_attachment a;
  a.s_ = s;
  return a;
}

inline void qt_attachment::reset() noexcept {
  qt_detail::state* s = std::exchange(s_, nullptr);
  if (!s) return;
  if (event_loop* l = std::exchange(s->loop, nullptr)) l->detach_host();
  s->release();
  if (s->dispatching)
    s->orphaned = true;  // dispatch() frees it when run_once returns
  else
    delete s;
}

}  // namespace coro_jobs

#endif  // CORO_JOBS_QT_HPP
