// bench/w6_asio.cpp - W6: the same program as bench/w6_ours.cpp with Asio's coroutines.
// By default it includes only the Asio headers it uses; -DW6_WHOLE includes <asio.hpp>.
#ifdef W6_WHOLE
#include <asio.hpp>
#else
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#endif

using namespace std::chrono_literals;

asio::awaitable<int> nap() {
  asio::steady_timer t(co_await asio::this_coro::executor, 1ms);
  co_await t.async_wait(asio::use_awaitable);
  co_return 0;
}

int main() {
  asio::io_context io;
  int r = 1;
  asio::co_spawn(io, nap(), [&r](std::exception_ptr, int v) { r = v; });
  io.run();
  return r;
}
