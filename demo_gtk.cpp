// demo_gtk.cpp - the recipe's story in a real GTK 4 window: buttons start long jobs, and the
// window never freezes. The jobs are coro_jobs jobs on an event_loop that runs inside GTK's
// own GMainContext (hosts/coro_jobs_glib.hpp), so a click handler starts a job and returns.
//
// A row per job: its button, a progress bar and a status label.
//   Download       a blocking function on a worker thread (threaded_task), its bar fed by a
//                  progress<int> reporter
//   Convert        the same kind of job, stopped halfway by Cancel (job_handle::cancel)
//   Fetch          a worker whose function throws: the error shows in its label and in result()
//   Sleep          co_awaits sleep_task and shows how long it really slept
//   Save           awaits a real GtkMessageDialog's "response" with callback_task<bool>: no
//                  nested main loop; cancelling the job closes the dialog
//   Ping           with_timeout(500 ms) around a reply that never comes: timeout_error
//   Freeze         the bad button: 200 ms of busy work on the loop thread. The spinner and the
//                  clock stop, and the loop's watchdog (set_watchdog) names the culprit
//   Download both  when_all of two downloads, two bars, one result
//   closing        the window owns a job_scope; close-request cancels it (cancel_all), and every
//                  job has unwound before the window goes
// A heartbeat job updates the clock ten times a second and keeps the spinner spinning while
// jobs run: if anything blocked the loop thread, both would stop.
//
//   ./build/demo_gtk                      a script clicks the buttons (emitting "clicked", so the
//                                         handlers a person would run) and closes the window
//   ./build/demo_gtk --interactive        no script; ends when the window closes
//   ./build/demo_gtk --screenshot F.png   the script, and a picture of the window mid-way

#include "coro_jobs.hpp"
#include "hosts/coro_jobs_glib.hpp"

#include <gtk/gtk.h>

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <deque>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

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

// One row of the window. Only the loop thread touches it (which is GTK's thread too):
// workers report through progress<int>, which delivers on the loop.
struct row {
  std::string name;
  GtkWidget* button = nullptr;  // a.iso and b.iso have none: they are Download both's bars
  GtkWidget* bar = nullptr;
  GtkWidget* label = nullptr;
};

struct window {
  window(event_loop& loop) : loop(loop), scope(loop) {}

  event_loop& loop;
  // Every job of the window is started through its scope, so closing the window can cancel
  // them and know they are over: no job touches a widget after the window has gone.
  job_scope scope;
  GtkWidget* win = nullptr;
  GtkWidget* spinner = nullptr;
  GtkWidget* clock = nullptr;
  GtkWidget* log_label = nullptr;
  GtkWidget* cancel = nullptr;
  GtkWidget* dialog_widget = nullptr;
  GMainLoop* main_loop = nullptr;
  steady_clock::time_point t0 = steady_clock::now();
  std::deque<row> rows;  // a deque: jobs hold references to rows
  std::vector<std::string> log;
  std::vector<job_handle<>> jobs;           // every job a click started, for Cancel and the summary
  std::optional<task_return<bool>> dialog;  // set while Save's dialog waits for an answer
  std::optional<task_return<>> pong;        // set while Ping waits for a reply
  bool closing = false;
  std::vector<std::string> unwound;  // jobs whose unwinding ran while the window closed
  int ticks = 0;

  double seconds() const { return to_seconds(steady_clock::now() - t0); }

  row& at(std::string_view name) {
    for (row& r : rows)
      if (r.name == name) return r;
    throw std::logic_error("no row " + std::string(name));
  }

  void event(const std::string& what) {
    log.push_back(format("[%.2fs] %s", seconds(), what.c_str()));
    std::printf("%s\n", log.back().c_str());
    std::string tail;
    for (std::size_t i = log.size() < 5 ? 0 : log.size() - 5; i < log.size(); ++i)
      tail += (tail.empty() ? "" : "\n") + log[i];
    gtk_label_set_text(GTK_LABEL(log_label), tail.c_str());
  }

  void say(row& r, std::string status) {
    gtk_label_set_text(GTK_LABEL(r.label), status.c_str());
    event(r.name + ": " + status);
  }

  static void set_percent(row& r, int percent) {
    gtk_progress_bar_set_fraction(GTK_PROGRESS_BAR(r.bar), percent / 100.0);
    gtk_progress_bar_set_text(GTK_PROGRESS_BAR(r.bar), format("%d%%", percent).c_str());
  }

