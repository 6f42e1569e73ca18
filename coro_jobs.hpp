// coro_jobs.hpp - asynchronous jobs as sequential-looking C++20 coroutines. v0.2, MIT license.
//
// A port of the recipe "Run asynchronous tasks using coroutines" (Arnau Sanchez, 2010):
// instead of scattering a long operation over callbacks, write it as a job that co_awaits
// tasks, and start it from the main loop. The loop stays responsive while the job waits.
//
// EXAMPLE
//     #include "coro_jobs.hpp"
//     using namespace coro_jobs; using namespace std::chrono_literals;
//     job<int> my_job(int a, int b) {
//         auto slept = co_await sleep_task(100ms);                     // the loop keeps running
//         int sum = co_await threaded_task(std::plus<>{}, a, b);       // f(a, b) on a worker thread
//         co_return sum;
//     }
//     int main() {
//         event_loop loop;
//         auto h = start_job(my_job(1, 2));                            // body starts next iteration
//         loop.run();                                                  // until nothing is pending
//         return h.result() == 3 ? 0 : 1;
//     }
//
// API (namespace coro_jobs)
//   event_loop                      the poll-based main loop; owned by the thread that makes it
//     run() / run_once() / quit()   run until idle or quit; one iteration; stop (any thread)
//     post(fn)                      run fn on the loop thread, FIFO (any thread)
//     call_later(d, fn)             run fn after d; returns a callback_handle
//     watch(fd, events, fn)         call fn(revents) whenever poll reports fd; callback_handle
//     set_error_handler(fn)         gets every error nobody can retrieve any more
//   job<T>                          return type of a job coroutine; lazy, move-only
//   start_job([loop,] job, [name])  start a job; returns job_handle<T> (also takes a lambda)
//   job_handle<T>                   done(), cancel(), result(), co_await handle
//   sleep_task(d)                   co_await: the elapsed steady_clock::duration, never early
//   threaded_task(f, args...)       co_await: f(args...) on a worker thread (stop_token first if
//                                   f takes one); its value, or its exception rethrown
//   callback_task<T>(start)         co_await: start(task_return<T>) is called; the job resumes
//                                   when task_return(value) is called, from any thread, once
//   wait_readable(fd) / wait_writable(fd)   co_await: poll's revents
//   line_reader(fd, [max])          co_await r.next_line(): a line, or nullopt at the end
//   start_process(options)          co_await: a process; p.out()/p.err() line readers,
//                                   co_await p.wait(): exit code or signal; killed on cancel
//   job_cancelled                   thrown at the co_await of a cancelled job (no std::exception)
//   shielded(a)                     co_await: a runs to its end although the job is cancelled
//   next_iteration()                co_await: let every other ready job run, then go on
//
// COMPOSITION AND CONTROL
//   when_all(a, b, ...)             co_await: std::tuple of results (void: std::monostate)
//   when_any(a, b, ...)             co_await: std::variant, index() = the first to end
//   with_timeout(d, a)              co_await: a's value, or throws timeout_error
//   progress<T>(fn)                 fn(value) on the loop thread; get_reporter() for workers
//   job_scope(loop, [restart])      start(job, name), cancel_all(): owns and unwinds its jobs;
//                                   restart::run_latest keeps only the newest repeated click
//   event_loop(loop_options{...})   worker_threads, manual_clock (then advance(d), now())
//   loop.set_watchdog(d, [fn])      reports steps that hold the loop longer than d
//   loop.jobs() / loop.stats()      live jobs (name, state, waiting on what, how long); counts
//   loop.run_once(max_wait)         one iteration that waits at most max_wait (0: never blocks)
//   loop.run_until(handle)          run until that job ends; its result, or its error rethrown
//   prepare_host_wait(), attach_host(fn), detach_host()   for running inside another loop:
//                                   hosts/coro_jobs_glib.hpp, _qt.hpp, _guest.hpp use them
//
// RULES
//   Threads: post(), quit() and task_return are safe from any thread. Everything else, jobs
//     and handles included, belongs to the thread that created the loop; calling a loop function
//     from another thread throws std::logic_error. A thread function submitted in an
//     iteration starts when that iteration's ready work has run.
//   Signals: quit() is async-signal-safe (atomics and one write(2)): call it from a SIGINT
//     handler. post() and task_return lock and allocate, so not from a signal handler.
//   Errors: a job's exception goes to whoever co_awaits the job or its handle or calls
//     result(). If nobody can any more (no handle left), the loop's error handler gets it,
//     exactly once; so do exceptions from post/call_later/watch callbacks. The loop goes on.
//     job_cancelled is not an error and is never reported. An exception thrown by the error
//     handler itself leaves run() / run_once().
//   Cancellation: cancel() removes the job's pending timer or fd wait, makes a waiting
//     callback task's task_return a no-op (and calls its canceller), withdraws a queued
//     thread function and requests the stop token of a running one; the job then resumes, on
//     a later iteration (after its thread function has returned), with job_cancelled thrown
//     from its co_await, so its destructors run. job_scope::cancel_all(), ~job_scope and the
//     losers of when_any/with_timeout wait for those functions, blocking the loop thread until
//     they honour their stop tokens (the watchdog names the job); threaded_task(
//     abandon_on_cancel, f) is not waited for. job_cancelled is not a
//     std::exception; catch (...) catches it: rethrow it. Every later co_await in the job
//     yields to the loop, then throws job_cancelled again; a job that catches it and goes on
//     (awaits again, or ends normally) is reported once to the error handler. Cleanup that
//     must wait: co_await shielded(a). Children it awaits are cancelled with it. A job
//     cancelled before its body started ends without running it.
//   Scopes: cancel_all() and size() off the loop's thread throw std::logic_error; a scope
//     destroyed there prints why and calls std::terminate (a destructor cannot throw).
//   Handles: copyable and movable; copying one off the loop thread throws std::logic_error,
//     destroying one there posts its release to the loop thread. cancel() of an empty
//     handle returns false. Every task type is [[nodiscard]].
//   Lifetime: destroying the loop requests the stop token of every running thread function
//     and waits for each (except abandoned ones), drops queued work, destroys every job frame
//     it still has (their handles then report job_cancelled) and joins the workers. A frame's
//     destructor may still call the loop meanwhile: now() works, post() is dropped, and a job
//     started then is destroyed unstarted (its handle reports job_cancelled).
//   Bad input: empty jobs and handles throw std::invalid_argument; misuse of a loop
//     (wrong thread, run() inside run()) throws std::logic_error; a bad fd throws
//     std::system_error(EBADF); durations saturate (negative = next iteration, huge = never);
//     out of memory, start_job throws std::bad_alloc and leaves no job behind, and so does
//     the co_await of a when_all/when_any that cannot start all its branches.
//   Hosts: attached to another loop (hosts/*.hpp), the loop runs only from that loop, on its
//     own thread; run() and a second attach throw std::logic_error. A job step that runs a
//     nested host loop (a modal dialog's) holds this loop like any blocking call: await the
//     dialog's answer with callback_task instead. Destroying the loop first detaches it.
//   Fds: any number of waits and watches may share an fd. The loop polls each fd once, for
//     the union of their events, and wakes each one whose events poll reports (POLLERR,
//     POLLHUP and POLLNVAL: all of them); stats().fd_waits counts the waits and watches.
//
// HOW ONE ITERATION WORKS (loop_impl::run_once, asyncio's _run_once)
//   1. wait: ppoll on the inbox pipe, the timerfd and the watched fds, until the first timer
//      (not at all if work is ready);
//   2. collect: cross-thread completions, fd events and due timers only queue ready items;
//   3. run the ready snapshot, in order: resume jobs, start jobs, posted callbacks, timer and
//      watch callbacks, error reports. A job frame is resumed in one place (loop_impl::resume);
//      work queued meanwhile waits for the next iteration, so nothing starves;
//   4. kick the worker pool for the thread functions submitted meanwhile.
//
// NOTES: what is kept beyond the recipe's obvious design, and what each buys (bench/ figures
// on a 2-core VM with g++ 12 -O2; stress/ for the stack)
//   trampoline        loop_impl::resume runs every job-to-job transfer in a loop. Symmetric
//                     transfer is a tail call only when optimised: GCC 12 at -O0 and with
//                     -fsanitize=address emits a real call, and 10,000,000 chained awaits
//                     overflow the stack (stress/deep.cpp). Costs one return per transfer.
//   no-syscall yield  with work ready and no fd watched, step 1 skips ppoll (the inbox flag
//                     is an atomic): a job that yields costs a queue push, not a syscall.
//   spin before block a thread waits up to 50 us (yielding) before it blocks: a wakeup takes
//                     5-25 us on a VM. W3, one job's sequential round trips: 25 us -> 4 us.
//   pool kick         thread functions are queued during step 3 and workers woken once, at
//                     step 4: W3 with 64 concurrent jobs, 2 us -> 0.4 us per round trip. A
//                     worker still spinning after its last function is not woken again:
//                     W7 --quick seq round trip, median of 7 side by side, 11.8 -> 8.6 us.
//   timer slack       the loop thread's timer slack is 1 ns (prctl): 50 us late otherwise (W4).
//   hosted pipe       hosted, a wakeup writes the inbox pipe only between prepare_host_wait
//                     and run_once (the host may block), not while the host is busy: W7
//                     glib --quick, 523 -> 10..185 writes (strace -c -f); W7 round trip,
//                     side by side: glib 11.3 -> 8.5 us, qt 12.5 -> 11.2 us (native 5.8-7).
//   hosted poll       hosted, with no fd of the program's watched, run_once(0s) makes no
//                     ppoll(0) of its own: the host's poll has just told the same. W7 --quick
//                     seq round trip, median of 5 side by side: qt 14.0 -> 9.4 us, glib
//                     11.9 -> 7.9 us, guest 28.2 -> 21.0 us.
//   glib can recurse  the GSource may recurse, so GLib does not take its fds out and back
//                     around each dispatch (4 wakeup-eventfd writes and a read per
//                     iteration): W7 glib --quick 2711 -> 523 writes, round trip 17.5 -> 11.3 us.
//   timerfd           the first deadline is also armed on a timerfd: ppoll's own timeout is
//                     late by 0.1% of it (a 1 s sleep: 1.07 ms late; the timerfd: 55 us).
//   4-ary heap        timers in an indexed 4-ary heap, each owner knowing its slot (cancel:
//                     O(log n), no allocation): W2, 1.6 s against 2.0 s with a binary heap.
//   frame room        a job's state is built in a room in front of its top frame: one
//                     allocation and one free per job, not two. W2 (callgrind, --quick):
//                     41.8 M instructions with it, 49.7 M without (malloc and free doubled).
//   one-word sleep    sleep_task returns just the duration: 40 bytes less in every sleeping
//                     frame (W2: a million of them).
//   job_extras        name, lambda and parent behind one pointer: 56 bytes less per job (W2);
//                     a branch's name is built when asked: 8,000 nested with_timeouts held
//                     1.2 GB of copied names.
//   one pollfd per fd however many waits share it: ppoll fails with EINVAL beyond
//                     RLIMIT_NOFILE entries, and 300 waits on one fd cost O(300), not O(300^2).
//   flat cancel       cancelling a when_all nest walks a list, not a recursion: a 12,000-deep
//                     nest overflowed a 1 MiB stack; job_scope::cancel_all withdraws queued
//                     items in one pass (100,000 jobs: 27 s -> 25 ms).
//   scope sweep       a job_scope forgets ended jobs when its list has doubled: 80,000 starts
//                     took 4 s when it swept on every start.
//   error queue       errors reach the handler as ready items, never from the noexcept paths
//                     that find them (a frame's final suspend, a destructor).
//   EINTR             a signal neither ends nor postpones a wait (wait() polls again).
//

#ifndef CORO_JOBS_HPP
#define CORO_JOBS_HPP
#define CORO_JOBS_VERSION_MAJOR 0
#define CORO_JOBS_VERSION_MINOR 2
#define CORO_JOBS_VERSION_PATCH 0

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <span>
#include <string>
#include <string_view>
#include <system_error>  // std::system_error(EBADF) from watch() and wait_readable()
#include <thread>        // std::thread::id: the thread a job's handles belong to
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <cerrno>  // EBADF
#include <poll.h>  // POLLIN, POLLOUT... for watch() and wait_readable()

#include <condition_variable>
#include <cstdio>
#include <deque>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>  // posix_spawnp: the process task
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sched.h>  // sched_getaffinity
#include <sys/prctl.h>
#include <sys/syscall.h>  // pidfd_open
#include <sys/timerfd.h>
#endif

#ifndef __GLIBC__
extern char** environ;  // glibc's <unistd.h> declares it
#endif

namespace coro_jobs {

namespace detail {  // what the declarations below refer to, defined after them
struct loop_impl;
struct job_ctx;
struct group;
struct handle_waiter;
struct callback_node;
struct access;
struct held_ref;
template <class T> struct job_promise;
template <class T> struct job_state;
template <class T> struct callback_state;
template <class T> struct return_token;
template <class T, class Start> class callback_op;
class sleep_op;
struct sleep_for;
class fd_op;
template <class T> struct is_job : std::false_type {};
template <class T> struct shield_awaiter;
template <class T> struct is_shield : std::false_type {};
template <class T> struct is_shield<shield_awaiter<T>> : std::true_type {};
template <class T> struct await_value;
template <class T> struct await_result;
template <class T> struct progress_state;
}  // namespace detail

/// Thrown at the co_await of a cancelled job, and by result() of a job that ended cancelled.
/// Deliberately not a std::exception (like Python's CancelledError, a BaseException since
/// 3.8): `catch (const std::exception&)` around a co_await must not swallow a cancel. A
/// `catch (...)` does catch it: rethrow it (`throw;`).
struct job_cancelled {
  const char* what() const noexcept { return "coro_jobs: job cancelled"; }
};

/// Receives each error that nobody can retrieve any more: the job's name (or "post",
/// "call_later", "watch", "task_return") and the exception.
using error_handler = std::function<void(std::string_view name, std::exception_ptr error)>;

/// What a loop holds right now (for tests and debug dumps).
struct loop_stats {
  std::size_t jobs;          // started jobs that have not ended
  std::size_t timers;        // sleeps and call_later timers not yet fired or cancelled
  std::size_t fd_waits;      // watches and wait_readable/wait_writable registrations
  std::size_t outstanding;   // thread functions running and callback tasks waiting
  std::size_t ready;         // work queued for the next iteration
  std::uint64_t iterations;  // run_once calls that did work, since the loop was made
  std::uint64_t polls;       // ppoll/poll calls among them (fast iterations skip the syscall)
};

/// How to make an event_loop.
struct loop_options {
  /// The most threads threaded_task may use (0: like asyncio's default, min(32, hardware
  /// threads + 4)). Workers are started on demand.
  std::size_t worker_threads = 0;
  /// A clock that moves only when advance() says so, for deterministic tests: sleeps and
  /// timers never make the loop block, they wait for advance().
  bool manual_clock = false;
};

/// One live job, for a debug dump (event_loop::jobs()).
struct job_info {
  std::string name;
  const char* state;       // "not started", "ready", "running" or "waiting"
  const char* waiting_on;  // "sleep_task", "threaded_task", "callback_task", "wait_readable",
                           // "wait_writable", "job_handle", "when_all", "when_any"; or ""
  std::chrono::steady_clock::duration waited;  // how long the current wait has lasted
};

/// Receives a watchdog report: who held the loop ("post", "call_later", "watch", or the
/// job's name) and for how long.
using watchdog_handler =
    std::function<void(std::string_view who, std::chrono::steady_clock::duration held)>;

/// What the error handler gets when no watchdog_handler is set.
struct slow_step : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// A registered timer or fd watch. Copyable; cancel() from the loop thread.
class callback_handle {
 public:
  callback_handle() noexcept = default;
  callback_handle(const callback_handle& o) noexcept;
  callback_handle& operator=(const callback_handle& o) noexcept;
  ~callback_handle();
  /// Removes the timer or watch; false if it already ran (timers), was cancelled, or the
  /// loop is gone.
  bool cancel();
  /// Whether the timer has yet to run, or the watch is still registered.
  bool active() const noexcept;

 private:
  friend struct detail::access;
  detail::callback_node* n_ = nullptr;
};

template <class T> class job_handle;

/// The main loop: ready work, timers, fd watches and cross-thread completions, multiplexed
/// with one ppoll() per iteration. Not copyable or movable; bound to the creating thread.
class event_loop {
 public:
  event_loop();
  explicit event_loop(const loop_options& options);
  ~event_loop();
  event_loop(const event_loop&) = delete;
  event_loop& operator=(const event_loop&) = delete;

  /// Runs iterations until quit() is called or nothing is pending (with a manual clock:
  /// nothing but timers and callback tasks, which may wait for advance()).
  void run();
  /// One iteration; blocks if something is pending and nothing is ready. Returns whether
  /// anything is still pending.
  bool run_once();
  /// One iteration that waits at most max_wait (zero or negative: never blocks, as Asio's
  /// poll()). Returns whether anything is still pending.
  template <class Rep, class Period> bool run_once(std::chrono::duration<Rep, Period> max_wait);
  /// Runs iterations until the job of h has ended, however busy other jobs keep the loop,
  /// and returns its result (or rethrows its error). std::logic_error if it cannot end
  /// (nothing else is pending; with a manual clock, it waits for advance()), as for run();
  /// std::runtime_error if quit() is called first (asyncio's run_until_complete).
  template <class T> T run_until(job_handle<T> h);
  /// Makes the current (or next) run() return after its current iteration. Any thread, and
  /// async-signal-safe: it takes no lock and allocates nothing.
  void quit() noexcept;
  /// Runs fn on the loop thread, in FIFO order with other posts. Any thread.
  void post(std::function<void()> fn);
  /// Runs fn once after delay (saturated; <= 0 means the next iteration).
  template <class Rep, class Period>
  callback_handle call_later(std::chrono::duration<Rep, Period> delay, std::function<void()> fn);
  /// Calls fn(revents) on each iteration where poll reports fd for events (POLLIN, POLLOUT,
  /// ...), until cancelled. A closed fd is reported once with POLLNVAL, then dropped.
  callback_handle watch(int fd, short events, std::function<void(short revents)> fn);
  /// Replaces the error handler (the default prints the name and what() to stderr).
  void set_error_handler(error_handler handler);
  /// Counts of what the loop holds.
  loop_stats stats() const;
  /// The live jobs, newest first, with what each waits on.
  std::vector<job_info> jobs() const;
  /// The loop's clock: steady_clock, or the manual clock.
  std::chrono::steady_clock::time_point now() const;
  /// Manual clock only: moves time forward by d, running every timer that falls due (in
  /// deadline order, the clock set to each deadline in turn) and the work that follows,
  /// until nothing is ready. std::logic_error without a manual clock or inside the loop.
  template <class Rep, class Period> void advance(std::chrono::duration<Rep, Period> d);
  /// Watchdog: each job step, posted callback, timer or watch callback that holds the loop
  /// longer than threshold is reported once, to handler or else to the error handler (as a
  /// slow_step). Zero or negative turns it off. Costs two clock reads per item when on.
  template <class Rep, class Period>
  void set_watchdog(std::chrono::duration<Rep, Period> threshold, watchdog_handler handler = {});

  // ---- For adapters that run the loop inside another loop (hosts/*.hpp; README: "Inside
  // another loop"). A host polls `fds` for their events for at most `timeout`, then calls
  // run_once(0s); again and again. Every cross-thread wakeup (post, a thread function's
  // completion, task_return, progress, quit) and every change made from the loop thread
  // outside an iteration (a start_job, a new timer or fd wait) makes fds[0] readable, or, if
  // it lands before prepare_host_wait, makes its timeout zero: call it before each wait.
  struct host_wait {
    std::span<const pollfd> fds;                  // valid until the next call into the loop
    std::chrono::steady_clock::duration timeout;  // zero: work is ready; negative: no limit
  };
  /// What to wait for now. On Linux fds includes a timerfd armed to the first deadline,
  /// so the host wakes on time even if its own timeouts are in milliseconds.
  host_wait prepare_host_wait();
  /// Marks the loop as driven by a host: run() then throws std::logic_error. on_destroyed is
  /// called by ~event_loop, so an adapter may outlive the loop. std::logic_error if attached.
  void attach_host(std::function<void()> on_destroyed);
  /// Ends attach_host (no-op if not attached).
  void detach_host() noexcept;

