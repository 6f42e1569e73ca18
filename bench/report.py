#!/usr/bin/env python3
"""bench/report.py - runs the benchmark programs interleaved and prints the Markdown table.

Usage: python3 bench/report.py [--build DIR] [--reps N] [--quick] [--only W1,W6] [--out FILE]
The programs must be built already (bench/run.sh and `make bench` build them first).
Each workload runs in a fresh process per system and repetition, in the order
ours, asio, glib, asyncio, ours, asio, ... so that machine drift affects all alike; the
table shows medians and the (min-max) spread over the repetitions.
"""
import argparse
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SYSTEMS = ["ours", "asio", "glib", "asyncio"]
PEERS = SYSTEMS[1:]
WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7"]

# (workload, metric key, label, unit, target-check) in table order. A check gets the medians
# {system: value} and returns its verdict text, or None.
def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def verdict(ok, text):
    return f"{text} {'✅' if ok else '❌'}"


ROWS = [
    ("W1", "ns_per_switch", "W1 switches: 1000 jobs x 1000 yields", "ns/switch",
     lambda m: verdict(m["ours"] <= 15 and (ratio(m["asio"], m["ours"]) or 0) >= 8
                       and m["ours"] < (m["glib"] or 0),
                       "≤15 ns, ≥8x faster than Asio, < GLib")),
    ("W1", "bare_ns_per_switch", "W1 baseline: bare resume from a vector", "ns/switch",
     lambda m: None),
    ("W2", "jobs", "W2 timers: jobs", "count", lambda m: None),
    ("W2", "wall_s", "W2 timers: wall time", "s", lambda m: verdict(m["ours"] < 1.3, "< 1.3 s")),
    ("W2", "bytes_per_job", "W2 timers: peak RSS growth per job", "bytes",
     lambda m: verdict(m["ours"] <= 200, "≤ 200 B")),
    ("W2", "heap_per_job_bytes", "W2 timers: heap per started job (frame + state, malloc headers)", "bytes",
     lambda m: None),
    ("W2", "floor_frame_bytes", "W2 floor: frame of W2's job body, empty promise, one-word awaiter", "bytes",
     lambda m: None),
    ("W2", "floor_cancellable_frame_bytes", "W2 floor: the same with the least a cancellable sleep holds",
     "bytes", lambda m: None),
    ("W2", "late_p50_ms", "W2 timers: lateness p50", "ms", lambda m: None),
    ("W2", "late_p99_ms", "W2 timers: lateness p99", "ms",
     lambda m: verdict(m["ours"] < 100, "< 100 ms")),
    ("W3", "seq_us_per_trip", "W3 threads: 1 job, sequential round trips", "µs/trip",
     lambda m: verdict(m["ours"] <= m["asio"], "≤ Asio")),
    ("W3", "par64_us_per_trip", "W3 threads: 64 concurrent jobs", "µs/trip",
     lambda m: verdict(m["ours"] <= m["asio"], "≤ Asio")),
    ("W4", "1ms_late_p50_us", "W4 precision: 1 ms sleeps, lateness p50", "µs",
     lambda m: verdict(m["ours"] <= 1.2 * m["asio"], "≤ 1.2x Asio")),
    ("W4", "1ms_late_p99_us", "W4 precision: 1 ms sleeps, lateness p99", "µs", lambda m: None),
    ("W4", "1ms_late_max_us", "W4 precision: 1 ms sleeps, lateness max", "µs", lambda m: None),
    ("W4", "10ms_late_p50_us", "W4 precision: 10 ms sleeps, lateness p50", "µs",
     lambda m: verdict(m["ours"] <= 1.2 * m["asio"], "≤ 1.2x Asio")),
    ("W4", "10ms_late_p99_us", "W4 precision: 10 ms sleeps, lateness p99", "µs", lambda m: None),
    ("W4", "10ms_late_max_us", "W4 precision: 10 ms sleeps, lateness max", "µs", lambda m: None),
    ("W5", "cpu_ms", "W5 idle: one 2 s sleep, CPU time", "ms", lambda m: None),
    ("W5", "blocking_waits", "W5 idle: blocking waits (ours: ppoll calls; peers: voluntary ctx switches)",
     "count", lambda m: verdict(m["ours"] == 1, "exactly 1")),
    ("W5", "ctx_switches", "W5 idle: voluntary context switches of the loop thread", "count",
     lambda m: None),
    ("W6", "compile_s", "W6 compile: one job, one sleep (asio: only the headers it uses)", "s",
     lambda m: verdict(m["ours"] <= 0.8 * m["asio"], "≤ 0.8x Asio")),
    ("W6", "compile_whole_s", "W6 compile: same, asio via <asio.hpp>", "s", lambda m: None),
]

# W6 rows that compare a program of one row with a program of another: ours has one
# header-only program.
BORROW = {
    "compile_whole_s": {"ours": "compile_s"},
}


