// bench/w6_ours.cpp - W6: the smallest coro_jobs program (one job, one sleep); its compile
// time is measured against bench/w6_asio.cpp.
#include "coro_jobs.hpp"

using namespace std::chrono_literals;

coro_jobs::job<int> nap() {
  co_await coro_jobs::sleep_task(1ms);
  co_return 0;
}

int main() {
  coro_jobs::event_loop loop;
  auto h = coro_jobs::start_job(loop, nap());
  loop.run();
  return h.result();
}