 private:
  friend struct detail::access;
  callback_handle call_later_impl(std::chrono::steady_clock::duration delay,
                                  std::function<void()> fn);
  bool run_once_impl(std::chrono::steady_clock::duration max_wait);
  void advance_impl(std::chrono::steady_clock::duration d);
  void set_watchdog_impl(std::chrono::steady_clock::duration threshold, watchdog_handler handler);
  std::unique_ptr<detail::loop_impl> impl_;
};

/// The return type of a job coroutine. Lazy: the body starts when the job is started with
/// start_job or co_awaited by another job (as a child, sharing its cancellation).
template <class T = void> class [[nodiscard]] job {
  static_assert(!std::is_reference_v<T>, "job<T&> is not supported; return a value or pointer");

 public:
  using promise_type = detail::job_promise<T>;
  using value_type = T;
  job() noexcept = default;
  job(job&& o) noexcept : h_(std::exchange(o.h_, {})) {}
  job& operator=(job&& o) noexcept {
    if (this != &o) {
      if (h_) h_.destroy();
      h_ = std::exchange(o.h_, {});
    }
    return *this;
  }
  ~job() {
    if (h_) h_.destroy();
  }
  /// False for a default-constructed, moved-from, started or awaited job.
  explicit operator bool() const noexcept { return static_cast<bool>(h_); }

 private:
  friend struct detail::access;
  friend promise_type;
  explicit job(std::coroutine_handle<promise_type> h) noexcept : h_(h) {}
  std::coroutine_handle<promise_type> h_;
};

/// A copyable, movable reference to a started job. Belongs to the loop thread: copying it
/// on another thread throws std::logic_error; destroying it there hands its release to the
/// loop thread (a post), so it never races with the loop.
template <class T = void> class job_handle {
 public:
  job_handle() noexcept = default;
  job_handle(const job_handle& o);
  job_handle(job_handle&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  job_handle& operator=(const job_handle& o);
  job_handle& operator=(job_handle&& o) noexcept;
  ~job_handle();
  /// False for a default-constructed or moved-from handle.
  explicit operator bool() const noexcept { return s_ != nullptr; }
  /// Whether the job has ended (returned, thrown, or cancelled).
  bool done() const;
  /// Cancels the job (see RULES); false if it had already ended or the handle is empty.
  bool cancel();
  /// The job's value, or rethrows its exception (job_cancelled included); std::logic_error
  /// if it has not ended. A move-only value can be taken once.
  T result();
  /// The name given to start_job.
  std::string_view name() const;

 private:
  friend struct detail::access;
  detail::job_state<T>* s_ = nullptr;
};

/// Starts a job on loop; its body begins on the loop's next iteration.
template <class T> job_handle<T> start_job(event_loop& loop, job<T> j, std::string name = {});
/// Starts a job on the loop running on this thread or, outside run(), the one most recently
/// created on this thread; std::logic_error if there is none.
template <class T> job_handle<T> start_job(job<T> j, std::string name = {});
/// Starts the job made by calling make() and keeps make (a lambda and its captures) alive
/// until the job ends: use this form for a lambda coroutine with captures.
template <class F>
  requires std::invocable<F&> && detail::is_job<std::invoke_result_t<F&>>::value
auto start_job(event_loop& loop, F&& make, std::string name = {});
template <class F>
  requires std::invocable<F&> && detail::is_job<std::invoke_result_t<F&>>::value
auto start_job(F&& make, std::string name = {});

/// co_await sleep_task(d): resumes no earlier than d later, yielding the elapsed time.
template <class Rep, class Period>
detail::sleep_for sleep_task(std::chrono::duration<Rep, Period> d);
/// co_await next_iteration(): yields to the loop, which runs everything else that is ready,
/// and resumes on its next iteration (sleep_task(0s), by name).
detail::sleep_for next_iteration() noexcept;

/// The tag of threaded_task(abandon_on_cancel, f, args...), below.
struct abandon_on_cancel_t {
  explicit abandon_on_cancel_t() = default;
};
inline constexpr abandon_on_cancel_t abandon_on_cancel{};

/// co_await threaded_task(f, args...): runs f(args...) (or f(stop_token, args...)) on a
/// worker thread; yields its result on the loop thread or rethrows its exception. When the
/// job is cancelled, the stop token is requested and the job resumes (with job_cancelled)
/// only after f has returned: f may use what the job's frame and its scope own until then.
template <class F, class... Args>
  requires(!std::is_same_v<std::remove_cvref_t<F>, abandon_on_cancel_t>)
auto threaded_task(F&& f, Args&&... args);

/// co_await threaded_task(abandon_on_cancel, f, args...): the same, for a call that cannot
/// be stopped: a cancel lets the job go on unwinding at once while f still runs, its result
/// dropped. f may then touch only what it owns (its decay-copied arguments and captures,
/// shared_ptrs it holds); the loop's destructor does not wait for it.
template <class F, class... Args> auto threaded_task(abandon_on_cancel_t, F&& f, Args&&... args);

/// The completion callback of a callback_task: call it exactly once, from any thread.
/// A second call only reports a std::logic_error to the error handler; if every copy is
/// destroyed without a call, the job gets a std::logic_error instead of hanging. If building
/// the T from the value throws, the job gets that exception (the call does not throw).
template <class T = void> class task_return {
 public:
  template <class U = T>
    requires(!std::is_void_v<T> && std::is_convertible_v<U &&, T>)
  void operator()(U&& value) const {
    if (auto* s = claim()) s->set_value(std::forward<U>(value));
  }
  void operator()() const
    requires std::is_void_v<T>
  {
    if (auto* s = claim()) s->set_value();
  }
  /// Completes the task by throwing e at the co_await.
  /// A null e throws std::invalid_argument here (the task stays pending).
  void fail(std::exception_ptr e) const {
    if (!e) throw std::invalid_argument("coro_jobs: task_return::fail(nullptr)");
    if (auto* s = claim()) s->set_error(std::move(e));
  }

 private:
  template <class, class> friend class detail::callback_op;
  explicit task_return(std::shared_ptr<detail::return_token<T>> t) : t_(std::move(t)) {}
  detail::callback_state<T>* claim() const;
  std::shared_ptr<detail::return_token<T>> t_;
};

/// co_await callback_task<T>(start): calls start(task_return<T>) on the loop thread and
/// resumes the job with the value passed to task_return. start may return a canceller
/// (a callable), called on the loop thread if the job is cancelled while waiting.
template <class T = void, class Start>
detail::callback_op<T, std::decay_t<Start>> callback_task(Start&& start);

/// co_await wait_readable(fd) / wait_writable(fd): resumes when poll reports the fd ready,
/// yielding revents. Throws std::system_error(EBADF) for an fd that is not open (or is
/// closed while waited on).
detail::fd_op wait_readable(int fd);
detail::fd_op wait_writable(int fd);

/// Reads lines from any readable fd (a pipe, a socket, a tty, stdin) without blocking the
/// loop: each read follows a wait_readable, so the fd's flags are left as they are. It does
/// not own the fd. Memory stays under max_line plus one 64 KiB read.
class line_reader {
 public:
  /// std::invalid_argument for max_line 0.
  explicit line_reader(int fd, std::size_t max_line = std::size_t(1) << 20);
  /// co_await r.next_line(): the next line without its '\n'; at the end of the stream, a
  /// last line without '\n' (if any), then std::nullopt. A line longer than max_line throws
  /// std::length_error (the reader then stays at that point); a read error std::system_error.
  job<std::optional<std::string>> next_line();

 private:
  int fd_;
  std::size_t max_;
  std::string buf_;          // bytes read and not yet returned, from start_
  std::size_t start_ = 0;    // where the next line begins in buf_
  std::size_t scanned_ = 0;  // bytes after start_ known to hold no '\n'
  bool eof_ = false;
  friend class process;
};

/// How a child process's stdout or stderr is connected.
enum class stdio { capture, inherit, discard };

/// What start_process runs.
struct process_options {
  std::vector<std::string> argv;                         // argv[0] is looked up in PATH
  std::string cwd;                                       // empty: the caller's
  std::vector<std::pair<std::string, std::string>> env;  // set in the child's environment
  std::optional<std::string> input;  // written to stdin, which is then closed; none: /dev/null
  stdio out = stdio::capture, err = stdio::capture;
  std::chrono::milliseconds grace{2000};        // a child still running when its process object
                                                // dies gets SIGTERM, then SIGKILL after this
  std::size_t max_line = std::size_t(1) << 20;  // for out() and err()
};

/// How a child ended: exited with `code`, or killed by `signal` (then code is -1).
struct exit_status {
  int code = -1;
  int signal = 0;
};

/// A running child process (move-only), from co_await start_process(options). Its streams
/// are read with out() and err(); co_await wait() gives its exit, noticed without polling
/// (a pidfd on Linux; elsewhere waitpid every 10 ms). Destroyed while the child runs (the job
/// that owns it was cancelled, say), it sends SIGTERM, then SIGKILL after options.grace, and
/// a job of the loop reaps the child; destroying the loop kills and reaps it at once. No
/// zombie and no open pipe is left.
class process {
 public:
  process() = default;
  process(process&& o) noexcept;
  process& operator=(process&& o) noexcept;
  ~process();
  /// The captured stdout / stderr; std::logic_error if it was not captured.
  line_reader& out();
  line_reader& err();
  /// co_await p.wait(): the child's exit. Once only; std::logic_error for an empty process.
  job<exit_status> wait();
  /// co_await p.read_all(p.out()): the rest of that stream, up to its end, as one string.
  static job<std::string> read_all(line_reader& r);
  int pid() const noexcept { return pid_; }

 private:
  friend job<process> start_process(process_options options);
  void release() noexcept;
  event_loop* loop_ = nullptr;
  int pid_ = -1, pidfd_ = -1, in_fd_ = -1;
  std::optional<line_reader> out_, err_;
  std::chrono::milliseconds grace_{0};
  job_handle<> writer_;  // feeds options.input to stdin
  bool reaped_ = false;
};

/// co_await start_process(options): starts the child. A program that cannot be started
/// throws std::system_error with its errno here (not a child exiting with 127); an empty
/// argv throws std::invalid_argument.
job<process> start_process(process_options options);

// --- Composition -------------------------------------------------------------------------
// when_all, when_any and with_timeout take any mix of tasks, jobs (by value) and job
// handles. Each runs as a job of its own on the loop (a "branch", named after its parent),
// so that each can be cancelled alone. A void result is std::monostate.

/// The value an awaitable yields: T for job<T> and job_handle<T>, the task's value for
/// tasks; std::monostate for void.
template <class A> using await_value_t = typename detail::await_value<std::remove_cvref_t<A>>::type;

/// co_await when_all(a, b, ...): a std::tuple of every result. The first error (or a branch
/// cancelled from outside) cancels the others, waits for them to unwind, and is rethrown;
/// errors the others throw while they unwind go to the error handler. A cancelled branch's
/// task drops its result, even an error that came back in the same iteration (RULES).
template <class... A> job<std::tuple<await_value_t<A>...>> when_all(A... awaitables);

/// co_await when_any(a, b, ...): a std::variant whose index() is the first to end and whose
/// alternative is its value; if the first to end threw, that is rethrown. The others are
/// cancelled and have finished unwinding when when_any returns.
template <class... A> job<std::variant<await_value_t<A>...>> when_any(A... awaitables);

/// Thrown by with_timeout when the time ran out first.
struct timeout_error : std::exception {
  const char* what() const noexcept override { return "coro_jobs: timed out"; }
};

/// co_await with_timeout(d, a): a's value, or cancels a and throws timeout_error after d. A
/// cancel of the awaiting job stays job_cancelled.
template <class Rep, class Period, class A>
job<await_value_t<A>> with_timeout(std::chrono::duration<Rep, Period> d, A awaitable);

/// co_await shielded(a): runs a (a task, job or job_handle) to its end even if the awaiting
/// job is cancelled meanwhile or already was: for cleanup that must still wait, such as
/// saving a draft. It runs as a job of its own ("<name>/shielded") that the awaiting job's
/// cancel does not reach; bound it with with_timeout inside: shielded(with_timeout(d, a)).
/// Yields a's value or rethrows its error. A job scope's cancel_all() does not wait for a
/// shielded wait to end (it would block the loop): the job ends after it, on the loop.
template <class A>
detail::shield_awaiter<typename detail::await_result<std::remove_cvref_t<A>>::type> shielded(
    A awaitable);

/// Progress from any thread, seen on the loop thread. Make one in the job (it is bound to
/// the loop and the callback), hand reporter() to the thread function, and the callback runs
/// on the loop thread with the latest value. Reports are coalesced: however fast the worker,
/// at most one delivery is queued at a time, and it carries the newest value. Destroying the
/// progress object (e.g. when the job ends) makes later reports no-ops.
template <class T> class progress {
 public:
  /// A copyable, thread-safe handle for reporting; harmless after the progress is gone.
  class reporter {
   public:
    void operator()(T value) const { st_->report(std::move(value)); }

   private:
    friend class progress;
    explicit reporter(std::shared_ptr<detail::progress_state<T>> s) : st_(std::move(s)) {}
    std::shared_ptr<detail::progress_state<T>> st_;
  };
  progress(event_loop& loop, std::function<void(T)> on_progress);
  /// Uses the loop running on this thread (as start_job(job) does).
  explicit progress(std::function<void(T)> on_progress);
  ~progress();
  progress(const progress&) = delete;
  progress& operator=(const progress&) = delete;
  reporter get_reporter() const { return reporter(st_); }

 private:
  std::shared_ptr<detail::progress_state<T>> st_;
};

// --- Job scopes --------------------------------------------------------------------------

/// What a job_scope does when a job is started under a name that a live job of the scope
/// already has (a repeated click): start another, ignore the new one (returning the running
/// job's handle), or cancel the previous one (finishing its unwinding) and start the new one.
/// run_latest: while a job of that name runs, keep only the newest start (a newer one
/// cancels the one waiting, which never runs), and run it when the running job ends
/// (Kotlin's conflation). Its handle's job waits first, then runs the body.
enum class restart { run_another, ignore_while_running, cancel_previous, run_latest };

/// Owns the jobs started through it: cancel_all() or the destructor cancels them and finishes
/// their unwinding (their catch blocks and destructors run) before it returns, so a window
/// that owns a scope knows no job touches it after it closes. Loop thread only; destroy it
/// before its loop.
class job_scope {
 public:
  explicit job_scope(event_loop& loop, restart policy = restart::run_another);
  ~job_scope();
  job_scope(const job_scope&) = delete;
  job_scope& operator=(const job_scope&) = delete;

  template <class T> job_handle<T> start(job<T> j, std::string name = {});
  template <class T> job_handle<T> start(job<T> j, std::string name, restart policy);
  /// The lambda form, like start_job(loop, make).
  template <class F>
    requires std::invocable<F&> && detail::is_job<std::invoke_result_t<F&>>::value
  auto start(F&& make, std::string name = {}, std::optional<restart> policy = {});
  /// Cancels every live job of the scope and finishes their unwinding now; returns how many
  /// were live. A job calling this on its own scope is cancelled but ends at its next await.
  std::size_t cancel_all();
  /// The scope's jobs that have not ended.
  std::size_t size();
  // cancel_all() and size() throw std::logic_error off the loop's thread, as loop functions
  // do. The destructor cannot throw: off that thread it prints why and calls std::terminate,
  // rather than run the jobs' catch blocks and destructors on the wrong thread.

 private:
  template <class T> job_handle<T> adopt(job_handle<T> h);
  template <class T>
  std::optional<job_handle<T>> apply_policy(const std::string& name, restart policy);
  detail::loop_impl* loop_;
  restart policy_;
  std::thread::id owner_;  // the loop's thread; kept here, as the loop may be gone first
  std::vector<detail::job_ctx*> jobs_;    // each holds a reference; ended ones until a sweep
  std::size_t sweep_at_ = 16;             // jobs_.size() that triggers the next sweep
  std::vector<detail::job_ctx*> queued_;  // run_latest jobs still waiting for their turn
  template <class T>
  static job<T> run_after(job_scope* scope, detail::held_ref previous, job<T> body);
  template <class T> job_handle<T> queue(job_handle<T> h);  // a run_latest job, waiting
  detail::job_ctx* take_turn(const std::string& name);      // cancels the waiting; the running one
  void unqueue(detail::job_ctx* j) noexcept;                // its turn came
  void check_thread(const char* what) const;
};


// ======================================================================================
//                          IMPLEMENTATION, from the bottom up
// ======================================================================================

namespace detail {

// --- Clock and durations --------------------------------------------------------------


using clock_type = std::chrono::steady_clock;
using time_point = clock_type::time_point;
using duration = clock_type::duration;

template <class T> struct is_job<job<T>> : std::true_type {};

[[noreturn]] inline void fail_logic(const char* what) { throw std::logic_error(what); }

// Durations from users may be of any type and any size. Compare in long double (64-bit
// mantissa: exact for every int64 nanosecond count) so hours::max() cannot wrap.
template <class Rep, class Period>
duration saturate(std::chrono::duration<Rep, Period> d) noexcept {
  using ld = std::chrono::duration<long double, std::nano>;
  const long double n = std::chrono::duration_cast<ld>(d).count();
  if (!(n == n)) return duration::zero();  // NaN
  if (n >= ld(duration::max()).count()) return duration::max();
  if (n <= ld(duration::min()).count()) return duration::min();
  return std::chrono::duration_cast<duration>(ld(n));
}

inline time_point deadline_after(time_point now, duration d) noexcept {
  if (d <= duration::zero()) return now;
  if (now.time_since_epoch() > duration::max() - d) return time_point::max();
  return now + d;
}


// --- The ready queue -------------------------------------------------------------------------

// One entry of the ready queue, two words: the hot path of every job switch.
enum class item : std::uint8_t {
  resume,  // arg: a job_ctx; resume it at its resume_at frame
  start,   // arg: a job_ctx; run its body to its first await (or drop it, if cancelled)
  posted,  // the oldest posted callback (a post, a progress delivery)
  timer,   // arg: a callback_node; its call_later callback
  watch,   // arg: a callback_node; its watch callback, with the revents poll gave
  report,  // the oldest queued error, to the error handler
  skip,    // withdrawn (see loop_impl::withdraw_items)
};
struct ready_item {
  item kind;
  void* arg;
};

// What other threads send the loop through its inbox. With `who` null, fn is a completion:
// it runs as soon as the loop takes the batch, and only queues work. Otherwise it is a
// callback (a post, a progress delivery) that runs in the ready step like the loop's own,
// named `who` to the error handler and the watchdog.
struct remote_item {
  const char* who;
  std::function<void()> fn;
};

// --- Timers and fds ----------------------------------------------------------------------

// One wait (fd_op) or watch (callback_node) on an fd. The loop polls each fd through one
// pollfd entry however many owners it has (ppoll fails with EINVAL given more entries than
// RLIMIT_NOFILE): the owners of an fd form a list through these links, oldest first.
struct fd_owner {
  fd_owner(int f, short ev) noexcept : fd(f), events(ev) {}
  int fd;
  short events;             // what this owner waits for
  bool one_shot = false;    // dropped when it fires (a job's wait), else only on POLLNVAL
  bool registered = false;  // in its fd's list
  fd_owner *prev = nullptr, *next = nullptr;
  // Poll reported `revents` (this owner's events, and POLLERR/POLLHUP/POLLNVAL) and, if it
  // is one-shot or the fd is invalid, the loop has already dropped it. It only queues work:
  // it runs no user code and never touches the fd table (see loop_impl::dispatch_fd).
  virtual void fd_ready(loop_impl& loop, short revents) noexcept = 0;

 protected:
  ~fd_owner() = default;
};

// What waits in the timer heap (a sleep, a call_later) keeps the index of its entry, which
// the heap updates on every move, as Asio's timer_queue and libuv do: a cancel removes the
// entry in O(log n), at once, and allocates nothing.
struct timer_owner {
  static constexpr std::size_t not_queued = std::size_t(-1);
  std::size_t timer_slot = not_queued;
};

// A timer entry fires by calling fire(owner, loop) when its deadline is due. `seq` breaks
// ties so that equal deadlines fire in the order they were set.
struct timer_entry {
  time_point deadline;
  std::uint64_t seq;
  void (*fire)(timer_owner*, loop_impl&);
  timer_owner* owner;
  friend bool operator>(const timer_entry& a, const timer_entry& b) noexcept {
    return a.deadline != b.deadline ? a.deadline > b.deadline : a.seq > b.seq;
  }
};


// --- Threads: the inbox and the worker pool ------------------------------------------

inline unsigned usable_cpus() noexcept {
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
    return unsigned(CPU_COUNT(&set));
#endif
  const unsigned hw = std::thread::hardware_concurrency();
  return hw ? hw : 1;
}


// One thread function on its way through the pool. The task is also the state the worker
// and the awaiting job share, so a threaded_task costs one allocation (plus its completion's
// trip through the inbox), not one per layer.
struct pool_task {
  virtual void run(std::shared_ptr<pool_task>& self) = 0;  // on a worker
  // Set once the function has returned and its captures are destroyed (or the pool dropped
  // it unrun). A cancelled job waits for it, so nothing the function touches dies first.
  std::atomic<bool> returned{false};
  void mark_returned() noexcept {
    returned.store(true, std::memory_order_release);
    returned.notify_all();
  }

 protected:
  ~pool_task() = default;
};


// Waits up to 50 us for done() before the caller blocks, yielding the CPU meanwhile. A
// wakeup (futex or pipe) takes 5 to 25 us to get a thread running again on a VM, longer
// than a whole round trip to a worker: the loop spins while a thread function runs (its
// result may be microseconds away), and a worker spins after each function (the job it
// served may submit the next one at once). NOTES: spin before block. Never on one CPU, where the waiting thread would only delay the one it waits for.
template <class Done> bool spin_until(Done done) {
  static const bool worth_it = usable_cpus() > 1;
  if (!worth_it) return done();
  const auto stop = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
  while (!done()) {
    if (std::chrono::steady_clock::now() >= stop) return false;
    std::this_thread::yield();
  }
  return true;
}

// The one path into the loop from other threads (libuv's uv_async, in effect). A writer
// queues its item under the mutex, then wakes the loop unless a wakeup is already on its way
// (`signalled`): with one byte to a pipe that the loop's ppoll always watches, and only if
// the loop is in (or about to enter) ppoll. The loop resets `signalled` before it takes the
// items, so no wakeup is lost, and a burst of writers costs one write. Waking takes no lock
// and allocates nothing (two atomics and write(2)), so quit() may be called from a signal
// handler; queueing an item (post, task_return) takes the mutex and allocates, so it may
// not. Writers hold the inbox by shared_ptr, so it outlives every writer even if the loop
// is gone.
struct inbox {
  std::mutex m;
  std::vector<remote_item> items;
  bool closed = false;                 // guarded by m
  std::atomic<bool> signalled{false};  // a wakeup is on its way (or the loop is busy anyway)
  // The loop is in (or about to enter) ppoll, or a host waits (prepare_host_wait).
  std::atomic<bool> polling{false};
  std::atomic<bool> piped{false};  // set after each byte written: the pipe needs draining
  std::atomic<bool> quit{false};
  int rfd = -1, wfd = -1;

  inbox();
  ~inbox();
  inbox(const inbox&) = delete;
  inbox& operator=(const inbox&) = delete;

  // Any thread:
  bool push(remote_item it);  // queues it and wakes the loop; false once closed
  void wake() noexcept;       // async-signal-safe: no lock, no allocation
  // The loop thread:
  void drain() noexcept;                     // empties the pipe
  void take(std::vector<remote_item>& out);  // the queued items, flag reset
  void close();                              // drops items; later pushes fail
};

inline inbox::inbox() {
  int fds[2];
  if (::pipe(fds) != 0) throw std::system_error(errno, std::generic_category(), "coro_jobs: pipe");
  rfd = fds[0];
  wfd = fds[1];
  for (int fd : fds) {
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  }
}
inline inbox::~inbox() {
  ::close(rfd);
  ::close(wfd);
}
inline bool inbox::push(remote_item it) {
  {
    std::lock_guard<std::mutex> lock(m);
    if (closed) return false;
    items.push_back(std::move(it));
  }
  wake();
  return true;
}
// With loop_impl::wait this is Dekker's handshake (all seq_cst): either the loop sees our
// flag and does not block, or we see its `polling` and our byte wakes its ppoll. A busy
// loop needs no byte: it reads `signalled` before it blocks.
inline void inbox::wake() noexcept {
  if (signalled.exchange(true)) return;
  if (!polling.load()) return;  // hosted too: prepare_host_wait sets it before the host blocks
  const char c = 1;
  [[maybe_unused]] auto n = ::write(wfd, &c, 1);  // a full pipe: a wakeup is pending anyway
  piped.store(true, std::memory_order_release);   // after the byte: set, the pipe gets drained
}
// Empties the pipe, before `signalled` is reset: a writer that sets the flag after the
// reset writes a fresh byte, so ppoll cannot miss it. (One that set it before the reset
// may write its byte after the drain; run_once drains such a stale byte when poll shows
// it or `piped` is set again, or every later poll would return at once.)
inline void inbox::drain() noexcept {
  char buf[64];
  while (::read(rfd, buf, sizeof buf) == sizeof buf) {
  }
}
inline void inbox::take(std::vector<remote_item>& out) {
  if (piped.exchange(false, std::memory_order_acquire)) drain();
  signalled.store(false, std::memory_order_release);
  std::lock_guard<std::mutex> lock(m);
  out.swap(items);
}
inline void inbox::close() {
  std::vector<remote_item> dropped;
  {
    std::lock_guard<std::mutex> lock(m);
    closed = true;
    dropped.swap(items);
  }
}

// --- Worker pool ------------------------------------------------------------------------

// Threads are started on demand up to `max` and then stay until the loop is destroyed, which
// joins them; or detaches them if one runs an abandoned function. They own the pool through
// a shared_ptr, so a detached one finishes safely after the loop is gone.
struct worker_pool {
  std::mutex m;
  std::condition_variable cv;
  std::deque<std::shared_ptr<pool_task>> queue;
  std::vector<std::thread> workers;  // the loop thread's only
  std::size_t max = 1, threads = 0, idle = 0;
  bool stopping = false;
  std::atomic<std::size_t> queued{0};    // queue.size(), readable without the lock while spinning
  std::atomic<std::size_t> spinning{0};  // workers between two functions, about to take one

  static void submit(const std::shared_ptr<worker_pool>& p, std::shared_ptr<pool_task> work);
  void kick() noexcept;  // the loop, once per iteration: wakes idle workers for queued work
  void work_loop();      // a worker thread's body
  void stop();           // the loop's destructor: drops queued work, lets workers exit
  void release_workers(bool join);                    // then: joins them, or detaches them
  std::shared_ptr<pool_task> withdraw(pool_task* t);  // t out of the queue, if it is there
};

// Queues work without waking anyone: the loop calls kick() once per iteration, after its
// ready snapshot ran. So 64 jobs that each submit a function cost one wakeup, not 64, and
// a woken worker does not preempt the loop in mid-iteration on a small machine (NOTES: pool
// kick). A thread is started at once if the pool may grow and every thread is busy.
inline void worker_pool::submit(const std::shared_ptr<worker_pool>& p,
                                std::shared_ptr<pool_task> work) {
  std::lock_guard<std::mutex> lock(p->m);
  p->queue.push_back(std::move(work));
  p->queued.store(p->queue.size(), std::memory_order_relaxed);
  if (p->idle >= p->queue.size() || p->threads >= p->max) return;
  ++p->threads;
  try {
    p->workers.reserve(p->workers.size() + 1);
    p->workers.emplace_back([p] { p->work_loop(); });
  } catch (...) {
    --p->threads;
    p->queue.pop_back();
    p->queued.store(p->queue.size(), std::memory_order_relaxed);
    throw;
  }
}
// Wakes as many idle workers as there is queued work (busy ones take more by themselves).
// noexcept: a mutex that cannot be locked is beyond repair.
inline void worker_pool::kick() noexcept {
  std::size_t n;
  {
    std::lock_guard<std::mutex> lock(m);
    const std::size_t spinners = spinning.load(std::memory_order_relaxed);
    n = std::min(idle, queue.size() > spinners ? queue.size() - spinners : 0);
  }
  while (n-- > 0) cv.notify_one();
}
inline void worker_pool::work_loop() {
  std::unique_lock<std::mutex> lock(m);
  for (;;) {
    while (queue.empty() && !stopping) {
      ++idle;
      cv.wait(lock);
      --idle;
    }
    if (queue.empty()) break;
    auto work = std::move(queue.front());
    queue.pop_front();
    queued.store(queue.size(), std::memory_order_relaxed);
    lock.unlock();
    work->run(work);
    work = nullptr;  // destroy captures outside the lock
    spinning.fetch_add(1, std::memory_order_relaxed);
    spin_until([this] { return queued.load(std::memory_order_relaxed) > 0; });
    spinning.fetch_sub(1, std::memory_order_relaxed);
    lock.lock();
  }
  --threads;
}
inline std::shared_ptr<pool_task> worker_pool::withdraw(pool_task* t) {
  std::lock_guard<std::mutex> lock(m);
  auto it = std::find_if(queue.begin(), queue.end(), [t](const auto& q) { return q.get() == t; });
  if (it == queue.end()) return nullptr;
  auto out = std::move(*it);
  queue.erase(it);
  queued.store(queue.size(), std::memory_order_relaxed);
  return out;
}
inline void worker_pool::stop() {
  std::deque<std::shared_ptr<pool_task>> dropped;
  {
    std::lock_guard<std::mutex> lock(m);
    stopping = true;
    dropped.swap(queue);
    queued.store(0, std::memory_order_relaxed);
  }
  cv.notify_all();
  for (auto& t : dropped) t->mark_returned();
}
inline void worker_pool::release_workers(bool join) {
  for (std::thread& t : workers) join ? t.join() : t.detach();
  workers.clear();
}


// --- A job, as the loop sees it -------------------------------------------------------


// A wait of a job that cancel() can withdraw. Every completion path clears ctx->pending
// before it enqueues the job, so a job is never resumed twice for one wait.
struct op_base {
  job_ctx* ctx = nullptr;
  std::coroutine_handle<> waiter;
  virtual void cancel_op() noexcept = 0;
  // After cancel_op: true while the job must still wait for the op's work to stop (a thread
  // function that is running); the op then resumes the job itself, with job_cancelled.
  virtual bool holds_job() const noexcept { return false; }
  // Blocks until that work has stopped, then lets the job go (job scopes, the destructor).
  virtual void wait_stopped() noexcept {}
  virtual const char* what() const noexcept = 0;  // for event_loop::jobs()
  void park() noexcept;  // the job now waits on this op (ctx->pending), since now

 protected:
  ~op_base() = default;
};


// While a job awaits a child, the awaiter (in the parent's frame) links the child's handle
// into the job's chain, so the loop's destructor can destroy the frames innermost first
// instead of recursing through 100,000 nested destructors.
struct child_link {
  void* slot;                   // the awaited job object's coroutine handle
  void (*destroy)(void* slot);  // destroys that frame and empties the handle
  child_link* outer;
};

// What start_job(lambda) keeps alive for the job's lifetime: the lambda and its captures.
struct maker_base {
  virtual ~maker_base() = default;
};
template <class F> struct maker_box final : maker_base {
  F f;
  explicit maker_box(F&& x) : f(std::move(x)) {}
  explicit maker_box(const F& x) : f(x) {}
};

// What few jobs have, behind one pointer (NOTES: job_extras): a name, the lambda that
// start_job(lambda) keeps alive, and a branch's place.
// A branch of when_all/when_any (or a shielded wait's job) is named after the job it
// serves, "<parent>/when_all[i]" ("<parent>/shielded"), but stores only that job and its
// own place: the full name is built when asked for (an error, the watchdog, jobs()). The branch holds a
// reference to its parent (see job_ctx::release), so the chain can always be walked.
class job_extras {
  struct data {
    std::string name;
    std::unique_ptr<maker_base> maker;
    job_ctx* parent = nullptr;   // a branch's or shielded job's: the job it serves
    const char* kind = nullptr;  // then "when_all", "when_any" or "shielded"
    std::size_t index = 0;       // a branch's place in its when_all/when_any
  };
  std::unique_ptr<data> d_;
  data& get() {
    if (!d_) d_ = std::make_unique<data>();
    return *d_;
  }

 public:
  void set_name(std::string n) {
    if (!n.empty()) get().name = std::move(n);
  }
  void set_maker(std::unique_ptr<maker_base> m) { get().maker = std::move(m); }
  // Named "<parent's name>/<kind>[index]", or "<parent's name>/<kind>" with no index.
  void set_parent(job_ctx* parent, const char* kind, std::optional<std::size_t> index) {
    data& d = get();
    d.parent = parent;
    d.kind = kind;
    d.index = index.value_or(std::size_t(-1));
  }
  job_ctx* parent() const noexcept { return d_ ? d_->parent : nullptr; }
  void drop_maker() noexcept {
    if (d_) d_->maker.reset();
  }
  // The name given to start_job (empty for a branch: see full_name).
  std::string_view name() const noexcept {
    return d_ ? std::string_view(d_->name) : std::string_view();
  }
  std::string full_name() const;  // the name given, or a branch's built one; may be empty
  std::string name_or_job() const {
    std::string n = full_name();
    return n.empty() ? std::string("job") : n;
  }
};

// What one started job shares among its frames (root and children) and its handles.
struct job_ctx {
  loop_impl* loop = nullptr;
  // The loop it was started on; never changes (see drop_handle_elsewhere).
  loop_impl* home = nullptr;
  std::thread::id owner;                     // that loop's thread
  op_base* pending = nullptr;                // the cancellable wait the job is suspended on, if any
  group* branches = nullptr;                 // a when_all/when_any whose branches it owns, if any
  child_link* innermost = nullptr;           // the chain of children being awaited
  std::coroutine_handle<> root;              // the top frame, until it ends
  std::coroutine_handle<> resume_at;         // the frame to resume when its ready item runs
  time_point since{};                        // when the current wait began (for event_loop::jobs())
  job_ctx *prev = nullptr, *next = nullptr;  // the loop's list of live jobs
  handle_waiter* waiters = nullptr;          // jobs awaiting a handle of this one
  std::exception_ptr error;
  job_extras extra;  // name, and the lambda of start_job(lambda)
  // Atomic for one case only: handles that outlive the loop, dropped on several threads.
  std::atomic<std::uint32_t> refs = 0;     // handles + 1 while the frame lives
  std::atomic<std::uint32_t> handles = 0;  // job_handle copies
  // Its life: start_job makes it `queued`; its start item makes it `running` (see
  // run_start); job_finished makes it `ended`, when its top frame ends or is dropped unrun.
  enum class stage : std::uint8_t { queued, running, ended } life = stage::queued;
  // How far a cancel has reached the job's own code: cancel() makes it `requested`; the
  // cancel_point that throws job_cancelled into the job makes it `thrown` (from then on
  // every co_await yields to the loop before it throws, so a job that catches it in a loop
  // cannot freeze the program); a job that then awaits again or ends normally `went_on`
  // (note_went_on reports it once).
  enum class cancel_reach : std::uint8_t {
    none,
    requested,
    thrown,
    went_on
  } reach = cancel_reach::none;
  // Its error (`error`), set when it ends: a cancel, never reported; or an error `unseen`
  // until result() or an awaiter sees it (observe_error) or it is reported, then `seen`.
  enum class fault : std::uint8_t { none, cancel, unseen, seen } error_is = fault::none;
  bool started() const noexcept { return life != stage::queued; }
  bool done() const noexcept { return life == stage::ended; }
  bool cancelled() const noexcept { return reach != cancel_reach::none; }
  void request_cancel() noexcept {
    if (reach == cancel_reach::none) reach = cancel_reach::requested;
  }
  void set_error(std::exception_ptr e, bool is_cancel) noexcept {
    error = std::move(e);
    error_is = is_cancel ? fault::cancel : fault::unseen;
  }
  bool item_kept = false;  // loop_impl::withdraw_items only: its newest queued item is kept
  bool in_room = false;    // built in the room in front of its root frame (see alloc_frame)

  virtual ~job_ctx() = default;
  // The complete object's address (in the room: the frame's whole allocation), and its result
  // type's tag (type_tag<T>): what dynamic_cast would tell, without RTTI (-fno-rtti builds).
  virtual void* memory() noexcept = 0;
  virtual const void* type() const noexcept = 0;
  bool cancel() noexcept;
  // A branch's state holds a reference to its parent's: the last release of a chain of
  // them walks up in this loop, not by recursion.
  void release() noexcept {
    for (job_ctx* j = this; j && --j->refs == 0;) {
      job_ctx* const up = j->extra.parent();
      if (!j->in_room) {
        delete j;
      } else {
        void* const m = j->memory();
        j->~job_ctx();
        ::operator delete(m);
      }
      j = up;
    }
  }
  void rethrow_if_error();
};

// Walks up to the first job with a name of its own (or none: "job"), then appends each
// level's "/kind[i]" on the way back down: O(depth), only when a name is asked for.
inline std::string job_extras::full_name() const {
  if (!d_ || !d_->parent) return d_ ? d_->name : std::string();
  std::vector<const data*> levels;
  const job_extras* e = this;
  for (; e->d_ && e->d_->parent; e = &e->d_->parent->extra) levels.push_back(e->d_.get());
  std::string n = e->d_ && !e->d_->name.empty() ? e->d_->name : std::string("job");
  for (auto it = levels.rbegin(); it != levels.rend(); ++it) {
    n += '/';
    n += (*it)->kind;
    if ((*it)->index != std::size_t(-1)) n += "[" + std::to_string((*it)->index) + "]";
  }
  return n;
}

template <class T> inline constexpr char type_tag = 0;  // one address per T, in every file

template <class T> struct job_state final : job_ctx {
  std::optional<T> value;
  bool taken = false;
  void* memory() noexcept override { return this; }
  const void* type() const noexcept override { return &type_tag<T>; }
  T get() {
    rethrow_if_error();
    if constexpr (std::is_copy_constructible_v<T>) {
      return *value;
    } else {
      if (taken) fail_logic("coro_jobs: the move-only result of this job was already taken");
      taken = true;
      return std::move(*value);
    }
  }
};
template <> struct job_state<void> final : job_ctx {
  void* memory() noexcept override { return this; }
  const void* type() const noexcept override { return &type_tag<void>; }
  void get() { rethrow_if_error(); }
};

// --- Frame memory
// Every job frame is allocated with a room in front of it for a job_state, so start_job
// builds the job's state there instead of allocating it: one allocation and one free per
// job instead of two, and no second malloc header (NOTES: frame room). A child frame
// leaves its room unused (about 128 bytes per nested frame). Once a state lives in the
// room, the memory is
// the state's to free when its last reference goes: it may outlive the frame (a
// job_handle reads the result), so operator delete then leaves it alone. Frames larger
// than room_frame_limit do not offer their room: a handle kept to a finished job must not
// keep a big frame's memory.
// The room ends with one word, just before the frame: the frame's address if a state may
// be built there, plus 1 once one is. start_job checks the address, because it finds the
// room from coroutine_handle::address(), which is the pointer operator new returned on GCC,
// Clang and MSVC; where it is not, or the room is not offered, it allocates the state apart.
inline constexpr std::size_t new_align = __STDCPP_DEFAULT_NEW_ALIGNMENT__;  // the frame's alignment
inline constexpr std::size_t room_frame_limit = 512;

template <class State>  // a multiple of new_align, so the frame stays aligned; 0: no room
inline constexpr std::size_t state_room =
    alignof(State) <= new_align && sizeof(State) <= 256
        ? (sizeof(State) + sizeof(std::uintptr_t) + new_align - 1) / new_align * new_align
        : 0;

inline std::uintptr_t& room_word(void* frame) noexcept {
  return *reinterpret_cast<std::uintptr_t*>(static_cast<char*>(frame) - sizeof(std::uintptr_t));
}
template <class State> void* alloc_frame(std::size_t n) {
  constexpr std::size_t room = state_room<State>;
  if constexpr (room == 0) {
    return ::operator new(n);
  } else {
    char* const frame = static_cast<char*>(::operator new(room + n)) + room;
    const std::uintptr_t offer =
        n <= room_frame_limit ? reinterpret_cast<std::uintptr_t>(frame) : 0;
    ::new (static_cast<void*>(frame - sizeof(std::uintptr_t))) std::uintptr_t(offer);
    return frame;
  }
}
template <class State> void free_frame(void* frame) noexcept {
  constexpr std::size_t room = state_room<State>;
  if constexpr (room == 0) {
    ::operator delete(frame);
  } else if (!(room_word(frame) & 1)) {  // else its state frees the memory
    room_word(frame) = 0;  // no stale address for a later frame in the same memory to match
    ::operator delete(static_cast<char*>(frame) - room);
  }
}
// Builds the job state for the frame at `frame`: in its room if it has one.
template <class State> State* make_state(void* frame) {
  constexpr std::size_t room = state_room<State>;
  if constexpr (room != 0) {
    std::uintptr_t& word = room_word(frame);
    if (word == reinterpret_cast<std::uintptr_t>(frame)) {
      State* const s = ::new (static_cast<char*>(frame) - room) State();
      word |= 1;
      s->in_room = true;
      return s;
    }
  }
  return new State();
}

// The branches of one when_all/when_any: jobs of their own, each reporting its end here.
// The awaiting job waits on the group twice: first (cancellable, `parked`) until it has its
// answer, then (not cancellable, so a cancelled job can still wait) until every branch has
// ended, so nothing a branch uses dies before it. Branches always end: they are cancelled.
struct group final : op_base {
  const char* kind;                     // "when_all" or "when_any"
  bool any;                             // stop at the first end (when_any) or first error
  std::vector<job_ctx*> branches;       // each holds a reference
  std::size_t left = 0;                 // branches not yet ended
  std::size_t first = std::size_t(-1);  // when_any: the winner
  std::exception_ptr error;             // the error to rethrow
  bool stopping = false, suspended = false;
  // A stop on its way down a nest (see stop): the next group on the loop's stop list, the
  // next branch to cancel, and whether the awaiting job waits for that (holds_job).
  group* stop_next = nullptr;
  std::size_t stop_at = 0;
  bool listed = false, holding = false;

  group(const char* k, bool a) noexcept;
  group(const group&) = delete;
  group& operator=(const group&) = delete;
  ~group();
  const char* what() const noexcept override;

  void stop() noexcept;
  void stopped() noexcept;  // every branch has been cancelled
  void cancel_op() noexcept override;
  bool holds_job() const noexcept override { return holding; }
  void wake();
  void branch_done(std::size_t i, std::exception_ptr e);

  // co_await wait(): until the answer (or all ended); parked, so cancel() reaches it.
  struct answer_awaiter {
    static constexpr bool coro_jobs_internal = true;
    group& g;
    bool await_ready() const noexcept { return g.left == 0 || g.stopping; }
    void await_suspend(std::coroutine_handle<> h) noexcept {
      g.waiter = h;
      g.suspended = true;
      g.park();
    }
    void await_resume() const noexcept {}
  };
  // co_await drained(): until every branch has ended. Not parked: it cannot be cancelled.
  struct drain_awaiter {
    static constexpr bool coro_jobs_internal = true;
    group& g;
    bool await_ready() const noexcept { return g.left == 0; }
    void await_suspend(std::coroutine_handle<> h) noexcept {
      g.waiter = h;
      g.suspended = true;
    }
    void await_resume() const noexcept {}
  };
  answer_awaiter answer() noexcept { return {*this}; }
  drain_awaiter drained() noexcept { return {*this}; }
  void rethrow();
};

struct access {
  template <class T> static auto& handle(job<T>& j) noexcept { return j.h_; }
  template <class T> static auto& state(job_handle<T>& h) noexcept { return h.s_; }
  template <class T> static job<T> make_job(std::coroutine_handle<job_promise<T>> h) noexcept {
    return job<T>(h);
  }
  static loop_impl& impl(event_loop& l) noexcept { return *l.impl_; }
  static callback_handle make_handle(callback_node* n) noexcept;
  static callback_node* node(const callback_handle& h) noexcept { return h.n_; }
};

// A job awaiting a job_handle: queued on the target job until it ends.
struct handle_waiter : op_base {
  job_ctx* target = nullptr;
  handle_waiter* next = nullptr;
  const char* what() const noexcept override { return "job_handle"; }
  void wait_for(job_ctx* t, std::coroutine_handle<> w) noexcept {  // until t ends
    waiter = w;
    target = t;
    next = t->waiters;
    t->waiters = this;
  }
  void cancel_op() noexcept override {
    for (handle_waiter** p = &target->waiters; *p; p = &(*p)->next) {
      if (*p == this) {
        *p = next;
        break;
      }
    }
  }

 protected:
  ~handle_waiter() = default;
};


// --- The loop ---------------------------------------------------------------------------

struct callback_node final : fd_owner, timer_owner {
  int refs = 1;
  loop_impl* loop;                                           // null once the loop is gone
  callback_node *prev_node = nullptr, *next_node = nullptr;  // the loop's list of nodes
  bool is_timer = false;
  std::function<void()> on_timer;
  std::function<void(short)> on_fd;
  bool active = true;  // timer not yet run / watch not cancelled
  short revents = 0;   // watch: what the last poll said

  explicit callback_node(loop_impl& l) noexcept;
  callback_node(const callback_node&) = delete;
  callback_node& operator=(const callback_node&) = delete;
  ~callback_node();
  void ref() noexcept;
  void unref() noexcept;
  void fd_ready(loop_impl& loop, short ev) noexcept override;
  static void fire_timer(timer_owner* self, loop_impl& loop);
  void run_timer();  // item::timer
  void run_watch();  // item::watch
};

struct loop_impl {
  event_loop* self;
  std::thread::id owner = std::this_thread::get_id();

  std::vector<ready_item> ready, running;  // this iteration's snapshot runs from `running`

  std::vector<timer_entry> timers;  // a 4-ary min-heap on (deadline, seq)
  std::uint64_t next_seq = 0;

  // ---- fds: one pollfd entry per fd, whatever the number of waits and watches on it
  std::vector<pollfd> pfds;  // [0] is the inbox pipe; [i].events: the OR of i's owners' events
  std::size_t own_fds = 1;   // the loop's own entries: the pipe, and the timerfd if there is one
  int timer_fd = -1;         // Linux: armed to the first deadline while the loop blocks
  time_point timer_fd_at = time_point::min();  // what it is armed to (min: disarmed)
  void arm_timer_fd(time_point deadline) noexcept;
  struct fd_list {
    fd_owner *first = nullptr, *last = nullptr;
  };
  std::vector<fd_list> fd_lists;      // parallel to pfds: the owners of each entry
  std::vector<std::size_t> fd_entry;  // by fd number: its index in pfds, 0 if none
  std::size_t fd_registrations = 0;   // owners, for stats().fd_waits

  std::shared_ptr<inbox> box = std::make_shared<inbox>();
  std::vector<remote_item> remote;  // the batch taken from the inbox
  std::deque<remote_item> posted;   // posted callbacks, in FIFO order

  std::shared_ptr<worker_pool> pool = std::make_shared<worker_pool>();
  // Work was submitted to the pool since its last kick(). Only jobs submit, and jobs run only
  // inside run_once (a job scope resumes cancelled jobs only, whose awaits throw at once), so
  // the kick at the end of each iteration is the only one needed.
  bool kick_pool = false;
  void kick_pool_if_needed() noexcept;
  void submit_thread(std::shared_ptr<pool_task> work);
  bool withdraw_thread(pool_task* t) noexcept;                 // still queued: it never runs
  void abandon_thread(std::shared_ptr<pool_task> t) noexcept;  // it may still run
  void wait_for_thread(job_ctx* j, const pool_task& t) noexcept;
  std::vector<std::shared_ptr<pool_task>> abandoned;  // by abandon_on_cancel, maybe running
  bool detach_workers = false;  // one abandoned function could not be recorded
  std::size_t outstanding = 0;  // thread functions running + callback tasks waiting
  std::size_t threads_out = 0;  // thread functions running (they wake the loop by themselves)
  std::uint64_t iterations = 0, polls = 0;  // for stats(): benchmarks and the idle test

  job_ctx* jobs = nullptr;         // live jobs, newest first
  callback_node* nodes = nullptr;  // every timer and watch node, to detach them at the end
  std::deque<std::pair<std::string, std::exception_ptr>> errors;  // for the handler
  error_handler on_error;

  time_point now = clock_type::now();  // read once per iteration
  bool in_iteration = false;
  bool manual = false;          // loop_options::manual_clock
  time_point manual_now = now;  // the manual clock's reading

  duration watchdog{};  // > 0: report items that hold the loop longer
  watchdog_handler on_slow;

  loop_impl(event_loop* s, std::size_t workers);
  ~loop_impl();
  void shut_down();  // ~event_loop: destroys the jobs and callbacks while the loop is usable
  void destroy_jobs() noexcept;  // its steps
  void drop_callbacks() noexcept;

  time_point clock() const noexcept;

  void check_thread(const char* what) const;

  void enqueue(job_ctx* j, std::coroutine_handle<> h);  // j resumes at h next iteration
  job_ctx* current = nullptr;                           // the job being resumed, if any
  void resume_job(job_ctx* j);  // runs j from where it was enqueued, as `current`
  void finish_now(job_ctx* j);  // cancels j and finishes its unwinding before returning
  void finish_now(job_ctx* const* first, job_ctx* const* last);  // the same for each, in order
  void finish_one(job_ctx* j);  // finish_now's work on one job of the tree, branches done
  void withdraw_items(job_ctx** first, job_ctx** last) noexcept;  // of jobs finish_now ran
  // Groups whose stop has not reached all their branches yet, innermost first (see
  // group::stop), and whether a stop below us on the stack is working through them.
  group* stop_list = nullptr;
  bool stopping_groups = false;
  void run_items();
  void run_item(const ready_item& it);
  static const char* item_name(item k) noexcept;            // for the watchdog
  void report_slow(const std::string& who, duration held);  // to on_slow, else the handler

  // The one place job frames are resumed. A frame that awaits a child, or a child that
  // finishes, does not resume the other itself: it leaves it in `next` and returns here.
  // Symmetric transfer would do the same with a tail call, but GCC emits a real call at
  // -O0 and under ASan, so 10,000,000 awaits would overflow the stack; this loop costs one
  // return and one indirect call per transfer and keeps the stack flat at any -O level.
  std::coroutine_handle<> next;
  void resume(std::coroutine_handle<> h);

  // ---- timers: a 4-ary min-heap on (deadline, seq), each owner knowing its slot
  void add_timer(timer_owner* o, time_point deadline, void (*fire)(timer_owner*, loop_impl&));
  void remove_timer(timer_owner* o) noexcept;  // if it is in the heap
  timer_entry pop_timer() noexcept;
  void place(std::size_t i, const timer_entry& e) noexcept;
  void sift_up(std::size_t i) noexcept;
  void sift_down(std::size_t i) noexcept;

  // ---- fds
  void add_fd(fd_owner* o);              // on o->fd, for o->events
  void remove_fd(fd_owner* o) noexcept;  // O(owners of its fd); none if not registered
  void unlink_fd(std::size_t i, fd_owner* o) noexcept;  // out of entry i's list only
  void update_fd(std::size_t i) noexcept;  // entry i's events again, or the entry dropped
  void dispatch_fd(std::size_t i, short revents) noexcept;  // poll's revents for entry i

  // ---- errors
  void run_report();  // item::report: hands the oldest error to the handler
  void report(std::string name, std::exception_ptr e);  // queues it for the handler
  void call_handler(std::string_view name, std::exception_ptr e);
  static void print_error(std::string_view name, const std::exception_ptr& e) noexcept;

  // ---- jobs and posted callbacks
  void link(job_ctx* j) noexcept;
  void unlink(job_ctx* j) noexcept;
  void job_finished(job_ctx* j);      // its top frame ended, or it was dropped unstarted
  static void run_start(job_ctx* j);  // item::start
  void run_posted();                  // item::posted

  // ---- one iteration
  bool pending() const noexcept;
  // With a manual clock, only advance() can make progress: nothing is ready and nothing but
  // timers and callback tasks is pending (a thread function or an fd would wake the loop).
  bool waits_for_advance() const noexcept {
    return manual && ready.empty() && pfds.size() == own_fds && threads_out == 0 &&
           !box->signalled.load(std::memory_order_acquire);
  }
  bool run_once(duration max_wait);  // max(): as long as time_to_wait() says
  duration time_to_wait() const noexcept;
  // A host loop drives this one (attach_host): the pipe is written while the host waits,
  // wait() always polls, and a change from outside an iteration wakes the host (touched).
  bool hosted = false;
  std::function<void()> on_host_gone;
  void touched() noexcept {
    if (!in_iteration && hosted) box->wake();
  }
  void wait(duration timeout_or_negative);
  void host_woke() noexcept;  // step 1 hosted, when the host's poll stands in for ours
  void collect_remote();
  void collect_fds() noexcept;
  void collect_due_timers();
};

inline void loop_impl::kick_pool_if_needed() noexcept {
  if (std::exchange(kick_pool, false)) pool->kick();
}
inline loop_impl::loop_impl(event_loop* s, std::size_t workers) : self(s) {
  if (workers == 0) {
    workers = std::min<std::size_t>(32, std::size_t(usable_cpus()) + 4);
  }
  pool->max = workers;
#ifdef __linux__
  // The thread's timer slack (50 us by default) is added to every kernel timer of the
  // thread that owns the loop: 1 ns, so that no timer fires 50 us late.
  ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
#endif
  pfds.push_back({box->rfd, POLLIN, 0});
  fd_lists.emplace_back();
#ifdef __linux__
  // poll's own timeout is late by 0.1% of it whatever the slack (the kernel's
  // select_estimate_accuracy: a 1 s sleep ended 1.07 ms late), a timerfd is not (55 us):
  // so the first deadline is also armed on a timerfd that ppoll watches, as Asio does.
  timer_fd = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (timer_fd >= 0) {  // else ppoll's timeout alone, less precise
    pfds.push_back({timer_fd, POLLIN, 0});
    fd_lists.emplace_back();
  }
#endif
  own_fds = pfds.size();
}
inline time_point loop_impl::clock() const noexcept {
  return manual ? manual_now : clock_type::now();
}
inline void loop_impl::check_thread(const char* what) const {
  if (std::this_thread::get_id() != owner) fail_logic(what);
}
// Queues job j to resume at frame h. The item names the job, not the frame, so that the
// watchdog and job scopes can tell whose it is.
inline void loop_impl::enqueue(job_ctx* j, std::coroutine_handle<> h) {
  j->resume_at = h;
  ready.push_back({item::resume, j});
  touched();
}
inline void loop_impl::resume_job(job_ctx* j) {
  job_ctx* const outer = std::exchange(current, j);  // a job scope may resume one inside another
  resume(std::exchange(j->resume_at, {}));
  current = outer;
}
// finish_now runs jobs itself, so their queued items (a resume item from the cancel or from
// before, a start item) must not run again. Of a job's resume items only the newest can
// still be due, and only if the job was queued again meanwhile (resume_at is set: it caught
// job_cancelled and went on, say): the others become no-ops, as does the start item of a job
// that has started or ended. One pass over both queues for all of [first, last), which it
// sorts for the lookup. It compares an item's job with them and reads no other job: an item
// that already ran may name a job that is gone. (Withdrawing per job and per resume made
// cancel_all of a 20,000-deep nest quadratic in the depth.)
inline void loop_impl::withdraw_items(job_ctx** first, job_ctx** last) noexcept {
  std::sort(first, last, std::less<job_ctx*>());
  for (job_ctx** p = first; p != last; ++p) (*p)->item_kept = false;
  auto ours = [&](const ready_item& it) -> job_ctx* {
    if (it.kind != item::resume && it.kind != item::start) return nullptr;
    auto* j = static_cast<job_ctx*>(it.arg);
    job_ctx** p = std::lower_bound(first, last, j, std::less<job_ctx*>());
    return p != last && *p == j ? j : nullptr;
  };
  for (auto* q : {&ready, &running})  // newest first: ready is filled after running
    for (auto it = q->rbegin(); it != q->rend(); ++it) {
      job_ctx* const j = ours(*it);
      if (!j) continue;
      const bool due = it->kind == item::start ? !j->started() && !j->done()
                                               : j->resume_at && !std::exchange(j->item_kept, true);
      if (!due) *it = {item::skip, nullptr};
    }
}
inline void loop_impl::resume(std::coroutine_handle<> h) {
  do {
    next = {};
    h.resume();
    h = next;
  } while (h);
}
// ---- timers
// A 4-ary heap: half the levels of a binary one, so half the moves, and each move also
// writes its owner's slot, a cache miss in a frame elsewhere. Bench W2 (a million sleeping
// jobs), same run: 1.6 s against 2.0 s with a binary heap.
inline void loop_impl::add_timer(timer_owner* o, time_point deadline,
                                 void (*fire)(timer_owner*, loop_impl&)) {
  timers.push_back({deadline, ++next_seq, fire, o});
  o->timer_slot = timers.size() - 1;
  sift_up(timers.size() - 1);
  touched();
}
inline void loop_impl::remove_timer(timer_owner* o) noexcept {
  const std::size_t i = o->timer_slot;
  if (i == timer_owner::not_queued) return;
  o->timer_slot = timer_owner::not_queued;
  const timer_entry last = timers.back();
  timers.pop_back();
  if (i == timers.size()) return;  // it was the last one
  place(i, last);
  sift_up(i);
  sift_down(last.owner->timer_slot);
}
inline timer_entry loop_impl::pop_timer() noexcept {
  const timer_entry top = timers.front();
  remove_timer(top.owner);
  return top;
}
inline void loop_impl::place(std::size_t i, const timer_entry& e) noexcept {
  timers[i] = e;
  e.owner->timer_slot = i;
}
inline void loop_impl::sift_up(std::size_t i) noexcept {
  const timer_entry e = timers[i];
  for (; i > 0 && timers[(i - 1) / 4] > e; i = (i - 1) / 4) place(i, timers[(i - 1) / 4]);
  place(i, e);
}
inline void loop_impl::sift_down(std::size_t i) noexcept {
  const std::size_t n = timers.size();
  const timer_entry e = timers[i];
  for (;;) {
    const std::size_t first = 4 * i + 1;
    if (first >= n) break;
    std::size_t c = first;
    for (std::size_t k = first + 1; k < std::min(first + 4, n); ++k)
      if (timers[c] > timers[k]) c = k;
    if (!(e > timers[c])) break;
    place(i, timers[c]);
    i = c;
  }
  place(i, e);
}
// ---- fds
// The table by fd number is a vector: fds are small (the lowest free one is handed out, and
// all are below RLIMIT_NOFILE), and a wait costs no hashing.
inline void loop_impl::add_fd(fd_owner* o) {
  const auto fd = std::size_t(o->fd);  // checked by the caller: open, so not negative
  if (fd >= fd_entry.size()) fd_entry.resize(fd + 1, 0);
  std::size_t i = fd_entry[fd];
  if (i == 0) {  // the fd's first owner: a new entry
    pfds.push_back({o->fd, 0, 0});
    try {
      fd_lists.emplace_back();
    } catch (...) {
      pfds.pop_back();
      throw;
    }
    i = pfds.size() - 1;
    fd_entry[fd] = i;
  }
  fd_list& l = fd_lists[i];
  o->prev = l.last;
  o->next = nullptr;
  (l.last ? l.last->next : l.first) = o;
  l.last = o;
  o->registered = true;
  ++fd_registrations;
  pfds[i].events = short(pfds[i].events | o->events);
  touched();
}
inline void loop_impl::remove_fd(fd_owner* o) noexcept {
  if (!o->registered) return;
  const std::size_t i = fd_entry[std::size_t(o->fd)];
  unlink_fd(i, o);
  update_fd(i);
}
inline void loop_impl::unlink_fd(std::size_t i, fd_owner* o) noexcept {
  fd_list& l = fd_lists[i];
  (o->prev ? o->prev->next : l.first) = o->next;
  (o->next ? o->next->prev : l.last) = o->prev;
  o->prev = o->next = nullptr;
  o->registered = false;
  --fd_registrations;
}
// Without its events, a cancelled wait_writable would leave POLLOUT in the entry, and a
// writable fd would wake every poll at once for the other owners' sake.
inline void loop_impl::update_fd(std::size_t i) noexcept {
  if (fd_lists[i].first) {
    short events = 0;
    for (const fd_owner* o = fd_lists[i].first; o; o = o->next) events = short(events | o->events);
    pfds[i].events = events;
    return;
  }
  // No owner left: the last entry moves into its place (with its revents, if not yet handed out).
  fd_entry[std::size_t(pfds[i].fd)] = 0;
  const std::size_t last = pfds.size() - 1;
  if (i != last) {
    pfds[i] = pfds[last];
    fd_lists[i] = fd_lists[last];
    fd_entry[std::size_t(pfds[i].fd)] = i;
  }
  pfds.pop_back();
  fd_lists.pop_back();
}
// Hands entry i's revents to each owner whose events they include; POLLERR, POLLHUP and
// POLLNVAL (which poll reports unasked) go to every owner. A one-shot owner, and every owner
// on POLLNVAL, is unlinked before its fd_ready runs.
// Changes to the list while this walks it: fd_ready runs no user code (it only queues a job
// or a watch callback, which run in the ready step, after every fd is dispatched), so only
// this walk unlinks, and only the owner at hand: reading `next` first is enough. A resumed
// job or a watch callback that then cancels another owner of the fd, or waits on it again,
// does so after the walk, through remove_fd/add_fd; a cancelled owner woken by this poll
// does not run (its job resumes with job_cancelled, its watch callback is skipped).
// The events are recomputed once at the end, not per removal: 300 waits on one fd firing
// together cost O(300), not O(300^2).
inline void loop_impl::dispatch_fd(std::size_t i, short revents) noexcept {
  constexpr short always = POLLERR | POLLHUP | POLLNVAL;
  bool dropped = false;
  for (fd_owner *o = fd_lists[i].first, *next; o; o = next) {
    next = o->next;
    const short mine = short(revents & (o->events | always));
    if (!mine) continue;
    if (o->one_shot || (mine & POLLNVAL)) {
      unlink_fd(i, o);
      dropped = true;
    }
    o->fd_ready(*this, mine);
  }
  if (dropped) update_fd(i);
}
inline void loop_impl::report(std::string name, std::exception_ptr e) {
  errors.emplace_back(std::move(name), std::move(e));
  ready.push_back({item::report, nullptr});
}
inline void loop_impl::call_handler(std::string_view name, std::exception_ptr e) {
  // A copy: the handler may replace itself (set_error_handler) while it runs.
  if (on_error) {
    const error_handler fn = on_error;
    return fn(name, std::move(e));
  }
  print_error(name, e);
}
inline void loop_impl::print_error(std::string_view name, const std::exception_ptr& e) noexcept {
  try {
    std::rethrow_exception(e);
  } catch (const slow_step& x) {  // not a failure; its what() is the whole report
    std::fprintf(stderr, "%s\n", x.what());
  } catch (const std::exception& x) {
    std::fprintf(stderr, "coro_jobs: %.*s failed: %s\n", int(name.size()), name.data(), x.what());
  } catch (...) {
    std::fprintf(stderr, "coro_jobs: %.*s failed with a non-std exception\n", int(name.size()),
                 name.data());
  }
}
// ---- jobs
inline void loop_impl::link(job_ctx* j) noexcept {
  j->next = jobs;
  if (jobs) jobs->prev = j;
  jobs = j;
}
inline void loop_impl::unlink(job_ctx* j) noexcept {
  (j->prev ? j->prev->next : jobs) = j->next;
  if (j->next) j->next->prev = j->prev;
  j->prev = j->next = nullptr;
}
inline void loop_impl::run_posted() {
  remote_item p = std::move(posted.front());
  posted.pop_front();
  try {
    p.fn();
  } catch (...) {
    report(p.who, std::current_exception());
  }
}
inline bool loop_impl::pending() const noexcept {
  return !ready.empty() || !timers.empty() || pfds.size() > own_fds || outstanding > 0 ||
         box->signalled.load(std::memory_order_acquire);
}

// One iteration, asyncio's _run_once in four named steps:
//   1. wait: not at all if work is ready, else until the nearest timer, else until an fd or
//      the inbox's pipe wakes us (ppoll); nothing pending: return false.
//   2. collect: cross-thread completions, fd events and due timers only enqueue work;
//   3. run the ready snapshot: only what was ready when this step began, so a job that
//      keeps yielding cannot starve timers or fds (its next turn is the next iteration);
//   4. report whether anything is still pending.
inline bool loop_impl::run_once(duration max_wait) {
  if (in_iteration) fail_logic("coro_jobs: run() or run_once() called from inside the loop");
  if (!pending()) {
    if (!hosted) return false;
    max_wait = duration::zero();  // hosted: still drain what woke the host, never block
  }
  in_iteration = true;
  struct end_of_iteration {  // on every way out, an error handler's throw included
    loop_impl& l;
    ~end_of_iteration() {
      l.in_iteration = false;
      l.kick_pool_if_needed();  // functions submitted in this iteration start now
    }
  } guard{*this};

  const duration t = time_to_wait();
  wait(max_wait == duration::max() ? t : t < duration::zero() ? max_wait : std::min(t, max_wait));
  now = clock();
  ++iterations;
  collect_remote();
  collect_fds();
  collect_due_timers();
  running.swap(ready);
  run_items();
  running.clear();
  return pending();
}

// Step 1's timeout: none if work is ready, else until the first timer, else no limit (-1).
// A manual clock never waits for a timer (time moves only through advance()), but it still
// blocks for what can wake it (a worker, a callback, an fd), unless advance() has just made
// the first timer due.
inline duration loop_impl::time_to_wait() const noexcept {
  if (!ready.empty()) return duration::zero();
  if (timers.empty()) return duration(-1);
  const time_point first = timers.front().deadline;
  if (!manual) return std::max(first - clock_type::now(), duration::zero());
  const bool waker = threads_out > 0 || pfds.size() > own_fds;
  return waker && first > manual_now ? duration(-1) : duration::zero();
}

// Step 2: what other threads sent. Completions queue their jobs now; posted callbacks
// queue up to run in step 3.
inline void loop_impl::collect_remote() {
  const bool pipe_readable = std::exchange(pfds[0].revents, short(0)) != 0;
  if (box->signalled.load(std::memory_order_acquire)) {
    box->take(remote);
    for (remote_item& r : remote) {
      if (!r.who) {
        r.fn();
      } else {
        posted.push_back(std::move(r));
        ready.push_back({item::posted, nullptr});
      }
    }
    remote.clear();
  } else if (pipe_readable || box->piped.exchange(false, std::memory_order_acquire)) {
    box->drain();  // a stale byte (see inbox::drain): left there, every poll would return at once
  }
}

// Step 2: what poll reported, backwards, because an entry whose last owner fired swaps the
// last entry (already handled) into its place.
inline void loop_impl::collect_fds() noexcept {
  for (std::size_t i = pfds.size(); i-- > own_fds;)
    if (i < pfds.size() && pfds[i].revents)
      dispatch_fd(i, std::exchange(pfds[i].revents, short(0)));
}

// Runs this iteration's snapshot. Only the error handler (or the watchdog's) throws out of
// here; the rest of the snapshot is kept for the next iteration. With the watchdog on, each
// item is timed (real time, even with a manual clock: it is the user's wait that matters),
// and a job is held by a reference while it runs, so its name can still be read when it has
// just ended.
inline void loop_impl::run_items() {
  std::size_t i = 0;
  try {
    for (; i < running.size(); ++i) {
      const ready_item it = running[i];
      if (watchdog <= duration::zero()) {
        run_item(it);
        continue;
      }
      const bool is_job = it.kind == item::resume || it.kind == item::start;
      struct hold {
        job_ctx* j;
        ~hold() {
          if (j) j->release();
        }
      } keep{is_job ? static_cast<job_ctx*>(it.arg) : nullptr};
      if (keep.j) ++keep.j->refs;
      const char* const who = it.kind == item::posted ? posted.front().who : nullptr;
      const auto t0 = clock_type::now();
      run_item(it);
      const auto held = clock_type::now() - t0;
      if (held > watchdog)
        report_slow(keep.j ? keep.j->extra.name_or_job() : who ? who : item_name(it.kind), held);
    }
  } catch (...) {
    ready.insert(ready.begin(), running.begin() + std::ptrdiff_t(i) + 1, running.end());
    running.clear();
    throw;
  }
}

inline void loop_impl::run_item(const ready_item& it) {
  switch (it.kind) {
    case item::resume: return resume_job(static_cast<job_ctx*>(it.arg));
    case item::start: return run_start(static_cast<job_ctx*>(it.arg));
    case item::posted: return run_posted();
    case item::timer: return static_cast<callback_node*>(it.arg)->run_timer();
    case item::watch: return static_cast<callback_node*>(it.arg)->run_watch();
    case item::report: return run_report();
    case item::skip: return;
  }
}

inline const char* loop_impl::item_name(item k) noexcept {
  switch (k) {
    case item::timer: return "call_later";
    case item::watch: return "watch";
    case item::report: return "error handler";
    default: return "post";
  }
}

inline void loop_impl::report_slow(const std::string& w, duration held) {
  if (on_slow) {
    const watchdog_handler fn = on_slow;  // a copy: it may call set_watchdog
    fn(w, held);
  } else {
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(held).count();
    report(w, std::make_exception_ptr(slow_step("coro_jobs: " + w + " held the loop for " +
                                                std::to_string(us / 1000) + "." +
                                                std::to_string(us % 1000 / 100) + " ms")));
  }
}


// Hosted, with no fd of the program's watched, the host's own poll has just told what
// ppoll(0) would (NOTES: hosted poll): the pipe is drained by collect_remote (the `piped`
// flag), the timerfd is read only once its deadline has passed (left readable, it would
// make every host poll return at once). The host may block only after prepare_host_wait.
inline void loop_impl::host_woke() noexcept {
  box->polling.store(false, std::memory_order_relaxed);
  if (timer_fd >= 0 && timer_fd_at != time_point::min() && timer_fd_at <= clock_type::now()) {
    std::uint64_t expirations;  // not yet expired (EAGAIN): left armed, to be read next time
    if (::read(timer_fd, &expirations, sizeof expirations) > 0) timer_fd_at = time_point::min();
  }
}

// Blocks in ppoll (nanosecond timeout) for at most `timeout` (negative: no limit). When
// work is ready and no fd is watched, the syscall is skipped: the inbox flag is an atomic
// we can read directly, which keeps a yield as cheap as a queue push.
inline void loop_impl::wait(duration timeout) {
  if (timeout == duration::zero() && pfds.size() == own_fds) {
    if (hosted) host_woke();
    return;
  }
  ++polls;
  // A thread function is running: its result may be microseconds away (see spin_until).
  if (threads_out > 0 && timeout != duration::zero() &&
      spin_until([this] { return box->signalled.load(std::memory_order_acquire); }))
    return;
  // Writers write the pipe only while we poll (see inbox::wake): announce it, then look.
  box->polling.store(true);
  struct not_polling {
    inbox& b;
    ~not_polling() { b.polling.store(false, std::memory_order_relaxed); }
  } guard{*box};
  if (box->signalled.load()) timeout = duration::zero();  // work is in: just look at the fds
  if (timer_fd >= 0 && timeout != duration::zero())
    arm_timer_fd(timeout > duration::zero() && !timers.empty() ? timers.front().deadline
                                                               : time_point::min());
  for (;;) {
    int n;
#if defined(__linux__) || defined(__FreeBSD__) || defined(__OpenBSD__) || defined(__NetBSD__)
    timespec ts{}, *tsp = nullptr;
    if (timeout >= duration::zero()) {
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::min<duration>(timeout, std::chrono::hours(24 * 365)));
      ts.tv_sec = time_t(ns.count() / 1000000000);
      ts.tv_nsec = long(ns.count() % 1000000000);
      tsp = &ts;
    }
    n = ::ppoll(pfds.data(), nfds_t(pfds.size()), tsp, nullptr);
#else
    int ms = -1;  // poll() has milliseconds: round up, or a timer would wake early and spin
    if (timeout >= duration::zero())
      ms = int(std::min<long long>(
          (std::chrono::duration_cast<std::chrono::nanoseconds>(timeout).count() + 999999) /
              1000000,
          86400000));
    n = ::poll(pfds.data(), nfds_t(pfds.size()), ms);
#endif
    if (n >= 0) {
      if (timer_fd >= 0 && std::exchange(pfds[1].revents, short(0))) {
        std::uint64_t expirations;
        [[maybe_unused]] auto r = ::read(timer_fd, &expirations, sizeof expirations);
        timer_fd_at = time_point::min();
      }
      return;
    }
    if (errno != EINTR) throw std::system_error(errno, std::generic_category(), "coro_jobs: poll");
    // A signal: poll again for what is left, so EINTR can neither end nor postpone a wait.
    if (timeout > duration::zero()) {
      if (timers.empty()) return;
      timeout = std::max(timers.front().deadline - clock(), duration::zero());
    }
  }
}

// Arms the timerfd to `deadline` (min: disarms it), unless it is armed to that already:
// one syscall when the first deadline changes, none per wait on the same one.
inline void loop_impl::arm_timer_fd(time_point deadline) noexcept {
#ifdef __linux__
  if (deadline == time_point::max()) deadline = time_point::min();  // never: nothing to arm
  if (deadline == timer_fd_at || manual) return;
  itimerspec its{};
  if (deadline != time_point::min()) {
    const auto ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(deadline.time_since_epoch()).count();
    its.it_value.tv_sec = time_t(ns / 1000000000);
    its.it_value.tv_nsec = long(ns % 1000000000);
    if (ns <= 0) its.it_value.tv_nsec = 1;  // zero would disarm it
  }
  if (::timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &its, nullptr) == 0) timer_fd_at = deadline;
#else
  (void)deadline;
#endif
}

inline void loop_impl::collect_due_timers() {
  while (!timers.empty() && timers.front().deadline <= now) {
    const timer_entry e = pop_timer();
    e.fire(e.owner, *this);
  }
}

inline void loop_impl::run_report() {
  auto [name, e] = std::move(errors.front());
  errors.pop_front();
  call_handler(name, std::move(e));
}

// ---- The loop's destructor

// Runs from ~event_loop before the implementation goes, so that the destructors of job
// frames may still use the loop: now() works, post() is dropped (the inbox is closed), and
// a job started meanwhile is linked like any other and so destroyed, unstarted, below.
inline void loop_impl::shut_down() {
  box->close();  // later completions from workers and task_returns are dropped
  // Every wait is cancelled first, so that all running thread functions are asked to stop
  // at once; then each is waited for before its job's frame dies (as std::jthread joins).
  for (job_ctx* j = jobs; j; j = j->next) {
    if (j->done()) continue;
    j->request_cancel();
    if (op_base* p = std::exchange(j->pending, nullptr)) {
      p->cancel_op();
      if (p->holds_job()) j->pending = p;
    }
  }
  pool->stop();  // queued thread functions never run
  destroy_jobs();
  // The workers are joined, unless one still runs a function its job abandoned.
  const bool still_running = std::any_of(abandoned.begin(), abandoned.end(), [](const auto& t) {
    return !t->returned.load(std::memory_order_acquire);
  });
  pool->release_workers(!still_running && !detach_workers);
  // What the teardown runs (the error handler for the errors still queued, the destructors
  // of callbacks and frames) may start jobs, set timers and watches or report errors: they
  // are torn down in turn, until nothing is left.
  do {
    drop_callbacks();
    destroy_jobs();
    const auto queued = std::exchange(errors, {});  // the handler may queue more
    for (const auto& [name, e] : queued) {
      try {
        call_handler(name, e);
      } catch (...) {
        std::fputs("coro_jobs: the error handler threw during ~event_loop\n", stderr);
      }
    }
  } while (jobs || nodes || !timers.empty() || !errors.empty());
}
// Every job's frame, innermost first; its thread function, if running, waited for first.
inline void loop_impl::destroy_jobs() noexcept {
  while (job_ctx* j = jobs) {
    unlink(j);
    if (j->done()) {  // ended with an error a handle may still read
      j->loop = nullptr;
      continue;
    }
    if (op_base* p = std::exchange(j->pending, nullptr)) p->wait_stopped();
    while (child_link* c = j->innermost) {  // innermost first: no deep recursion
      j->innermost = c->outer;
      c->destroy(c->slot);
    }
    if (j->root) std::exchange(j->root, {}).destroy();
    j->extra.drop_maker();
    j->set_error(std::make_exception_ptr(job_cancelled{}), true);
    j->life = job_ctx::stage::ended;
    j->waiters = nullptr;
    j->loop = nullptr;
    j->release();
  }
}
// Timer and watch callbacks die with the loop, even while a callback_handle keeps its
// node: their captures may be tied to the loop. The loop's references to nodes and the
// callbacks are taken out first and let go of last, since a capture's destructor may drop
// another handle (and free a node), or set a timer or watch (left for shut_down's next pass).
inline void loop_impl::drop_callbacks() noexcept {
  std::vector<callback_node*> held;  // the heap's, the fd lists' and the ready items' references
  for (const timer_entry& e : timers)
    if (e.fire == &callback_node::fire_timer) held.push_back(static_cast<callback_node*>(e.owner));
  timers.clear();
  for (std::size_t i = own_fds; i < fd_lists.size(); ++i)  // job waits are gone: only watches
    for (fd_owner* o = fd_lists[i].first; o; o = o->next) {
      o->registered = false;
      held.push_back(static_cast<callback_node*>(o));
    }
  pfds.resize(own_fds);
  fd_lists.resize(own_fds);
  fd_entry.clear();
  fd_registrations = 0;
  for (auto* q : {&ready, &running}) {
    for (const ready_item& it : *q)
      if (it.kind == item::timer || it.kind == item::watch)
        held.push_back(static_cast<callback_node*>(it.arg));
    q->clear();  // the rest name jobs that are gone, or posted functions that never run
  }
  std::vector<std::function<void()>> dead_timer_fns;
  std::vector<std::function<void(short)>> dead_watch_fns;
  for (callback_node* n = nodes; n; n = n->next_node) {
    if (n->on_timer) dead_timer_fns.push_back(std::move(n->on_timer));
    if (n->on_fd) dead_watch_fns.push_back(std::move(n->on_fd));
  }
  for (callback_node* n = nodes; n; n = n->next_node) {
    n->loop = nullptr;
    n->active = false;
  }
  nodes = nullptr;
  for (callback_node* n : held) n->unref();
}
inline loop_impl::~loop_impl() {
  if (timer_fd >= 0) ::close(timer_fd);
}

inline void callback_node::fd_ready(loop_impl& l, short ev) noexcept {
  revents = ev;
  ref();  // the ready item's
  l.ready.push_back({item::watch, this});
  if (ev & POLLNVAL) {  // a closed fd: reported once; the loop has dropped it, or poll would spin
    active = false;
    unref();  // the registration's
  }
}
inline void callback_node::run_watch() {
  if ((active || (revents & POLLNVAL)) && loop) {
    try {
      on_fd(revents);
    } catch (...) {
      loop->report("watch", std::current_exception());
    }
  }
  unref();
}
inline void callback_node::fire_timer(timer_owner* self, loop_impl& l) {
  l.ready.push_back(
      {item::timer, static_cast<callback_node*>(self)});  // takes the heap's reference
}
inline void callback_node::run_timer() {
  if (active && loop) {
    active = false;
    try {
      on_timer();
    } catch (...) {
      loop->report("call_later", std::current_exception());
    }
  }
  unref();
}

inline callback_node::callback_node(loop_impl& l) noexcept : fd_owner(-1, 0), loop(&l) {
  next_node = l.nodes;
  if (l.nodes) l.nodes->prev_node = this;
  l.nodes = this;
}
inline callback_node::~callback_node() {
  if (!loop) return;
  (prev_node ? prev_node->next_node : loop->nodes) = next_node;
  if (next_node) next_node->prev_node = prev_node;
}

inline callback_handle access::make_handle(callback_node* n) noexcept {
  callback_handle h;
  h.n_ = n;
  return h;
}

inline void callback_node::ref() noexcept { ++refs; }
inline void callback_node::unref() noexcept {
  if (--refs == 0) delete this;
}

inline void op_base::park() noexcept {
  ctx->pending = this;
  ctx->since = ctx->loop->now;
}

inline bool job_ctx::cancel() noexcept {
  if (done()) return false;
  request_cancel();
  if (op_base* p = pending) {
    pending = nullptr;
    p->cancel_op();
    if (p->holds_job())
      pending = p;  // a thread function still runs: p resumes the job when it returns
    else
      loop->enqueue(this, p->waiter);
  }
  return true;
}

// Cancels job j and finishes its unwinding now, instead of on a later iteration. A job that
// waits on a when_all/when_any waits for its branches, and they for theirs: the whole tree
// below j is listed first (breadth first, each held), then finished from the last listed
// back, so every job after the ones it waits for. A list and a loop, not a recursion: a
// when_all nested 20,000 deep took 1.1 KiB of stack a level under ASan.
inline void loop_impl::finish_now(job_ctx* j) { finish_now(&j, &j + 1); }
// The same for several jobs, in order (job_scope::cancel_all), with one withdraw_items pass
// for all of them at the end: one pass per job made closing a scope of 100,000 unstarted
// jobs quadratic (181 s under ASan, 27 s at -O2).
inline void loop_impl::finish_now(job_ctx* const* first, job_ctx* const* last) {
  std::vector<job_ctx*> held;  // every job finished here, with its tree: held till withdrawn
  held.reserve(std::size_t(last - first));
  struct done_with {
    loop_impl& l;
    std::vector<job_ctx*>& held;
    ~done_with() {
      l.withdraw_items(held.data(), held.data() + held.size());
      for (job_ctx* b : held) b->release();
    }
  } hold{*this, held};
  auto list_branches = [&held](job_ctx* p) {
    if (!p->started() || p->done() || !p->branches) return;
    for (job_ctx* b : p->branches->branches) {
      if (b->done()) continue;
      held.push_back(b);
      ++b->refs;
    }
  };
  for (; first != last; ++first) {
    job_ctx* const j = *first;
    if (j->done()) continue;
    j->cancel();  // reaches every branch below it (see group::stop)
    if (j == current)
      continue;  // it is running (it closed its own scope): it ends at its next await
    const std::size_t top = held.size();
    held.push_back(j);
    ++j->refs;
    for (std::size_t i = top; i < held.size(); ++i) list_branches(held[i]);
    for (std::size_t i = held.size(); i-- > top;) finish_one(held[i]);  // j last
  }
}
inline void loop_impl::finish_one(job_ctx* j) {
  if (j->done() || j == current) return;
  j->cancel();  // done already, unless something changed since (it costs nothing then)
  if (!j->started()) return run_start(j);  // never runs its body; its start item is withdrawn
  if (op_base* p = j->pending) {           // its thread function runs: wait until it has returned
    p->wait_stopped();
    j->pending = nullptr;
    enqueue(j, p->waiter);
  }
  // A cancelled job's awaits throw, so this ends; unless the job catches job_cancelled
  // and goes on, and then it is the loop's to run (it was reported), not ours.
  while (!j->done() && j->resume_at && j->reach != job_ctx::cancel_reach::went_on) resume_job(j);
}

// A job that caught job_cancelled and went on (awaited again, or ended normally) is a bug in
// the job: reported once, naming it. It goes on unwinding: each later co_await throws again.
inline void note_went_on(job_ctx* j) {
  if (j->reach == job_ctx::cancel_reach::went_on) return;
  j->reach = job_ctx::cancel_reach::went_on;
  const std::string name = j->extra.name_or_job();
  j->loop->report(
      name, std::make_exception_ptr(std::logic_error("coro_jobs: job '" + name +
                                                     "' caught job_cancelled and went on; "
                                                     "rethrow it (catch (...) { ...; throw; })")));
}

// The top frame has ended (or was dropped unstarted): wake handle awaiters, report an error
// that nobody can retrieve any more, and drop the frame's reference.
inline void loop_impl::job_finished(job_ctx* j) {
  j->life = job_ctx::stage::ended;
  if (!j->error && j->reach == job_ctx::cancel_reach::thrown) note_went_on(j);  // ended normally
  j->extra.drop_maker();
  for (handle_waiter* w = std::exchange(j->waiters, nullptr); w; w = w->next) {
    w->ctx->pending = nullptr;
    enqueue(w->ctx, w->waiter);
  }
  const bool unseen_error = j->error_is == job_ctx::fault::unseen;
  if (unseen_error && j->handles == 0) {
    j->error_is = job_ctx::fault::seen;
    report(j->extra.name_or_job(), j->error);
  }
  // A finished job with an error still to be seen stays listed, so that the loop can
  // detach it if it dies first; the last handle then reports the error.
  if (!(unseen_error && j->handles > 0)) {
    unlink(j);
    j->loop = nullptr;
  }
  j->release();
}

inline void loop_impl::run_start(job_ctx* j) {
  if (j->cancelled()) {  // cancelled before its body began: never run it
    std::exchange(j->root, {}).destroy();
    j->set_error(std::make_exception_ptr(job_cancelled{}), true);
    j->loop->job_finished(j);
    return;
  }
  j->life = job_ctx::stage::running;
  loop_impl* l = j->loop;  // j may be gone when resume() returns
  job_ctx* const outer = std::exchange(l->current, j);
  l->resume(j->root);
  l->current = outer;
}

// A job's error is seen by result() or an awaiter: it need not be reported any more.
inline void observe_error(job_ctx* j) noexcept {
  if (j->error_is == job_ctx::fault::unseen) j->error_is = job_ctx::fault::seen;
  if (j->done() && j->loop) {
    j->loop->unlink(j);
    j->loop = nullptr;
  }
}

inline void job_ctx::rethrow_if_error() {
  if (error) {
    observe_error(this);
    std::rethrow_exception(error);
  }
}

inline void drop_handle(job_ctx* s) {
  if (--s->handles == 0 && s->done() && s->error_is == job_ctx::fault::unseen) {
    s->error_is = job_ctx::fault::seen;
    if (loop_impl* l = s->loop) {
      l->report(s->extra.name_or_job(), s->error);
      l->unlink(s);
      s->loop = nullptr;
    } else {  // the loop is gone: its handler with it
      loop_impl::print_error(s->extra.full_name(), s->error);
    }
  }
  s->release();
}
// ---- thread functions: what a threaded_task asks of the loop
inline void loop_impl::submit_thread(std::shared_ptr<pool_task> work) {
  worker_pool::submit(pool, std::move(work));
  kick_pool = true;
}
// A cancelled job's function that no worker has taken yet is taken out of the queue: it
// never runs, and the job need not wait for it.
inline bool loop_impl::withdraw_thread(pool_task* t) noexcept {
  return pool->withdraw(t) != nullptr;
}
inline void loop_impl::abandon_thread(std::shared_ptr<pool_task> t) noexcept {
  std::erase_if(abandoned,
                [](const auto& a) { return a->returned.load(std::memory_order_acquire); });
  try {
    abandoned.push_back(std::move(t));
  } catch (...) {  // unrecorded, it cannot be waited for: the workers are then left detached
    detach_workers = true;
  }
}
// Blocks until t's function has returned; the watchdog names j if that holds the loop.
inline void loop_impl::wait_for_thread(job_ctx* j, const pool_task& t) noexcept {
  const auto t0 = clock_type::now();
  t.returned.wait(false, std::memory_order_acquire);
  const auto held = clock_type::now() - t0;
  if (watchdog <= duration::zero() || held <= watchdog) return;
  try {
    report_slow(j->extra.name_or_job() + " waiting for its cancelled threaded_task", held);
  } catch (...) {
    report("watchdog", std::current_exception());
  }
}

// --- Which loop --------------------------------------------------------------------------

// Loops by owning thread, for start_job(job) outside run(). Never destroyed, so a loop that
// outlives static destruction can still unregister.
struct registry_t {
  struct entry {
    std::thread::id owner;
    event_loop* loop;
    bool closing = false;        // in ~event_loop: a release from another thread waits in `late`
    std::vector<job_ctx*> late;  // released by ~event_loop on its thread, once shut down
  };
  std::mutex m;
  std::vector<entry> loops;
};
inline registry_t& registry() {
  static registry_t* r = new registry_t;
  return *r;
}
inline event_loop*& running_loop() noexcept {
  thread_local event_loop* p = nullptr;
  return p;
}
inline event_loop& current_loop() {
  if (event_loop* p = running_loop()) return *p;
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.m);
  const auto id = std::this_thread::get_id();
  for (auto it = r.loops.rbegin(); it != r.loops.rend(); ++it)
    if (it->owner == id && !it->closing) return *it->loop;
  fail_logic(
      "coro_jobs: start_job(job) found no event_loop on this thread; create one first or pass it");
}

