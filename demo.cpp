// demo.cpp - the recipe's story: a window whose buttons start long jobs and never freeze.
//
// A script clicks buttons on a terminal "window" (each click is an event_loop::call_later
// timer) and each click starts a job that reads like sequential code:
//   Download       a blocking function on a worker thread (threaded_task), its progress bar
//                  fed by a progress<int> reporter
//   Convert        the same kind of job, stopped halfway by a click on Cancel (job_handle::cancel)
//   Sleep          co_awaits sleep_task and shows how long it really slept
//   Fetch          runs a real program (start_process) and shows its lines as it prints them;
//                  it fails, and the job shows its error, as does result()
//   Save           asks a question in a "dialog" (callback_task) answered by a click on Yes
//   Ping           with_timeout(500 ms) around a reply that never comes: timeout_error. Started
//                  with restart::ignore_while_running, so a second quick click is ignored
//   Freeze         the bad button: 200 ms of busy work on the loop thread, no co_await. The
//                  clock stops, and the loop's watchdog (set_watchdog) names the culprit
//   Download both  when_all of two downloads, two progress bars, one result
//   Close window   the window owns a job_scope that started every job; closing it cancels
//                  the running ones and returns only after they have unwound
// Meanwhile a heartbeat job redraws the window at 10 Hz: if anything blocked the loop thread,
// the clock and spinner would stop. That responsiveness is what the recipe is about.
//
// On a terminal the window is redrawn in place; otherwise (`./build/demo | cat`) each event
// is printed as one line, with a status line every second. The script ends after ~6.5 s.
//
// `./build/demo --interactive` leaves the clicking to a person: each button has a key, shown
// in the window, read from the terminal in raw mode by a job that co_awaits wait_readable on
// stdin. `q` (or Ctrl-C, or Ctrl-D) closes the window; the terminal is restored on every way
// out, a SIGTERM or SIGHUP included.
//
// To add a scene: write its job and its on_* function, add them to `row_order` and `buttons`,
// and add its clicks to `script`.

#include "coro_jobs.hpp"

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

#include <cerrno>
#include <csignal>
#include <cstring>

#include <termios.h>
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

double to_seconds(steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }

// One line of the window: what a job last said in it, and its progress. Only the loop
// thread touches it: workers report through progress<int>, which delivers on the loop.
struct row {
  std::string name;
  std::string status = "idle";
  int percent = -1;  // -1: no bar
};

struct window {
  window(event_loop& loop, bool tty) : loop(loop), scope(loop), tty(tty) {}

  event_loop& loop;
  // Every job of the window is started through its scope, so closing the window (close())
  // can cancel them and know they are over: no job touches the window after it has gone.
  job_scope scope;
  bool tty;  // redraw in place with ANSI codes, or print one line per event
  steady_clock::time_point t0 = steady_clock::now();
  std::deque<row> rows;  // a deque, because jobs hold references to rows as rows are added
  std::vector<std::string> log;
  std::vector<job_handle<>> jobs;           // every job a click started, for Cancel and the summary
  std::optional<task_return<bool>> dialog;  // set while the Save dialog waits for an answer
  std::optional<task_return<>> pong;        // set while Ping waits for a reply
  bool closing = false;
  std::vector<std::string> unwound;  // jobs whose unwinding ran while the window closed
  int ticks = 0, drawn = 0;

  double seconds() const { return to_seconds(steady_clock::now() - t0); }

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

  // Starts a job for the button's row through the window's scope; the body runs on the
  // loop's next iteration. With restart::ignore_while_running a click while the button's
  // job runs starts nothing (the scope drops the new job unstarted): its size stays the same.
  template <class Body>
  std::string start(std::string_view name, Body body, restart policy = restart::run_another);

  std::string close();

  int running() const {
    int n = 0;
    for (const auto& h : jobs) n += !h.done();
    return n;
  }

  void draw();
};

// The buttons and their keys, as lines that fit the window; defined with the buttons below.
std::vector<std::string> keys_lines();

