// stress/main.cpp - the stress suite's main: doctest with per-case durations, or one child
// case (`--stress-child=NAME`) run in a process of its own.
#define DOCTEST_CONFIG_IMPLEMENT
#include "common.hpp"

int main(int argc, char** argv) {
  if (argc == 2 && std::strncmp(argv[1], "--stress-child=", 15) == 0)
    return stress::run_child(argv[1] + 15);
  doctest::Context context;
  context.setOption("duration", true);  // the time of every case, for the report
  context.applyCommandLine(argc, argv);
  return context.run();
}