// A job_handle destroyed on another thread must not touch the job, which belongs to the
// loop thread: its release is posted there. The registry's lock keeps the loop alive while
// we post. The release happens on the loop thread only: when the post runs, or when the
// loop drops it unrun; while ~event_loop runs, the loop releases it once shut down. If the
// loop is gone, the job is frozen but for its counts, which are atomic for this case: the
// handle is released here (the last one, on whichever thread, frees the job).
inline void drop_handle_elsewhere(job_ctx* s) noexcept {
  struct release_later {
    job_ctx* s;
    std::thread::id owner;  // copied: s may be freed by release()
    std::atomic<bool> released{false};
    explicit release_later(job_ctx* p) noexcept : s(p), owner(p->owner) {}
    void release() noexcept {
      if (!released.exchange(true)) drop_handle(s);
    }
    ~release_later() {
      if (std::this_thread::get_id() == owner) release();
    }
  };
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.m);
  for (auto& e : r.loops) {
    if (&access::impl(*e.loop) != s->home) continue;
    try {
      if (e.closing) {  // its destructor runs on its thread: it releases s when shut down
        e.late.push_back(s);
      } else {
        auto keep = std::make_shared<release_later>(s);
        e.loop->post([keep] { keep->release(); });
      }
    } catch (...) {  // out of memory: the reference leaks rather than races
    }
    return;
  }
  drop_handle(s);  // the loop is gone: the counts are atomic, so other threads' drops are safe
}

