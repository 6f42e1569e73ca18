// Compiled by `make test` once per CASE with -Werror: each must FAIL to compile, because a
// task whose co_await was forgotten does nothing (every task type is [[nodiscard]]).
#include "coro_jobs.hpp"
using namespace coro_jobs;
using namespace std::chrono_literals;
job<> forgot() {
#if CASE == 1
  sleep_task(100ms);
#elif CASE == 2
  threaded_task([] {});
#elif CASE == 3
  callback_task<>([](task_return<>) {});
#elif CASE == 4
  wait_readable(0);
#elif CASE == 5
  shielded(sleep_task(1ms));
#elif CASE == 6
  with_timeout(1s, sleep_task(1ms));
#endif
  co_return;
}
int main() { return 0; }
