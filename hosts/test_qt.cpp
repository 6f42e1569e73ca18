// hosts/test_qt.cpp - the adapter cases under a real QCoreApplication (Debian qt6-base-dev).
// QT_NO_GLIB=1 runs them under Qt's poll dispatcher instead of its GLib one.
#define DOCTEST_CONFIG_IMPLEMENT
#include "hosts/coro_jobs_qt.hpp"

#include <doctest/doctest.h>

#include <QAbstractEventDispatcher>
#include <QCoreApplication>
#include <QEventLoop>
#include <QMetaObject>
#include <QTimer>

#include <functional>
#include <thread>

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
  void idle(std::function<void()> fn) {
    QMetaObject::invokeMethod(&owner, std::move(fn), Qt::QueuedConnection);
  }
  template <class Pred> bool run_until(Pred pred, std::chrono::milliseconds limit) {
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

// Beyond the shared cases: what this adapter does that the others need not.
namespace {

job<> nested_qt_loop(event_loop& loop, bool& posted, bool& posted_inside, long& cpu, long& rounds) {
  co_await sleep_task(1ms);
  std::thread t([&loop, &posted] { loop.post([&posted] { posted = true; }); });
  t.join();  // the inbox pipe is readable for all of the nested loop
  const long cpu0 = cpu_us();
  QEventLoop nested;
  QTimer::singleShot(100ms, &nested, &QEventLoop::quit);
  const auto counting =
      QObject::connect(QAbstractEventDispatcher::instance(),
                       &QAbstractEventDispatcher::aboutToBlock, [&rounds] { ++rounds; });
  nested.exec();
  QObject::disconnect(counting);
  cpu = cpu_us() - cpu0;
  posted_inside = posted;
}

}  // namespace

TEST_SUITE(HOST_NAME) {

TEST_CASE(
    "a job step that runs a nested QEventLoop holds the loop, and the nested loop does not spin") {
  event_loop loop;
  host h;
  h.attach(loop);
  bool posted = false, posted_inside = true;
  long cpu = -1, rounds = 0;
  auto j = start_job(loop, nested_qt_loop(loop, posted, posted_inside, cpu, rounds));
  REQUIRE(h.run_until([&] { return j.done() && posted; }, deadline));
  CHECK_FALSE(posted_inside);  // no run_once inside run_once: the post waited for the step
  MESSAGE("a 100 ms nested loop with the pipe readable: ", rounds, " iterations, CPU: ", cpu,
          " us");
  CHECK(rounds < 20);  // the notifiers were off, else they would fire all along (thousands)
  CHECK(cpu < 50000);
}

TEST_CASE("destroying the attachment from inside a job step detaches when the step ends") {
  event_loop loop;
  host h;
  h.attach(loop);
  auto j = start_job(loop, [](host& h) -> job<> {
    co_await sleep_task(1ms);
    h.detach();
  }(h));
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  CHECK_FALSE(h.attachment);
  loop.run();  // detached: the loop's own run() works again
}

// A pass through Qt's dispatch costs about as much as an iteration: while work is ready, one
// dispatch runs more iterations, for up to 100 us (W7 qt round trip).
TEST_CASE(
    "while work is ready one Qt dispatch runs several iterations, not one per pass through Qt") {
  event_loop loop;
  host h;
  h.attach(loop);
  int turns = 0;
  auto j = start_job(loop, [](int& turns) -> job<> {
    for (; turns < 200; ++turns) co_await next_iteration();
  }(turns));
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  MESSAGE("200 iterations in ", h.waits(), " processEvents calls");
  CHECK(h.waits() < 100);  // one per iteration without the batch
}

TEST_CASE("a job that never stops yielding does not starve Qt's own timers") {
  event_loop loop;
  host h;
  h.attach(loop);
  bool fired = false;
  long turns = 0;
  auto j = start_job(loop, [](bool& fired, long& turns) -> job<> {
    while (!fired) {
      ++turns;
      co_await next_iteration();
    }
  }(fired, turns));
  h.after(20ms, [&fired] { fired = true; });
  REQUIRE(h.run_until([&] { return fired; }, deadline));
  REQUIRE(h.run_until([&] { return j.done(); }, deadline));
  CHECK(turns > 1);
}

}  // TEST_SUITE

int main(int argc, char** argv) {
  QCoreApplication app(argc, argv);  // once for the binary; every case runs on its thread
  doctest::Context context(argc, argv);
  return context.run();
}