// --- Promise and awaiters -----------------------------------------------------------------

template <class T> struct always_false : std::false_type {};

template <class A>
concept internal_awaiter = std::remove_cvref_t<A>::coro_jobs_internal;

// co_await this_job{} inside a job yields its job_ctx (for when_all and friends).
struct this_job {};
struct this_job_awaiter {
  job_ctx* ctx;
  bool await_ready() const noexcept { return true; }
  void await_suspend(std::coroutine_handle<>) const noexcept {}
  job_ctx* await_resume() const noexcept { return ctx; }
};
template <class T> struct is_handle : std::false_type {};
template <class T> struct is_handle<job_handle<T>> : std::true_type {};

inline void require_job(job_ctx* ctx) {
  if (!ctx) fail_logic("coro_jobs: tasks can only be co_awaited inside a coro_jobs::job");
}

template <class T> struct job_awaiter;
template <class T> struct handle_awaiter;

inline bool is_cancellation(const std::exception_ptr& e) noexcept {
  try {
    std::rethrow_exception(e);
  } catch (const job_cancelled&) {
    return true;
  } catch (...) {
    return false;
  }
}

// The one place that decides what cancellation does to a co_await in a job's code. Before
// job_cancelled has been thrown into the job, a cancelled job's co_await throws it at once
// (or, if the wait was already under way, the wait was withdrawn and resumes throwing it).
// After that, each later co_await first yields to the loop, then throws: a job that catches
// job_cancelled and goes on cannot hold the loop, and it is reported once (note_went_on).
template <class A>  // an awaiter, or a reference to a task that is its own awaiter
struct cancel_point {
  A a;
  job_ctx* ctx;
  enum class path : std::uint8_t { wait, throw_now, yield_then_throw } how = path::wait;

