// test/4-hosting-lines-processes.cpp - run_once(max_wait) and run_until; the hosted loop's
// contract (the adapters' own cases are in hosts/); next_iteration; restart::run_latest;
// line_reader and the process task.
// Part of the specification, in the manual's order (the list is in test.cpp).
#include "helpers.hpp"

#include <filesystem>
#include <optional>
#include <poll.h>

TEST_SUITE("the loop: run_once(max_wait) and run_until") {

TEST_CASE("run_once(0s) never blocks, even with a sleep pending") {
  event_loop loop;
  auto j = start_job(loop, []() -> job<> { co_await sleep_task(1h); }());
  CHECK(loop.run_once(0s));  // starts the job: it sleeps
  const auto polls = loop.stats().polls;
  CHECK(loop.run_once(0s));  // nothing ready: returns at once, still pending
  CHECK(loop.stats().polls >= polls);
  CHECK_FALSE(j.done());
  j.cancel();
  while (loop.run_once(0s)) {
  }
  CHECK(j.done());
}

TEST_CASE("run_once(max_wait) waits at most max_wait for a later timer") {
  event_loop loop;
  auto j = start_job(loop, []() -> job<> { co_await sleep_task(1h); }());
  loop.run_once(0s);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(loop.run_once(20ms));
  CHECK(std::chrono::steady_clock::now() - t0 >= 20ms);
  CHECK_FALSE(j.done());
  j.cancel();
  loop.run();
}

TEST_CASE("run_once with a negative max_wait is run_once(0s), and a huge one waits as run_once() does") {
  event_loop loop;
  bool ran = false;
  auto cb = loop.call_later(1ms, [&] { ran = true; });
  CHECK(loop.run_once(-5s));
  while (!ran) loop.run_once(std::chrono::hours::max());
  CHECK(ran);
}

TEST_CASE("run_until returns the job's result while a heartbeat keeps the loop busy") {
  event_loop loop;
  int beats = 0;
  auto heartbeat = start_job(loop, [](int& b) -> job<> {
    for (;;) {
      co_await sleep_task(1ms);
      ++b;
    }
  }(beats));
  auto h = start_job(loop, []() -> job<int> {
    co_await sleep_task(10ms);
    co_return 7;
  }());
  CHECK(loop.run_until(h) == 7);
  CHECK_FALSE(heartbeat.done());
  CHECK(beats >= 1);
  heartbeat.cancel();
  loop.run();
}

TEST_CASE("run_until rethrows the job's error") {
  event_loop loop;
  auto h = start_job(loop, []() -> job<int> {
    co_await next_iteration();
    throw std::runtime_error("boom");
  }());
  CHECK_THROWS_WITH_AS(loop.run_until(h), "boom", std::runtime_error);
}

TEST_CASE("run_until of a job that can never end is std::logic_error, not a hang") {
  event_loop loop;
  job_handle<> self;
  auto h = start_job(loop, [](job_handle<>& other) -> job<> { co_await other; }(self));
  auto g = start_job(loop, [](job_handle<>& other) -> job<> { co_await other; }(h));
  self = g;  // h waits for g, which waits for h
  CHECK_THROWS_AS(loop.run_until(h), std::logic_error);
  CHECK_THROWS_AS(loop.run_until(job_handle<>{}), std::invalid_argument);
  h.cancel();
  loop.run();
}

TEST_CASE("run_until on a manual clock throws std::logic_error when the job waits for advance()") {
  event_loop loop(loop_options{.manual_clock = true});
  auto h = start_job(loop, []() -> job<> { co_await sleep_task(1s); }());
  CHECK_THROWS_AS(loop.run_until(h), std::logic_error);
  loop.advance(1s);
  CHECK_NOTHROW(loop.run_until(h));
}

TEST_CASE("quit() before the job ends makes run_until throw std::runtime_error") {
  event_loop loop;
  auto h = start_job(loop, []() -> job<> { co_await sleep_task(1h); }());
  loop.post([&] { loop.quit(); });
  CHECK_THROWS_AS(loop.run_until(h), std::runtime_error);
  h.cancel();
  loop.run();
}

}  // TEST_SUITE

