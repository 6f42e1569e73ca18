// hosts/test_qt.cpp - the adapter cases under a real QCoreApplication (Debian qt6-base-dev).
// QT_NO_GLIB=1 runs them under Qt's poll dispatcher instead of its GLib one.
#define DOCTEST_CONFIG_IMPLEMENT
#include "hosts/coro_jobs_qt.hpp"

#include <doctest/doctest.h>

#include <QCoreApplication>
#include <QEventLoop>
#include <QMetaObject>
#include <QTimer>

#include <functional>

namespace {

// Iterates this thread's Qt event loop; counts each processEvents call allowed to block.
struct host {
  QObject owner;  // the host's own timers and idle calls: cancelled with the host
  coro_jobs::qt_attachment attachment;
  long blocking = 0;

  ~host() { attachment.reset(); }
  void attach(coro_jobs::event_loop& l) { attachment = coro_jobs::attach_to_qt(l); }
  void detach() { attachment.reset(); }
  long waits() const { return blocking; }
  void after(std::chrono::milliseconds d, std::function<void()> fn) {
    QTimer::singleShot(d, Qt::PreciseTimer, &owner, std::move(fn));
  }
  void idle(std::function<void()> fn) { QMetaObject::invokeMethod(&owner, std::move(fn), Qt::QueuedConnection); }
  template <class Pred>
  bool run_until(Pred pred, std::chrono::milliseconds limit) {
    bool expired = false;
    QTimer timeout;
    timeout.setSingleShot(true);
    QObject::connect(&timeout, &QTimer::timeout, [&expired] { expired = true; });
    timeout.start(limit);
    while (!pred() && !expired) {
      ++blocking;
      QCoreApplication::processEvents(QEventLoop::WaitForMoreEvents);
    }
    return pred();
  }
};

}  // namespace

#define HOST_NAME "qt adapter"
#include "hosts/test_common.hpp"

int main(int argc, char** argv) {
  QCoreApplication app(argc, argv);  // once for the binary; every case runs on its thread
  doctest::Context context(argc, argv);
  return context.run();
}