  bool await_ready() {
    if (!ctx->cancelled()) return a.await_ready();
    if (ctx->reach == job_ctx::cancel_reach::requested) {
      how = path::throw_now;
      return true;
    }
    note_went_on(ctx);
    how = path::yield_then_throw;
    return false;
  }
  void await_suspend(std::coroutine_handle<> h) {
    static_assert(std::is_void_v<decltype(a.await_suspend(h))>);
    if (how == path::yield_then_throw) return ctx->loop->enqueue(ctx, h);
    a.await_suspend(h);
  }
  decltype(auto) await_resume() {
    if (how != path::wait) {
      ctx->reach = std::max(ctx->reach, job_ctx::cancel_reach::thrown);
      throw job_cancelled{};
    }
    if (!ctx->cancelled()) return a.await_resume();
    // Cancelled during the wait: the awaiter throws job_cancelled, unless what it waited for
    // had already ended (a child that returned before its own job cancelled it).
    try {
      return a.await_resume();
    } catch (const job_cancelled&) {
      ctx->reach = std::max(ctx->reach, job_ctx::cancel_reach::thrown);
      throw;
    }
  }
};

struct final_awaiter {
  bool await_ready() noexcept { return false; }
  // A child hands control to its parent through the loop's resume() (no stack growth
  // however long the chain). The top frame hands its result to the job state and
  // destroys itself.
  template <class P> void await_suspend(std::coroutine_handle<P> h) noexcept {
    P& p = h.promise();
    job_ctx* j = p.ctx;
    if (p.continuation) {
      j->loop->next = p.continuation;
      return;
    }
    p.store_result();
    j->root = {};
    h.destroy();
    j->loop->job_finished(j);
  }
  void await_resume() noexcept {}
};

struct promise_base {
  job_ctx* ctx = nullptr;                // the started job this frame runs for
  std::coroutine_handle<> continuation;  // the parent frame; null for the top frame
  std::exception_ptr error;

  std::suspend_always initial_suspend() noexcept { return {}; }
  final_awaiter final_suspend() noexcept { return {}; }
  void unhandled_exception() noexcept { error = std::current_exception(); }