// Every job of the window runs inside this one, which notes in the window when the job is
// unwound by the window's close: that is how close() can show that its jobs had finished
// unwinding (catch blocks run, frames destroyed) before cancel_all() returned.
template <class T> job<> tracked(window& w, std::string name, row* r, job<T> body) {
  try {
    co_await std::move(body);
  } catch (const job_cancelled&) {
    if (w.closing) {
      w.unwound.push_back(name);
      if (r) w.say(*r, "cancelled by Close, unwound");
    }
    throw;  // a cancelled job must end cancelled: swallowing it would report success
  }
}

template <class Body> std::string window::start(std::string_view name, Body body, restart policy) {
  row& r = at(name);
  const std::size_t live = scope.size();
  auto h =
      scope.start(tracked(*this, std::string(name), &r, body(*this, r)), std::string(name), policy);
  if (scope.size() == live) return "ignored: " + std::string(name) + " is still running";
  r.status = "started";
  jobs.push_back(std::move(h));
  return "job started";
}

// Closing the window: cancel_all() cancels every live job of the scope and returns only once
// each has unwound, so the window may be destroyed right after. The app quits with it.
std::string window::close() {
  std::string live;
  for (const job_info& j : loop.jobs())  // newest first, branches of when_all included
    live += format("%s%s (%s)", live.empty() ? "" : ", ", j.name.c_str(),
                   *j.waiting_on ? j.waiting_on : j.state);
  event("live jobs: " + live);
  closing = true;
  const std::size_t n = scope.cancel_all();
  std::string names;
  for (const auto& u : unwound) names += (names.empty() ? "" : ", ") + u;
  event("unwound before cancel_all() returned: " + names);
  loop.quit();
  return format("closed: %zu jobs cancelled and unwound", n);
}

std::string bar(int percent) {
  if (percent < 0) return std::string(24, ' ');
  const int full = percent * 20 / 100;
  return format("[%s%s] %3d%%", std::string(full, '#').c_str(), std::string(20 - full, '.').c_str(),
                percent);
}

void window::draw() {
  if (!tty) {  // a pipe gets a status line a second, enough to see the clock never stopped
    if (ticks % 10 != 0) return;
    std::string s =
        format("[%.2fs] status: tick %d, %d job(s) running", seconds(), ticks, running());
    for (const row& r : rows)
      if (r.percent >= 0) s += format(", %s %d%%", r.name.c_str(), r.percent);
    std::printf("%s\n", s.c_str());
    return;
  }
  std::vector<std::string> lines;
  const char spinner[] = "|/-\\";
  lines.push_back(format(" coro_jobs demo   %c %5.1fs   tick %-4d  %d job(s) running",
                         spinner[ticks % 4], seconds(), ticks, running()));
  lines.push_back(std::string(78, '-'));
  for (const row& r : rows)
    lines.push_back(
        format(" %-13s %s  %s", r.name.c_str(), bar(r.percent).c_str(), r.status.c_str()));
  lines.push_back(std::string(78, '-'));
  for (auto& k : keys_lines()) lines.push_back(std::move(k));
  lines.push_back(std::string(78, '-'));
  for (std::size_t i = log.size() < 5 ? 0 : log.size() - 5; i < log.size(); ++i)
    lines.push_back(" " + log[i]);
  while (lines.size() < rows.size() + 12) lines.emplace_back();  // fixed height: the log fills up

  // Move up over the previous frame and overwrite it line by line, clearing each. A line
  // longer than the terminal would wrap and throw the count off, so lines are clipped.
  if (drawn) std::printf("\x1b[%dA", drawn);
  for (const auto& l : lines) std::printf("\r\x1b[2K%.79s\n", l.c_str());
  drawn = int(lines.size());
  std::fflush(stdout);
}

// --- The blocking functions: what a click handler must never call on the loop thread -----

// Copies `chunks` chunks, 30 ms each. A thread cannot be interrupted from outside, so it
// checks its stop token between chunks; a cancel then frees the worker within one chunk.
// It reports progress through a reporter it holds by value, never through the job's or the
// window's memory: a worker may still be finishing its chunk after the loop is gone.
int copy_blocking(std::stop_token stop, progress<int>::reporter report, int chunks) {
  for (int i = 1; i <= chunks; ++i) {
    if (stop.stop_requested()) return -1;  // nobody will see the value: the job was cancelled
    std::this_thread::sleep_for(30ms);
    report(i * 100 / chunks);
  }
  return chunks * 64;  // KiB
}


