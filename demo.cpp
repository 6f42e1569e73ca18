// demo.cpp - the recipe's story: a window whose buttons start long jobs and never freeze.
//
// A script clicks buttons on a terminal "window" (each click is an event_loop::call_later
// timer) and each click starts a job that reads like sequential code:
//   Download  a blocking function on a worker thread (threaded_task), with a progress bar
//   Convert   the same kind of job, stopped halfway by a click on Cancel (job_handle::cancel)
//   Sleep     co_awaits sleep_task and shows how long it really slept
//   Fetch     its worker thread throws; the job shows the error, and so does result()
//   Save      asks a question in a "dialog" (callback_task) answered by a click on Yes
// Meanwhile a heartbeat job redraws the window at 10 Hz: if anything blocked the loop thread,
// the clock and spinner would stop. That responsiveness is what the recipe is about.
//
// On a terminal the window is redrawn in place; otherwise (`./build/demo | cat`) each event
// is printed as one line, with a status line every second. The script ends after ~6 s.
//
// To add a scene: write its job and its on_* function, add them to `row_order` and `buttons`,
// and add its clicks to `script`.

#include "coro_jobs.hpp"

#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <deque>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

using namespace coro_jobs;
using namespace std::chrono_literals;
using std::chrono::steady_clock;

namespace {

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[256];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  return buf;
}

// One line of the window per job-starting button: what its job last said, and its progress.
struct row {
  std::string name;
  std::string status = "idle";
  std::atomic<int> percent{-1};  // -1: no bar. Written by a worker thread, read by draw().
};

struct window {
  explicit window(bool tty) : tty(tty) {}

  bool tty;  // redraw in place with ANSI codes, or print one line per event
  steady_clock::time_point t0 = steady_clock::now();
  std::deque<row> rows;  // a deque, because a row holds an atomic and must never move
  std::vector<std::string> log;
  std::vector<job_handle<>> jobs;  // every job a click started, for Cancel and the summary
  std::optional<task_return<bool>> dialog;  // set while the Save dialog waits for an answer
  int ticks = 0, drawn = 0;

  double seconds() const { return std::chrono::duration<double>(steady_clock::now() - t0).count(); }

  row& at(std::string_view name) {
    for (row& r : rows)
      if (r.name == name) return r;
    row& r = rows.emplace_back();
    r.name = name;
    return r;
  }

  void event(const std::string& what) {
    log.push_back(format("[%.2fs] %s", seconds(), what.c_str()));
    if (!tty) std::printf("%s\n", log.back().c_str());
  }

  // A job reports through its row; the terminal shows it at the next tick.
  void say(row& r, std::string status) {
    r.status = std::move(status);
    event(r.name + ": " + r.status);
  }

  // Starts a job for the button's row; the body runs on the loop's next iteration.
  template <class Body>
  std::string start(std::string_view name, Body body) {
    row& r = at(name);
    r.status = "started";
    jobs.push_back(start_job(body(*this, r), std::string(name)));
    return "job started";
  }

  int running() const {
    int n = 0;
    for (const auto& h : jobs) n += !h.done();
    return n;
  }

  void draw();
};

std::string bar(int percent) {
  if (percent < 0) return std::string(24, ' ');
  const int full = percent * 20 / 100;
  return format("[%s%s] %3d%%", std::string(full, '#').c_str(), std::string(20 - full, '.').c_str(),
                percent);
}

void window::draw() {
  if (!tty) {  // a pipe gets a status line a second, enough to see the clock never stopped
    if (ticks % 10 != 0) return;
    std::string s = format("[%.2fs] status: tick %d, %d job(s) running", seconds(), ticks, running());
    for (const row& r : rows)
      if (int p = r.percent.load(); p >= 0) s += format(", %s %d%%", r.name.c_str(), p);
    std::printf("%s\n", s.c_str());
    return;
  }
  std::vector<std::string> lines;
  const char spinner[] = "|/-\\";
  lines.push_back(format(" coro_jobs demo   %c %5.1fs   tick %-4d  %d job(s) running",
                         spinner[ticks % 4], seconds(), ticks, running()));
  lines.push_back(std::string(72, '-'));
  for (const row& r : rows)
    lines.push_back(format(" %-9s %s  %s", r.name.c_str(), bar(r.percent.load()).c_str(),
                           r.status.c_str()));
  lines.push_back(std::string(72, '-'));
  for (std::size_t i = log.size() < 4 ? 0 : log.size() - 4; i < log.size(); ++i)
    lines.push_back(" " + log[i]);
  while (lines.size() < rows.size() + 7) lines.emplace_back();  // fixed height: the log fills up

  // Move up over the previous frame and overwrite it line by line, clearing each.
  if (drawn) std::printf("\x1b[%dA", drawn);
  for (const auto& l : lines) std::printf("\r\x1b[2K%s\n", l.c_str());
  drawn = int(lines.size());
  std::fflush(stdout);
}

// --- The blocking functions: what a click handler must never call on the loop thread -----

// Copies `chunks` chunks, 30 ms each. A thread cannot be interrupted from outside, so it
// checks its stop token between chunks; Cancel then frees the worker within one chunk.
int copy_blocking(std::stop_token stop, std::atomic<int>* percent, int chunks) {
  for (int i = 1; i <= chunks; ++i) {
    if (stop.stop_requested()) return -1;  // nobody will see the value: the job was cancelled
    std::this_thread::sleep_for(30ms);
    percent->store(i * 100 / chunks);
  }
  return chunks * 64;  // KiB
}

