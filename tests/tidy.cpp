// tests/tidy.cpp: the translation unit `make tidy` gives clang-tidy, so that it checks the
// header (.clang-tidy's HeaderFilterRegex) and the templates a small job instantiates.
#include "coro_jobs.hpp"

#include <chrono>
#include <functional>

using namespace coro_jobs;
using namespace std::chrono_literals;

static job<int> add(int a, int b) {
  co_await sleep_task(1ms);
  co_return co_await threaded_task(std::plus<>{}, a, b);
}

int main() {
  event_loop loop;
  auto h = start_job(loop, add(1, 2));
  loop.run();
  return h.result() == 3 ? 0 : 1;
}
