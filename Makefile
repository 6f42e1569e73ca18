# coro_jobs: `make run` builds and runs the demo, `make test` builds and runs the tests.
# Knobs: CXX, CXXFLAGS (e.g. `make test CXX=clang++ CXXFLAGS=-O0`), BUILD (output folder).
CXXFLAGS ?= -O2 -g
BUILD    ?= build
WARN     := -Wall -Wextra -Wpedantic -Werror
REQUIRED := -std=c++20 -I. -pthread

.PHONY: all run test nodiscard stress bench bench-build asan tsan stress-asan stress-tsan warnings deps clean

all: $(BUILD)/demo $(BUILD)/test

run: $(BUILD)/demo
	./$(BUILD)/demo

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

# Both compilers, warnings as errors, every program.
warnings:
	$(MAKE) all BUILD=build CXX=g++
	$(MAKE) all BUILD=build-clang CXX=clang++

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
bench-build: bench-deps $(BENCH)/ours $(BENCH)/peer_asio $(BENCH)/peer_glib $(BENCH)/w6_ours.o $(BENCH)/w6_asio.o
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
$(BENCH)/w6_ours.o: bench/w6_ours.cpp coro_jobs.hpp | $(BENCH)
	$(CXX) $(REQUIRED) $(WARN) $(BENCH_OPT) -c bench/w6_ours.cpp -o $@
$(BENCH)/w6_asio.o: bench/w6_asio.cpp | $(BENCH) bench-deps
	$(CXX) $(REQUIRED) -Wall -Wextra -Werror $(BENCH_OPT) $(BENCH_ASIO) -c bench/w6_asio.cpp -o $@
# --- end bench ---

# `make -j2 ci-build`: every program CI runs, compiled in parallel (the runs stay serial, in
# .ci/run). Each line is one configuration; make's job server shares the -j slots among them.
CI_BUILDS := ci-gcc ci-clang ci-asan ci-tsan ci-asan-clang ci-tsan-clang ci-bench
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

# doctest comes from the system (Debian: doctest-dev). Install it if we can, else say how.
deps:
	@printf '\043include <doctest/doctest.h>\n' | $(CXX) -std=c++20 -x c++ -E - >/dev/null 2>&1 || \
	  sh tools/need doctest-dev

clean:
	rm -rf build build-*
