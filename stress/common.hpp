// stress/common.hpp - shared setup of the stress suite: sizes, bounded loop driving, live
// counters. Every wait here has a deadline, so a hang becomes a failed check.
#ifndef CORO_JOBS_STRESS_COMMON_HPP
#define CORO_JOBS_STRESS_COMMON_HPP

#include <doctest/doctest.h>

#include "coro_jobs.hpp"

#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace stress {

using namespace coro_jobs;
using namespace std::chrono_literals;
using std::chrono::steady_clock;

// ---- Build kind: sanitizers make everything slower and bigger, so sizes shrink with them.

#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool asan = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool asan = true;
#else
inline constexpr bool asan = false;
#endif
#else
inline constexpr bool asan = false;
#endif

#if defined(__SANITIZE_THREAD__)
inline constexpr bool tsan = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr bool tsan = true;
#else
inline constexpr bool tsan = false;
#endif
#else
inline constexpr bool tsan = false;
#endif

#if defined(__OPTIMIZE__)
inline constexpr bool optimized = true;
#else
inline constexpr bool optimized = false;
#endif

// "plain", "asan" or "tsan", and " -O0" when built without optimisation.
inline std::string build_label() {
  return std::string(asan ? "asan" : tsan ? "tsan"
                                          : "plain") +
         (optimized ? "" : " -O0");
}

// A size for this build: `plain` normally, smaller under a sanitizer. STRESS_SCALE (a
// factor, e.g. 0.1 or 2) scales every size further, for quick runs or longer soaks.
inline double env_scale() {
  static const double s = [] {
    const char* e = std::getenv("STRESS_SCALE");
    const double v = e ? std::atof(e) : 1.0;
    return v > 0 ? v : 1.0;
  }();
  return s;
}
inline long sized(long plain, long under_asan, long under_tsan) {
  const long n = asan ? under_asan : tsan ? under_tsan
                                          : plain;
  return std::max(1L, static_cast<long>(static_cast<double>(n) * env_scale()));
}

// The seed of the randomized cases: STRESS_SEED if set, else a fixed default (so a plain
// run is reproducible); every case prints the seed it used.
inline std::uint64_t base_seed(std::uint64_t fallback = 20240525) {
  const char* e = std::getenv("STRESS_SEED");
  return e ? std::strtoull(e, nullptr, 0) : fallback;
}

// Collects what reaches the loop's error handler.
struct error_log {
  std::vector<std::string> names, whats;
  explicit error_log(event_loop& loop) {
    loop.set_error_handler([this](std::string_view name, std::exception_ptr e) {
      names.emplace_back(name);
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        whats.emplace_back(x.what());
      } catch (...) {
        whats.emplace_back("?");
      }
    });
  }
};

// ---- Live counters: a struct whose constructors and destructor count instances.

template <class Tag>
struct counted {
  static inline std::atomic<long> live{0};
  counted() noexcept { ++live; }
  counted(const counted&) noexcept { ++live; }
  counted& operator=(const counted&) noexcept = default;
  ~counted() { --live; }
};
struct frame_tag {};
using live_frame = counted<frame_tag>;  // one in every job frame of the suite

// ---- A watchdog: wakes a blocked loop once a deadline has passed.
//
// run_once() may block in poll for as long as something is pending. A post() from another
// thread is the one public way to wake it, so a background thread posts a no-op to the
// armed loop once its deadline passes (and again every 50 ms until disarmed). The driving
// helpers then see the deadline and fail instead of hanging.

class watchdog {
 public:
  static watchdog& get() {
    static watchdog* w = new watchdog;  // never destroyed: its thread runs until exit
    return *w;
  }
  void arm(event_loop& loop, steady_clock::time_point deadline) {
    std::lock_guard<std::mutex> lock(m_);
    loop_ = &loop;
    deadline_ = deadline;
    cv_.notify_one();
  }
  void disarm() {
    std::lock_guard<std::mutex> lock(m_);  // a post in progress ends before the loop can die
    loop_ = nullptr;
  }

 private:
  watchdog() {
    std::thread([this] {
      std::unique_lock<std::mutex> lock(m_);
      for (;;) {
        if (!loop_) {
          cv_.wait(lock);
        } else if (steady_clock::now() < deadline_) {
          cv_.wait_until(lock, deadline_);
        } else {
          loop_->post([] {});
          cv_.wait_for(lock, 50ms);
        }
      }
    }).detach();
  }
  std::mutex m_;
  std::condition_variable cv_;
  event_loop* loop_ = nullptr;
  steady_clock::time_point deadline_{};
};

struct armed {
  armed(event_loop& loop, steady_clock::time_point deadline) { watchdog::get().arm(loop, deadline); }
  ~armed() { watchdog::get().disarm(); }
  armed(const armed&) = delete;
  armed& operator=(const armed&) = delete;
};

