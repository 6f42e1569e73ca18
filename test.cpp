// test.cpp - the specification of coro_jobs: doctest's main, and the replacement operator
// new that the out-of-memory tests use. The cases live in test/, one file per group of
// suites, in the order of the manual's rules (doctest runs them in file order):
//   test/1-jobs-loop-tasks.cpp               jobs; the loop; tasks: sleep, threads, callbacks, fds
//   test/2-errors-cancellation-lifetime.cpp  errors; cancellation; lifetime; handles; bad input
//   test/3-clock-composition-scopes.cpp      manual clock; composition; scopes; progress;
//                                            watchdog; signals
//   test/4-hosting-lines-processes.cpp       run_once(max_wait), run_until; the hosted loop;
//                                            next_iteration; run_latest; line_reader; processes
// test/helpers.hpp holds what they share. `make test` builds them in parallel and runs them.
// This file does not include coro_jobs.hpp: doctest's runner alone takes long enough to build.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cstdlib>
#include <new>

#include "test/allocations.hpp"

thread_local int fail_alloc_in = 0;
thread_local long allocations = 0;

// Replaces the global operator new of the whole test binary. (Not inlined, so that GCC does
// not pair these mallocs and frees with other allocation functions in its
// -Wmismatched-new-delete analysis.)
#ifndef NO_NEW_REPLACEMENT
[[gnu::noinline]] void* operator new(std::size_t n) {
  ++allocations;
  if (fail_alloc_in > 0 && --fail_alloc_in == 0) throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#endif
