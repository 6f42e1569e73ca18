// stress/random.cpp - randomized schedules. From a seed, generate programs of jobs that
// start, sleep, run threaded and callback tasks, await children and handles, cancel, throw,
// and sometimes have their loop destroyed mid-flight; run each and check the invariants:
//   - every job body that started ends exactly once (its frame is destroyed once);
//   - every error raised reaches exactly one place: a catch in an awaiting job, result(),
//     or the error handler (after the loop is gone: the stderr line of ~job_handle);
//   - no frame outlives its loop; the live counter returns to zero.
// Replay one program with STRESS_SEED=<seed> STRESS_PROGRAM=<index> (timing still varies:
// threads and timers race as they do in real use, the program itself is the same).
#include "common.hpp"

#include <cstdio>
#include <deque>
#include <memory>
#include <random>
#include <vector>

using namespace stress;

namespace {

enum class kind { sleep,
                  threaded,
                  callback,
                  child,
                  spawn,
                  await_handle,
                  cancel,
                  throw_ };
const char* const kind_names[] = {"sleep", "threaded", "callback", "child", "spawn", "await_handle", "cancel", "throw"};

struct op {
  kind k;
  int a = 0, b = 0;
  bool c = false;  // threaded/callback: fail; child/await: catch the error here
};
struct spec {
  std::vector<op> ops;
};
struct program {
  std::vector<spec> specs;  // specs[0 .. roots-1] are started by the harness
  int roots = 1;
  int destroy_after = -1;  // iterations before the loop is destroyed; -1: run to the end
  std::string describe() const {
    std::string s = "roots " + std::to_string(roots) + ", destroy_after " + std::to_string(destroy_after) + "\n";
    for (std::size_t i = 0; i < specs.size(); ++i) {
      s += "  job " + std::to_string(i) + ":";
      for (const op& o : specs[i].ops)
        s += std::string(" ") + kind_names[int(o.k)] + "(" + std::to_string(o.a) + "," + std::to_string(o.b) +
             (o.c ? ",c" : "") + ")";
      s += "\n";
    }
    return s;
  }
};

int gen_spec(program& p, std::mt19937_64& rng, int depth) {
  const int idx = int(p.specs.size());
  p.specs.emplace_back();
  const int n = 1 + int(rng() % 5);
  std::vector<op> ops;
  for (int i = 0; i < n; ++i) {
    op o;
    const int r = int(rng() % 13);
    o.k = r < 3 ? kind::sleep : r < 5 ? kind::threaded
                            : r < 7   ? kind::callback
                            : r < 9   ? kind::child
                            : r < 10  ? kind::spawn
                            : r < 11  ? kind::await_handle
                            : r < 12  ? kind::cancel
                                      : kind::throw_;
    if ((o.k == kind::child || o.k == kind::spawn) && depth >= 3) o.k = kind::sleep;
    o.a = int(rng() % 3);
    o.b = int(rng() % 1000);
    o.c = rng() % 3 == 0;
    if (o.k == kind::child || o.k == kind::spawn) o.a = gen_spec(p, rng, depth + 1);
    ops.push_back(o);
  }
  p.specs[std::size_t(idx)].ops = std::move(ops);
  return idx;
}

program generate(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  program p;
  p.roots = 1 + int(rng() % 3);
  for (int r = 0; r < p.roots; ++r) p.specs.emplace_back();
  for (int r = 0; r < p.roots; ++r) {
    // Generate root r's body as spec r (children are appended after the roots).
    const int tmp = gen_spec(p, rng, 1);
    p.specs[std::size_t(r)] = p.specs[std::size_t(tmp)];
    p.specs[std::size_t(tmp)].ops.clear();  // unreferenced placeholder
  }
  p.destroy_after = rng() % 3 == 0 ? int(rng() % 12) : -1;
  return p;
}

struct stress_error : std::runtime_error {
  int id;
  explicit stress_error(int i) : std::runtime_error("E" + std::to_string(i) + "."), id(i) {}
};

// Calls task_returns from a thread of its own: the "foreign thread" completions.
class completer {
 public:
  completer() : t_([this] { loop(); }) {}
  ~completer() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    cv_.notify_one();
    t_.join();
  }
  void push(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(m_);
      q_.push_back(std::move(fn));
    }
    cv_.notify_one();
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !q_.empty(); });
      if (q_.empty()) return;
      auto fn = std::move(q_.front());
      q_.pop_front();
      lock.unlock();
      fn();
      fn = nullptr;
      lock.lock();
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
  bool stop_ = false;
  std::thread t_;
};