// --- The jobs: sequential code, with a co_await wherever the recipe has a yield ------------

// A copy on a worker thread, its progress shown in row r. The progress object lives in this
// frame: once the job ends, late reports from the worker are dropped.
job<int> copy(window& w, row& r, const char* doing, int chunks) {
  w.say(r, doing);
  progress<int> p([&r](int percent) { r.percent = percent; });  // runs on the loop thread
  try {
    int kib = co_await threaded_task(copy_blocking, p.get_reporter(), chunks);
    w.say(r, format("done, %d KiB", kib));
    co_return kib;
  } catch (const job_cancelled&) {
    w.say(r, format("cancelled at %d%%", r.percent));
    throw;
  }
}

job<> download(window& w, row& r) { co_await copy(w, r, "downloading", 60); }

job<> convert(window& w, row& r) { co_await copy(w, r, "converting", 120); }

// Two downloads at once, each a job of its own (a branch) with its own bar; the results come
// back together. Cancelling this job cancels both branches.
job<> download_both(window& w, row& r) {
  w.say(r, "downloading a.iso and b.iso");
  auto [a, b] = co_await when_all(copy(w, w.at("a.iso"), "downloading", 40),
                                  copy(w, w.at("b.iso"), "downloading", 100));
  w.say(r, format("done, %d KiB in all", a + b));
}

job<> nap(window& w, row& r) {
  w.say(r, "sleeping 1.5 s");
  auto slept = co_await sleep_task(1500ms);
  w.say(r, format("slept %.3f s", to_seconds(slept)));
}

