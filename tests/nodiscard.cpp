// Compiled by `make test` (the nodiscard target), which wants a [[nodiscard]] warning on
// every line marked `forgotten` and no other diagnostic: a task whose co_await was forgotten
// does nothing, so every task type is [[nodiscard]], and under -Werror each of these lines
// fails to compile.
#include "coro_jobs.hpp"
using namespace coro_jobs;
using namespace std::chrono_literals;
job<> forgot() {
  sleep_task(100ms);                      // forgotten
  threaded_task([] {});                   // forgotten
  callback_task<>([](task_return<>) {});  // forgotten
  wait_readable(0);                       // forgotten
  shielded(sleep_task(1ms));              // forgotten
  with_timeout(1s, sleep_task(1ms));      // forgotten
  co_return;
}
int main() { return 0; }