struct world {
  const program* prog = nullptr;
  event_loop* loop = nullptr;
  completer* comp = nullptr;
  std::vector<job_handle<int>> harness;  // held by the harness: read with result() at the end
  std::vector<int> ended;                // per job instance: how often its sentinel died
  std::atomic<int> next_error{0};
  std::vector<int> raised, observed;  // per error id (loop thread only)
  std::vector<std::string> faults;    // anything unexpected
  void grow(int id) {
    if (std::size_t(id) >= raised.size()) {
      raised.resize(std::size_t(id) + 1, 0);
      observed.resize(std::size_t(id) + 1, 0);
    }
  }
  void raise(int id) { grow(id), ++raised[std::size_t(id)]; }
  void observe(int id) { grow(id), ++observed[std::size_t(id)]; }
  void observe_what(const std::string& what) {
    if (what.size() > 1 && what[0] == 'E')
      observe(std::atoi(what.c_str() + 1));
    else
      faults.push_back("unexpected error: " + what);
  }
};

struct sentinel {
  world& w;
  std::size_t id;
  explicit sentinel(world& ww) : w(ww), id(ww.ended.size()) { w.ended.push_back(0); }
  sentinel(const sentinel&) = delete;
  ~sentinel() { ++w.ended[id]; }
};

job<int> run_spec(world& w, int s) {
  sentinel guard(w);
  live_frame f;
  std::vector<job_handle<int>> mine;
  int sum = 0;
  const std::vector<op>& ops = w.prog->specs[std::size_t(s)].ops;
  for (const op& o : ops) {
    switch (o.k) {
      case kind::sleep:
        co_await sleep_task(std::chrono::microseconds(o.a == 0 ? 0 : o.b * o.a));
        break;
      case kind::threaded: {
        const int eid = o.c ? w.next_error++ : -1;
        try {
          sum += co_await threaded_task([eid, spin = o.b % 30] {
            const auto until = steady_clock::now() + std::chrono::microseconds(spin);
            while (steady_clock::now() < until) {
            }
            if (eid >= 0) throw stress_error(eid);
            return 1;
          });
        } catch (const stress_error& e) {
          w.raise(e.id);
          if (o.b % 2) throw;
          w.observe(e.id);
        }
        break;
      }
      case kind::callback: {
        const int eid = o.c ? w.next_error++ : -1;
        try {
          sum += co_await callback_task<int>([&w, &o, eid](task_return<int> r) {
            auto finish = [r, eid] {
              if (eid >= 0)
                r.fail(std::make_exception_ptr(stress_error(eid)));
              else
                r(1);
            };
            if (o.a == 0)
              w.loop->post(finish);
            else if (o.a == 1)
              w.comp->push(finish);
            else
              w.loop->call_later(std::chrono::microseconds(o.b), finish);
          });
        } catch (const stress_error& e) {
          w.raise(e.id);
          if (o.b % 2) throw;
          w.observe(e.id);
        }
        break;
      }
      case kind::child:
        try {
          sum += co_await run_spec(w, o.a);
        } catch (const stress_error& e) {
          if (!o.c) throw;
          w.observe(e.id);
        }
        break;
      case kind::spawn: {
        auto h = start_job(*w.loop, run_spec(w, o.a));
        if (o.b % 3 == 1) mine.push_back(h);
        if (o.b % 3 == 2) w.harness.push_back(h);
        break;
      }
      case kind::await_handle:
        if (!mine.empty()) {
          auto h = mine.back();
          mine.pop_back();
          try {
            sum += co_await h;
          } catch (const stress_error& e) {
            if (!o.c) throw;
            w.observe(e.id);
          }
        }
        break;
      case kind::cancel:
        if (o.a == 0 && !mine.empty())
          mine.back().cancel();
        else if (!w.harness.empty())
          w.harness[std::size_t(o.b) % w.harness.size()].cancel();  // maybe itself
        break;
      case kind::throw_: {
        const int eid = w.next_error++;
        w.raise(eid);
        throw stress_error(eid);
      }
    }
  }
  co_return sum;
}

// Captures what the library prints to stderr (fd 2) while it is alive.
class stderr_capture {
 public:
  stderr_capture() {
    std::fflush(stderr);
    file_ = std::tmpfile();
    saved_ = ::dup(2);
    if (file_ && saved_ >= 0) ::dup2(::fileno(file_), 2);
  }
  std::string finish() {
    std::fflush(stderr);
    if (saved_ >= 0) {
      ::dup2(saved_, 2);
      ::close(saved_);
      saved_ = -1;
    }
    std::string s;
    if (file_) {
      std::rewind(file_);
      char buf[4096];
      std::size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, file_)) > 0) s.append(buf, n);
      std::fclose(file_);
      file_ = nullptr;
    }
    return s;
  }
  ~stderr_capture() { finish(); }

 private:
  std::FILE* file_ = nullptr;
  int saved_ = -1;
};