TEST_SUITE("tasks: next_iteration") {

TEST_CASE("next_iteration lets every other ready job run before it resumes") {
  event_loop loop;
  std::vector<int> order;
  auto a = start_job(loop, [](std::vector<int>& o) -> job<> {
    o.push_back(1);
    co_await next_iteration();
    o.push_back(3);
  }(order));
  auto b = start_job(loop, [](std::vector<int>& o) -> job<> {
    o.push_back(2);
    co_return;
  }(order));
  loop.run();
  CHECK(order == std::vector<int>{1, 2, 3});
}

}  // TEST_SUITE

TEST_SUITE("scopes: run_latest") {

TEST_CASE("restart::run_latest runs the first click and the newest of the clicks made while it ran") {
  event_loop loop;
  job_scope scope(loop, restart::run_latest);
  std::vector<int> ran;
  auto click = [&](int n) {
    return scope.start([](std::vector<int>& r, int n) -> job<int> {
      r.push_back(n);
      co_await sleep_task(5ms);
      co_return n;
    }(ran, n),
                       "save");
  };
  auto first = click(1);
  loop.run_once(0s);  // the first one runs
  auto second = click(2);
  auto third = click(3);  // replaces the second, which never runs
  CHECK(second.done());
  CHECK_THROWS_AS(second.result(), job_cancelled);
  CHECK(loop.run_until(third) == 3);
  CHECK(first.result() == 1);
  CHECK(ran == std::vector<int>{1, 3});
  CHECK(scope.size() == 0);
}

TEST_CASE("restart::run_latest with a lambda keeps its captures until the job ends") {
  event_loop loop;
  job_scope scope(loop);
  auto s = std::make_shared<int>(5);
  auto first = scope.start([]() -> job<> { co_await sleep_task(5ms); }(), "x", restart::run_latest);
  loop.run_once(0s);
  auto second = scope.start([s]() -> job<int> {
    co_await next_iteration();
    co_return *s;
  },
                            "x", restart::run_latest);
  std::weak_ptr<int> w = s;
  s.reset();
  CHECK(loop.run_until(second) == 5);
  loop.run();
  CHECK(w.expired());
}

TEST_CASE("closing a scope cancels a run_latest job still waiting for its turn, and it never runs") {
  event_loop loop;
  int bodies = 0;
  std::optional<job_scope> scope(std::in_place, loop, restart::run_latest);
  auto body = [](int& n) -> job<> {
    ++n;
    co_await sleep_task(1h);
  };
  auto a = scope->start(body(bodies), "x");
  loop.run_once(0s);
  auto b = scope->start(body(bodies), "x");
  scope.reset();
  CHECK(a.done());
  CHECK(b.done());
  CHECK(bodies == 1);
  CHECK(loop.stats().jobs == 0);
}

}  // TEST_SUITE

