#!/bin/sh
# tools/consumer-test.sh: a project consumes coro_jobs in each documented way, from scratch in a
# temporary folder, and runs a small job that must print "coro_jobs 0.2.0: 2 + 3 = 5":
#   1. CMake: configure and install this checkout to a prefix; find_package(coro_jobs 0.2)
#   2. CMake: FetchContent from this checkout (a git URL, as a project would give it)
#   3. pkg-config: `make install PREFIX=...`, compile with `pkg-config --cflags --libs coro_jobs`,
#      then find_package against that same prefix, and `make uninstall` leaves nothing behind
# Knobs: CXX (default g++). Needs cmake, git, pkg-config.
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
CXX=${CXX:-g++}
export CXX
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
want="coro_jobs 0.2.0: 2 + 3 = 5"

mkdir "$tmp/app"
cat >"$tmp/app/main.cpp" <<'EOF'
#include "coro_jobs.hpp"
#include <cstdio>
#include <functional>
coro_jobs::job<int> add(int a, int b) { co_return co_await coro_jobs::threaded_task(std::plus<>{}, a, b); }
int main() {
  coro_jobs::event_loop loop;
  auto h = coro_jobs::start_job(loop, add(2, 3));
  loop.run();
  std::printf("coro_jobs %d.%d.%d: 2 + 3 = %d\n", CORO_JOBS_VERSION_MAJOR, CORO_JOBS_VERSION_MINOR,
              CORO_JOBS_VERSION_PATCH, h.result());
}
EOF
# $1: the folder with the built app. Runs it and checks what it prints.
check() {
  got=$("$1/app")
  if [ "$got" != "$want" ]; then echo "consumer-test: $1/app printed '$got', not '$want'" >&2; exit 1; fi
  echo "consumer-test: $2: $got"
}
# $1: a name, $2: CMAKE_PREFIX_PATH, then the CMake lines after project(); builds $tmp/$1/build/app.
cmake_app() {
  name=$1; prefix=$2; shift 2
  mkdir -p "$tmp/$name"
  cp "$tmp/app/main.cpp" "$tmp/$name/"
  { echo "cmake_minimum_required(VERSION 3.14)"; echo "project(app CXX)"; printf '%s\n' "$@"
    echo "add_executable(app main.cpp)"; echo "target_link_libraries(app PRIVATE coro_jobs::coro_jobs)"
  } >"$tmp/$name/CMakeLists.txt"
  cmake -S "$tmp/$name" -B "$tmp/$name/build" -DCMAKE_PREFIX_PATH="$prefix" >"$tmp/$name.log" 2>&1 &&
    cmake --build "$tmp/$name/build" >>"$tmp/$name.log" 2>&1 || { cat "$tmp/$name.log" >&2; exit 1; }
}

# 1. find_package after CMake's own install.
cmake -S "$src" -B "$tmp/lib-build" -DCMAKE_INSTALL_PREFIX="$tmp/cmake-prefix" \
  -DCORO_JOBS_BUILD_TESTS=OFF -DCORO_JOBS_BUILD_DEMO=OFF >"$tmp/lib.log" 2>&1 &&
  cmake --install "$tmp/lib-build" >>"$tmp/lib.log" 2>&1 || { cat "$tmp/lib.log" >&2; exit 1; }
cmake_app find-package "$tmp/cmake-prefix" "find_package(coro_jobs 0.2 CONFIG REQUIRED)"
check "$tmp/find-package/build" "find_package(coro_jobs 0.2) after cmake --install"
# A version it does not satisfy must not be found.
if (cmake_app wrong-version "$tmp/cmake-prefix" "find_package(coro_jobs 0.3 CONFIG REQUIRED)") 2>/dev/null; then
  echo "consumer-test: find_package(coro_jobs 0.3) accepted version 0.2.0" >&2; exit 1
fi
grep -q 'compatible with requested version "0.3"' "$tmp/wrong-version.log" ||
  { cat "$tmp/wrong-version.log" >&2; echo "consumer-test: find_package(coro_jobs 0.3) failed otherwise" >&2; exit 1; }
echo "consumer-test: find_package(coro_jobs 0.3) rejected 0.2.0, as it should"

# 2. FetchContent from this checkout's committed HEAD; as a subproject it adds no tests.
cmake_app fetch-content "" "include(FetchContent)" \
  "FetchContent_Declare(coro_jobs GIT_REPOSITORY file://$src GIT_TAG $(git -C "$src" rev-parse HEAD))" \
  "FetchContent_MakeAvailable(coro_jobs)" \
  "if(TARGET coro_jobs_test OR TARGET coro_jobs_demo)" \
  "  message(FATAL_ERROR \"coro_jobs built its tests or demo as a subproject\")" "endif()"
check "$tmp/fetch-content/build" "FetchContent (GIT_REPOSITORY file://, HEAD)"

# 3. make install PREFIX=..., then pkg-config; the same prefix serves find_package too.
make -s -C "$src" install PREFIX="$tmp/make-prefix" >/dev/null
mkdir "$tmp/pkg-config"
PKG_CONFIG_PATH="$tmp/make-prefix/share/pkgconfig" pkg-config --exact-version=0.2.0 coro_jobs
flags=$(PKG_CONFIG_PATH="$tmp/make-prefix/share/pkgconfig" pkg-config --cflags --libs coro_jobs)
# shellcheck disable=SC2086  # the flags are words
"$CXX" -std=c++20 "$tmp/app/main.cpp" $flags -o "$tmp/pkg-config/app"
check "$tmp/pkg-config" "pkg-config ($flags) after make install"
cmake_app find-package-make "$tmp/make-prefix" "find_package(coro_jobs 0.2 CONFIG REQUIRED)"
check "$tmp/find-package-make/build" "find_package(coro_jobs 0.2) after make install"
# Both installs put the same files at the same places.
a=$(cd "$tmp/cmake-prefix" && find . -type f | sort)
b=$(cd "$tmp/make-prefix" && find . -type f | sort)
if [ "$a" != "$b" ]; then printf 'consumer-test: cmake --install and make install differ:\n%s\n--\n%s\n' "$a" "$b" >&2; exit 1; fi
make -s -C "$src" uninstall PREFIX="$tmp/make-prefix"
left=$(find "$tmp/make-prefix" -type f)
if [ -n "$left" ]; then echo "consumer-test: make uninstall left: $left" >&2; exit 1; fi
echo "consumer-test: cmake --install and make install: the same $(echo "$a" | wc -l) files; make uninstall removed them all"