def commands(build, quick):
    q = ["--quick"] if quick else []
    return {
        "ours": [os.path.join(build, "ours")] + q,
        "asio": [os.path.join(build, "peer_asio")] + q,
        "glib": [os.path.join(build, "peer_glib")] + q,
        "asyncio": [sys.executable, os.path.join(HERE, "peer_asyncio.py")] + q,
    }


def run_program(cmd, workload):
    p = subprocess.run(cmd + ["--only", workload], capture_output=True, text=True, cwd=ROOT)
    found = {}
    for line in p.stdout.splitlines():
        m = re.match(r"RESULT (\S+) (\S+) (\S+)$", line)
        if m:
            found[(m.group(1), m.group(2))] = float(m.group(3))
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} --only {workload} failed ({p.returncode}): "
                           f"{p.stderr.strip()[-500:]}")
    return found


def compile_seconds(cxx, args):
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run([cxx] + args + ["-o", os.path.join(d, "w6.o")], check=True, cwd=ROOT)
        return time.perf_counter() - t0


def w6_commands(cxx):
    common = ["-std=c++20", "-O2", "-c"]
    asio = ["-DASIO_HAS_CO_AWAIT", "-DASIO_HAS_STD_COROUTINE"]  # needed by clang + libstdc++
    return [
        ("ours", "compile_s", common + ["-I.", "bench/w6_ours.cpp"]),
        ("asio", "compile_s", common + asio + ["bench/w6_asio.cpp"]),
        ("asio", "compile_whole_s", common + asio + ["-DW6_WHOLE", "bench/w6_asio.cpp"]),
    ]


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def machine(cxx):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    asio = sh("grep -m1 -o '^#define ASIO_VERSION [0-9]*' /usr/include/asio/version.hpp").split()[-1:] or ["?"]
    av = int(asio[0]) if asio[0].isdigit() else 0
    return [
        f"- machine: {os.cpu_count()} CPUs (nproc {sh('nproc')}), {cpu}, Linux {platform.release()}",
        f"- compiler: {sh(shlex.quote(cxx) + ' --version').splitlines()[0]} (-O2 -DNDEBUG)",
        f"- peers: Asio {av // 100000}.{av // 100 % 1000}.{av % 100}, "
        f"GLib {sh('pkg-config --modversion glib-2.0')}, Python {platform.python_version()}",
    ]


def fmt(v):
    if v is None:
        return "–"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


# W7: the same program under the native loop and each host adapter (bench/w7_hosted.cpp).
W7_HOSTS = ["native", "glib", "guest", "qt", "pump"]
W7_ROWS = [
    ("late_p50_us", "W7 hosted: 1 ms sleep lateness p50", "µs", 1.5),
    ("late_p99_us", "W7 hosted: 1 ms sleep lateness p99", "µs", None),
    ("seq_us_per_trip", "W7 hosted: threaded_task round trip, sequential", "µs/trip", 1.5),
    ("par64_us_per_trip", "W7 hosted: threaded_task round trip, 64 jobs", "µs/trip", None),
    ("idle_cpu_ms", "W7 hosted: CPU over one 2 s sleep", "ms", 1.2),
]