// A real program (a lookup that takes its time, then fails), run without blocking the loop:
// each line it prints shows up as it comes. Its error becomes the job's: result() sees it.
job<> fetch(window& w, row& r) {
  process_options o;
  o.argv = {"sh", "-c",
            "for i in 1 2 3; do echo \"resolving example.invalid ($i)\"; sleep 0.2; done;"
            "echo 'cannot resolve example.invalid' >&2; exit 6"};
  process p = co_await start_process(std::move(o));
  while (auto line = co_await p.out().next_line()) w.say(r, *line);
  std::string why = co_await process::read_all(p.err());
  const exit_status st = co_await p.wait();
  if (st.code == 0) co_return;
  if (!why.empty() && why.back() == '\n') why.pop_back();
  w.say(r, "failed: " + why + " (exit " + std::to_string(st.code) + ")");
  throw std::runtime_error(why);
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

// A host that never answers: without a timeout the job would wait forever.
job<> ping(window& w, row& r) {
  w.say(r, "pinging 192.0.2.1");
  const auto t0 = steady_clock::now();
  try {
    co_await with_timeout(500ms, callback_task<void>([&w](task_return<> reply) {
                            w.pong = std::move(reply);        // nobody will ever call it
                            return [&w] { w.pong.reset(); };  // the timeout cancels the wait
                          }));
    w.say(r, "pong");
  } catch (const timeout_error&) {
    w.say(r, format("timed out after %.1f s", to_seconds(steady_clock::now() - t0)));
  }
}

// The bad button: 200 ms of work on the loop thread with no co_await, so nothing else runs
// meanwhile (the clock stops). Such work belongs in threaded_task; the watchdog says so.
job<> freeze(window& w, row& r) {
  w.say(r, "computing on the loop thread");
  const auto until = steady_clock::now() + 200ms;
  while (steady_clock::now() < until) {
  }
  w.say(r, "done, and the window froze meanwhile");
  co_return;
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
// An impatient user clicks Ping twice: one ping at a time is enough.
std::string on_ping(window& w) { return w.start("Ping", ping, restart::ignore_while_running); }
std::string on_freeze(window& w) { return w.start("Freeze", freeze); }
std::string on_download_both(window& w) { return w.start("Download both", download_both); }
std::string on_close(window& w) { return w.close(); }

std::string on_cancel(window& w) {
  for (auto& h : w.jobs)
    if (h.name() == "Convert" && h.cancel()) return "Convert cancelled";
  return "nothing to cancel";
}

// The dialog's two buttons answer the Save job's question.
std::string answer(window& w, bool yes) {
  if (!w.dialog) return "no dialog open";
  (*std::exchange(w.dialog, std::nullopt))(yes);
  return "dialog answered";
}
std::string on_yes(window& w) { return answer(w, true); }
std::string on_no(window& w) { return answer(w, false); }

// Each button has a key, for --interactive; the window shows them.
struct button {
  std::string_view name;
  char key;
  std::string (*on_click)(window&);
};
const button buttons[] = {
    {"Download", 'd', on_download},
    {"Convert", 'c', on_convert},
    {"Sleep", 's', on_sleep},
    {"Fetch", 'f', on_fetch},
    {"Save", 'v', on_save},
    {"Cancel", 'x', on_cancel},
    {"Yes", 'y', on_yes},
    {"No", 'n', on_no},
    {"Ping", 'p', on_ping},
    {"Freeze", 'z', on_freeze},
    {"Download both", 'b', on_download_both},
    {"Close window", 'q', on_close},
};

std::vector<std::string> keys_lines() {
  std::vector<std::string> lines(1, " keys:");
  for (const button& b : buttons) {
    std::string k = format("  %c %.*s", b.key, int(b.name.size()), b.name.data());
    if (lines.back().size() + k.size() > 78) lines.emplace_back("      ");
    lines.back() += k;
  }
  return lines;
}
// The window's rows, top to bottom (a.iso and b.iso are Download both's two bars).
const std::string_view row_order[] = {"Download", "Convert", "Sleep",         "Fetch", "Save",
                                      "Ping",     "Freeze",  "Download both", "a.iso", "b.iso"};

// What a tester would click by hand, and when. Several jobs overlap throughout; the window
// is closed while Download both and the second Sleep are still running.
struct click {
  steady_clock::duration at;
  std::string_view button;
};
const click script[] = {
    {300ms, "Download"}, {800ms, "Convert"},        {1300ms, "Sleep"},
    {1800ms, "Fetch"},   {2300ms, "Cancel"},        {2600ms, "Ping"},
    {2800ms, "Ping"},    {3400ms, "Freeze"},        {3700ms, "Save"},
    {4400ms, "Yes"},     {4700ms, "Download both"}, {5100ms, "Ping"},  // the first ended
    {5400ms, "Sleep"},   {6500ms, "Close window"},  // the last click: the app quits
};

void press(window& w, std::string_view name) {
  std::string what = "no such button";
  for (const button& b : buttons)
    if (b.name == name) what = b.on_click(w);
  w.event(format("click %.*s -> %s", int(name.size()), name.data(), what.c_str()));
}

// --- --interactive: a person presses the keys -----------------------------------------------

// The terminal in raw mode while it lives: each key arrives at once, unechoed, and Ctrl-C is
// a key (ISIG off) rather than a signal, so it closes the window like `q` and the jobs unwind.
// The destructor restores the terminal on a normal return or an exception; a SIGTERM or SIGHUP
// restores it in the handler (tcsetattr is async-signal-safe) and then ends the program as
// that signal would.
class raw_terminal {
 public:
  explicit raw_terminal(int fd) : fd_(fd) {
    if (::tcgetattr(fd_, &saved_) != 0) throw std::runtime_error("stdin is not a terminal");
    termios raw = saved_;
    raw.c_lflag &= ~tcflag_t(ICANON | ECHO | ISIG | IEXTEN);
    raw.c_iflag &= ~tcflag_t(IXON | ICRNL);
    raw.c_cc[VMIN] = 1;
    raw.c_cc[VTIME] = 0;
    active_ = this;
    for (int sig : {SIGTERM, SIGHUP}) std::signal(sig, on_signal);
    ::tcsetattr(fd_, TCSAFLUSH, &raw);
  }
  ~raw_terminal() {
    show_cursor();
    ::tcsetattr(fd_, TCSAFLUSH, &saved_);
    for (int sig : {SIGTERM, SIGHUP}) std::signal(sig, SIG_DFL);
    active_ = nullptr;
  }
  raw_terminal(const raw_terminal&) = delete;
  raw_terminal& operator=(const raw_terminal&) = delete;

 private:
  // The window hides the cursor while it redraws; write() is async-signal-safe, printf is not.
  static void show_cursor() { [[maybe_unused]] auto n = ::write(STDOUT_FILENO, "\x1b[?25h", 6); }
  static void on_signal(int sig) {
    show_cursor();
    if (active_) ::tcsetattr(active_->fd_, TCSANOW, &active_->saved_);
    std::signal(sig, SIG_DFL);
    std::raise(sig);
  }
  static inline raw_terminal* active_ = nullptr;
  int fd_;
  termios saved_{};
};

// Reads keys while the window is open: one co_await per burst of keys, no thread, no polling.
// Close window is posted rather than pressed here: closing cancels every job of the window's
// scope, this one included, and is better done from outside any of them.
job<> keyboard(window& w) {
  for (;;) {
    co_await wait_readable(STDIN_FILENO);
    char keys[64];
    const ssize_t n = ::read(STDIN_FILENO, keys, sizeof keys);
    if (n < 0 && errno == EINTR) continue;
    for (ssize_t i = 0; i < (n > 0 ? n : 1); ++i) {
      const char key = n > 0 ? keys[i] : 'q';  // end of input (or an error) closes the window
      const bool quit = key == 'q' || key == 3 || key == 4;  // q, Ctrl-C, Ctrl-D
      if (quit) {
        w.loop.post([&w] { press(w, "Close window"); });
        co_return;
      }
      for (const button& b : buttons)
        if (b.key == key) press(w, b.name);
    }
  }
}

void run(bool interactive) {
  event_loop loop;
  // Made after the loop, so destroyed before it, as its job_scope must be; the scope's jobs
  // refer to the window, and closing it (the last click) has ended them all.
  window w(loop, ::isatty(1) == 1);
  for (auto name : row_order) w.at(name);

  // Anything that holds the loop thread longer than 100 ms is named in the window.
  loop.set_watchdog(100ms, [&w](std::string_view who, steady_clock::duration held) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(held).count();
    w.event(format("watchdog: %.*s held the loop for %lld ms", int(who.size()), who.data(),
                   static_cast<long long>(ms)));
  });

  if (interactive)
    w.scope.start(keyboard(w), "keyboard");
  else
    for (const click& c : script) loop.call_later(c.at, [&w, c] { press(w, c.button); });
  // The heartbeat never ends: it belongs to the window, and Close window ends it with the rest.
  w.scope.start(tracked(w, "heartbeat", nullptr, heartbeat(w)), "heartbeat");

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
      std::printf("  %-13s finished\n", h.name().data());
    } catch (const job_cancelled&) {
      std::printf("  %-13s cancelled\n", h.name().data());
    } catch (const std::exception& e) {
      std::printf("  %-13s failed: %s\n", h.name().data(), e.what());
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool interactive = argc == 2 && std::strcmp(argv[1], "--interactive") == 0;
  if (argc > 1 && !interactive) {
    std::fprintf(stderr, "usage: %s [--interactive]\n", argv[0]);
    return 2;
  }
  if (interactive && (!::isatty(STDIN_FILENO) || !::isatty(STDOUT_FILENO))) {
    std::fprintf(stderr, "demo: --interactive needs a terminal on stdin and stdout\n");
    return 2;
  }
  // Made before the loop, so restored after everything; the catch makes sure the stack is
  // unwound (and the terminal restored) when something throws.
  std::optional<raw_terminal> raw;
  try {
    if (interactive) raw.emplace(STDIN_FILENO);
    run(interactive);
  } catch (const std::exception& e) {
    raw.reset();
    std::fprintf(stderr, "demo: %s\n", e.what());
    return 1;
  }
}
