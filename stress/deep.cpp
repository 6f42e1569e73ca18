// stress/deep.cpp - long and deep chains of jobs on a 1 MiB stack. Built twice: into the
// stress binary (CXXFLAGS) and on its own at -O0, where compilers are least likely to turn
// symmetric transfer into a real tail call. Each case runs in a child process, so a stack
// overflow fails its check instead of killing the suite.
#include "common.hpp"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define STRESS_SANITIZER_HEAP 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define STRESS_SANITIZER_HEAP 1
#endif
#endif
#ifdef STRESS_SANITIZER_HEAP
// Declared here rather than through <sanitizer/allocator_interface.h>, which Debian ships
// with clang but not with g++.
extern "C" std::size_t __sanitizer_get_current_allocated_bytes();
#else
#include <malloc.h>
#endif

namespace stress {
namespace {

constexpr std::size_t small_stack = 1 << 20;  // 1 MiB, as `ulimit -s 1024`

long chain_length() { return sized(10'000'000, 10'000'000, 1'000'000); }
int nesting_depth() { return 100'000; }

job<int> one() {
  live_frame f;
  co_return 1;
}

job<long> chain(long n) {
  long sum = 0;
  for (long i = 0; i < n; ++i) sum += co_await one();
  co_return sum;
}

job<int> depth(int n) {
  live_frame f;
  if (n == 0) co_return 0;
  co_return 1 + co_await depth(n - 1);
}

// Like depth(), but the innermost job waits: for cancellation and loop destruction.
job<int> depth_then_sleep(int n) {
  live_frame f;
  if (n == 0) {
    co_await sleep_task(1h);
    co_return 0;
  }
  co_return 1 + co_await depth_then_sleep(n - 1);
}

// Like depth(), but the innermost job throws; the top catches it.
job<int> depth_then_throw(int n) {
  live_frame f;
  if (n == 0) throw std::runtime_error("bottom");
  co_return 1 + co_await depth_then_throw(n - 1);
}

// Bytes the heap holds now (the sanitizers' allocators replace malloc's bookkeeping).
std::size_t heap_in_use() {
#ifdef STRESS_SANITIZER_HEAP
  return __sanitizer_get_current_allocated_bytes();
#else
  const struct mallinfo2 m = ::mallinfo2();
  return m.uordblks + m.hblkhd;
#endif
}

int timeout_nesting() { return static_cast<int>(sized(8'000, 8'000, 8'000)); }

// The innermost level of the with_timeout nest: waits until its task_return is called.
job<int> wait_for_return(std::optional<task_return<int>>& out) {
  live_frame f;
  co_return co_await callback_task<int>([&out](task_return<int> r) { out.emplace(std::move(r)); });
}

int when_all_nesting() { return static_cast<int>(sized(20'000, 20'000, 20'000)); }

// A when_all nested n deep: each level awaits a when_all whose one branch (a job of its own)
// is the level below; the innermost sleeps for an hour. `waiting` is set once it sleeps.
job<> nested_when_all(int n, bool& waiting) {
  live_frame f;
  if (n == 0) {
    waiting = true;
    co_await sleep_task(1h);
    co_return;
  }
  co_await when_all(nested_when_all(n - 1, waiting));
}

// Each child prints what it saw and exits 0 only if everything was as expected.
int report(const char* what, bool ok, const std::string& detail) {
  std::fprintf(stderr, "  child %s: %s (%s)\n", what, ok ? "ok" : "WRONG", detail.c_str());
  return ok ? 0 : 1;
}

int chain_child() {
  const long n = chain_length();
  long got = -1;
  on_small_stack(small_stack, [&] {
    event_loop loop;
    auto h = start_job(loop, chain(n));
    loop.run();
    got = h.done() ? h.result() : -1;
  });
  return report("chain", got == n && live_frame::live == 0,
                "sum " + std::to_string(got) + ", live " + std::to_string(live_frame::live));
}

int depth_child() {
  const int n = nesting_depth();
  int got = -1;
  on_small_stack(small_stack, [&] {
    event_loop loop;
    auto h = start_job(loop, depth(n));
    loop.run();
    got = h.done() ? h.result() : -1;
  });
  return report("depth", got == n && live_frame::live == 0,
                "result " + std::to_string(got) + ", live " + std::to_string(live_frame::live));
}

int cancel_deep_child() {
  const int n = nesting_depth();
  std::string outcome = "not run";
  long live_while_waiting = 0;
  on_small_stack(small_stack, [&] {
    event_loop loop;
    auto h = start_job(loop, depth_then_sleep(n));
    loop.run_once();
    live_while_waiting = live_frame::live;
    h.cancel();
    loop.run();
    try {
      h.result();
      outcome = "a value";
    } catch (const job_cancelled&) {
      outcome = "job_cancelled";
    }
  });
  return report("cancel", outcome == "job_cancelled" && live_while_waiting == n + 1 && live_frame::live == 0,
                outcome + ", live while waiting " + std::to_string(live_while_waiting) + ", after " +
                    std::to_string(live_frame::live));
}

int throw_deep_child() {
  const int n = nesting_depth();
  std::string caught = "nothing";
  on_small_stack(small_stack, [&] {
    event_loop loop;
    auto h = start_job(loop, depth_then_throw(n));
    loop.run();
    try {
      h.result();
    } catch (const std::runtime_error& e) {
      caught = e.what();
    }
  });
  return report("throw", caught == "bottom" && live_frame::live == 0,
                "caught " + caught + ", live " + std::to_string(live_frame::live));
}

int destroy_deep_child() {
  const int n = nesting_depth();
  long live_before = 0;
  on_small_stack(small_stack, [&] {
    event_loop loop;
    start_job(loop, depth_then_sleep(n));
    loop.run_once();
    live_before = live_frame::live;
  });
  return report("destroy", live_before == n + 1 && live_frame::live == 0,
                "live before " + std::to_string(live_before) + ", after " + std::to_string(live_frame::live));
}

// Every level of a with_timeout nest is a branch job named after the level above; the
// names must not be copied down the levels (memory and time quadratic in the depth: at
// 8,000 levels about 190 KB per level). A level itself is four frames and two job
// states, about 1.7 KB at -O0: the bound is 4 KiB.
int nested_timeouts_child() {
  const int n = timeout_nesting();
  std::size_t per_level = 0;
  int got = -1;
  on_small_stack(small_stack, [&] {
    event_loop loop;
    std::optional<task_return<int>> ret;
    const std::size_t before = heap_in_use();
    job<int> j = wait_for_return(ret);
    for (int i = 0; i < n; ++i) j = with_timeout(1h, std::move(j));
    auto h = start_job(loop, std::move(j), "top");
    if (!run_until(
            loop, [&] { return ret.has_value(); }, 60s)) return;
    per_level = (heap_in_use() - before) / std::size_t(n);
    (*ret)(7);
    ret.reset();
    if (!drain(loop, 60s)) return;
    got = h.done() ? h.result() : -1;
  });
  return report("nested-timeouts", got == 7 && per_level < 4096 && live_frame::live == 0,
                "result " + std::to_string(got) + ", " + std::to_string(per_level) +
                    " heap bytes per level, live " + std::to_string(live_frame::live));
}

// Cancels a job awaiting a when_all nested when_all_nesting() deep, by its handle
// (by_scope false: then the loop unwinds it, in one iteration, since every level is queued
// after the levels below it) or by job_scope::cancel_all (which unwinds it before it
// returns). The cancel used to recurse once per level through each level's group
// and branch (about 95 bytes a level at -O2, 320 under ASan), cancel_all once more through
// each level's unwinding (1.1 KiB a level under ASan): 12,000 levels overflowed 1 MiB.
int cancel_nested_when_all(const char* what, bool by_scope) {
  const int n = when_all_nesting();
  long live_while_waiting = 0, live_after_cancel = -1;
  std::string outcome = "not run";
  on_small_stack(small_stack, [&] {
    event_loop loop;
    job_scope scope(loop);
    bool waiting = false;
    auto h = by_scope ? scope.start(nested_when_all(n, waiting), "top")
                      : start_job(loop, nested_when_all(n, waiting), "top");
    if (!run_until(
            loop, [&] { return waiting; }, 60s)) return;
    live_while_waiting = live_frame::live;
    if (by_scope) {
      scope.cancel_all();
      live_after_cancel = live_frame::live;  // cancel_all has unwound every level already
    } else {
      h.cancel();
      loop.run_once();
      live_after_cancel = live_frame::live;
    }
    if (!drain(loop, 60s)) return;
    try {
      h.result();
      outcome = "no error";
    } catch (const job_cancelled&) {
      outcome = "job_cancelled";
    }
  });
  const bool ok = outcome == "job_cancelled" && live_while_waiting == n + 1 && live_after_cancel == 0 &&
                  live_frame::live == 0;
  return report(what, ok,
                outcome + ", live while waiting " + std::to_string(live_while_waiting) +
                    (by_scope ? ", after cancel_all " : ", after one iteration ") +
                    std::to_string(live_after_cancel) + ", after " + std::to_string(live_frame::live));
}
// The loop's destructor cancels every wait first, a when_all's through the same group stop.
int destroy_nested_when_all_child() {
  const int n = when_all_nesting();
  long live_before = 0;
  on_small_stack(small_stack, [&] {
    event_loop loop;
    bool waiting = false;
    start_job(loop, nested_when_all(n, waiting));
    if (!run_until(
            loop, [&] { return waiting; }, 60s)) return;
    live_before = live_frame::live;
  });
  return report("destroy-nested-when-all", live_before == n + 1 && live_frame::live == 0,
                "live before " + std::to_string(live_before) + ", after " + std::to_string(live_frame::live));
}
int cancel_nested_when_all_child() { return cancel_nested_when_all("cancel-nested-when-all", false); }
int scope_nested_when_all_child() { return cancel_nested_when_all("scope-nested-when-all", true); }

const register_child reg_chain("chain", chain_child);
const register_child reg_depth("depth", depth_child);
const register_child reg_cancel("cancel-deep", cancel_deep_child);
const register_child reg_throw("throw-deep", throw_deep_child);
const register_child reg_destroy("destroy-deep", destroy_deep_child);
const register_child reg_nested_timeouts("nested-timeouts", nested_timeouts_child);
const register_child reg_cancel_nested_when_all("cancel-nested-when-all", cancel_nested_when_all_child);
const register_child reg_scope_nested_when_all("scope-nested-when-all", scope_nested_when_all_child);
const register_child reg_destroy_nested_when_all("destroy-nested-when-all", destroy_nested_when_all_child);

}  // namespace
}  // namespace stress

using namespace stress;

TEST_CASE("a job awaiting 10,000,000 child jobs that complete at once runs on a 1 MiB stack") {
  stopwatch w;
  CHECK(spawn_child("chain") == "exit 0");
  STRESS_REPORT("chain of " << chain_length() << " awaits, 1 MiB stack", w);
}

TEST_CASE("100,000 nested child jobs run on a 1 MiB stack") {
  stopwatch w;
  CHECK(spawn_child("depth") == "exit 0");
  STRESS_REPORT(nesting_depth() << " nested jobs, 1 MiB stack", w);
}

TEST_CASE("cancelling a job 100,000 levels deep unwinds every level on a 1 MiB stack") {
  stopwatch w;
  CHECK(spawn_child("cancel-deep") == "exit 0");
  STRESS_REPORT(nesting_depth() << " nested jobs cancelled, 1 MiB stack", w);
}

TEST_CASE("an exception thrown 100,000 levels deep reaches the top on a 1 MiB stack") {
  stopwatch w;
  CHECK(spawn_child("throw-deep") == "exit 0");
  STRESS_REPORT(nesting_depth() << " nested jobs unwinding an exception, 1 MiB stack", w);
}

TEST_CASE("destroying a loop with 100,000 nested jobs pending works on a 1 MiB stack") {
  stopwatch w;
  CHECK(spawn_child("destroy-deep") == "exit 0");
  STRESS_REPORT(nesting_depth() << " nested jobs destroyed with the loop, 1 MiB stack", w);
}

TEST_CASE("8,000 nested with_timeouts take a bounded amount of memory per level on a 1 MiB stack") {
  stopwatch w;
  CHECK(spawn_child("nested-timeouts") == "exit 0");
  STRESS_REPORT(timeout_nesting() << " nested with_timeouts, 1 MiB stack", w);
}

TEST_CASE("cancelling a job that awaits a when_all nested 20,000 deep unwinds every level on a 1 MiB stack") {
  stopwatch w;
  CHECK(spawn_child("cancel-nested-when-all") == "exit 0");
  STRESS_REPORT(when_all_nesting() << " nested when_alls cancelled by the handle, 1 MiB stack", w);
}

TEST_CASE("job_scope::cancel_all of a job awaiting a when_all nested 20,000 deep unwinds every level on a 1 MiB stack") {
  stopwatch w;
  CHECK(spawn_child("scope-nested-when-all") == "exit 0");
  STRESS_REPORT(when_all_nesting() << " nested when_alls cancelled by job_scope::cancel_all, 1 MiB stack", w);
}

TEST_CASE("destroying a loop with a job awaiting a when_all nested 20,000 deep works on a 1 MiB stack") {
  stopwatch w;
  CHECK(spawn_child("destroy-nested-when-all") == "exit 0");
  STRESS_REPORT(when_all_nesting() << " nested when_alls destroyed with the loop, 1 MiB stack", w);
}