// Drives the loop one iteration at a time until pred() holds. Fails the check (and returns
// false) if the deadline passes first or the loop runs out of work with pred() still false.
template <class Pred>
bool run_until(event_loop& loop, Pred&& pred, std::chrono::milliseconds limit = 20s) {
  const auto deadline = steady_clock::now() + limit;
  armed guard(loop, deadline);
  while (!pred()) {
    if (steady_clock::now() >= deadline) {
      FAIL_CHECK("run_until: the condition did not hold within " << limit.count() << " ms");
      return false;
    }
    if (!loop.run_once() && !pred()) {
      FAIL_CHECK("run_until: the loop went idle before the condition held");
      return false;
    }
  }
  return true;
}

// Runs the loop until nothing is pending; fails the check if that takes longer than limit.
inline bool drain(event_loop& loop, std::chrono::milliseconds limit = 20s) {
  const auto deadline = steady_clock::now() + limit;
  armed guard(loop, deadline);
  while (loop.run_once()) {
    if (steady_clock::now() >= deadline) {
      FAIL_CHECK("drain: the loop was still busy after " << limit.count() << " ms");
      return false;
    }
  }
  return true;
}

// Waits (off the loop) until pred() holds, for at most limit. For conditions that other
// threads make true; the condition is re-checked on every notify and every millisecond.
template <class Pred>
bool wait_for_condition(Pred&& pred, std::chrono::milliseconds limit = 20s) {
  const auto deadline = steady_clock::now() + limit;
  std::mutex m;
  std::condition_variable cv;
  std::unique_lock<std::mutex> lock(m);
  while (!pred()) {
    if (steady_clock::now() >= deadline) return false;
    cv.wait_for(lock, 1ms);  // a poll interval, not a synchronisation: pred decides
  }
  return true;
}

inline bool all_zero(const loop_stats& s) {
  return s.jobs == 0 && s.timers == 0 && s.fd_waits == 0 && s.outstanding == 0 && s.ready == 0;
}
inline std::string to_string(const loop_stats& s) {
  return "{jobs " + std::to_string(s.jobs) + ", timers " + std::to_string(s.timers) +
         ", fd_waits " + std::to_string(s.fd_waits) + ", outstanding " +
         std::to_string(s.outstanding) + ", ready " + std::to_string(s.ready) + "}";
}

// ---- Timing and reporting

struct stopwatch {
  steady_clock::time_point t0 = steady_clock::now();
  double ms() const { return std::chrono::duration<double, std::milli>(steady_clock::now() - t0).count(); }
};

// Prints one line per case: its sizes and how long it took, so runs can be compared.
#define STRESS_REPORT(sizes, watch)                               \
  MESSAGE("[" << ::stress::build_label() << "] " << sizes << ": " \
              << static_cast<long>((watch).ms()) << " ms")

// ---- Small fixtures

struct pipe_fds {
  int r = -1, w = -1;
  pipe_fds() {
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    r = fds[0];
    w = fds[1];
  }
  ~pipe_fds() { close_both(); }
  void close_both() {
    if (r >= 0) ::close(r);
    if (w >= 0) ::close(w);
    r = w = -1;
  }
  pipe_fds(const pipe_fds&) = delete;
  pipe_fds& operator=(const pipe_fds&) = delete;
};

// Runs fn on a fresh thread whose stack is `bytes` big (the `ulimit -s 1024` of the brief,
// made testable), and waits for it. False if the thread could not be made.
inline bool on_small_stack(std::size_t bytes, std::function<void()> fn) {
  pthread_attr_t attr;
  if (pthread_attr_init(&attr) != 0) return false;
  bool ok = pthread_attr_setstacksize(&attr, bytes) == 0;
  pthread_t t;
  auto body = [](void* p) -> void* {
    (*static_cast<std::function<void()>*>(p))();
    return nullptr;
  };
  ok = ok && pthread_create(&t, &attr, body, &fn) == 0;
  pthread_attr_destroy(&attr);
  if (ok) pthread_join(t, nullptr);
  return ok;
}

// ---- Child processes: a case that may crash (a stack overflow) runs in a fresh copy of
// this binary, so the crash becomes a failed check and the other cases still run.

using child_fn = int (*)();
inline std::map<std::string, child_fn>& children() {
  static std::map<std::string, child_fn> m;
  return m;
}
struct register_child {
  register_child(const char* name, child_fn fn) { children()[name] = fn; }
};

// main() calls this for `--stress-child=NAME`; the child dies by SIGALRM if it hangs.
inline int run_child(const char* name, unsigned limit_seconds = 120) {
  auto it = children().find(name);
  if (it == children().end()) {
    std::fprintf(stderr, "no stress child named %s\n", name);
    return 2;
  }
  ::alarm(limit_seconds);
  return it->second();
}

// Runs child NAME in a new process and describes how it ended: "exit 0" is a pass.
inline std::string spawn_child(const char* name) {
  const std::string arg = std::string("--stress-child=") + name;
  char exe[] = "/proc/self/exe";
  char* argv[] = {exe, const_cast<char*>(arg.c_str()), nullptr};
  pid_t pid;
  if (int e = ::posix_spawn(&pid, exe, nullptr, nullptr, argv, environ))
    return std::string("posix_spawn failed: ") + std::strerror(e);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return "killed by signal " + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) + ")";
  return "ended oddly";
}

}  // namespace stress

#endif  // CORO_JOBS_STRESS_COMMON_HPP