TEST_SUITE("hosts: the contract") {

TEST_CASE("a hosted loop's run_once() with nothing pending drains and returns instead of blocking") {
  event_loop loop;
  loop.attach_host([] {});
  CHECK_FALSE(loop.run_once());                                                           // nothing pending: no wait without a limit
  CHECK(loop.prepare_host_wait().timeout < std::chrono::steady_clock::duration::zero());  // the host may block
  std::thread t([&] { loop.post([] {}); });
  t.join();
  const auto w = loop.prepare_host_wait();
  CHECK(w.timeout == std::chrono::steady_clock::duration::zero());  // the post is in
  pollfd p = w.fds[0];
  CHECK(::poll(&p, 1, 0) == 1);  // and the pipe a host watches is readable
  loop.run_once(0s);
  pollfd q = loop.prepare_host_wait().fds[0];
  CHECK(::poll(&q, 1, 0) == 0);  // drained: an idle host does not spin
  loop.detach_host();
}

TEST_CASE("a start_job from outside an iteration makes a hosted loop's pipe readable") {
  event_loop loop;
  loop.attach_host([] {});
  loop.run_once(0s);
  (void)loop.prepare_host_wait();  // the host is about to block: a change wakes it
  auto j = start_job(loop, []() -> job<> { co_return; }());
  pollfd p = loop.prepare_host_wait().fds[0];
  CHECK(::poll(&p, 1, 0) == 1);
  while (!j.done()) loop.run_once(0s);
  loop.detach_host();
}

// Between run_once and the next prepare_host_wait the host is busy: a wakeup then writes
// nothing (NOTES: hosted pipe); the next prepare_host_wait says zero instead.
TEST_CASE("a wakeup while the host is busy costs no pipe write, and the next wait is zero") {
  event_loop loop;
  loop.attach_host([] {});
  loop.run_once(0s);
  bool ran = false;
  std::thread t([&] { loop.post([&ran] { ran = true; }); });
  t.join();
  auto j = start_job(loop, []() -> job<> { co_return; }());
  const auto w = loop.prepare_host_wait();
  CHECK(w.timeout == std::chrono::steady_clock::duration::zero());
  pollfd p = w.fds[0];
  CHECK(::poll(&p, 1, 0) == 0);  // nothing written: the host was not waiting
  const auto stop = std::chrono::steady_clock::now() + 10s;
  while (!(ran && j.done()) && std::chrono::steady_clock::now() < stop) loop.run_once(0s);
  CHECK(ran);
  CHECK(j.done());
  loop.detach_host();
}

// The host's poll has just told what ppoll(0) would (NOTES: hosted poll): with no fd of the
// program's watched, a hosted iteration makes no syscall of its own.
TEST_CASE("a hosted loop's run_once(0s) with no fd of the program's watched makes no poll of its own") {
  event_loop loop;
  loop.attach_host([] {});
  int trips = 0;
  auto j = start_job(loop, [&]() -> job<> {
    for (; trips < 100; ++trips) co_await threaded_task([] { return 1; });
  });
  const std::uint64_t polls = loop.stats().polls;
  const auto stop = std::chrono::steady_clock::now() + 10s;
  while (!j.done() && std::chrono::steady_clock::now() < stop) {
    const auto w = loop.prepare_host_wait();
    std::vector<pollfd> fds(w.fds.begin(), w.fds.end());
    const auto ms = std::chrono::ceil<std::chrono::milliseconds>(w.timeout).count();
    ::poll(fds.data(), nfds_t(fds.size()), ms < 0 ? 100 : int(std::min<long long>(ms, 100)));  // a lost wakeup: fails by the deadline
    loop.run_once(0s);
  }
  CHECK(j.done());
  CHECK(trips == 100);
  CHECK(loop.stats().polls == polls);
  loop.detach_host();
}

// Left readable, an expired timerfd would make every later host poll return at once.
TEST_CASE("after a timer a hosted loop's fds go quiet, so an idle host does not spin") {
  event_loop loop;
  loop.attach_host([] {});
  auto j = start_job(loop, []() -> job<> {
    for (int i = 0; i < 5; ++i) (void)co_await sleep_task(2ms);
  });
  const auto stop = std::chrono::steady_clock::now() + 10s;
  while (!j.done() && std::chrono::steady_clock::now() < stop) {
    const auto w = loop.prepare_host_wait();
    std::vector<pollfd> fds(w.fds.begin(), w.fds.end());
    const auto ms = std::chrono::ceil<std::chrono::milliseconds>(w.timeout).count();
    ::poll(fds.data(), nfds_t(fds.size()), int(std::clamp<long long>(ms, 0, 100)));
    loop.run_once(0s);
  }
  REQUIRE(j.done());
  const auto w = loop.prepare_host_wait();
  CHECK(w.timeout < std::chrono::steady_clock::duration::zero());  // nothing due: the host may block
  std::vector<pollfd> fds(w.fds.begin(), w.fds.end());
  CHECK(::poll(fds.data(), nfds_t(fds.size()), 0) == 0);
  loop.detach_host();
}

}  // TEST_SUITE

