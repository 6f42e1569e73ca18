# coro_jobs: `make run` builds and runs the demo, `make test` builds and runs the tests.
# Knobs: CXX, CXXFLAGS (e.g. `make test CXX=clang++ CXXFLAGS=-O0`), BUILD (output folder).
CXXFLAGS ?= -O2 -g
BUILD    ?= build
WARN     := -Wall -Wextra -Wpedantic -Werror
REQUIRED := -std=c++20 -I. -pthread

.PHONY: all run demo-tty-check run-gtk demo-gtk-check gtk-deps format check-format test nodiscard stress bench bench-build \
  asan tsan stress-asan stress-tsan warnings deps clean

all: $(BUILD)/demo $(BUILD)/test

run: $(BUILD)/demo
	./$(BUILD)/demo

# The demo's --interactive mode driven through a pseudo-terminal: keys, q, Ctrl-C, SIGTERM,
# and the terminal's modes restored after each (tools/demo_pty_check.py says what it checks).
demo-tty-check: $(BUILD)/demo
	python3 tools/demo_pty_check.py ./$(BUILD)/demo

# Builds in parallel even when typed as plain `make test`: JOBS compiles at once (JOBS=1 for
# a serial build); under `make -jN` the sub-make shares the caller's job slots instead.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
test:
	@$(MAKE) --no-print-directory $(if $(findstring jobserver,$(MAKEFLAGS)),,-j$(JOBS)) $(BUILD)/test nodiscard
	./$(BUILD)/test

# Every task type is [[nodiscard]]: a forgotten co_await must not compile. tests/nodiscard.cpp
# forgets one of each, on the lines marked `forgotten`; one compile, with warnings kept as
# warnings, must report a nodiscard warning on each of those lines and nothing else.
nodiscard:
	@out=$$($(CXX) $(REQUIRED) $(WARN) -Wno-error -fsyntax-only tests/nodiscard.cpp 2>&1) || \
	  { echo "$$out"; echo "tests/nodiscard.cpp does not compile"; exit 1; }; \
	want=$$(grep -n '// forgotten' tests/nodiscard.cpp | cut -d: -f1 | tr '\n' ' '); \
	got=$$(echo "$$out" | sed -n 's/^tests\/nodiscard\.cpp:\([0-9]*\):[0-9]*: warning: .*nodiscard.*/\1/p' | \
	  sort -nu | tr '\n' ' '); \
	other=$$(echo "$$out" | grep -E 'warning:|error:' | grep -v nodiscard); \
	if [ "$$got" != "$$want" ] || [ -n "$$other" ]; then echo "$$out"; \
	  echo "tests/nodiscard.cpp: nodiscard reported on lines '$$got', wanted '$$want' and nothing else"; exit 1; fi; \
	echo "nodiscard: $$(echo $$want | wc -w) forgotten co_awaits rejected"

$(BUILD):
	mkdir -p $@

$(BUILD)/demo: demo.cpp coro_jobs.hpp | $(BUILD)
	$(CXX) $(REQUIRED) $(WARN) $(CXXFLAGS) demo.cpp -o $@