  // Every wait of a job's own code goes through a cancel_point, which decides what a
  // cancel does to it; the library's internal waits (this_job, shielded, when_all's) do not.
  template <class U> cancel_point<job_awaiter<U>> await_transform(job<U>&& j) noexcept {
    return {job_awaiter<U>(j, ctx), ctx};
  }
  template <class U> cancel_point<job_awaiter<U>> await_transform(job<U>& j) noexcept {
    return {job_awaiter<U>(j, ctx), ctx};
  }
  template <class U> cancel_point<handle_awaiter<U>> await_transform(const job_handle<U>& h) {
    return {handle_awaiter<U>(h, ctx), ctx};
  }
  template <class A>
    requires std::derived_from<std::remove_cvref_t<A>, op_base>
  cancel_point<A&> await_transform(A&& a) noexcept {
    a.ctx = ctx;
    return {a, ctx};
  }
  this_job_awaiter await_transform(this_job) noexcept { return {ctx}; }
  cancel_point<sleep_op> await_transform(sleep_for s) noexcept;
  template <class U> shield_awaiter<U>&& await_transform(shield_awaiter<U>&& a) noexcept {
    a.ctx = ctx;
    return std::move(a);
  }
  template <class A>
    requires internal_awaiter<A>  // when_all's own waits
  A&& await_transform(A&& a) noexcept {
    return std::forward<A>(a);
  }
  template <class A>
    requires(!std::derived_from<std::remove_cvref_t<A>, op_base> &&
             !is_job<std::remove_cvref_t<A>>::value && !is_handle<std::remove_cvref_t<A>>::value &&
             !std::is_same_v<std::remove_cvref_t<A>, this_job> && !internal_awaiter<A> &&
             !is_shield<std::remove_cvref_t<A>>::value)
  A&& await_transform(A&& a) noexcept {
    static_assert(always_false<A>::value,
                  "a coro_jobs::job can co_await jobs, job_handles and coro_jobs tasks only "
                  "(so that cancellation reaches every wait); wrap other asynchronous APIs "
                  "in callback_task");
    return std::forward<A>(a);
  }

 protected:
  void store_error(job_ctx* j) {
    const bool cancel = is_cancellation(error);
    j->set_error(std::move(error), cancel);
  }
};

template <class T> struct job_promise : promise_base {
  std::optional<T> value;
  static void* operator new(std::size_t n) { return alloc_frame<job_state<T>>(n); }
  static void operator delete(void* frame) noexcept { free_frame<job_state<T>>(frame); }
  job<T> get_return_object() noexcept {
    return access::make_job<T>(std::coroutine_handle<job_promise>::from_promise(*this));
  }
  void return_value(T v) { value.emplace(std::move(v)); }
  void store_result() {
    if (error) return store_error(ctx);
    static_cast<job_state<T>*>(ctx)->value = std::move(value);
  }
  T take() {
    if (error) std::rethrow_exception(error);
    return std::move(*value);
  }
};

template <> struct job_promise<void> : promise_base {
  static void* operator new(std::size_t n) { return alloc_frame<job_state<void>>(n); }
  static void operator delete(void* frame) noexcept { free_frame<job_state<void>>(frame); }
  job<void> get_return_object() noexcept {
    return access::make_job<void>(std::coroutine_handle<job_promise>::from_promise(*this));
  }
  void return_void() noexcept {}
  void store_result() {
    if (error) store_error(ctx);
  }
  void take() {
    if (error) std::rethrow_exception(error);
  }
};

// co_await of a child job: the child runs in this job's context (its cancellation included)
// and its frame is destroyed as soon as its result is taken.
template <class T> struct job_awaiter {
  using handle = std::coroutine_handle<job_promise<T>>;
  handle& child;  // the job object's handle, emptied here
  job_ctx* ctx;
  child_link link{};

  static void destroy_child(void* slot) noexcept {
    handle& h = *static_cast<handle*>(slot);
    std::exchange(h, {}).destroy();
  }
  job_awaiter(job<T>& j, job_ctx* c) noexcept : child(access::handle(j)), ctx(c) {}
  bool await_ready() {
    require_job(ctx);
    if (!child)
      throw std::invalid_argument(
          "coro_jobs: co_await of an empty job (moved-from or already awaited)");
    // Another job (holding a reference to the same job object) already awaits it: its frame
    // has a parent, and resuming it a second time would run a frame that may be gone.
    if (child.promise().continuation)
      throw std::invalid_argument("coro_jobs: co_await of a job that is already being awaited");
    return ctx->cancelled();
  }
  void await_suspend(std::coroutine_handle<> parent) noexcept {
    auto& p = child.promise();
    p.ctx = ctx;
    p.continuation = parent;
    link = {&child, &destroy_child, ctx->innermost};
    ctx->innermost = &link;
    ctx->loop->next = child;  // loop_impl::resume() runs it as soon as we return
  }
  T await_resume() {
    if (!link.slot) throw job_cancelled{};
    ctx->innermost = link.outer;
    struct destroy_on_exit {
      handle h;
      ~destroy_on_exit() { h.destroy(); }
    } d{std::exchange(child, {})};
    return d.h.promise().take();
  }
};

template <class T> struct handle_awaiter final : handle_waiter {
  job_handle<T> h;  // keeps the awaited job's state alive while we wait
  handle_awaiter(const job_handle<T>& hh, job_ctx* c) : h(hh) { ctx = c; }
  bool await_ready() {
    require_job(ctx);
    auto* s = access::state(h);
    if (!s) throw std::invalid_argument("coro_jobs: co_await of an empty job_handle");
    if (s == ctx) fail_logic("coro_jobs: a job cannot co_await its own handle");
    if (!s->done() && s->loop != ctx->loop)
      fail_logic("coro_jobs: co_await of a job on another event_loop");
    return ctx->cancelled() || s->done();
  }
  void await_suspend(std::coroutine_handle<> w) noexcept {
    wait_for(access::state(h), w);
    park();
  }
  T await_resume() {
    if (ctx->cancelled()) throw job_cancelled{};
    return access::state(h)->get();
  }
};

// co_await job_end(j): until job j has ended; its result is not read (restart::run_latest).
struct job_end final : handle_waiter {
  job_ctx* j;
  explicit job_end(job_ctx* p) noexcept : j(p) {}
  bool await_ready() const {
    require_job(ctx);
    return ctx->cancelled() || j->done();
  }
  void await_suspend(std::coroutine_handle<> w) noexcept {
    wait_for(j, w);
    park();
  }
  void await_resume() const {
    if (ctx->cancelled()) throw job_cancelled{};
  }
};
// A reference to a job's state, released with it (a coroutine parameter, so a frame that
// never runs still releases it).
struct held_ref {
  job_ctx* j;
  explicit held_ref(job_ctx* p) noexcept : j(p) { ++j->refs; }
  held_ref(held_ref&& o) noexcept : j(std::exchange(o.j, nullptr)) {}
  held_ref& operator=(held_ref&&) = delete;
  ~held_ref() {
    if (j) j->release();
  }
};

// --- Tasks ------------------------------------------------------------------------------

// What sleep_task returns: only the duration; the job's await_transform makes the sleep_op
// that waits. GCC keeps both the co_await operand and its awaiter in the frame, so a
// one-word operand saves 40 bytes in every sleeping frame (NOTES: one-word sleep).
// Outside a job (no await_transform), operator co_await makes one that throws logic_error.
struct [[nodiscard]] sleep_for {
  duration d;
  sleep_op operator co_await() const noexcept;
};

class sleep_op final : public op_base, public timer_owner {
 public:
  sleep_op(duration d, job_ctx* c) noexcept : at_(d) { ctx = c; }
  bool await_ready() const;
  void await_suspend(std::coroutine_handle<> h);
  duration await_resume() const;
  void cancel_op() noexcept override;
  const char* what() const noexcept override;

 private:
  static void fire(timer_owner* self, loop_impl& l);
  // The duration asked for, held as an offset from the epoch until the wait begins, then
  // the wait's start: one word for both, since every sleeping frame holds one.
  time_point at_;
};

inline cancel_point<sleep_op> promise_base::await_transform(sleep_for s) noexcept {
  return {sleep_op(s.d, ctx), ctx};
}
inline sleep_op sleep_for::operator co_await() const noexcept { return {d, nullptr}; }

class [[nodiscard]] fd_op final : public op_base, public fd_owner {
 public:
  fd_op(int fd, short events) noexcept : fd_owner(fd, events) { one_shot = true; }
  bool await_ready() const;
  void await_suspend(std::coroutine_handle<> h);
  short await_resume() const;
  void cancel_op() noexcept override;
  const char* what() const noexcept override;
  void fd_ready(loop_impl& l, short ev) noexcept override;

 private:
  short revents_ = 0;
};

// A value or an exception, written by one thread and read by the loop thread after the
// inbox handed it over (the inbox's mutex orders the two).
template <class T> struct result_box {
  std::optional<T> value;
  std::exception_ptr error;
  template <class... A> void set(A&&... a) { value.emplace(std::forward<A>(a)...); }
  // The error is released here, on the loop thread, not by whichever thread drops the
  // last reference to the shared state.
  T take() {
    if (error) std::rethrow_exception(std::exchange(error, nullptr));
    return std::move(*value);
  }
};
template <> struct result_box<void> {
  std::exception_ptr error;
  void set() noexcept {}
  void take() {
    if (error) std::rethrow_exception(std::exchange(error, nullptr));
  }
};

// The one way a result made on another thread (a thread function's, a task_return's) comes
// back: written there into `result`, handed over by the inbox, taken on the loop thread.
// While `counted`, run() waits for it (loop_impl::outstanding) and its arrival resumes the
// job; let_go() ends that, for a cancel or a function withdrawn, waited for or abandoned.
// `op` and `counted` belong to the loop thread.
template <class T> struct remote_completion : result_box<T> {
  std::shared_ptr<inbox> box;  // outlives the loop, for a completion that comes late
  loop_impl* loop;
  op_base* op = nullptr;
  bool counted = false;
  bool thread;  // a thread function: also counted in loop_impl::threads_out

  remote_completion(loop_impl& l, bool t) : box(l.box), loop(&l), thread(t) {}
  void count(op_base* o) noexcept {
    op = o;
    counted = true;
    ++loop->outstanding;
    loop->threads_out += thread;
  }
  void let_go() noexcept {
    if (!std::exchange(counted, false)) return;
    --loop->outstanding;
    loop->threads_out -= thread;
  }
  void arrived() {  // the inbox item that the other thread sent
    if (!counted) return;
    let_go();
    op->ctx->pending = nullptr;
    loop->enqueue(op->ctx, op->waiter);
  }
};

// The function, its result and the way back to the loop, in one allocation. The worker
// writes only `result` and `returned` before it hands the state to the inbox.
template <class R, class Fn> struct thread_work final : pool_task, remote_completion<R> {
  std::stop_source stop;
  std::optional<Fn> fn;

  thread_work(Fn f, loop_impl& l) : remote_completion<R>(l, true), fn(std::move(f)) {}
  void run(std::shared_ptr<pool_task>& self) override {
    try {
      if constexpr (std::is_void_v<R>)
        (*fn)(stop.get_token());
      else
        this->set((*fn)(stop.get_token()));
    } catch (...) {
      this->error = std::current_exception();
    }
    fn.reset();  // the function's captures die on the worker, as with std::thread
    mark_returned();
    std::shared_ptr<inbox> b = this->box;
    b->push({nullptr,
             [me = std::static_pointer_cast<thread_work>(std::move(self))] { me->arrived(); }});
  }
};

template <class R, class Fn> class [[nodiscard]] thread_op final : public op_base {
 public:
  thread_op(Fn fn, bool abandon) : fn_(std::move(fn)), abandon_(abandon) {}
  bool await_ready() const {
    require_job(ctx);
    return ctx->cancelled();
  }
  void await_suspend(std::coroutine_handle<> h) {
    loop_impl& l = *ctx->loop;
    work_ = std::make_shared<thread_work<R, Fn>>(std::move(fn_), l);
    waiter = h;
    l.submit_thread(work_);
    work_->count(this);
    park();
  }
  R await_resume() {
    if (ctx->cancelled()) throw job_cancelled{};
    return work_->take();
  }
  // A queued function is withdrawn and never runs. A running one is asked to stop, and the
  // job waits for it to return (holds_job), unless it was started with abandon_on_cancel.
  void cancel_op() noexcept override {
    loop_impl& l = *ctx->loop;
    if (l.withdraw_thread(work_.get())) return work_->let_go();
    work_->stop.request_stop();
    if (abandon_) {
      work_->let_go();  // run() does not wait for it any more
      l.abandon_thread(work_);
    }
  }
  bool holds_job() const noexcept override { return work_->counted; }
  void wait_stopped() noexcept override {
    ctx->loop->wait_for_thread(ctx, *work_);
    work_->let_go();
  }
  const char* what() const noexcept override { return "threaded_task"; }

 private:
  Fn fn_;
  bool abandon_;
  std::shared_ptr<thread_work<R, Fn>> work_;
};

template <class T>
struct callback_state : remote_completion<T>, std::enable_shared_from_this<callback_state<T>> {
  std::atomic<bool> claimed{false};  // task_return was called (or its last copy died)

  explicit callback_state(loop_impl& l) : remote_completion<T>(l, false) {}
  template <class... A> void set_value(A&&... a) {
    try {  // building T threw: claimed already, so the job gets the error, not a hang
      this->set(std::forward<A>(a)...);
    } catch (...) {
      this->error = std::current_exception();
    }
    deliver();
  }
  void set_error(std::exception_ptr e) {
    this->error = std::move(e);
    deliver();
  }
  void deliver() {
    this->box->push({nullptr, [s = this->shared_from_this()] { s->arrived(); }});
  }
  void called_twice() {
    this->box->push({nullptr, [l = this->loop] {
                       l->report("task_return",
                                 std::make_exception_ptr(std::logic_error(
                                     "coro_jobs: task_return called more than once")));
                     }});
  }
};

// Held by every copy of a task_return; when the last copy dies without a call, the job gets
// an error instead of waiting forever (std::promise's broken_promise, for callbacks).
template <class T> struct return_token {
  std::shared_ptr<callback_state<T>> st;
  explicit return_token(std::shared_ptr<callback_state<T>> s) : st(std::move(s)) {}
  ~return_token() {
    if (!st->claimed.exchange(true)) {
      st->set_error(std::make_exception_ptr(
          std::logic_error("coro_jobs: task_return destroyed without being called")));
    }
  }
  return_token(const return_token&) = delete;
  return_token& operator=(const return_token&) = delete;
};

template <class R> constexpr bool is_canceller() {
  if constexpr (std::is_void_v<R>)
    return true;
  else
    return std::is_invocable_v<R&>;
}

template <class T, class Start> class [[nodiscard]] callback_op final : public op_base {
  using start_result = std::invoke_result_t<Start&, task_return<T>>;
  static_assert(is_canceller<start_result>(),
                "callback_task: start must return void or a canceller callable with no arguments");
  using canceller = std::conditional_t<std::is_void_v<start_result>, char, start_result>;

 public:
  explicit callback_op(Start s) : start_(std::move(s)) {}
  bool await_ready() const {
    require_job(ctx);
    return ctx->cancelled();
  }
  void await_suspend(std::coroutine_handle<> h) {
    loop_impl& l = *ctx->loop;
    st_ = std::make_shared<callback_state<T>>(l);
    waiter = h;
    task_return<T> ret(std::make_shared<return_token<T>>(st_));
    // If start throws, the state is never counted: whatever it did with task_return is ignored.
    if constexpr (std::is_void_v<start_result>)
      start_(std::move(ret));
    else
      cancel_.emplace(start_(std::move(ret)));
    st_->count(this);
    park();
  }
  T await_resume() {
    if (ctx->cancelled()) throw job_cancelled{};
    return st_->take();
  }
  const char* what() const noexcept override { return "callback_task"; }
  void cancel_op() noexcept override {
    st_->let_go();
    if constexpr (!std::is_void_v<start_result>) {
      try {
        if (cancel_) (*cancel_)();
      } catch (...) {
        st_->loop->report("canceller", std::current_exception());
      }
    }
  }

 private:
  Start start_;
  std::shared_ptr<callback_state<T>> st_;
  std::optional<canceller> cancel_;
};

// ---- Sleeps and fd waits

inline bool sleep_op::await_ready() const {
  require_job(ctx);
  return ctx->cancelled();
}
inline void sleep_op::await_suspend(std::coroutine_handle<> h) {
  loop_impl& l = *ctx->loop;
  waiter = h;
  const duration d = at_.time_since_epoch();
  if (d <= duration::zero()) {  // a plain yield: the next iteration, no timer, no clock read
    at_ = l.now;
    l.enqueue(ctx, h);
    return;
  }
  // The real clock, not the iteration's cached one, so the sleep can never end early.
  at_ = l.clock();
  l.add_timer(this, deadline_after(at_, d), &fire);
  park();
}
inline duration sleep_op::await_resume() const {
  if (ctx->cancelled()) throw job_cancelled{};
  return ctx->loop->now - at_;
}
inline void sleep_op::cancel_op() noexcept { ctx->loop->remove_timer(this); }
inline const char* sleep_op::what() const noexcept { return "sleep_task"; }
inline void sleep_op::fire(timer_owner* self, loop_impl& l) {
  auto* op = static_cast<sleep_op*>(self);
  op->ctx->pending = nullptr;
  l.enqueue(op->ctx, op->waiter);
}

inline bool fd_op::await_ready() const {
  require_job(ctx);
  if (ctx->cancelled()) return true;
  if (fd < 0 || ::fcntl(fd, F_GETFD) == -1)
    throw std::system_error(EBADF, std::generic_category(), "coro_jobs: wait on a bad fd");
  return false;
}
inline void fd_op::await_suspend(std::coroutine_handle<> h) {
  waiter = h;
  ctx->loop->add_fd(this);
  park();
}
inline short fd_op::await_resume() const {
  if (ctx->cancelled()) throw job_cancelled{};
  if (revents_ & POLLNVAL)
    throw std::system_error(EBADF, std::generic_category(), "coro_jobs: fd closed while waited on");
  return revents_;
}
inline void fd_op::cancel_op() noexcept { ctx->loop->remove_fd(this); }
inline const char* fd_op::what() const noexcept {
  return events & POLLIN ? "wait_readable" : "wait_writable";
}
inline void fd_op::fd_ready(loop_impl& l, short ev) noexcept {
  revents_ = ev;  // one-shot: the loop has dropped the wait
  ctx->pending = nullptr;
  l.enqueue(ctx, waiter);
}
// --- Composition: branches and groups --------------------------------------------------

template <class T>
job_handle<T> start_for(job_ctx* parent, job<T>& j, const char* kind,
                        std::optional<std::size_t> index);

template <class T> struct void_to_monostate {
  using type = T;
};
template <> struct void_to_monostate<void> {
  using type = std::monostate;
};

template <class T> struct await_result {  // tasks
  using type = std::decay_t<decltype(std::declval<T&>().await_resume())>;
};
template <class T> struct await_result<job<T>> {
  using type = T;
};
template <> struct await_result<sleep_for> {
  using type = duration;
};
template <class T> struct await_result<job_handle<T>> {
  using type = T;
};
template <class T> struct await_value : void_to_monostate<typename await_result<T>::type> {};

// One branch: awaits `a` in a job of its own and hands the result to its slot and group.
template <class A, class V> job<> branch(A a, group* g, std::size_t i, std::optional<V>* slot) {
  job_ctx* const self = co_await this_job{};
  std::exception_ptr e;
  try {
    if constexpr (std::is_void_v<typename await_result<A>::type>) {
      co_await std::move(a);
      slot->emplace();
    } else {
      slot->emplace(co_await std::move(a));
    }
  } catch (...) {
    e = std::current_exception();
  }
  g->branch_done(i, std::move(e));
  if (self->cancelled()) throw job_cancelled{};  // its error, if any, went to the group
}

// Starts one branch job per awaitable, named after the awaiting job.
template <class... A, std::size_t... I>
void start_branches(group& g, std::tuple<std::optional<await_value_t<A>>...>& slots,
                    std::index_sequence<I...>, A&... a) {
  g.ctx->branches = &g;  // for job_ctx::finish_now
  g.left = sizeof...(A);
  auto own_handle = [&](auto& x) {
    if constexpr (is_handle<std::remove_cvref_t<decltype(x)>>::value)
      if (access::state(x) == g.ctx) fail_logic("coro_jobs: a job cannot wait for its own handle");
  };
  (own_handle(a), ...);
  g.branches.reserve(sizeof...(A));  // so that no push_back below can fail once a branch runs
  auto one = [&](auto&& j, std::size_t i) {
    auto h = start_for(g.ctx, j, g.kind, i);
    job_ctx* c = access::state(h);
    ++c->refs;
    g.branches.push_back(c);
  };
  try {
    (one(branch(std::move(a), &g, I, &std::get<I>(slots)), I), ...);
  } catch (...) {
    // Out of memory part way (a branch's frame, name or ready slot): the branches started so
    // far point into this frame (g, slots), which the error is about to destroy. None has
    // run yet, so finishing them now destroys their frames unstarted.
    for (job_ctx* b : g.branches) b->loop->finish_now(b);
    throw;
  }
}


inline group::group(const char* k, bool a) noexcept : kind(k), any(a) {}
inline group::~group() {
  if (listed)  // defensive: a stop still on its way (a canceller that ran jobs could do that)
    for (group** p = &ctx->loop->stop_list; *p; p = &(*p)->stop_next)
      if (*p == this) {
        *p = stop_next;
        break;
      }
  if (ctx && ctx->branches == this) ctx->branches = nullptr;
  for (job_ctx* b : branches) b->release();
}
inline const char* group::what() const noexcept { return kind; }
// Cancels the branches still running. One that never started never will: it counts as
// ended now.
// A branch that waits on a when_all of its own is cancelled through that group's stop, and so
// on down a nest: called directly, a recursion as deep as the nest (12,000 levels overflowed
// a 1 MiB stack at -O2). So a stop puts its group on the loop's list, and only the outermost
// one works through it, in a loop: the group on top cancels its next branch (which may put
// the branch's own group on top), and once it has cancelled them all it comes off and lets
// its awaiting job go if that job waits for it (`holding`, see cancel_op). Every job is thus
// queued after the jobs below it, as with the recursion: a cancelled nest unwinds in one
// iteration, innermost first.
inline void group::stop() noexcept {
  if (stopping) return;  // its branches are cancelled, or on their way
  stopping = true;
  loop_impl& l = *ctx->loop;
  stop_next = std::exchange(l.stop_list, this);
  listed = true;
  if (l.stopping_groups) return;  // a stop further out is working through the list
  l.stopping_groups = true;
  while (group* g = l.stop_list) {
    if (g->stop_at == g->branches.size()) {
      l.stop_list = g->stop_next;
      g->listed = false;
      g->stopped();
      continue;
    }
    job_ctx* const b = g->branches[g->stop_at++];
    if (b->done() || b->cancelled()) continue;
    const bool unstarted = !b->started();
    b->cancel();
    if (unstarted) --g->left;
  }
  l.stopping_groups = false;
}
inline void group::stopped() noexcept {
  if (std::exchange(holding, false) && ctx->pending == this) {
    ctx->pending = nullptr;
    ctx->loop->enqueue(ctx, waiter);
  }
  if (left == 0) wake();  // unstarted branches ended just now (a no-op unless it waits)
}
inline void group::cancel_op() noexcept {  // the awaiting job was cancelled
  suspended = false;
  stop();
  // Listed still: a stop further out is on its way through our branches. The job waits
  // (holds_job) and stopped() queues it after them.
  holding = listed;
}
inline void group::wake() {
  if (!suspended) return;
  suspended = false;
  ctx->pending = nullptr;
  ctx->loop->enqueue(ctx, waiter);
}
// A branch's last act (its body's end).
inline void group::branch_done(std::size_t i, std::exception_ptr e) {
  --left;
  const bool cancel = e && is_cancellation(e);
  if (!stopping && (any || e)) {  // the answer: a winner, or the first failure
    first = i;
    error = std::move(e);
    stop();
    wake();
  } else if (e && !cancel) {  // a second failure while stopping: never lost
    ctx->loop->report(kind, std::move(e));
  }
  if (left == 0) wake();
}
inline void group::rethrow() {
  if (ctx->cancelled()) throw job_cancelled{};
  if (error) std::rethrow_exception(error);
}

