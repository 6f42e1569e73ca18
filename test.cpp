// test.cpp - the specification of coro_jobs: doctest's main, and the replacement operator
// new that the out-of-memory tests use. The cases live in test/, one file per group of
// suites, in the order of the manual's rules (doctest runs them in file order):
//   test/1-jobs-and-the-loop.cpp                 jobs; the loop
//   test/2-tasks.cpp                             tasks: sleep, threads, callbacks, fds
//   test/3-errors-and-cancellation.cpp           errors; cancellation
//   test/4-lifetime-handles-bad-input.cpp        lifetime; handles; bad input
//   test/5-manual-clock-and-composition.cpp      manual clock; composition
//   test/6-scopes-progress-watchdog-signals.cpp  scopes; progress; watchdog; signals
// test/helpers.hpp holds what they share. `make test` builds them in parallel and runs them.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "test/helpers.hpp"

// fail_alloc_in = n makes the n-th allocation from now on this thread throw std::bad_alloc.
thread_local int fail_alloc_in = 0;
thread_local long allocations = 0;  // operator new calls on this thread

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
