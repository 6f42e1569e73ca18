// bench/common.hpp - what every C++ benchmark program shares: flags, sizes, the timer-delay
// sequence, statistics, rusage and the RESULT lines that bench/report.py parses.
#ifndef CORO_JOBS_BENCH_COMMON_HPP
#define CORO_JOBS_BENCH_COMMON_HPP

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>

namespace bench {

using clk = std::chrono::steady_clock;

// The workload sizes. --quick divides them for smoke runs; every program uses these.
struct sizes {
  int w1_jobs = 1000, w1_yields = 1000;
  int w2_jobs = 1000000, w2_max_ms = 1000;
  int w3_seq = 100000, w3_jobs = 64, w3_each = 1562;
  int w4_short = 1000, w4_long = 300;  // sleeps of 1 ms and of 10 ms
  int w5_ms = 2000;
};

struct options {
  bool quick = false;
  std::string only;  // empty: all workloads
  sizes n;
  bool want(const char* w) const {
    if (only.empty()) return true;
    const std::string s = "," + only + ",";
    return s.find("," + std::string(w) + ",") != std::string::npos;
  }
};

inline options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) {
      o.quick = true;
    } else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) {
      o.only = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--only W1,W2,...]\n", argv[0]);
      std::exit(2);
    }
  }
  if (o.quick) {
    o.n.w1_yields = 100;
    o.n.w2_jobs = 20000;
    o.n.w2_max_ms = 200;
    o.n.w3_seq = 5000;
    o.n.w3_each = 50;
    o.n.w4_short = 50;
    o.n.w4_long = 10;
    o.n.w5_ms = 200;
  }
  return o;
}

inline void result(const char* workload, const char* metric, double value) {
  std::printf("RESULT %s %s %.6g\n", workload, metric, value);
  std::fflush(stdout);
}

[[noreturn]] inline void fail(const char* workload, const char* what) {
  std::fprintf(stderr, "FAILED %s: %s\n", workload, what);
  std::exit(1);
}

inline void check(bool ok, const char* workload, const char* what) {
  if (!ok) fail(workload, what);
}

// The W2 delays: the first n outputs of std::mt19937 seeded with 12345, modulo max_ms.
// bench/peer_asyncio.py computes the same sequence with its own MT19937.
inline std::vector<int> delays(int n, int max_ms) {
  std::mt19937 gen(12345);
  std::vector<int> d(static_cast<std::size_t>(n));
  for (auto& x : d) x = int(gen() % std::uint32_t(max_ms));
  return d;
}

// The q-quantile (0..1) of v, which it reorders.
template <class T> double quantile(std::vector<T>& v, double q) {
  if (v.empty()) return 0;
  auto k = std::size_t(q * double(v.size() - 1) + 0.5);
  std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(k), v.end());
  return double(v[k]);
}

inline double seconds(clk::duration d) { return std::chrono::duration<double>(d).count(); }

// Peak resident set size so far, in bytes: VmHWM of /proc/self/status. (Not getrusage's
// ru_maxrss: Linux carries that over exec from the parent, here the Python driver.)
inline long peak_rss() {
  long kb = -1;
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "VmHWM: %ld kB", &kb) == 1) break;
    std::fclose(f);
  }
  return kb * 1024L;
}
// CPU time of the process (user + system), in seconds.
inline double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}
// Voluntary context switches of the calling thread: how often it blocked.
inline long thread_blocks() {
  rusage u{};
  getrusage(RUSAGE_THREAD, &u);
  return u.ru_nvcsw;
}

// Lateness in microseconds of a sequence of sleeps, reported as p50, p99 and max.
inline void report_lateness_us(const char* w, const char* prefix, std::vector<double>& late_us) {
  const double mx = *std::max_element(late_us.begin(), late_us.end());
  std::string m = prefix;
  result(w, (m + "_late_p50_us").c_str(), quantile(late_us, 0.50));
  result(w, (m + "_late_p99_us").c_str(), quantile(late_us, 0.99));
  result(w, (m + "_late_max_us").c_str(), mx);
}

// W2's figures, the same for every system: late holds each job's lateness in ms.
inline void report_w2(int n, double wall_s, long rss0, long rss1, std::vector<float>& late) {
  check(*std::min_element(late.begin(), late.end()) >= 0, "W2", "a sleep ended early");
  result("W2", "jobs", n);
  result("W2", "wall_s", wall_s);
  result("W2", "bytes_per_job", double(rss1 - rss0) / n);
  result("W2", "late_p50_ms", quantile(late, 0.50));
  result("W2", "late_p99_ms", quantile(late, 0.99));
}

// W3's function, run by every system's pool; it counts the calls made off the loop thread.
inline std::thread::id loop_thread;
inline std::atomic<long> off_loop{0};
inline int trivial(int x) {
  if (std::this_thread::get_id() != loop_thread) off_loop.fetch_add(1, std::memory_order_relaxed);
  return x + 1;
}

// W5's figures: CPU time, blocking waits (ours: polls; peers: context switches), switches.
inline void report_w5(double cpu_s, long blocking_waits, long ctx_switches) {
  result("W5", "cpu_ms", cpu_s * 1e3);
  result("W5", "blocking_waits", double(blocking_waits));
  result("W5", "ctx_switches", double(ctx_switches));
}

// Every program's main: the workloads W1..W5 that --only selects, in order.
template <class... W> int run_workloads(int argc, char** argv, W... w) {
  const auto o = parse(argc, argv);
  int i = 0;
  ((++i, o.want(("W" + std::to_string(i)).c_str()) ? w(o) : void()), ...);
  return 0;
}

}  // namespace bench

#endif
