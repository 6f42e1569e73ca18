# coro_jobs package configuration, for find_package(coro_jobs 0.2 CONFIG REQUIRED) and then
# target_link_libraries(app PRIVATE coro_jobs::coro_jobs). `make install` and CMake's install()
# both put this file, as it is, in <prefix>/share/cmake/coro_jobs/: the prefix is three levels up,
# and the header is in <prefix>/include/coro_jobs/ (#include "coro_jobs.hpp").
include(CMakeFindDependencyMacro)
set(THREADS_PREFER_PTHREAD_FLAG ON)
find_dependency(Threads)
if(NOT TARGET coro_jobs::coro_jobs)
  get_filename_component(_coro_jobs_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
  add_library(coro_jobs::coro_jobs INTERFACE IMPORTED)
  set_target_properties(coro_jobs::coro_jobs PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${_coro_jobs_prefix}/include/coro_jobs"
    INTERFACE_COMPILE_FEATURES cxx_std_20
    INTERFACE_LINK_LIBRARIES Threads::Threads)
  unset(_coro_jobs_prefix)
endif()
