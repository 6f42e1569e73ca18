// test/allocations.hpp - the allocation counter of the out-of-memory tests. The replacement
// operator new in test.cpp keeps it: fail_alloc_in = n makes the n-th allocation from now on
// this thread throw std::bad_alloc, and `allocations` counts operator new calls on this
// thread. Clang's TSan runtime defines operator new itself, so there is no replacement there
// and those tests are skipped.
#pragma once
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define NO_NEW_REPLACEMENT 1
#endif
#endif
extern thread_local int fail_alloc_in;
extern thread_local long allocations;
#ifdef NO_NEW_REPLACEMENT
constexpr bool can_fail_allocations = false;
#else
constexpr bool can_fail_allocations = true;
#endif