  template <class Body>
  std::string start(std::string_view name, Body body, restart policy = restart::run_another);

  int running() const {
    int n = 0;
    for (const auto& h : jobs) n += !h.done();
    return n;
  }
};

// Every job of the window runs inside this one, which notes when the window's close unwinds
// it: that is how the close can show its jobs had unwound before cancel_all() returned.
template <class T> job<> tracked(window& w, std::string name, row* r, job<T> body) {
  try {
    co_await std::move(body);
  } catch (const job_cancelled&) {
    if (w.closing) {
      w.unwound.push_back(name);
      if (r) w.say(*r, "cancelled by closing the window, unwound");
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
  gtk_label_set_text(GTK_LABEL(r.label), "started");
  jobs.push_back(std::move(h));
  return "job started";
}

// --- The blocking functions: what a click handler must never call on the loop thread -----

// Copies `chunks` chunks, 30 ms each, checking its stop token between chunks. It reports
// through a reporter held by value, never through the window: a worker may still be
// finishing a chunk after the window has gone.
int copy_blocking(std::stop_token stop, progress<int>::reporter report, int chunks) {
  for (int i = 1; i <= chunks; ++i) {
    if (stop.stop_requested()) return -1;  // nobody will see the value: the job was cancelled
    std::this_thread::sleep_for(30ms);
    report(i * 100 / chunks);
  }
  return chunks * 64;  // KiB
}

// A lookup that gets a third of the way and fails: its exception becomes the job's.
int fetch_blocking(std::stop_token stop, progress<int>::reporter report) {
  for (int i = 1; i <= 10; ++i) {
    if (stop.stop_requested()) return -1;
    std::this_thread::sleep_for(30ms);
    report(i * 100 / 30);
  }
  throw std::runtime_error("cannot resolve example.invalid");
}

// --- The jobs: sequential code, with a co_await wherever the recipe has a yield ------------

job<int> copy(window& w, row& r, const char* doing, int chunks) {
  w.say(r, doing);
  progress<int> p([&r](int percent) { window::set_percent(r, percent); });  // on the loop thread
  try {
    int kib = co_await threaded_task(copy_blocking, p.get_reporter(), chunks);
    w.say(r, format("done, %d KiB", kib));
    co_return kib;
  } catch (const job_cancelled&) {
    w.say(r, format("cancelled at %.0f%%",
                    100 * gtk_progress_bar_get_fraction(GTK_PROGRESS_BAR(r.bar))));
    throw;
  }
}

job<> download(window& w, row& r) { co_await copy(w, r, "downloading", 60); }

job<> convert(window& w, row& r) { co_await copy(w, r, "converting", 120); }

job<> download_both(window& w, row& r) {
  w.say(r, "downloading a.iso and b.iso");
  auto [a, b] = co_await when_all(copy(w, w.at("a.iso"), "downloading", 40),
                                  copy(w, w.at("b.iso"), "downloading", 100));
  w.say(r, format("done, %d KiB in all", a + b));
}

job<> fetch(window& w, row& r) {
  w.say(r, "resolving example.invalid");
  progress<int> p([&r](int percent) { window::set_percent(r, percent); });
  try {
    co_await threaded_task(fetch_blocking, p.get_reporter());
  } catch (const std::runtime_error& e) {
    w.say(r, std::string("failed: ") + e.what());
    throw;  // the handle's result() sees it too
  }
}

job<> nap(window& w, row& r) {
  w.say(r, "sleeping 1.5 s");
  auto slept = co_await sleep_task(1500ms);
  w.say(r, format("slept %.3f s", to_seconds(slept)));
}

void on_dialog_response(GtkDialog*, int response, gpointer data) {
  auto& w = *static_cast<window*>(data);
  if (!w.dialog) return;
  auto answer = std::move(*std::exchange(w.dialog, std::nullopt));
  gtk_window_destroy(GTK_WINDOW(std::exchange(w.dialog_widget, nullptr)));
  answer(response == GTK_RESPONSE_YES);  // resumes Save on the loop's next iteration
}

// A real dialog, not modal: the window stays usable while Save waits for the answer.
job<> save(window& w, row& r) {
  w.say(r, "asking: overwrite report.txt?");
  auto ask = [&w](task_return<bool> answer) {
    w.dialog = std::move(answer);
    w.dialog_widget =
        gtk_message_dialog_new(GTK_WINDOW(w.win), GTK_DIALOG_DESTROY_WITH_PARENT,
                               GTK_MESSAGE_QUESTION, GTK_BUTTONS_YES_NO, "Overwrite report.txt?");
    g_signal_connect(w.dialog_widget, "response", G_CALLBACK(on_dialog_response), &w);
    gtk_window_present(GTK_WINDOW(w.dialog_widget));
    return [&w] {  // the job was cancelled: close the dialog, nobody will answer it
      w.dialog.reset();
      if (w.dialog_widget) gtk_window_destroy(GTK_WINDOW(std::exchange(w.dialog_widget, nullptr)));
    };
  };
  bool yes = co_await callback_task<bool>(ask);
  w.say(r, yes ? "saved report.txt" : "kept the old report.txt");
}

job<> ping(window& w, row& r) {
  w.say(r, "pinging 192.0.2.1");
  const auto t0 = steady_clock::now();
  auto wait = [&w](task_return<> reply) {
    w.pong = std::move(reply);        // nobody will ever call it
    return [&w] { w.pong.reset(); };  // the timeout cancels the wait
  };
  try {
    co_await with_timeout(500ms, callback_task<void>(wait));
    w.say(r, "pong");
  } catch (const timeout_error&) {
    w.say(r, format("timed out after %.1f s", to_seconds(steady_clock::now() - t0)));
  }
}

// The bad button: work on the loop thread with no co_await. It belongs in threaded_task.
job<> freeze(window& w, row& r) {
  w.say(r, "computing on the loop thread");
  const auto until = steady_clock::now() + 200ms;
  while (steady_clock::now() < until) {
  }
  w.say(r, "done, and the window froze meanwhile");
  co_return;
}

job<> heartbeat(window& w) {
  for (auto next = steady_clock::now();;) {  // ten ticks a second, however long a tick takes
    next += 100ms;
    co_await sleep_task(next - steady_clock::now());
    ++w.ticks;
    const int n = w.running();
    gtk_label_set_text(
        GTK_LABEL(w.clock),
        format("%5.1f s   tick %d   %d job(s) running", w.seconds(), w.ticks, n).c_str());
    gtk_spinner_set_spinning(GTK_SPINNER(w.spinner), n > 0);
  }
}

// --- The buttons: a click handler runs on GTK's (and the loop's) thread: it starts a job -----

std::string on_download(window& w) { return w.start("Download", download); }
std::string on_convert(window& w) { return w.start("Convert", convert); }
std::string on_fetch(window& w) { return w.start("Fetch", fetch); }
std::string on_sleep(window& w) { return w.start("Sleep", nap); }
// One dialog at a time: a second click while Save waits starts nothing.
std::string on_save(window& w) { return w.start("Save", save, restart::ignore_while_running); }
std::string on_ping(window& w) { return w.start("Ping", ping, restart::ignore_while_running); }
std::string on_freeze(window& w) { return w.start("Freeze", freeze); }
std::string on_download_both(window& w) { return w.start("Download both", download_both); }
std::string on_cancel(window& w) {
  for (auto& h : w.jobs)
    if (h.name() == "Convert" && h.cancel()) return "Convert cancelled";
  return "nothing to cancel";
}

struct button {
  const char* name;
  std::string (*on_click)(window&);
};
const button buttons[] = {
    {"Download", on_download}, {"Convert", on_convert},
    {"Fetch", on_fetch},       {"Sleep", on_sleep},
    {"Save", on_save},         {"Ping", on_ping},
    {"Freeze", on_freeze},     {"Download both", on_download_both},
    {"Cancel", on_cancel},
};
const char* const bar_rows[] = {"a.iso", "b.iso"};  // Download both's two bars

struct binding {
  window* w;
  const button* b;
};
std::deque<binding> bindings;  // the "clicked" handlers' data, alive as long as the buttons

void on_clicked(GtkButton*, gpointer data) {
  auto* d = static_cast<binding*>(data);
  const std::string what = d->b->on_click(*d->w);
  d->w->event(format("click %s -> %s", d->b->name, what.c_str()));
}

// Closing the window: cancel_all() cancels every live job of the scope and returns only once
// each has unwound (Save's dialog closed with it), so the window may go right after.
gboolean on_close_request(GtkWindow*, gpointer data) {
  auto& w = *static_cast<window*>(data);
  std::string live;
  for (const job_info& j : w.loop.jobs())
    live += format("%s%s (%s)", live.empty() ? "" : ", ", j.name.c_str(),
                   *j.waiting_on ? j.waiting_on : j.state);
  w.event("closing; live jobs: " + live);
  w.closing = true;
  const std::size_t n = w.scope.cancel_all();
  std::string names;
  for (const auto& u : w.unwound) names += (names.empty() ? "" : ", ") + u;
  w.event(format("%zu jobs cancelled; unwound before cancel_all() returned: %s", n, names.c_str()));
  g_main_loop_quit(w.main_loop);
  return FALSE;  // and GTK destroys the window
}

void build(window& w) {
  w.win = gtk_window_new();
  gtk_window_set_title(GTK_WINDOW(w.win), "coro_jobs demo (GTK 4)");
  gtk_window_set_default_size(GTK_WINDOW(w.win), 640, -1);
  GtkWidget* box = gtk_box_new(GTK_ORIENTATION_VERTICAL, 8);
  for (auto set : {gtk_widget_set_margin_top, gtk_widget_set_margin_bottom,
                   gtk_widget_set_margin_start, gtk_widget_set_margin_end})
    set(box, 12);
  gtk_window_set_child(GTK_WINDOW(w.win), box);

  GtkWidget* top = gtk_box_new(GTK_ORIENTATION_HORIZONTAL, 8);
  w.spinner = gtk_spinner_new();
  w.clock = gtk_label_new("");
  gtk_box_append(GTK_BOX(top), w.spinner);
  gtk_box_append(GTK_BOX(top), w.clock);
  gtk_box_append(GTK_BOX(box), top);

  GtkWidget* grid = gtk_grid_new();
  gtk_grid_set_row_spacing(GTK_GRID(grid), 6);
  gtk_grid_set_column_spacing(GTK_GRID(grid), 12);
  gtk_box_append(GTK_BOX(box), grid);
  int y = 0;
  auto add_row = [&](const char* name, GtkWidget* button) {
    row& r = w.rows.emplace_back();
    r.name = name;
    r.button = button ? button : gtk_label_new(name);
    r.bar = gtk_progress_bar_new();
    gtk_progress_bar_set_show_text(GTK_PROGRESS_BAR(r.bar), TRUE);
    gtk_progress_bar_set_text(GTK_PROGRESS_BAR(r.bar), "");
    gtk_widget_set_valign(r.bar, GTK_ALIGN_CENTER);
    gtk_widget_set_hexpand(r.bar, TRUE);
    r.label = gtk_label_new("idle");
    gtk_label_set_xalign(GTK_LABEL(r.label), 0);
    gtk_label_set_width_chars(GTK_LABEL(r.label), 34);
    gtk_grid_attach(GTK_GRID(grid), r.button, 0, y, 1, 1);
    gtk_grid_attach(GTK_GRID(grid), r.bar, 1, y, 1, 1);
    gtk_grid_attach(GTK_GRID(grid), r.label, 2, y, 1, 1);
    ++y;
  };
  for (const button& b : buttons) {
    GtkWidget* gb = gtk_button_new_with_label(b.name);
    g_signal_connect(gb, "clicked", G_CALLBACK(on_clicked),
                     &bindings.emplace_back(binding{&w, &b}));
    if (std::strcmp(b.name, "Cancel") == 0)
      w.cancel = gb;  // no row of its own: it sits beside the clock
    else
      add_row(b.name, gb);
  }
  for (const char* name : bar_rows) add_row(name, nullptr);
  gtk_box_append(GTK_BOX(top), w.cancel);
  gtk_widget_set_hexpand(w.clock, TRUE);
  gtk_label_set_xalign(GTK_LABEL(w.clock), 0);

  w.log_label = gtk_label_new("");
  gtk_label_set_xalign(GTK_LABEL(w.log_label), 0);
  gtk_label_set_lines(GTK_LABEL(w.log_label), 5);
  gtk_widget_set_size_request(w.log_label, -1, 90);
  gtk_box_append(GTK_BOX(box), w.log_label);
  g_signal_connect(w.win, "close-request", G_CALLBACK(on_close_request), &w);
}

// Renders the window with GTK's own renderer into a texture and saves it: no X tool.
void screenshot(window& w, const char* file) {
  GdkPaintable* paintable = gtk_widget_paintable_new(w.win);
  const int width = gtk_widget_get_width(w.win), height = gtk_widget_get_height(w.win);
  GtkSnapshot* snapshot = gtk_snapshot_new();
  gdk_paintable_snapshot(paintable, snapshot, width, height);
  GskRenderNode* node = gtk_snapshot_free_to_node(snapshot);
  GskRenderer* renderer = gtk_native_get_renderer(GTK_NATIVE(w.win));
  if (node && renderer) {
    GdkTexture* texture = gsk_renderer_render_texture(renderer, node, nullptr);
    if (gdk_texture_save_to_png(texture, file))
      w.event(format("screenshot: saved %dx%d to %s", width, height, file));
    else
      w.event(format("screenshot: could not save %s", file));
    g_object_unref(texture);
  } else {
    w.event("screenshot: nothing to render (is the window shown?)");
  }
  if (node) gsk_render_node_unref(node);
  g_object_unref(paintable);
}

// What a tester would click, and when. The "Yes" click is the dialog's own Yes button.
struct click {
  steady_clock::duration at;
  const char* button;
};
const click script[] = {
    {300ms, "Download"}, {800ms, "Convert"}, {1300ms, "Sleep"},         {1800ms, "Fetch"},
    {2300ms, "Cancel"},  {2600ms, "Ping"},   {2800ms, "Ping"},          {3400ms, "Freeze"},
    {3700ms, "Save"},    {4400ms, "Yes"},    {4700ms, "Download both"}, {5100ms, "Ping"},
    {5400ms, "Sleep"},   {6500ms, "close"},
};
constexpr auto screenshot_at = 5300ms;  // a.iso and b.iso part-way, the spinner running

void press(window& w, const char* name) {
  if (std::strcmp(name, "close") == 0) {
    gtk_window_close(GTK_WINDOW(w.win));  // emits close-request, as the title bar's [x] does
    return;
  }
  if (std::strcmp(name, "Yes") == 0) {
    if (!w.dialog_widget) return w.event("click Yes -> no dialog open");
    GtkWidget* yes =
        gtk_dialog_get_widget_for_response(GTK_DIALOG(w.dialog_widget), GTK_RESPONSE_YES);
    g_signal_emit_by_name(yes, "clicked");
    return;
  }
  for (const row& r : w.rows)
    if (r.name == name) return g_signal_emit_by_name(r.button, "clicked");
  g_signal_emit_by_name(w.cancel, "clicked");  // the only button without a row
}

}  // namespace

int main(int argc, char** argv) {
  bool interactive = false;
  const char* shot = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--interactive") == 0) {
      interactive = true;
    } else if (std::strcmp(argv[i], "--screenshot") == 0 && i + 1 < argc) {
      shot = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--interactive | --screenshot FILE.png]\n", argv[0]);
      return 2;
    }
  }
  gtk_init();

  // Lifetimes, first made and last destroyed: the loop; its attachment to GTK's context; the
  // window and its job_scope. So the scope's jobs end before the loop detaches, and the loop
  // outlives both. The window's widgets are gone after the close, and so are its jobs.
  event_loop loop;
  glib_attachment attached = attach_to_glib(loop);  // the default context, GTK's
  window w(loop);
  w.main_loop = g_main_loop_new(nullptr, FALSE);
  build(w);

  loop.set_watchdog(100ms, [&w](std::string_view who, steady_clock::duration held) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(held).count();
    const std::string what = format("watchdog: %.*s held the loop for %lld ms", int(who.size()),
                                    who.data(), static_cast<long long>(ms));
    gtk_label_set_text(GTK_LABEL(w.at("Freeze").label), what.c_str());
    w.event(what);
  });

  // The script starts when the window is on the screen, not when it is built: on a fresh
  // machine GTK's first start (fonts, the X server) can take seconds, and the screenshot
  // must find a window that has been drawn.
  struct script_start {
    window& w;
    const char* shot;
  } start{w, shot};
  if (!interactive)
    g_signal_connect_swapped(
        w.win, "map", G_CALLBACK(+[](script_start* s) {
          static bool started = false;  // a window is mapped again after a hide
          if (std::exchange(started, true)) return;
          window& w = s->w;
          for (const click& c : script) w.loop.call_later(c.at, [&w, c] { press(w, c.button); });
          if (const char* shot = s->shot)
            w.loop.call_later(screenshot_at, [&w, shot] { screenshot(w, shot); });
        }),
        &start);
  w.scope.start(tracked(w, "heartbeat", nullptr, heartbeat(w)), "heartbeat");
  gtk_window_present(GTK_WINDOW(w.win));
  g_main_loop_run(w.main_loop);
  g_main_loop_unref(w.main_loop);

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