// Runs one program; returns a description of every broken invariant (empty: all held).
std::vector<std::string> run_program(const program& p, completer& comp, long& jobs_run, long& errors_raised) {
  world w;
  w.prog = &p;
  w.comp = &comp;
  live_frame::live = 0;
  {
    auto loop = std::make_unique<event_loop>();
    w.loop = loop.get();
    loop->set_error_handler([&w](std::string_view, std::exception_ptr e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        w.observe_what(x.what());
      }
    });
    for (int r = 0; r < p.roots; ++r) w.harness.push_back(start_job(*loop, run_spec(w, r)));
    if (p.destroy_after < 0) {
      if (!drain(*loop, 20s)) w.faults.push_back("the loop did not go idle within 20 s");
    } else {
      for (int i = 0; i < p.destroy_after && loop->run_once(); ++i) {
      }
    }
    stderr_capture cap;
    loop.reset();
    w.loop = nullptr;
    const std::string printed = cap.finish();
    // Each line must be "coro_jobs: NAME failed: E<id>." (~job_handle after the loop).
    bool unexpected = false;
    std::size_t pos = 0;
    while (pos < printed.size()) {
      std::size_t eol = printed.find('\n', pos);
      if (eol == std::string::npos) eol = printed.size();
      const std::string l = printed.substr(pos, eol - pos);
      pos = eol + 1;
      const std::size_t at = l.find(" failed: E");
      if (l.rfind("coro_jobs: ", 0) == 0 && at != std::string::npos && !l.empty() && l.back() == '.')
        w.observe(std::atoi(l.c_str() + at + 10));
      else if (!l.empty())
        unexpected = true;
    }
    if (unexpected) {
      std::fputs(printed.c_str(), stderr);
      w.faults.push_back("unexpected stderr output");
    }
  }
  if (live_frame::live != 0) w.faults.push_back(std::to_string(live_frame::live.load()) + " frames outlived the loop");
  for (auto& h : w.harness) {
    if (!h.done()) {
      w.faults.push_back("a harness handle is not done after the loop ended");
      continue;
    }
    try {
      h.result();
    } catch (const stress_error& e) {
      w.observe(e.id);
    } catch (const job_cancelled&) {
    } catch (const std::exception& e) {
      w.faults.push_back(std::string("result() threw ") + e.what());
    }
  }
  w.harness.clear();
  for (std::size_t i = 0; i < w.ended.size(); ++i)
    if (w.ended[i] != 1)
      w.faults.push_back("job instance " + std::to_string(i) + " ended " + std::to_string(w.ended[i]) + " times");
  w.grow(w.next_error);
  for (std::size_t i = 0; i < w.raised.size(); ++i) {
    if (w.raised[i] > 1) w.faults.push_back("error E" + std::to_string(i) + " raised twice");
    if (w.observed[i] != w.raised[i])
      w.faults.push_back("error E" + std::to_string(i) + " raised " + std::to_string(w.raised[i]) +
                         " time(s), seen " + std::to_string(w.observed[i]) + " time(s)");
  }
  if (live_frame::live != 0) w.faults.push_back("live counter " + std::to_string(live_frame::live.load()));
  jobs_run += long(w.ended.size());
  for (int r : w.raised) errors_raised += r;
  return w.faults;
}

std::uint64_t program_seed(std::uint64_t base, long i) {
  std::uint64_t z = base + 0x9e3779b97f4a7c15ULL * std::uint64_t(i + 1);  // splitmix64
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

TEST_CASE("thousands of random programs of jobs, tasks, cancels, throws and loop destruction keep every invariant") {
  const std::uint64_t base = base_seed();
  const char* only = std::getenv("STRESS_PROGRAM");
  const long first = only ? std::atol(only) : 0;
  const long count = only ? 1 : sized(10'000, 5'000, 1'000);
  MESSAGE("seed " << base << ", programs " << first << ".." << first + count - 1
                  << " (replay one with STRESS_SEED=" << base << " STRESS_PROGRAM=<index>)");
  completer comp;
  long jobs_run = 0, errors_raised = 0, destroyed = 0, failed = 0;
  stopwatch w;
  for (long i = first; i < first + count; ++i) {
    const program p = generate(program_seed(base, i));
    destroyed += p.destroy_after >= 0;
    const auto faults = run_program(p, comp, jobs_run, errors_raised);
    if (!faults.empty()) {
      std::string all;
      for (const auto& f : faults) all += "  " + f + "\n";
      FAIL_CHECK("program " << i << " broke invariants; replay with STRESS_SEED=" << base
                            << " STRESS_PROGRAM=" << i << "\n"
                            << all << p.describe());
      if (++failed >= 5) break;
    }
  }
  MESSAGE(count << " programs (" << destroyed << " with the loop destroyed mid-flight), " << jobs_run
                << " job bodies, " << errors_raised << " errors raised");
  STRESS_REPORT(count << " random programs", w);
}