def w7_table(build, quick, reps):
    exe = os.path.join(build, "w7_hosted")
    if not os.path.exists(exe):
        return [], ["W7: build-bench/w7_hosted missing"]
    vals, errors = {}, []
    for _ in range(reps):
        for h in W7_HOSTS:
            cmd = [exe, "--host", h] + (["--quick"] if quick else [])
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if p.returncode != 0:
                if h != "qt":  # built without Qt: no qt column
                    errors.append(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-300:]}")
                continue
            for line in p.stdout.splitlines():
                m = re.match(r"RESULT W7 (\w+?)_(\S+) (\S+)$", line)
                if m:
                    vals.setdefault(m.group(2), {}).setdefault(m.group(1), []).append(float(m.group(3)))
    hosts = [h for h in W7_HOSTS if any(h in v for v in vals.values())]
    peers = [h for h in hosts if h != "native"]
    head = ["workload", "metric", *hosts, *(f"{h}/native" for h in peers), "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, unit, limit in W7_ROWS:
        per = vals.get(key, {})
        med = {h: statistics.median(per[h]) if h in per else None for h in hosts}
        cells = [fmt(med[h]) + (f" ({fmt(min(per[h]))}–{fmt(max(per[h]))})"
                                if h in per and len(per[h]) > 1 and min(per[h]) != max(per[h]) else "")
                 for h in hosts]
        rs = {h: ratio(med[h], med.get("native")) for h in peers}
        ratios = [fmt(rs[h]) + ("x" if rs[h] else "") for h in peers]
        target = ""
        if limit and med.get("native"):
            ok = all(rs[h] is not None and rs[h] <= limit for h in ("glib", "qt") if h in rs)
            target = verdict(ok, f"glib, qt ≤ {limit}x native")
        if key == "seq_us_per_trip" and "guest" in rs and "pump" in med and med["pump"]:
            ok3 = rs["guest"] is not None and rs["guest"] <= 3
            ok10 = all(med[h] and med["pump"] / med[h] >= 10 for h in ("glib", "guest", "qt") if h in med)
            target += "; " + verdict(ok3, "guest ≤ 3x native") + "; " + verdict(ok10, "each ≥ 10x better than the pump")
        lines.append(f"| {label} | {unit} | " + " | ".join(cells + ratios + [target]) + " |")
    return lines, errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build-bench"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"))
    ap.add_argument("--cxx", default=os.environ.get("BENCH_CXX", "g++"))
    a = ap.parse_args()
    wanted = [w for w in WORKLOADS if not a.only or w in a.only.split(",")]
    cmds = commands(os.path.abspath(a.build), a.quick)
    values = {}  # (workload, metric) -> system -> [values]
    errors = []
    started = time.perf_counter()

    for rep in range(a.reps):
        for w in wanted:
            if w == "W7":
                continue  # its own table, below
            if w == "W6":
                for system, metric, args in w6_commands(a.cxx):
                    values.setdefault((w, metric), {}).setdefault(system, []).append(
                        compile_seconds(a.cxx, args))
                continue
            for system in SYSTEMS:
                try:
                    found = run_program(cmds[system], w)
                except RuntimeError as e:
                    errors.append(str(e))
                    print(f"bench: {e}", file=sys.stderr)
                    continue
                for key, v in found.items():
                    values.setdefault(key, {}).setdefault(system, []).append(v)
        print(f"bench: repetition {rep + 1}/{a.reps} done after "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)

    head = ["workload", "metric", *SYSTEMS, *(f"ours/{p}" for p in PEERS), "target (ours)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w, key, label, unit, check in ROWS:
        if w not in wanted or (w, key) not in values:
            continue
        per = dict(values[(w, key)])
        for system, other in BORROW.get(key, {}).items():
            if ("W6", other) in values and system in values[("W6", other)]:
                per[system] = values[("W6", other)][system]
        med = {s: statistics.median(per[s]) if s in per else None for s in SYSTEMS}
        cells = []
        for s in SYSTEMS:
            if s not in per:
                cells.append("–")
            elif len(per[s]) > 1 and min(per[s]) != max(per[s]):
                cells.append(f"{fmt(med[s])} ({fmt(min(per[s]))}–{fmt(max(per[s]))})")
            else:
                cells.append(fmt(med[s]))
        ratios = ["–" if key == "jobs" else
                  fmt(ratio(med["ours"], med[p])) + ("x" if ratio(med["ours"], med[p]) else "")
                  for p in PEERS]
        try:
            target = check(med) or ""
        except TypeError:
            target = ""
        if key == "bare_ns_per_switch":
            b = med["ours"]
            o = statistics.median(values[("W1", "ns_per_switch")]["ours"]) \
                if ("W1", "ns_per_switch") in values and "ours" in values[("W1", "ns_per_switch")] else None
            if o and b:
                target = verdict(o <= 5 * b, f"ours ≤ 5x bare: {o / b:.1f}x")
        lines.append(f"| {label} | {unit} | " + " | ".join(cells + ratios + [target]) + " |")

    w7_lines = []
    if "W7" in wanted:
        w7_lines, w7_errors = w7_table(os.path.abspath(a.build), a.quick, a.reps)
        errors += w7_errors
    elapsed = time.perf_counter() - started
    size_note = ("--quick sizes (see bench/common.hpp)" if a.quick else
                 "asyncio runs smaller counts where CPython is slow: W2 200,000 jobs (not "
                 "1,000,000), W3 20,000 sequential trips and 64 x 200 concurrent (not 100,000 "
                 "and 64 x 1,562); per-item metrics are comparable, W2 wall time is not")
    out = [
        "# coro_jobs benchmark results",
        "",
        f"Command: `make bench` (runs `{shlex.join(['python3', 'bench/report.py'] + sys.argv[1:])}`); "
        f"{a.reps} runs per workload and system, interleaved; cells are median (min–max); "
        f"ratios are of medians (below 1x: ours is smaller, i.e. faster/leaner).",
        "",
        *machine(a.cxx),
        f"- sizes: {size_note}",
        f"- W6 compiles with `{a.cxx} -std=c++20 -O2 -c`; the whole run took {elapsed:.0f} s",
        "",
        *lines,
        "",
    ]
    if w7_lines:
        out += ["W7 runs the same jobs under the loop's own run() (native), inside a GMainContext "
                "(hosts/coro_jobs_glib.hpp), as a guest of a host that only runs posted functions "
                "(hosts/coro_jobs_guest.hpp), inside Qt (hosts/coro_jobs_qt.hpp) and, as the "
                "baseline a user would write without an adapter, a 1 ms GLib timeout calling "
                "run_once(0s) (pump); ratios are to native.", "", *w7_lines, ""]
    if errors:
        out += ["Failures:", ""] + [f"- {e}" for e in errors] + [""]
    text = "\n".join(out)
    print(text)
    with open(a.out, "w") as f:
        f.write(text)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