TEST_SUITE("tasks: line_reader") {

// A pipe whose write end another thread feeds with `chunks`, one write each.
struct fed_pipe {
  int fds[2];
  std::thread writer;
  explicit fed_pipe(std::vector<std::string> chunks) {
    REQUIRE(::pipe(fds) == 0);
    writer = std::thread([w = fds[1], chunks = std::move(chunks)] {
      for (const auto& c : chunks)
        for (std::size_t off = 0; off < c.size();) {
          const auto n = ::write(w, c.data() + off, c.size() - off);
          if (n <= 0) return;
          off += std::size_t(n);
        }
      ::close(w);
    });
  }
  ~fed_pipe() {
    writer.join();
    ::close(fds[0]);
  }
};

job<std::vector<std::string>> read_all_lines(line_reader& r) {
  std::vector<std::string> out;
  while (auto line = co_await r.next_line()) out.push_back(std::move(*line));
  co_return out;
}

TEST_CASE("line_reader returns lines in order, whatever the write boundaries, then the last partial line, then nullopt") {
  event_loop loop;
  fed_pipe p({"one\ntw", "o\n", "\n", "thr", "ee\nfour"});
  line_reader r(p.fds[0]);
  auto lines = loop.run_until(start_job(loop, read_all_lines(r)));
  CHECK(lines == std::vector<std::string>{"one", "two", "", "three", "four"});
}

TEST_CASE("line_reader tells an empty line from the end of the stream") {
  event_loop loop;
  fed_pipe p({"\n"});
  line_reader r(p.fds[0]);
  auto h = start_job(loop, [](line_reader& r) -> job<std::vector<std::optional<std::string>>> {
    std::vector<std::optional<std::string>> got;
    got.push_back(co_await r.next_line());
    got.push_back(co_await r.next_line());
    got.push_back(co_await r.next_line());
    co_return got;
  }(r));
  auto got = loop.run_until(h);
  REQUIRE(got.size() == 3);
  CHECK(got[0] == std::optional<std::string>(""));
  CHECK_FALSE(got[1].has_value());
  CHECK_FALSE(got[2].has_value());
}

TEST_CASE("line_reader throws std::length_error for a line over max_line, and std::invalid_argument for a max_line of 0") {
  event_loop loop;
  fed_pipe p({std::string(100, 'x') + "\n"});
  line_reader r(p.fds[0], 10);
  CHECK_THROWS_AS(loop.run_until(start_job(loop, read_all_lines(r))), std::length_error);
  CHECK_THROWS_AS(line_reader(p.fds[0], 0), std::invalid_argument);
  char buf[256];
  while (::read(p.fds[0], buf, sizeof buf) > 0) {
  }
}

TEST_CASE("line_reader reads 10 MB of lines with a buffer bounded by the line length") {
  event_loop loop;
  std::vector<std::string> chunks;
  const std::string line = std::string(99, 'a') + "\n";
  std::string block;
  for (int i = 0; i < 1000; ++i) block += line;  // 100 KB
  for (int i = 0; i < 100; ++i) chunks.push_back(block);
  fed_pipe p(chunks);
  line_reader r(p.fds[0], 200);
  auto h = start_job(loop, [](line_reader& r) -> job<long> {
    long n = 0;
    while (auto l = co_await r.next_line()) {
      if (l->size() != 99) throw std::runtime_error("a line was split or joined");
      ++n;
    }
    co_return n;
  }(r));
  CHECK(loop.run_until(h) == 100000);
}

TEST_CASE("line_reader on a closed fd throws std::system_error(EBADF)") {
  event_loop loop;
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  ::close(fds[0]);
  ::close(fds[1]);
  line_reader r(fds[0]);
  CHECK_THROWS_AS(loop.run_until(start_job(loop, read_all_lines(r))), std::system_error);
}

// Found by the adversarial review: each waiter of an fd is woken, the first reader took the
// bytes, and the second blocked the loop in read(2) on the blocking pipe for good.
TEST_CASE("two line_readers on one blocking pipe share its lines without blocking the loop") {
  pipe_fds p;
  bool closed = false;
  rescuer r([&] { ::close(std::exchange(p.w, -1)); });  // a blocked read(2) then returns 0
  event_loop loop;
  int lines = 0;
  auto reader = [&]() -> job<> {
    line_reader lr(p.r);
    while (auto l = co_await lr.next_line()) ++lines;
  };
  auto a = start_job(loop, reader);
  auto b = start_job(loop, reader);
  auto w = start_job(loop, [&]() -> job<> {
    for (int i = 0; i < 10; ++i) {
      co_await sleep_task(1ms);
      REQUIRE(::write(p.w, "hello\n", 6) == 6);
    }
    ::close(std::exchange(p.w, -1));
    closed = true;
  });
  drain(loop);
  CHECK(closed);
  CHECK(lines == 10);
  CHECK_FALSE(r.fired);
}

TEST_CASE("cancelling a job waiting in line_reader unwinds it") {
  event_loop loop;
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  line_reader r(fds[0]);
  auto h = start_job(loop, read_all_lines(r));
  loop.run_once(0s);
  CHECK(loop.stats().fd_waits == 1);
  h.cancel();
  loop.run();
  CHECK_THROWS_AS(h.result(), job_cancelled);
  CHECK(loop.stats().fd_waits == 0);
  ::close(fds[0]);
  ::close(fds[1]);
}

}  // TEST_SUITE