// --- Shielded waits -------------------------------------------------------------------------

template <class T, class A> job<T> shield_body(A a) {
  if constexpr (std::is_void_v<T>)
    co_await std::move(a);
  else
    co_return co_await std::move(a);
}

// Waits for the shielded job like a handle awaiter, but is never the job's `pending` wait,
// so the awaiting job's cancel() does not reach it. Started at the co_await, not before:
// shielded(a) built but never awaited runs nothing.
template <class T> struct [[nodiscard]] shield_awaiter {
  struct shield_wait final : handle_waiter {};
  job<T> body;
  job_ctx* ctx = nullptr;  // set by await_transform
  job_handle<T> h;
  shield_wait w;

  explicit shield_awaiter(job<T> b) noexcept : body(std::move(b)) {}
  shield_awaiter(shield_awaiter&& o) noexcept : body(std::move(o.body)), ctx(o.ctx) {}
  bool await_ready() {
    require_job(ctx);
    h = start_for(ctx, body, "shielded", std::nullopt);
    return false;
  }
  void await_suspend(std::coroutine_handle<> hh) noexcept {
    w.ctx = ctx;
    w.wait_for(access::state(h), hh);
  }
  T await_resume() { return static_cast<job_state<T>*>(access::state(h))->get(); }
};

// --- Progress ------------------------------------------------------------------------------

template <class T> struct progress_state : std::enable_shared_from_this<progress_state<T>> {
  std::mutex m;
  std::optional<T> latest;  // guarded by m
  bool queued = false;      // guarded by m: a delivery is on its way
  bool alive = true;        // loop thread only: the progress object exists
  std::function<void(T)> on_progress;
  std::shared_ptr<inbox> box;
  loop_impl* loop;

  void report(T v) {
    {
      std::lock_guard<std::mutex> lock(m);
      latest = std::move(v);
      if (queued) return;  // the queued delivery will carry the newest value
      queued = true;
    }
    box->push({"progress", [s = this->shared_from_this()] { deliver(s.get()); }});
  }
  static void deliver(progress_state* s) {  // a posted callback: its errors are reported
    std::optional<T> v;
    {
      std::lock_guard<std::mutex> lock(s->m);
      v = std::move(s->latest);
      s->latest.reset();
      s->queued = false;
    }
    if (!s->alive || !v) return;
    // Called from a local: a callback that ends the job destroys the progress object,
    // whose destructor would otherwise free the function (and its captures) mid-call.
    struct put_back {
      progress_state* s;
      std::function<void(T)> fn;
      ~put_back() {
        if (s->alive) s->on_progress = std::move(fn);
      }
    } running{s, std::move(s->on_progress)};
    running.fn(std::move(*v));
  }
};
}  // namespace detail

// ======================================================================================
//                               PUBLIC API: definitions
// ======================================================================================

template <class Rep, class Period>
callback_handle event_loop::call_later(std::chrono::duration<Rep, Period> delay,
                                       std::function<void()> fn) {
  return call_later_impl(detail::saturate(delay), std::move(fn));
}
template <class Rep, class Period>
bool event_loop::run_once(std::chrono::duration<Rep, Period> max_wait) {
  return run_once_impl(detail::saturate(max_wait));
}
template <class Rep, class Period> void event_loop::advance(std::chrono::duration<Rep, Period> d) {
  advance_impl(detail::saturate(d));
}
template <class Rep, class Period>
void event_loop::set_watchdog(std::chrono::duration<Rep, Period> threshold,
                              watchdog_handler handler) {
  set_watchdog_impl(detail::saturate(threshold), std::move(handler));
}

template <class T> job_handle<T>::job_handle(const job_handle& o) : s_(o.s_) {
  if (!s_) return;
  if (s_->owner != std::this_thread::get_id())
    detail::fail_logic("coro_jobs: job_handle copied on a thread that does not own its loop");
  ++s_->refs, ++s_->handles;
}
template <class T> job_handle<T>& job_handle<T>::operator=(const job_handle& o) {
  if (this != &o) {
    job_handle tmp(o);
    std::swap(s_, tmp.s_);
  }
  return *this;
}
template <class T> job_handle<T>& job_handle<T>::operator=(job_handle&& o) noexcept {
  if (this != &o) {
    job_handle tmp(std::move(o));
    std::swap(s_, tmp.s_);
  }
  return *this;
}
template <class T> job_handle<T>::~job_handle() {
  if (!s_) return;
  if (s_->owner == std::this_thread::get_id())
    detail::drop_handle(s_);
  else
    detail::drop_handle_elsewhere(s_);
}
template <class T> bool job_handle<T>::done() const {
  if (!s_) throw std::invalid_argument("coro_jobs: done() of an empty job_handle");
  if (!s_->done())
    s_->loop->check_thread("coro_jobs: job_handle used from a thread that does not own the loop");
  return s_->done();
}
template <class T> bool job_handle<T>::cancel() {
  if (!s_ || s_->done()) return false;
  s_->loop->check_thread("coro_jobs: job_handle used from a thread that does not own the loop");
  return s_->cancel();
}
template <class T> T job_handle<T>::result() {
  if (!s_) throw std::invalid_argument("coro_jobs: result() of an empty job_handle");
  if (!s_->done()) {
    s_->loop->check_thread("coro_jobs: job_handle used from a thread that does not own the loop");
    detail::fail_logic("coro_jobs: result() of a job that has not ended");
  }
  return s_->get();
}
template <class T> std::string_view job_handle<T>::name() const {
  if (!s_) throw std::invalid_argument("coro_jobs: name() of an empty job_handle");
  return s_->extra.name();
}

namespace detail {
template <class T> job_handle<T> start_with(event_loop& loop, job<T>& j, job_extras extra) {
  auto& l = access::impl(loop);
  l.check_thread("coro_jobs: start_job called from a thread that does not own the loop");
  auto& h = access::handle(j);
  if (!h)
    throw std::invalid_argument(
        "coro_jobs: start_job of an empty job (moved-from or already started)");
  // What may throw comes first, before anything is committed: the name (in `extra`), the
  // ready slot and the state.
  l.ready.push_back({item::start, nullptr});  // filled in below
  job_state<T>* s;
  try {
    s = make_state<job_state<T>>(h.address());
  } catch (...) {
    l.ready.pop_back();
    throw;
  }
  s->loop = s->home = &l;
  s->owner = std::this_thread::get_id();
  s->extra = std::move(extra);
  s->root = h;
  s->refs = 2;  // the frame and the handle below
  s->handles = 1;
  h.promise().ctx = s;
  h = {};  // the state owns the frame now
  l.link(s);
  l.ready.back().arg = s;
  l.touched();
  if (job_ctx* parent = s->extra.parent()) ++parent->refs;  // see job_ctx::release
  job_handle<T> r;
  access::state(r) = s;
  return r;
}
template <class T>
job_handle<T> start_with(event_loop& loop, job<T>& j, std::string name,
                         std::unique_ptr<maker_base> maker) {
  job_extras extra;
  extra.set_name(std::move(name));
  if (maker) extra.set_maker(std::move(maker));
  return start_with(loop, j, std::move(extra));
}
// A branch or shielded job, named after the job it serves (see job_extras).
template <class T>
job_handle<T> start_for(job_ctx* parent, job<T>& j, const char* kind,
                        std::optional<std::size_t> index) {
  job_extras extra;
  extra.set_parent(parent, kind, index);
  return start_with(*parent->loop->self, j, std::move(extra));
}
}  // namespace detail

template <class T> job_handle<T> start_job(event_loop& loop, job<T> j, std::string name) {
  return detail::start_with(loop, j, std::move(name), nullptr);
}
template <class T> job_handle<T> start_job(job<T> j, std::string name) {
  return start_job(detail::current_loop(), std::move(j), std::move(name));
}
template <class F>
  requires std::invocable<F&> && detail::is_job<std::invoke_result_t<F&>>::value
auto start_job(event_loop& loop, F&& make, std::string name) {
  auto keep = std::make_unique<detail::maker_box<std::decay_t<F>>>(std::forward<F>(make));
  auto j = keep->f();
  return detail::start_with(loop, j, std::move(name), std::move(keep));
}
template <class F>
  requires std::invocable<F&> && detail::is_job<std::invoke_result_t<F&>>::value
auto start_job(F&& make, std::string name) {
  return start_job(detail::current_loop(), std::forward<F>(make), std::move(name));
}

template <class Rep, class Period>
detail::sleep_for sleep_task(std::chrono::duration<Rep, Period> d) {
  return {detail::saturate(d)};
}
inline detail::sleep_for next_iteration() noexcept { return {detail::duration::zero()}; }

template <class T> T event_loop::run_until(job_handle<T> h) {
  if (!h) throw std::invalid_argument("coro_jobs: run_until of an empty job_handle");
  auto& l = *impl_;
  l.check_thread(
      "coro_jobs: event_loop::run_until called from a thread that does not own the loop");
  if (l.in_iteration) detail::fail_logic("coro_jobs: run_until called from inside the loop");
  if (l.hosted)
    detail::fail_logic(
        "coro_jobs: run_until of an event_loop attached to a host loop; the host runs it");
  if (detail::access::state(h)->home != &l)
    detail::fail_logic("coro_jobs: run_until of a job started on another event_loop");
  while (!h.done()) {
    if (l.box->quit.exchange(false))
      throw std::runtime_error(
          "coro_jobs: quit() was called before the job given to run_until ended");
    if (!run_once() && !h.done())
      detail::fail_logic("coro_jobs: run_until: nothing is pending and the job has not ended");
    if (!h.done() && l.waits_for_advance())
      detail::fail_logic("coro_jobs: run_until: the job waits for advance() (manual clock)");
  }
  return h.result();
}

namespace detail {
template <class F, class... Args> auto make_thread_op(bool abandon, F&& f, Args&&... args) {
  // Decay-copied like std::thread's arguments: the worker must not refer to the job's frame.
  auto call = [f = std::forward<F>(f),
               ... a = std::forward<Args>(args)](std::stop_token st) mutable -> decltype(auto) {
    if constexpr (std::is_invocable_v<std::decay_t<F>&, std::stop_token, std::decay_t<Args>...>)
      return std::invoke(f, std::move(st), std::move(a)...);
    else
      return std::invoke(f, std::move(a)...);
  };
  using R = std::decay_t<std::invoke_result_t<decltype(call)&, std::stop_token>>;
  return thread_op<R, decltype(call)>(std::move(call), abandon);
}
}  // namespace detail

template <class F, class... Args>
  requires(!std::is_same_v<std::remove_cvref_t<F>, abandon_on_cancel_t>)
auto threaded_task(F&& f, Args&&... args) {
  return detail::make_thread_op(false, std::forward<F>(f), std::forward<Args>(args)...);
}
template <class F, class... Args> auto threaded_task(abandon_on_cancel_t, F&& f, Args&&... args) {
  return detail::make_thread_op(true, std::forward<F>(f), std::forward<Args>(args)...);
}

template <class T> detail::callback_state<T>* task_return<T>::claim() const {
  if (!t_) throw std::logic_error("coro_jobs: call of an empty (moved-from) task_return");
  auto* s = t_->st.get();
  if (s->claimed.exchange(true)) {
    s->called_twice();
    return nullptr;
  }
  return s;
}

template <class T, class Start>
detail::callback_op<T, std::decay_t<Start>> callback_task(Start&& start) {
  return detail::callback_op<T, std::decay_t<Start>>(std::forward<Start>(start));
}

// ---- Composition

template <class... A> job<std::tuple<await_value_t<A>...>> when_all(A... awaitables) {
  static_assert(sizeof...(A) > 0, "when_all needs at least one awaitable");
  detail::group g("when_all", false);
  g.ctx = co_await detail::this_job{};
  std::tuple<std::optional<await_value_t<A>>...> slots;
  detail::start_branches(g, slots, std::index_sequence_for<A...>{}, awaitables...);
  co_await g.answer();
  while (g.left > 0) co_await g.drained();
  g.rethrow();
  co_return std::apply([](auto&... v) { return std::tuple<await_value_t<A>...>(std::move(*v)...); },
                       slots);
}

template <class... A> job<std::variant<await_value_t<A>...>> when_any(A... awaitables) {
  static_assert(sizeof...(A) > 0, "when_any needs at least one awaitable");
  using V = std::variant<await_value_t<A>...>;
  using Slots = std::tuple<std::optional<await_value_t<A>>...>;
  detail::group g("when_any", true);
  g.ctx = co_await detail::this_job{};
  Slots slots;
  detail::start_branches(g, slots, std::index_sequence_for<A...>{}, awaitables...);
  co_await g.answer();
  while (g.left > 0) co_await g.drained();
  g.rethrow();
  // The winner's index is known only now: pick the constructor from a table.
  constexpr auto table = []<std::size_t... I>(std::index_sequence<I...>) {
    return std::array<V (*)(Slots&), sizeof...(I)>{
        [](Slots& s) { return V(std::in_place_index<I>, std::move(*std::get<I>(s))); }...};
  }(std::index_sequence_for<A...>{});
  co_return table[g.first](slots);
}

template <class Rep, class Period, class A>
job<await_value_t<A>> with_timeout(std::chrono::duration<Rep, Period> d, A awaitable) {
  auto r = co_await when_any(std::move(awaitable), sleep_task(d));
  if (r.index() == 1) throw timeout_error{};
  co_return std::get<0>(std::move(r));
}

template <class A>
detail::shield_awaiter<typename detail::await_result<std::remove_cvref_t<A>>::type> shielded(
    A awaitable) {
  using T = typename detail::await_result<std::remove_cvref_t<A>>::type;
  return detail::shield_awaiter<T>(detail::shield_body<T>(std::move(awaitable)));
}

// ---- Progress

template <class T>
progress<T>::progress(event_loop& loop, std::function<void(T)> on_progress)
    : st_(std::make_shared<detail::progress_state<T>>()) {
  auto& l = detail::access::impl(loop);
  l.check_thread("coro_jobs: progress made on a thread that does not own the loop");
  if (!on_progress) throw std::invalid_argument("coro_jobs: progress needs a callback");
  st_->on_progress = std::move(on_progress);
  st_->box = l.box;
  st_->loop = &l;
}
template <class T>
progress<T>::progress(std::function<void(T)> on_progress)
    : progress(detail::current_loop(), std::move(on_progress)) {}
template <class T> progress<T>::~progress() {
  st_->alive = false;
  st_->on_progress = nullptr;  // its captures die here, on the loop thread, not on a worker
}

// ---- Job scopes

template <class T> job_handle<T> job_scope::adopt(job_handle<T> h) {
  // Forget ended jobs once the list has doubled since the last sweep: a sweep on every start
  // would make n starts cost n^2 (80,000 starts took 4 s). Then hold a reference (not a
  // handle: errors of jobs nobody else holds still reach the error handler when they end).
  if (jobs_.size() >= sweep_at_) {
    jobs_.erase(std::remove_if(
                    jobs_.begin(), jobs_.end(),
                    [](detail::job_ctx* j) {
      if (!j->done()) return false;
      j->release();
      return true;
                    }),
                jobs_.end());
    sweep_at_ = std::max<std::size_t>(16, 2 * jobs_.size());
  }
  detail::job_ctx* c = detail::access::state(h);
  jobs_.push_back(c);  // first: if it throws, no reference is left behind
  ++c->refs;
  return h;
}
template <class T> job_handle<T> job_scope::start(job<T> j, std::string name) {
  return start(std::move(j), std::move(name), policy_);
}
// A repeated start under a live job's name: the running job's handle (ignore), or nothing
// after cancelling and unwinding the previous one (cancel_previous) or at once (run_another).
template <class T>
std::optional<job_handle<T>> job_scope::apply_policy(const std::string& name, restart policy) {
  loop_->check_thread("coro_jobs: job_scope used from a thread that does not own the loop");
  if (policy == restart::run_another || name.empty()) return std::nullopt;
  if (policy == restart::cancel_previous) {
    std::vector<detail::job_ctx*> previous;  // held: unwinding may start jobs (see cancel_all)
    for (detail::job_ctx* old : jobs_)
      if (!old->done() && old->extra.name() == name) previous.push_back(old), ++old->refs;
    for (detail::job_ctx* old : previous) {
      if (!old->done()) loop_->finish_now(old);
      old->release();
    }
    return std::nullopt;
  }
  for (detail::job_ctx* old : jobs_) {
    if (old->done() || old->extra.name() != name) continue;
    if (old->type() != &detail::type_tag<T>)
      detail::fail_logic(
          "coro_jobs: job_scope: a running job of that name has another result type");
    auto* s = static_cast<detail::job_state<T>*>(old);
    job_handle<T> h;
    detail::access::state(h) = s;
    ++s->refs, ++s->handles;
    return h;
  }
  return std::nullopt;
}
template <class T> job_handle<T> job_scope::start(job<T> j, std::string name, restart policy) {
  if (!j) throw std::invalid_argument("coro_jobs: job_scope::start of an empty job");
  if (policy == restart::run_latest && !name.empty()) {
    loop_->check_thread("coro_jobs: job_scope used from a thread that does not own the loop");
    if (detail::job_ctx* running = take_turn(name)) {
      queued_.reserve(queued_.size() + 1);  // so that queue() cannot fail once it has started
      return queue(
          adopt(start_job(*loop_->self, run_after(this, detail::held_ref(running), std::move(j)),
                          std::move(name))));
    }
  } else if (auto running = apply_policy<T>(name, policy)) {
    return *running;  // j is dropped unstarted
  }
  return adopt(start_job(*loop_->self, std::move(j), std::move(name)));
}
template <class F>
  requires std::invocable<F&> && detail::is_job<std::invoke_result_t<F&>>::value
auto job_scope::start(F&& make, std::string name, std::optional<restart> policy) {
  using T = typename std::invoke_result_t<F&>::value_type;
  const restart p = policy.value_or(policy_);
  if (p == restart::run_latest && !name.empty()) {
    loop_->check_thread("coro_jobs: job_scope used from a thread that does not own the loop");
    if (detail::job_ctx* running = take_turn(name)) {
      // start_job keeps this lambda, and with it make's captures, until the job ends.
      auto after = [this, held = std::make_shared<detail::held_ref>(running),
                    make = std::forward<F>(make)]() mutable {
        return run_after(this, detail::held_ref(held->j), make());
      };
      queued_.reserve(queued_.size() + 1);
      return queue(adopt(start_job(*loop_->self, std::move(after), std::move(name))));
    }
  } else if (auto running = apply_policy<T>(name, p)) {
    return *running;
  }
  return adopt(start_job(*loop_->self, std::forward<F>(make), std::move(name)));
}
// restart::run_latest: waits for the running job of its name, then runs body.
template <class T>
job<T> job_scope::run_after(job_scope* scope, detail::held_ref previous, job<T> body) {
  co_await detail::job_end(previous.j);
  scope->unqueue(co_await detail::this_job{});
  if constexpr (std::is_void_v<T>)
    co_await std::move(body);
  else
    co_return co_await std::move(body);
}
template <class T> job_handle<T> job_scope::queue(job_handle<T> h) {
  detail::job_ctx* c = detail::access::state(h);
  queued_.push_back(c);
  ++c->refs;
  return h;
}


inline callback_handle::callback_handle(const callback_handle& o) noexcept : n_(o.n_) {
  if (n_) n_->ref();
}
inline callback_handle& callback_handle::operator=(const callback_handle& o) noexcept {
  if (o.n_) o.n_->ref();
  if (n_) n_->unref();
  n_ = o.n_;
  return *this;
}
inline callback_handle::~callback_handle() {
  if (n_) n_->unref();
}
inline bool callback_handle::active() const noexcept { return n_ && n_->loop && n_->active; }
inline bool callback_handle::cancel() {
  if (!active()) return false;
  n_->loop->check_thread(
      "coro_jobs: callback_handle::cancel called from a thread that does not own the loop");
  n_->active = false;
  if (n_->is_timer) {
    n_->on_timer = nullptr;  // free its captures now; it is not running (it was active)
    if (n_->timer_slot != detail::timer_owner::not_queued) {  // else due, queued: `active` stops it
      n_->loop->remove_timer(n_);
      n_->unref();  // the heap's reference (this handle holds another)
    }
  } else {
    n_->loop->remove_fd(n_);
    n_->unref();  // the registration's reference
  }
  return true;
}

inline event_loop::event_loop() : event_loop(loop_options{}) {}
inline event_loop::event_loop(const loop_options& o)
    : impl_(std::make_unique<detail::loop_impl>(this, o.worker_threads)) {
  impl_->manual = o.manual_clock;
  auto& r = detail::registry();
  std::lock_guard<std::mutex> lock(r.m);
  r.loops.push_back({std::this_thread::get_id(), this, false, {}});
}
inline event_loop::~event_loop() {
  auto& r = detail::registry();
  const auto mine = [this](const detail::registry_t::entry& e) { return e.loop == this; };
  {
    std::lock_guard<std::mutex> lock(r.m);
    std::find_if(r.loops.begin(), r.loops.end(), mine)->closing = true;
  }
  if (detail::running_loop() == this) detail::running_loop() = nullptr;
  if (auto gone = std::move(impl_->on_host_gone)) {  // the adapter lets go of the loop first
    detach_host();
    gone();
  }
  // Torn down while impl_ still points to it: a job frame's destructor may call now(),
  // post() or start_job on this loop (see loop_impl::shut_down).
  impl_->shut_down();
  std::vector<detail::job_ctx*> late;  // handles released on other threads meanwhile
  {
    std::lock_guard<std::mutex> lock(r.m);
    const auto it = std::find_if(r.loops.begin(), r.loops.end(), mine);
    late.swap(it->late);
    r.loops.erase(it);
  }
  for (detail::job_ctx* s : late) detail::drop_handle(s);
  impl_.reset();
}

