#!/usr/bin/env python3
"""bench/peer_asyncio.py - the Python asyncio side of the benchmark.

Usage: peer_asyncio.py [--quick] [--only W1,...]; prints RESULT <workload> <metric> <value>.
A job is an asyncio Task. Sizes match bench/common.hpp, except where SCALE says otherwise
(CPython is slow enough that the full counts would take minutes); per-item metrics are
comparable anyway, and the report says which counts differ.
"""
import argparse
import asyncio
import concurrent.futures
import resource
import sys
import threading
import time


def sizes(quick):
    n = dict(w1_jobs=1000, w1_yields=1000, w2_jobs=1000000, w2_max_ms=1000,
             w3_seq=100000, w3_jobs=64, w3_each=1562, w4_short=1000, w4_long=300, w5_ms=2000)
    if quick:
        n.update(w1_yields=100, w2_jobs=20000, w2_max_ms=200, w3_seq=5000, w3_each=50,
                 w4_short=50, w4_long=10, w5_ms=200)
    else:  # the reductions for CPython (see bench/README.md)
        n.update(w2_jobs=200000, w3_seq=20000, w3_each=200)
    return n


def result(workload, metric, value):
    print(f"RESULT {workload} {metric} {value:.6g}", flush=True)


def fail(workload, what):
    print(f"FAILED {workload}: {what}", file=sys.stderr)
    sys.exit(1)


def mt19937(seed):
    """The outputs of C++'s std::mt19937(seed), so W2 sleeps the same delays everywhere."""
    mt = [0] * 624
    mt[0] = seed
    for i in range(1, 624):
        mt[i] = (1812433253 * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i) & 0xFFFFFFFF
    while True:
        for i in range(624):
            y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
            mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
        for y in mt:
            y ^= y >> 11
            y ^= (y << 7) & 0x9D2C5680
            y ^= (y << 15) & 0xEFC60000
            y ^= y >> 18
            yield y


def delays(n, max_ms):
    g = mt19937(12345)
    return [next(g) % max_ms for _ in range(n)]


def quantile(v, q):
    v = sorted(v)
    return v[int(q * (len(v) - 1) + 0.5)] if v else 0.0


def peak_rss():
    """VmHWM: ru_maxrss would include the parent's peak, which Linux carries over exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def cpu_seconds():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def thread_blocks():
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


now = time.perf_counter  # CLOCK_MONOTONIC on Linux, as steady_clock


# ---- W1: switches ----------------------------------------------------------------------

async def yielder(n, count):
    for _ in range(n):
        await asyncio.sleep(0)  # asyncio's bare yield
        count[0] += 1


async def w1_main(n):
    count = [0]
    t0 = now()
    await asyncio.gather(*(yielder(n["w1_yields"], count) for _ in range(n["w1_jobs"])))
    t1 = now()
    switches = n["w1_jobs"] * n["w1_yields"]
    if count[0] != switches:
        fail("W1", "wrong number of switches")
    result("W1", "ns_per_switch", (t1 - t0) * 1e9 / switches)


# ---- W2: many timers --------------------------------------------------------------------

async def sleeper(ms, late, i, done):
    t0 = now()
    await asyncio.sleep(ms / 1000)
    late[i] = (now() - t0) * 1e3 - ms
    done[0] += 1


def w2(n):
    count = n["w2_jobs"]
    delay = delays(count, n["w2_max_ms"])
    late = [-1e9] * count
    done = [0]
    loop = asyncio.new_event_loop()
    rss0 = peak_rss()
    t0 = now()
    for i in range(count):
        loop.create_task(sleeper(delay[i], late, i, done))

    async def wait_all():
        while done[0] < count:
            await asyncio.sleep(0.01)
    loop.run_until_complete(wait_all())
    t1 = now()
    rss1 = peak_rss()
    loop.close()
    if done[0] != count:
        fail("W2", "not every job ended")
    result("W2", "jobs", count)
    result("W2", "wall_s", t1 - t0)
    result("W2", "bytes_per_job", (rss1 - rss0) / count)
    result("W2", "late_p50_ms", quantile(late, 0.50))
    result("W2", "late_p99_ms", quantile(late, 0.99))


# ---- W3: threaded round trips ------------------------------------------------------------

def trivial(x, loop_thread, off):
    if threading.get_ident() != loop_thread:
        off.append(1)  # list.append is atomic under the GIL
    return x + 1


async def round_trips(pool, count, sums, loop_thread, off):
    loop = asyncio.get_running_loop()
    for i in range(count):
        r = await loop.run_in_executor(pool, trivial, i, loop_thread, off)
        sums[0] += r - i
        if threading.get_ident() != loop_thread:
            fail("W3", "resumed off the loop thread")


async def w3_main(n):
    me = threading.get_ident()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for metric, jobs, each in (("seq_us_per_trip", 1, n["w3_seq"]),
                                   ("par64_us_per_trip", n["w3_jobs"], n["w3_each"])):
            sums, off = [0], []
            t0 = now()
            await asyncio.gather(*(round_trips(pool, each, sums, me, off) for _ in range(jobs)))
            t1 = now()
            total = jobs * each
            if sums[0] != total or len(off) != total:
                fail("W3", "wrong count or thread")
            result("W3", metric, (t1 - t0) * 1e6 / total)


# ---- W4: timer precision -----------------------------------------------------------------

async def w4_main(n):
    for prefix, count, ms in (("1ms", n["w4_short"], 1), ("10ms", n["w4_long"], 10)):
        late = []
        for _ in range(count):
            t0 = now()
            await asyncio.sleep(ms / 1000)
            late.append((now() - t0) * 1e6 - ms * 1000)
        mx = max(late)
        result("W4", f"{prefix}_late_p50_us", quantile(late, 0.50))
        result("W4", f"{prefix}_late_p99_us", quantile(late, 0.99))
        result("W4", f"{prefix}_late_max_us", mx)


# ---- W5: idle ----------------------------------------------------------------------------

def w5(n):
    loop = asyncio.new_event_loop()
    cpu0, blocks0 = cpu_seconds(), thread_blocks()
    loop.run_until_complete(asyncio.sleep(n["w5_ms"] / 1000))
    blocks1, cpu1 = thread_blocks(), cpu_seconds()
    loop.close()
    result("W5", "cpu_ms", (cpu1 - cpu0) * 1e3)
    result("W5", "blocking_waits", blocks1 - blocks0)
    result("W5", "ctx_switches", blocks1 - blocks0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="")
    a = p.parse_args()
    want = set(a.only.split(",")) if a.only else {"W1", "W2", "W3", "W4", "W5"}
    n = sizes(a.quick)
    if "W1" in want:
        asyncio.run(w1_main(n))
    if "W2" in want:
        w2(n)
    if "W3" in want:
        asyncio.run(w3_main(n))
    if "W4" in want:
        asyncio.run(w4_main(n))
    if "W5" in want:
        w5(n)


if __name__ == "__main__":
    main()