TEST_SUITE("tasks: processes") {

int open_fds() {
  int n = 0;
  for (auto& e : std::filesystem::directory_iterator("/proc/self/fd")) n += e.path().filename() != ".";
  return n;
}

TEST_CASE("start_process runs a program and its stdout is read line by line as it prints") {
  event_loop loop;
  auto h = start_job(loop, []() -> job<std::vector<std::string>> {
    process_options o;
    o.argv = {"sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.05; done"};
    process p = co_await start_process(std::move(o));
    std::vector<std::string> lines;
    while (auto l = co_await p.out().next_line()) lines.push_back(*l);
    const exit_status st = co_await p.wait();
    lines.push_back("exit " + std::to_string(st.code));
    co_return lines;
  }());
  CHECK(loop.run_until(h) == std::vector<std::string>{"1", "2", "3", "exit 0"});
}

TEST_CASE("a child's stderr is read apart from its stdout, and its exit code and signal are reported") {
  event_loop loop;
  auto h = start_job(loop, []() -> job<std::vector<std::string>> {
    std::vector<std::string> got;
    {
      process_options o;
      o.argv = {"sh", "-c", "echo out; echo err >&2; exit 3"};
      process p = co_await start_process(std::move(o));
      got.push_back(*co_await p.out().next_line());
      got.push_back(*co_await p.err().next_line());
      got.push_back(std::to_string((co_await p.wait()).code));
    }
    {
      process_options o;
      o.argv = {"sh", "-c", "kill -TERM $$"};
      o.out = o.err = stdio::discard;
      process p = co_await start_process(std::move(o));
      const exit_status st = co_await p.wait();
      got.push_back("signal " + std::to_string(st.signal) + " code " + std::to_string(st.code));
    }
    co_return got;
  }());
  CHECK(loop.run_until(h) ==
        std::vector<std::string>{"out", "err", "3", "signal " + std::to_string(SIGTERM) + " code -1"});
}

TEST_CASE("a program that does not exist throws std::system_error(ENOENT) at the co_await, and an empty argv std::invalid_argument") {
  event_loop loop;
  auto h = start_job(loop, []() -> job<> {
    process_options o;
    o.argv = {"/nonexistent/coro_jobs_no_such_program"};
    process p = co_await start_process(std::move(o));
  }());
  try {
    loop.run_until(h);
    FAIL("no error");
  } catch (const std::system_error& e) {
    CHECK(e.code().value() == ENOENT);
  }
  auto g = start_job(loop, []() -> job<> {
    process_options none;  // named first: GCC 12 miscompiles a braced temporary inside co_await (README)
    process p = co_await start_process(std::move(none));
  }());
  CHECK_THROWS_AS(loop.run_until(g), std::invalid_argument);
}

TEST_CASE("input is written to the child's stdin, and read_all returns the whole output") {
  event_loop loop;
  auto h = start_job(loop, []() -> job<std::string> {
    process_options o;
    o.argv = {"cat"};
    o.input = std::string("line one\nline two\n");
    o.env = {{"CORO_JOBS_TEST", "1"}};
    process p = co_await start_process(std::move(o));
    std::string all = co_await process::read_all(p.out());
    co_await p.wait();
    co_return all;
  }());
  CHECK(loop.run_until(h) == "line one\nline two\n");
}

TEST_CASE("cancelling the job that owns a child mid-output kills and reaps it and closes its pipes") {
  event_loop loop;
  const int fds_before = open_fds();
  int pid = -1, lines = 0;
  auto h = start_job(loop, [](int& pid, int& lines) -> job<> {
    process_options o;
    o.argv = {"sh", "-c", "while true; do echo tick; sleep 0.01; done"};
    o.grace = std::chrono::milliseconds(200);
    process p = co_await start_process(std::move(o));
    pid = p.pid();
    while (co_await p.out().next_line()) ++lines;
  }(pid, lines));
  while (lines < 3) loop.run_once();
  h.cancel();
  loop.run();  // the reaper job ends when the child is reaped
  CHECK_THROWS_AS(h.result(), job_cancelled);
  CHECK(::kill(pid, 0) == -1);  // gone, and reaped (a zombie would still accept signal 0)
  CHECK(errno == ESRCH);
  CHECK(open_fds() == fds_before);  // its pipes and pidfd are closed
}

TEST_CASE("destroying the loop with a child running kills and reaps it") {
  int pid = -1;
  {
    event_loop loop;
    auto h = start_job(loop, [](int& pid) -> job<> {
      process_options o;
      o.argv = {"sleep", "60"};
      process p = co_await start_process(std::move(o));
      pid = p.pid();
      co_await p.wait();
    }(pid));
    while (pid < 0) loop.run_once();
  }
  CHECK(::kill(pid, 0) == -1);
  CHECK(errno == ESRCH);
}

TEST_CASE("10 MB of output is read through line by line, the heap growing by less than 1 MiB") {
  event_loop loop;
  auto h = start_job(loop, []() -> job<long> {
    process_options o;
    o.argv = {"sh", "-c", "yes 0123456789012345678901234567890123456789012345678 | head -c 10000000"};
    o.max_line = 100;
    process p = co_await start_process(std::move(o));
    long bytes = 0;
    const std::size_t heap0 = mallinfo2().uordblks;
    std::size_t heap_peak = heap0;
    while (auto l = co_await p.out().next_line()) {
      bytes += long(l->size()) + 1;
      heap_peak = std::max(heap_peak, std::size_t(mallinfo2().uordblks));
    }
    co_await p.wait();
    MESSAGE("heap growth while reading 10 MB: ", heap_peak - heap0, " bytes");
    if (heap_peak - heap0 > 1024 * 1024) throw std::runtime_error("the reader's memory grew with the output");
    co_return bytes;
  }());
  CHECK(loop.run_until(h) == 10000000);
}

}  // TEST_SUITE