inline bool event_loop::run_once() { return run_once_impl(detail::duration::max()); }
inline bool event_loop::run_once_impl(detail::duration max_wait) {
  impl_->check_thread(
      "coro_jobs: event_loop::run_once called from a thread that does not own the loop");
  event_loop* const outer = std::exchange(detail::running_loop(), this);
  struct restore {
    event_loop* p;
    ~restore() { detail::running_loop() = p; }
  } r{outer};
  return impl_->run_once(std::max(max_wait, detail::duration::zero()));  // max(): no limit
}
inline event_loop::host_wait event_loop::prepare_host_wait() {
  auto& l = *impl_;
  l.check_thread("coro_jobs: prepare_host_wait called from a thread that does not own the loop");
  detail::duration t = l.time_to_wait();
  // As wait() does before it blocks: a running thread function's result may be
  // microseconds away, sooner than a host's wakeup (NOTES: spin before block).
  const auto signalled = [&l] { return l.box->signalled.load(std::memory_order_acquire); };
  if (signalled() ||
      (t != detail::duration::zero() && l.threads_out > 0 && detail::spin_until(signalled)))
    t = detail::duration::zero();
  // The host may block now: from here until run_once a wakeup writes the pipe (inbox::wake),
  // and not otherwise, so a result that lands while the host is busy costs no write, poll
  // wakeup and read (NOTES: hosted pipe). Announce it, then look again, as wait() does.
  if (t != detail::duration::zero()) {
    l.box->polling.store(true);
    if (l.box->signalled.load()) t = detail::duration::zero();
  }
  if (l.timer_fd >= 0 && t != detail::duration::zero())
    l.arm_timer_fd(t > detail::duration::zero() ? l.timers.front().deadline
                                                : detail::time_point::min());
  return {std::span<const pollfd>(l.pfds), t};
}
inline void event_loop::attach_host(std::function<void()> on_destroyed) {
  auto& l = *impl_;
  l.check_thread("coro_jobs: attach_host called from a thread that does not own the loop");
  if (l.hosted) detail::fail_logic("coro_jobs: the event_loop is already attached to a host loop");
  l.on_host_gone = std::move(on_destroyed);
  l.hosted = true;
}
inline void event_loop::detach_host() noexcept {
  impl_->hosted = false;
  impl_->on_host_gone = nullptr;
}
inline void event_loop::run() {
  impl_->check_thread("coro_jobs: event_loop::run called from a thread that does not own the loop");
  if (impl_->in_iteration)
    detail::fail_logic("coro_jobs: run() or run_once() called from inside the loop");
  if (impl_->hosted)
    detail::fail_logic(
        "coro_jobs: run() of an event_loop attached to a host loop; the host runs it");
  while (!impl_->box->quit.exchange(false) && run_once() && !impl_->waits_for_advance()) {
  }
}
inline void event_loop::quit() noexcept {
  // Held: the loop thread may destroy the loop as soon as it sees the flag.
  const std::shared_ptr<detail::inbox> box = impl_->box;
  box->quit.store(true);
  box->wake();
}
inline void event_loop::post(std::function<void()> fn) {
  if (!fn) throw std::invalid_argument("coro_jobs: post of an empty function");
  const std::shared_ptr<detail::inbox> box = impl_->box;  // see quit()
  box->push({"post", std::move(fn)});
}
inline callback_handle event_loop::call_later_impl(detail::duration delay,
                                                   std::function<void()> fn) {
  auto& l = *impl_;
  l.check_thread(
      "coro_jobs: event_loop::call_later called from a thread that does not own the loop");
  if (!fn) throw std::invalid_argument("coro_jobs: call_later of an empty function");
  auto* n = new detail::callback_node(l);
  auto h = detail::access::make_handle(n);  // owns the first reference
  n->is_timer = true;
  n->on_timer = std::move(fn);
  l.add_timer(n, detail::deadline_after(l.clock(), delay), &detail::callback_node::fire_timer);
  n->ref();  // the heap's
  return h;
}
inline callback_handle event_loop::watch(int fd, short events, std::function<void(short)> fn) {
  auto& l = *impl_;
  l.check_thread("coro_jobs: event_loop::watch called from a thread that does not own the loop");
  if (!fn) throw std::invalid_argument("coro_jobs: watch of an empty function");
  if (fd < 0 || ::fcntl(fd, F_GETFD) == -1)
    throw std::system_error(EBADF, std::generic_category(), "coro_jobs: watch of a bad fd");
  auto* n = new detail::callback_node(l);
  auto h = detail::access::make_handle(n);
  n->on_fd = std::move(fn);
  n->fd = fd;
  n->events = events;
  l.add_fd(n);
  n->ref();  // the registration's
  return h;
}
inline loop_stats event_loop::stats() const {
  const auto& l = *impl_;
  l.check_thread("coro_jobs: event_loop::stats called from a thread that does not own the loop");
  std::size_t jobs = 0;
  for (const detail::job_ctx* j = l.jobs; j; j = j->next) jobs += !j->done();
  return {jobs,         l.timers.size(), l.fd_registrations, l.outstanding, l.ready.size(),
          l.iterations, l.polls};
}
inline std::vector<job_info> event_loop::jobs() const {
  const auto& l = *impl_;
  l.check_thread("coro_jobs: event_loop::jobs called from a thread that does not own the loop");
  const auto t = l.clock();
  std::vector<job_info> out;
  for (const detail::job_ctx* j = l.jobs; j; j = j->next) {
    if (j->done()) continue;
    job_info i{j->extra.full_name(), "waiting", "", {}};
    if (!j->started())
      i.state = "not started";
    else if (j == l.current)
      i.state = "running";
    else if (j->resume_at)
      i.state = "ready";
    if (j->pending && !j->resume_at) {
      i.waiting_on = j->pending->what();
      i.waited = t - j->since;
    }
    out.push_back(std::move(i));
  }
  return out;
}
inline std::chrono::steady_clock::time_point event_loop::now() const { return impl_->clock(); }
inline void event_loop::advance_impl(detail::duration d) {
  auto& l = *impl_;
  l.check_thread("coro_jobs: event_loop::advance called from a thread that does not own the loop");
  if (!l.manual)
    detail::fail_logic("coro_jobs: advance() needs an event_loop made with a manual clock");
  if (l.in_iteration) detail::fail_logic("coro_jobs: advance() called from inside the loop");
  if (d < detail::duration::zero())
    throw std::invalid_argument("coro_jobs: advance() by a negative duration");
  const auto target = detail::deadline_after(l.manual_now, d);
  // Run what is ready, and what that makes ready; bounded, so that a job that keeps
  // yielding until a timer fires cannot keep the clock from moving.
  auto settle = [&] {
    for (int i = 0;
         i < 1000 && (!l.ready.empty() || l.box->signalled.load(std::memory_order_acquire)); ++i)
      run_once();
  };
  settle();
  // A "never" deadline (time_point::max()) never falls due, however far the clock moves;
  // and timers re-armed for the instant they fire (call_later(0) from its own callback) run
  // at most 1,000 times per instant here, the rest on a later iteration.
  int same_instant = 0;
  for (;;) {
    if (l.timers.empty()) break;
    const detail::time_point due = l.timers.front().deadline;
    if (due > target || due == detail::time_point::max()) break;
    same_instant = due <= l.manual_now ? same_instant + 1 : 0;
    if (same_instant > 1000) break;
    l.manual_now = std::max(l.manual_now, due);
    run_once();
    settle();
  }
  l.manual_now = std::max(l.manual_now, target);
  settle();
}
inline void event_loop::set_watchdog_impl(detail::duration threshold, watchdog_handler handler) {
  impl_->check_thread("coro_jobs: set_watchdog called from a thread that does not own the loop");
  impl_->watchdog = std::max(threshold, detail::duration::zero());
  impl_->on_slow = std::move(handler);
}
inline void event_loop::set_error_handler(error_handler handler) {
  impl_->check_thread(
      "coro_jobs: set_error_handler called from a thread that does not own the loop");
  impl_->on_error = std::move(handler);
}

inline detail::fd_op wait_readable(int fd) { return detail::fd_op(fd, POLLIN); }
inline detail::fd_op wait_writable(int fd) { return detail::fd_op(fd, POLLOUT); }

namespace detail {
// What fd holds now, without blocking the loop: after a wait, another waiter or watch of the
// same fd (each is woken) may have taken the bytes, and a blocking fd would then block the
// loop in read. -1 with EAGAIN if nothing is there.
inline ssize_t read_now(int fd, char* buf, std::size_t n) noexcept {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, 0) == 0) {
    errno = EAGAIN;
    return -1;
  }
  return ::read(fd, buf, n);
}
}  // namespace detail

inline line_reader::line_reader(int fd, std::size_t max_line) : fd_(fd), max_(max_line) {
  if (max_line == 0) throw std::invalid_argument("coro_jobs: line_reader with a max_line of 0");
}
inline job<std::string> process::read_all(line_reader& r) {
  std::string all;
  for (;;) {
    all.append(r.buf_, r.start_, std::string::npos);
    r.buf_.clear();
    r.start_ = r.scanned_ = 0;
    if (r.eof_) co_return all;
    co_await wait_readable(r.fd_);
    char chunk[4096];
    const ssize_t n = detail::read_now(r.fd_, chunk, sizeof chunk);
    if (n > 0) r.buf_.assign(chunk, std::size_t(n));
    if (n == 0) r.eof_ = true;
    if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)
      throw std::system_error(errno, std::generic_category(), "coro_jobs: read_all: read");
  }
}

namespace detail {
inline int open_pidfd(int pid) noexcept {
#if defined(__linux__) && defined(SYS_pidfd_open)
  return int(::syscall(SYS_pidfd_open, pid, 0));
#else
  (void)pid;
  return -1;
#endif
}
// Waits for the child to exit and reaps it: on its pidfd, or by polling waitpid every 10 ms.
inline job<exit_status> reap(int pid, int pidfd) {
  int status = 0;
  for (;;) {
    if (pidfd >= 0) co_await wait_readable(pidfd);
    const int r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR)
      throw std::system_error(errno, std::generic_category(), "coro_jobs: waitpid");
    if (pidfd < 0) co_await sleep_task(std::chrono::milliseconds(10));
  }
  if (WIFSIGNALED(status)) co_return exit_status{-1, WTERMSIG(status)};
  co_return exit_status{WEXITSTATUS(status), 0};
}
// What a process object leaves to the loop when it dies with its child running: SIGTERM was
// sent; SIGKILL follows after `grace`. If the loop goes first, the guard kills and reaps.
struct child_guard {
  int pid, pidfd;
  child_guard(int p, int fd) noexcept : pid(p), pidfd(fd) {}
  child_guard(child_guard&& o) noexcept
      : pid(std::exchange(o.pid, -1)), pidfd(std::exchange(o.pidfd, -1)) {}
  child_guard& operator=(child_guard&&) = delete;
  ~child_guard() {
    if (pid > 0 && ::waitpid(pid, nullptr, WNOHANG) == 0) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
    }
    if (pidfd >= 0) ::close(pidfd);
  }
};
inline job<> finish_child(child_guard g, std::chrono::milliseconds grace) {
  bool late = false;
  try {
    co_await with_timeout(grace, reap(g.pid, g.pidfd));
  } catch (const timeout_error&) {
    late = true;
  }
  if (late) {
    ::kill(g.pid, SIGKILL);
    co_await reap(g.pid, g.pidfd);
  }
  g.pid = -1;  // reaped
}
inline job<> write_all(int fd, std::string data) {
  struct closer {
    int fd;
    ~closer() { ::close(fd); }
  } c{fd};
  // A child that closed its stdin makes write() raise SIGPIPE, which would end this program:
  // it is blocked around the write, and consumed if it was ours.
  sigset_t pipe_signal, old;
  sigemptyset(&pipe_signal);
  sigaddset(&pipe_signal, SIGPIPE);
  for (std::size_t off = 0; off < data.size();) {
    co_await wait_writable(fd);
    ::pthread_sigmask(SIG_BLOCK, &pipe_signal, &old);
    const ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    const int error = errno;
    if (n < 0 && error == EPIPE) {
      const timespec zero{};
      ::sigtimedwait(&pipe_signal, nullptr, &zero);
    }
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    errno = error;
    if (n > 0) off += std::size_t(n);
    if (n < 0 && errno == EPIPE) co_return;  // the child closed its stdin: it wants no more
    if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)
      throw std::system_error(errno, std::generic_category(), "coro_jobs: writing a child's stdin");
  }
}
}  // namespace detail

inline job<process> start_process(process_options o) {
  if (o.argv.empty()) throw std::invalid_argument("coro_jobs: start_process with an empty argv");
  event_loop& loop = *(co_await detail::this_job{})->loop->self;
  // Pipes, ours with O_CLOEXEC; the child's ends are dup2'd onto 0, 1 and 2.
  struct fds_t {
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
    ~fds_t() {
      for (int* p : {in, out, err})
        for (int i = 0; i < 2; ++i)
          if (p[i] >= 0) ::close(p[i]);
    }
  } f;
  auto make_pipe = [](int* p) {
    if (::pipe(p) != 0) throw std::system_error(errno, std::generic_category(), "coro_jobs: pipe");
    for (int i = 0; i < 2; ++i) ::fcntl(p[i], F_SETFD, FD_CLOEXEC);
  };
  if (o.input) make_pipe(f.in);
  if (o.out == stdio::capture) make_pipe(f.out);
  if (o.err == stdio::capture) make_pipe(f.err);
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&attr);
  struct spawn_cleanup {
    posix_spawn_file_actions_t* fa;
    posix_spawnattr_t* attr;
    ~spawn_cleanup() {
      posix_spawn_file_actions_destroy(fa);
      posix_spawnattr_destroy(attr);
    }
  } cleanup{&fa, &attr};
  if (o.input)
    posix_spawn_file_actions_adddup2(&fa, f.in[0], 0);
  else
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  auto connect = [&](stdio how, int* p, int target) {
    if (how == stdio::capture) posix_spawn_file_actions_adddup2(&fa, p[1], target);
    if (how == stdio::discard)
      posix_spawn_file_actions_addopen(&fa, target, "/dev/null", O_WRONLY, 0);
  };
  connect(o.out, f.out, 1);
  connect(o.err, f.err, 2);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 29)
  if (!o.cwd.empty()) posix_spawn_file_actions_addchdir_np(&fa, o.cwd.c_str());
#else
  if (!o.cwd.empty()) throw std::invalid_argument("coro_jobs: start_process: cwd needs glibc 2.29");
#endif
  sigset_t none, defaults;  // the child starts with no signal blocked and SIGPIPE at its default
  sigemptyset(&none);
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGPIPE);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  std::vector<char*> argv;
  for (auto& a : o.argv) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_strings;
  for (char** e = environ; e && *e; ++e) {
    const std::string_view kv(*e);
    const auto eq = kv.find('=');
    const bool replaced = std::any_of(o.env.begin(), o.env.end(),
                                      [&](const auto& p) { return kv.substr(0, eq) == p.first; });
    if (!replaced) env_strings.emplace_back(kv);
  }
  for (auto& [k, v] : o.env) env_strings.push_back(std::string(k).append("=").append(v));
  std::vector<char*> envp;
  envp.reserve(env_strings.size() + 1);
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = -1;
  if (const int e = ::posix_spawnp(&pid, argv[0], &fa, &attr, argv.data(), envp.data()); e != 0)
    throw std::system_error(e, std::generic_category(), "coro_jobs: start_process: " + o.argv[0]);
  process p;
  p.loop_ = &loop;
  p.pid_ = pid;
  p.pidfd_ = detail::open_pidfd(pid);
  if (p.pidfd_ >= 0) ::fcntl(p.pidfd_, F_SETFD, FD_CLOEXEC);
  p.grace_ = o.grace;
  if (o.out == stdio::capture) p.out_.emplace(std::exchange(f.out[0], -1), o.max_line);
  if (o.err == stdio::capture) p.err_.emplace(std::exchange(f.err[0], -1), o.max_line);
  if (o.input) {
    ::fcntl(f.in[1], F_SETFL, ::fcntl(f.in[1], F_GETFL) | O_NONBLOCK);
    p.in_fd_ = std::exchange(f.in[1], -1);
    p.writer_ = start_job(loop, detail::write_all(p.in_fd_, std::move(*o.input)), "process stdin");
  }
  co_return p;
}

inline process::process(process&& o) noexcept
    : loop_(o.loop_),
      pid_(std::exchange(o.pid_, -1)),
      pidfd_(std::exchange(o.pidfd_, -1)),
      in_fd_(std::exchange(o.in_fd_, -1)),
      out_(std::move(o.out_)),
      err_(std::move(o.err_)),
      grace_(o.grace_),
      writer_(std::move(o.writer_)),
      reaped_(o.reaped_) {
  o.out_.reset();
  o.err_.reset();
}
inline process& process::operator=(process&& o) noexcept {
  if (this != &o) {
    release();
    loop_ = o.loop_;
    pid_ = std::exchange(o.pid_, -1);
    pidfd_ = std::exchange(o.pidfd_, -1);
    in_fd_ = std::exchange(o.in_fd_, -1);
    out_ = std::move(o.out_);
    err_ = std::move(o.err_);
    o.out_.reset();
    o.err_.reset();
    grace_ = o.grace_;
    writer_ = std::move(o.writer_);
    reaped_ = o.reaped_;
  }
  return *this;
}
inline process::~process() { release(); }
inline void process::release() noexcept {
  if (writer_) writer_.cancel();  // it closes stdin as it unwinds
  writer_ = {};
  if (out_) ::close(out_->fd_);
  if (err_) ::close(err_->fd_);
  out_.reset();
  err_.reset();
  if (pid_ > 0 && !reaped_) {
    if (::waitpid(pid_, nullptr, WNOHANG) == 0) {  // still running: the loop finishes it
      ::kill(pid_, SIGTERM);
      try {
        start_job(
            *loop_,
            detail::finish_child(detail::child_guard(pid_, std::exchange(pidfd_, -1)), grace_),
            "process reaper");
      } catch (...) {  // out of memory, or the loop is shutting down: the guard killed and reaped
      }
    }
  }
  if (pidfd_ >= 0) ::close(pidfd_);
  pid_ = pidfd_ = -1;
}
inline line_reader& process::out() {
  if (!out_) throw std::logic_error("coro_jobs: process::out(): stdout was not captured");
  return *out_;
}
inline line_reader& process::err() {
  if (!err_) throw std::logic_error("coro_jobs: process::err(): stderr was not captured");
  return *err_;
}
inline job<exit_status> process::wait() {
  if (pid_ <= 0 || reaped_)
    throw std::logic_error("coro_jobs: process::wait() of an empty or already awaited process");
  const exit_status st = co_await detail::reap(pid_, pidfd_);
  reaped_ = true;
  co_return st;
}

inline job<std::optional<std::string>> line_reader::next_line() {
  constexpr std::size_t chunk = std::size_t(64) * 1024;
  for (;;) {
    const std::size_t nl = buf_.find('\n', start_ + scanned_);
    if ((nl == std::string::npos ? buf_.size() : nl) - start_ > max_)
      throw std::length_error("coro_jobs: line_reader: a line longer than max_line");
    if (nl != std::string::npos) {
      std::string line = buf_.substr(start_, nl - start_);
      start_ = nl + 1;
      scanned_ = 0;
      if (start_ >
          buf_.size() / 2) {  // compact: the buffer never holds more than a line and a read
        buf_.erase(0, start_);
        start_ = 0;
      }
      co_return line;
    }
    scanned_ = buf_.size() - start_;
    if (eof_) {
      if (scanned_ == 0) co_return std::nullopt;
      std::string last = buf_.substr(start_);
      buf_.clear();
      start_ = scanned_ = 0;
      co_return last;
    }
    co_await wait_readable(fd_);
    const std::size_t old = buf_.size();
    buf_.resize(old + chunk);
    const ssize_t n = detail::read_now(fd_, buf_.data() + old, chunk);
    buf_.resize(old + std::size_t(n > 0 ? n : 0));
    if (n == 0) eof_ = true;
    if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)
      throw std::system_error(errno, std::generic_category(), "coro_jobs: line_reader: read");
  }
}

inline job_scope::job_scope(event_loop& loop, restart policy)
    : loop_(&detail::access::impl(loop)), policy_(policy), owner_(loop_->owner) {}
inline void job_scope::check_thread(const char* what) const {
  if (std::this_thread::get_id() != owner_) detail::fail_logic(what);
}
inline job_scope::~job_scope() {
  if (std::this_thread::get_id() != owner_) {
    std::fputs("coro_jobs: job_scope destroyed on a thread that does not own the loop\n", stderr);
    std::terminate();
  }
  // Again while jobs started by catch blocks during the last round remain (bounded, in case
  // every unwinding starts another).
  for (int round = 0; round < 1000 && cancel_all() > 0; ++round) {
  }
  for (detail::job_ctx* j : jobs_) j->release();
  for (detail::job_ctx* j : queued_) j->release();
}
// run_latest: the job of that name that is waiting for its turn, if any, is cancelled (its
// body never runs); the one running, if any, is what the new one waits for.
inline detail::job_ctx* job_scope::take_turn(const std::string& name) {
  std::vector<detail::job_ctx*> waiting;  // held: unwinding may start jobs (see cancel_all)
  for (detail::job_ctx* j : queued_)
    if (!j->done() && j->extra.name() == name) waiting.push_back(j), ++j->refs;
  for (detail::job_ctx* j : waiting) {
    if (!j->done()) loop_->finish_now(j);
    unqueue(j);
    j->release();
  }
  for (detail::job_ctx* j : jobs_)
    if (!j->done() && j->extra.name() == name &&
        std::find(queued_.begin(), queued_.end(), j) == queued_.end())
      return j;
  return nullptr;
}
inline void job_scope::unqueue(detail::job_ctx* j) noexcept {
  auto it = std::find(queued_.begin(), queued_.end(), j);
  if (it == queued_.end()) return;
  queued_.erase(it);
  j->release();
}
inline std::size_t job_scope::size() {
  check_thread("coro_jobs: job_scope::size called from a thread that does not own the loop");
  std::size_t n = 0;
  for (detail::job_ctx* j : jobs_) n += !j->done();
  return n;
}
inline std::size_t job_scope::cancel_all() {
  check_thread("coro_jobs: job_scope::cancel_all called from a thread that does not own the loop");
  // Newest first, as the loop's destructor does. A job started during this (by a catch
  // block) is not in the copy: it is cancelled by the next cancel_all or the destructor.
  // Each entry is held: an unwinding job may start another, and adopt() then drops ended
  // jobs from jobs_.
  std::vector<detail::job_ctx*> snapshot(jobs_.rbegin(), jobs_.rend());
  for (detail::job_ctx* j : snapshot) ++j->refs;
  struct release_all {
    std::vector<detail::job_ctx*>& v;
    ~release_all() {
      for (detail::job_ctx* j : v) j->release();
    }
  } release{snapshot};
  const auto n = std::size_t(
      std::count_if(snapshot.begin(), snapshot.end(), [](auto* j) { return !j->done(); }));
  if (n > 0)  // else the loop may be gone (it ended them all): do not touch it
    loop_->finish_now(snapshot.data(), snapshot.data() + snapshot.size());
  return n;
}

}  // namespace coro_jobs

#endif  // CORO_JOBS_HPP