# The suite: test.cpp (doctest's main and the replacement operator new) and test/*.cpp (the
# cases, in the manual's order), one object each, so that they compile in parallel.
TEST_SRC := test.cpp $(wildcard test/*.cpp)
TEST_OBJ := $(TEST_SRC:%.cpp=$(BUILD)/test-obj/%.o)
$(BUILD)/test: $(TEST_OBJ) | $(BUILD)
	$(CXX) $(REQUIRED) $(CXXFLAGS) $^ -o $@
$(BUILD)/test-obj/%.o: %.cpp $(wildcard test/*.hpp) coro_jobs.hpp | deps
	@mkdir -p $(dir $@)
	$(CXX) $(REQUIRED) $(WARN) $(CXXFLAGS) -c $< -o $@

# Sanitizer variants are the same targets re-run with other flags, in folders of their own.
# clang 14's -fsanitize=function (part of "undefined") cannot emit coroutine frames ("Cannot
# represent a difference across sections"), so it is left out with clang; g++ has no such check.
ASAN_FLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,leak -fno-sanitize-recover=all \
  $(if $(findstring clang,$(CXX)),-fno-sanitize=function)
# Folders per compiler, so that `make asan CXX=clang++` after `make asan` rebuilds.
SAN_DIR := $(if $(findstring clang,$(CXX)),-clang)
TSAN_FLAGS := -O1 -g -fsanitize=thread
ASAN_VARS = BUILD=build-asan$(SAN_DIR) CXXFLAGS="$(ASAN_FLAGS)"
TSAN_VARS = BUILD=build-tsan$(SAN_DIR) CXXFLAGS="$(TSAN_FLAGS)"
asan:
	$(MAKE) test $(ASAN_VARS)
tsan:
	$(MAKE) test $(TSAN_VARS)

# Both compilers, warnings as errors, every program (the GTK demo too when GTK 4 is installed).
HAVE_GTK4 := $(shell pkg-config --exists gtk4 2>/dev/null && echo yes)
warnings:
	$(MAKE) all BUILD=build CXX=g++
	$(MAKE) all BUILD=build-clang CXX=clang++
	$(if $(HAVE_GTK4),$(MAKE) build/demo_gtk BUILD=build CXX=g++)
	$(if $(HAVE_GTK4),$(MAKE) build-clang/demo_gtk BUILD=build-clang CXX=clang++)

# --- GTK demo (issue 13): demo.cpp's story in a GTK 4 window, on hosts/coro_jobs_glib.hpp ---
# `make run-gtk`: builds and runs it (a script clicks the buttons and closes the window);
# `make run-gtk GTK_ARGS=--interactive` leaves the clicking to you. Without a display it says
# how to run it under xvfb-run. `make demo-gtk-check` (CI): the script under xvfb-run, exit
# code 0, and $(BUILD)/demo_gtk.png, a screenshot whose pixels are not all one colour.
# GTK's headers are system headers here: our warnings are for our code.
GTK_FLAGS = $$(pkg-config --cflags gtk4 | sed 's/^-I/-isystem /; s/ -I/ -isystem /g')
GTK_LIBS  = $$(pkg-config --libs gtk4)
GTK_ARGS ?=
# Quiet and steady under Xvfb: no accessibility bus, X11, and the cairo renderer (no GL).
GTK_CHECK_ENV := GTK_A11Y=none NO_AT_BRIDGE=1 GDK_BACKEND=x11 GSK_RENDERER=cairo
gtk-deps:
	@command -v pkg-config >/dev/null 2>&1 || sh tools/need pkg-config
	@pkg-config --exists gtk4 || sh tools/need libgtk-4-dev
$(BUILD)/demo_gtk: demo_gtk.cpp coro_jobs.hpp hosts/coro_jobs_glib.hpp | $(BUILD) gtk-deps
	$(CXX) $(REQUIRED) $(WARN) $(CXXFLAGS) $(GTK_FLAGS) demo_gtk.cpp -o $@ $(GTK_LIBS)
run-gtk: $(BUILD)/demo_gtk
	@if [ -z "$$DISPLAY$$WAYLAND_DISPLAY" ]; then \
	  echo "run-gtk: no display here (DISPLAY and WAYLAND_DISPLAY are empty)."; \
	  if command -v xvfb-run >/dev/null 2>&1; then \
	    echo "run-gtk: xvfb-run is installed; run it on a virtual display with:"; \
	  else echo "run-gtk: install xvfb and xauth (Debian: apt-get install xvfb xauth), then run:"; fi; \
	  echo "  xvfb-run -a make run-gtk$(if $(GTK_ARGS), GTK_ARGS='$(GTK_ARGS)')"; exit 1; fi
	./$(BUILD)/demo_gtk $(GTK_ARGS)
demo-gtk-check: $(BUILD)/demo_gtk
	@command -v xvfb-run >/dev/null 2>&1 || sh tools/need xvfb xauth
	@rm -f $(BUILD)/demo_gtk.png; t0=$$(date +%s%N); \
	$(GTK_CHECK_ENV) timeout 60 xvfb-run -a ./$(BUILD)/demo_gtk --screenshot $(BUILD)/demo_gtk.png || \
	  { s=$$?; echo "demo-gtk-check: demo_gtk exited with $$s"; exit 1; }; \
	echo "demo-gtk-check: the scripted demo exited with 0 after $$(( ($$(date +%s%N) - t0) / 1000000 )) ms"
	python3 tools/png_check.py $(BUILD)/demo_gtk.png
# --- end GTK demo ---

# --- stress (issue 5): owned by stress/; edit only between these markers ---
# `make stress`: load and fault cases (stress/*.cpp, one doctest binary), then the deep
# cases (stress/deep.cpp) once more built at -O0. Sizes shrink under sanitizers (see
# stress/README.md); STRESS_SCALE=0.1 scales them further, STRESS_SEED=N replays a seed,
# STRESS_ARGS passes doctest options (e.g. STRESS_ARGS='-tc="*cancel*"').
STRESS_SRC     := $(wildcard stress/*.cpp)
STRESS_OBJ     := $(patsubst stress/%.cpp,$(BUILD)/stress-obj/%.o,$(STRESS_SRC))
STRESS_O0_OBJ  := $(BUILD)/stress-O0-obj/main.o $(BUILD)/stress-O0-obj/deep.o
STRESS_TIMEOUT ?= 600
stress: $(BUILD)/stress $(BUILD)/stress-deep-O0
	@s=0; timeout $(STRESS_TIMEOUT) ./$(BUILD)/stress $(STRESS_ARGS) || s=$$?; \
	  echo "== deep cases again, built at -O0 =="; \
	  timeout $(STRESS_TIMEOUT) ./$(BUILD)/stress-deep-O0 $(STRESS_ARGS) || s=$$?; exit $$s
$(BUILD)/stress: $(STRESS_OBJ)
	$(CXX) $(REQUIRED) $(CXXFLAGS) $^ -o $@
$(BUILD)/stress-deep-O0: $(STRESS_O0_OBJ)
	$(CXX) $(REQUIRED) $(CXXFLAGS) -O0 $^ -o $@
$(BUILD)/stress-obj/%.o: stress/%.cpp stress/common.hpp coro_jobs.hpp | deps
	@mkdir -p $(dir $@)
	$(CXX) $(REQUIRED) $(WARN) $(CXXFLAGS) -c $< -o $@
$(BUILD)/stress-O0-obj/%.o: stress/%.cpp stress/common.hpp coro_jobs.hpp | deps
	@mkdir -p $(dir $@)
	$(CXX) $(REQUIRED) $(WARN) $(CXXFLAGS) -O0 -c $< -o $@
stress-asan:
	$(MAKE) stress $(ASAN_VARS)
stress-tsan:
	TSAN_OPTIONS="suppressions=$(CURDIR)/stress/tsan.supp $(TSAN_OPTIONS)" $(MAKE) stress $(TSAN_VARS)
# --- end stress ---

# --- bench (issue 4): owned by bench/; edit only between these markers ---
# `make bench`: ours against Asio, GLib and asyncio on the same workloads, a Markdown table
# on stdout and in bench/results.md (a few minutes). `make bench-build`: build them only.
# Smoke run: `make bench BENCH_ARGS="--quick --reps 1"`. See bench/README.md.
BENCH      ?= build-bench
BENCH_ARGS ?=
BENCH_OPT  := -O2 -DNDEBUG
BENCH_ASIO := -DASIO_HAS_CO_AWAIT -DASIO_HAS_STD_COROUTINE
.PHONY: bench-deps
bench:
	BENCH_CXX="$(CXX)" MAKE="$(MAKE)" BENCH="$(BENCH)" sh bench/run.sh $(BENCH_ARGS)
bench-build: bench-deps $(BENCH)/ours $(BENCH)/peer_asio $(BENCH)/peer_glib $(BENCH)/w6_ours.o $(BENCH)/w6_asio.o $(BENCH)/w7_hosted
	@python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read())' bench/peer_asyncio.py
# The peers' packages (Debian names); quick checks when present.
bench-deps:
	@printf '\043include <asio/version.hpp>\n' | $(CXX) -x c++ -E - >/dev/null 2>&1 || sh tools/need libasio-dev
	@command -v pkg-config >/dev/null 2>&1 || sh tools/need pkg-config
	@pkg-config --exists glib-2.0 || sh tools/need libglib2.0-dev
	@command -v python3 >/dev/null 2>&1 || sh tools/need python3
$(BENCH):
	mkdir -p $@
$(BENCH)/ours: bench/ours.cpp bench/common.hpp coro_jobs.hpp | $(BENCH)
	$(CXX) $(REQUIRED) $(WARN) $(BENCH_OPT) bench/ours.cpp -o $@
$(BENCH)/peer_asio: bench/peer_asio.cpp bench/common.hpp | $(BENCH) bench-deps
	$(CXX) $(REQUIRED) -Wall -Wextra -Werror $(BENCH_OPT) $(BENCH_ASIO) bench/peer_asio.cpp -o $@
$(BENCH)/peer_glib: bench/peer_glib.cpp bench/common.hpp | $(BENCH) bench-deps
	$(CXX) $(REQUIRED) -Wall -Wextra -Werror $(BENCH_OPT) $$(pkg-config --cflags glib-2.0) \
	  bench/peer_glib.cpp -o $@ $$(pkg-config --libs glib-2.0)
# W7: the same jobs natively and inside each host loop (Qt's column when Qt 6 is installed).
W7_QT := $(shell pkg-config --exists Qt6Core 2>/dev/null && test -f hosts/coro_jobs_qt.hpp && echo -DW7_QT -fPIC $$(pkg-config --cflags Qt6Core))
W7_QT_LIBS := $(if $(W7_QT),$(shell pkg-config --libs Qt6Core))
$(BENCH)/w7_hosted: bench/w7_hosted.cpp bench/common.hpp coro_jobs.hpp $(wildcard hosts/coro_jobs_*.hpp) | $(BENCH) bench-deps
	$(CXX) $(REQUIRED) $(WARN) $(BENCH_OPT) $$(pkg-config --cflags glib-2.0) $(W7_QT) bench/w7_hosted.cpp -o $@ \
	  $$(pkg-config --libs glib-2.0) $(W7_QT_LIBS)
$(BENCH)/w6_ours.o: bench/w6_ours.cpp coro_jobs.hpp | $(BENCH)
	$(CXX) $(REQUIRED) $(WARN) $(BENCH_OPT) -c bench/w6_ours.cpp -o $@
$(BENCH)/w6_asio.o: bench/w6_asio.cpp | $(BENCH) bench-deps
	$(CXX) $(REQUIRED) -Wall -Wextra -Werror $(BENCH_OPT) $(BENCH_ASIO) -c bench/w6_asio.cpp -o $@
# --- end bench ---

# --- hosts (issue 12): the adapters in hosts/, each tested under its real toolkit ---
# `make test-hosts`: builds and runs hosts/test_*.cpp (installing the toolkits' Debian packages
# if they are missing). `make test` does not need them.
HOST_TESTS := $(BUILD)/test-guest $(BUILD)/test-glib $(BUILD)/test-qt
GLIB_FLAGS  = $$(pkg-config --cflags glib-2.0)
GLIB_LIBS   = $$(pkg-config --libs glib-2.0)
QT_FLAGS    = -fPIC $$(pkg-config --cflags Qt6Core)
QT_LIBS     = $$(pkg-config --libs Qt6Core)
.PHONY: test-hosts test-hosts-asan test-hosts-tsan host-deps
test-hosts-asan:
	$(MAKE) test-hosts $(ASAN_VARS)
test-hosts-tsan:
	$(MAKE) test-hosts $(TSAN_VARS)
test-hosts: $(HOST_TESTS)
	@for t in $(HOST_TESTS); do echo "== $$t"; ./$$t || exit 1; done
host-deps: deps
	@command -v pkg-config >/dev/null 2>&1 || sh tools/need pkg-config
	@pkg-config --exists glib-2.0 || sh tools/need libglib2.0-dev
	@pkg-config --exists Qt6Core || sh tools/need qt6-base-dev
$(BUILD)/test-guest: hosts/test_guest.cpp hosts/test_common.hpp hosts/coro_jobs_guest.hpp coro_jobs.hpp | $(BUILD) host-deps
	$(CXX) $(REQUIRED) $(WARN) $(CXXFLAGS) hosts/test_guest.cpp -o $@
$(BUILD)/test-glib: hosts/test_glib.cpp hosts/test_common.hpp hosts/coro_jobs_glib.hpp coro_jobs.hpp | $(BUILD) host-deps
	$(CXX) $(REQUIRED) $(WARN) $(CXXFLAGS) $(GLIB_FLAGS) hosts/test_glib.cpp -o $@ $(GLIB_LIBS)
$(BUILD)/test-qt: hosts/test_qt.cpp hosts/test_common.hpp hosts/coro_jobs_qt.hpp coro_jobs.hpp | $(BUILD) host-deps
	$(CXX) $(REQUIRED) $(WARN) $(CXXFLAGS) $(QT_FLAGS) hosts/test_qt.cpp -o $@ $(QT_LIBS)
# --- end hosts ---

# --- packaging (issue 14): install, uninstall, versions, lint, the compiler matrix ---
# `make install PREFIX=...` (default /usr/local; DESTDIR honoured): the header (and hosts/*.hpp)
# in PREFIX/include/coro_jobs/, coro_jobs.pc in PREFIX/share/pkgconfig/, the CMake package in
# PREFIX/share/cmake/coro_jobs/ (the same files as CMake's install(), from packaging/).
# `make uninstall` with the same PREFIX and DESTDIR removes exactly those.
PREFIX  ?= /usr/local
DESTDIR ?=
VERSION := $(shell awk '/^\#define CORO_JOBS_VERSION_(MAJOR|MINOR|PATCH) /{v = v s $$3; s = "."} END {print v}' coro_jobs.hpp)
HOST_HEADERS := $(wildcard hosts/*.hpp)
INSTALLED := include/coro_jobs/coro_jobs.hpp $(addprefix include/coro_jobs/,$(HOST_HEADERS)) \
  share/pkgconfig/coro_jobs.pc share/cmake/coro_jobs/coro_jobsConfig.cmake \
  share/cmake/coro_jobs/coro_jobsConfigVersion.cmake
FILL = sed -e 's|@CORO_JOBS_PREFIX@|$(PREFIX)|g' -e 's|@CORO_JOBS_VERSION@|$(VERSION)|g'
.PHONY: install uninstall check-version tidy
install:
	install -d $(DESTDIR)$(PREFIX)/include/coro_jobs $(DESTDIR)$(PREFIX)/share/pkgconfig \
	  $(DESTDIR)$(PREFIX)/share/cmake/coro_jobs $(if $(HOST_HEADERS),$(DESTDIR)$(PREFIX)/include/coro_jobs/hosts)
	install -m 644 coro_jobs.hpp $(DESTDIR)$(PREFIX)/include/coro_jobs/
	$(if $(HOST_HEADERS),install -m 644 $(HOST_HEADERS) $(DESTDIR)$(PREFIX)/include/coro_jobs/hosts/)
	$(FILL) packaging/coro_jobs.pc.in >$(DESTDIR)$(PREFIX)/share/pkgconfig/coro_jobs.pc
	install -m 644 packaging/coro_jobsConfig.cmake $(DESTDIR)$(PREFIX)/share/cmake/coro_jobs/
	$(FILL) packaging/coro_jobsConfigVersion.cmake.in >$(DESTDIR)$(PREFIX)/share/cmake/coro_jobs/coro_jobsConfigVersion.cmake
uninstall:
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/,$(INSTALLED))
	rmdir $(DESTDIR)$(PREFIX)/include/coro_jobs/hosts $(DESTDIR)$(PREFIX)/include/coro_jobs \
	  $(DESTDIR)$(PREFIX)/share/cmake/coro_jobs 2>/dev/null || true

# The header's CORO_JOBS_VERSION_* must equal CHANGELOG.md's newest release and CMake's version.
check-version:
	@c=$$(sed -n 's/^## \[\([0-9][0-9.]*\)\].*/\1/p' CHANGELOG.md | head -n 1); \
	m=$$(sed -n 's/^project(coro_jobs VERSION \([0-9.]*\).*/\1/p' CMakeLists.txt); \
	if [ -n "$(VERSION)" ] && [ "$(VERSION)" = "$$c" ] && [ "$(VERSION)" = "$$m" ]; then \
	  echo "check-version: $(VERSION) in coro_jobs.hpp, CHANGELOG.md and CMakeLists.txt"; \
	else echo "check-version: coro_jobs.hpp '$(VERSION)', CHANGELOG.md '$$c', CMakeLists.txt '$$m'"; exit 1; fi

# `make format` formats every source file with .clang-format; `make check-format` (CI) lists
# the files that differ from it and fails. clang-format 16, as its output differs from 14's.
CLANG_FORMAT ?= clang-format-16
FORMAT_SRC := $(wildcard *.hpp *.cpp hosts/*.hpp hosts/*.cpp test/*.hpp test/*.cpp tests/*.cpp \
  bench/*.hpp bench/*.cpp stress/*.hpp stress/*.cpp)
format:
	$(CLANG_FORMAT) -i $(FORMAT_SRC)
check-format:
	@command -v $(CLANG_FORMAT) >/dev/null || { echo "$(CLANG_FORMAT) is missing: apt-get install clang-format-16"; exit 1; }
	@bad=""; for f in $(FORMAT_SRC); do $(CLANG_FORMAT) $$f | cmp -s - $$f || bad="$$bad $$f"; done; \
	if [ -n "$$bad" ]; then echo "not formatted by .clang-format (run make format):$$bad"; exit 1; fi; \
	echo "check-format: $(words $(FORMAT_SRC)) files formatted by .clang-format"

# `make tidy`: clang-tidy with .clang-tidy's checks on the header, through tests/tidy.cpp.
CLANG_TIDY ?= clang-tidy
tidy:
	@command -v $(CLANG_TIDY) >/dev/null 2>&1 || sh tools/need clang-tidy
	$(CLANG_TIDY) --quiet tests/tidy.cpp -- $(REQUIRED)

# The compiler matrix: `make test` with each (g++ 12 and clang 14 are `make test` and
# test-clang14); clang 15 builds with -fno-rtti, clang 16 at C++23 (clang 16 spells it c++2b),
# g++ once more at -O0. The ci-* targets below build the same folders.
MATRIX_CLANG14 = BUILD=build-clang CXX=clang++
MATRIX_CLANG15 = BUILD=build-clang15 CXX=clang++-15 CXXFLAGS="-O2 -g -fno-rtti"
MATRIX_CLANG16 = BUILD=build-clang16 CXX=clang++-16 CXXFLAGS="-O2 -g -std=c++2b"
MATRIX_GCC_O0  = BUILD=build-gcc-O0 CXX=g++ CXXFLAGS="-O0 -g"
.PHONY: test-clang14 test-clang15 test-clang16 test-gcc-O0 test-matrix
test-clang14:
	$(MAKE) test $(MATRIX_CLANG14)
test-clang15:
	$(MAKE) test $(MATRIX_CLANG15)
test-clang16:
	$(MAKE) test $(MATRIX_CLANG16)
test-gcc-O0:
	$(MAKE) test $(MATRIX_GCC_O0)
test-matrix: test test-clang14 test-clang15 test-clang16 test-gcc-O0

# --- end packaging ---

# `make -j2 ci-build`: every program CI runs, compiled in parallel (the runs stay serial, in
# .ci/run). Each line is one configuration; make's job server shares the -j slots among them.
CI_BUILDS := ci-gcc ci-clang ci-asan ci-tsan ci-asan-clang ci-tsan-clang ci-bench \
  ci-clang15 ci-clang16 ci-gcc-O0 ci-hosts
.PHONY: ci-build $(CI_BUILDS)
ci-build: $(CI_BUILDS)
ci-gcc:
	$(MAKE) all $(BUILD)/stress $(BUILD)/stress-deep-O0 CXX=g++
ci-clang:
	$(MAKE) all BUILD=build-clang CXX=clang++
ci-asan:
	$(MAKE) build-asan/test build-asan/stress build-asan/stress-deep-O0 CXX=g++ $(ASAN_VARS)
ci-tsan:
	$(MAKE) build-tsan/test build-tsan/stress build-tsan/stress-deep-O0 CXX=g++ $(TSAN_VARS)
ci-asan-clang:
	$(MAKE) build-asan-clang/test CXX=clang++ BUILD=build-asan-clang \
	  CXXFLAGS="$(ASAN_FLAGS) -fno-sanitize=function"
ci-tsan-clang:
	$(MAKE) build-tsan-clang/test CXX=clang++ BUILD=build-tsan-clang CXXFLAGS="$(TSAN_FLAGS)"
ci-bench:
	$(MAKE) bench-build
ci-hosts:
	$(MAKE) $(HOST_TESTS) CXX=g++
	$(MAKE) $(subst $(BUILD)/,build-asan/,$(HOST_TESTS)) CXX=g++ $(ASAN_VARS)
	$(MAKE) $(subst $(BUILD)/,build-tsan/,$(HOST_TESTS)) CXX=g++ $(TSAN_VARS)
ci-clang15:
	$(MAKE) all $(MATRIX_CLANG15)
ci-clang16:
	$(MAKE) all $(MATRIX_CLANG16)
ci-gcc-O0:
	$(MAKE) build-gcc-O0/test $(MATRIX_GCC_O0)

# doctest comes from the system (Debian: doctest-dev). Install it if we can, else say how.
deps:
	@printf '\043include <doctest/doctest.h>\n' | $(CXX) -std=c++20 -x c++ -E - >/dev/null 2>&1 || \
	  sh tools/need doctest-dev

clean:
	rm -rf build build-*