std::string fetch_blocking(std::stop_token, std::string host) {
  std::this_thread::sleep_for(700ms);  // a DNS lookup that takes its time, then fails
  throw std::runtime_error("cannot resolve " + host);
}

// --- The jobs: sequential code, with a co_await wherever the recipe has a yield ------------

job<> download(window& w, row& r) {
  w.say(r, "downloading");
  int kib = co_await threaded_task(copy_blocking, &r.percent, 100);
  w.say(r, format("done, %d KiB", kib));
}

job<> convert(window& w, row& r) {
  w.say(r, "converting");
  try {
    co_await threaded_task(copy_blocking, &r.percent, 120);
    w.say(r, "done");
  } catch (const job_cancelled&) {
    w.say(r, "cancelled");
    throw;  // a cancelled job must end cancelled: swallowing it would report success
  }
}

job<> nap(window& w, row& r) {
  w.say(r, "sleeping 1.5 s");
  auto slept = co_await sleep_task(1500ms);
  w.say(r, format("slept %.3f s", std::chrono::duration<double>(slept).count()));
}

job<> fetch(window& w, row& r) {
  w.say(r, "fetching example.invalid");
  try {
    co_await threaded_task(fetch_blocking, std::string("example.invalid"));
  } catch (const std::runtime_error& e) {  // not std::exception: that would catch job_cancelled
    w.say(r, std::string("failed: ") + e.what());
    throw;  // and result() sees it too
  }
}

// The dialog's answer comes later, from whoever calls task_return: here the Yes button.
job<> save(window& w, row& r) {
  w.say(r, "dialog: overwrite report.txt? [Yes] [No]");
  bool yes = co_await callback_task<bool>([&w](task_return<bool> answer) {
    w.dialog = std::move(answer);
    return [&w] { w.dialog.reset(); };  // if the job is cancelled, close the dialog
  });
  w.say(r, yes ? "saved report.txt" : "kept the old report.txt");
}

// The window's heartbeat, a job like the others: it only ticks if nothing blocks the loop.
job<> heartbeat(window& w) {
  // Aim at the next tenth of a second rather than 100 ms after the last draw, so the tick
  // count stays at ten a second however long drawing takes.
  for (auto next = steady_clock::now();;) {
    next += 100ms;
    co_await sleep_task(next - steady_clock::now());
    ++w.ticks;
    w.draw();
  }
}

// --- The buttons: one function per button; each returns what the click did ----------------

// A click handler runs on the loop thread, so it only starts a job and returns at once.
std::string on_download(window& w) { return w.start("Download", download); }
std::string on_convert(window& w) { return w.start("Convert", convert); }
std::string on_sleep(window& w) { return w.start("Sleep", nap); }
std::string on_fetch(window& w) { return w.start("Fetch", fetch); }
std::string on_save(window& w) { return w.start("Save", save); }

std::string on_cancel(window& w) {
  for (auto& h : w.jobs)
    if (h.name() == "Convert" && h.cancel()) return "Convert cancelled";
  return "nothing to cancel";
}

std::string on_yes(window& w) {
  if (!w.dialog) return "no dialog open";
  (*std::exchange(w.dialog, std::nullopt))(true);
  return "dialog answered";
}

struct button {
  std::string_view name;
  std::string (*on_click)(window&);
};
const button buttons[] = {
    {"Download", on_download}, {"Convert", on_convert}, {"Sleep", on_sleep},
    {"Fetch", on_fetch},       {"Save", on_save},       {"Cancel", on_cancel},
    {"Yes", on_yes},
};
// The window's rows, top to bottom.
const std::string_view row_order[] = {"Download", "Convert", "Sleep", "Fetch", "Save"};

// What a tester would click by hand, and when. Several jobs overlap from 2.0 s to 3.5 s.
struct click {
  steady_clock::duration at;
  std::string_view button;
};
const click script[] = {
    {500ms, "Download"}, {1000ms, "Convert"}, {1500ms, "Sleep"}, {2000ms, "Fetch"},
    {2800ms, "Cancel"},  {3600ms, "Save"},    {4800ms, "Yes"},
};
constexpr auto script_end = 5800ms;

void press(window& w, std::string_view name) {
  std::string what = "no such button";
  for (const button& b : buttons)
    if (b.name == name) what = b.on_click(w);
  w.event(format("click %.*s -> %s", int(name.size()), name.data(), what.c_str()));
}

}  // namespace

int main() {
  window w(::isatty(1) == 1);
  for (auto name : row_order) w.at(name);
  // Made after the window, so destroyed before it: job frames refer to the window. (Worker
  // threads do too, and the loop does not wait for them: the script quits after they end.)
  event_loop loop;

  for (const click& c : script) loop.call_later(c.at, [&w, c] { press(w, c.button); });
  // The heartbeat never ends, so run() would never run out of work: the script quits it.
  loop.call_later(script_end, [&] {
    w.event("end of script: closing the window");
    loop.quit();
  });
  start_job(heartbeat(w), "heartbeat");

  if (w.tty) std::printf("\x1b[?25l");  // hide the cursor while redrawing
  loop.run();
  if (w.tty) {
    w.draw();
    std::printf("\x1b[?25h");
  }

  // Every job's outcome as its handle reports it: a value, job_cancelled, or its exception.
  std::printf("summary:\n");
  for (auto& h : w.jobs) {
    try {
      h.result();
      std::printf("  %-9s finished\n", h.name().data());
    } catch (const job_cancelled&) {
      std::printf("  %-9s cancelled\n", h.name().data());
    } catch (const std::exception& e) {
      std::printf("  %-9s failed: %s\n", h.name().data(), e.what());
    }
  }
}
