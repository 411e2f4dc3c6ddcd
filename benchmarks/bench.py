#!/usr/bin/env python3
"""jprobe benchmark: the cost of one probe hit, against no probe, a kernel uprobe,
Frida's Interceptor and E9Patch.

Run from the repository root:  python benchmarks/bench.py  [--runs 5] [--quick]
Prints a Markdown table and writes it to benchmarks/RESULTS.md.

Workload: benchmarks/loop.c calls a noinline `target(i)` N times and prints the
loop's ns/iteration (clock_gettime around the loop only, so patch-time,
start-up and report-writing costs are excluded).  Every row reports the median
of --runs runs.  Overhead is ns/iteration minus row (1)'s; the ratio compares a
row's overhead with that of a jprobe `count` probe at `target`.  Rows 2r and 4r run the loop
under `jprobe run` instead of patching the file; row 2a attaches to it while it waits to start.
A second table shows how hits/s scale with threads (benchmarks/threads.c, T = 1, 2, 4, 8) under
`jprobe run`, a third what planning many probes costs (benchmarks/plan_scale.py), and a fourth
how long attaching to a running process takes (benchmarks/attach_scale.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import attach_scale                 # benchmarks/attach_scale.py, next to this file
import plan_scale                   # benchmarks/plan_scale.py, next to this file

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
BUILD = BENCH / "build"
TRACEFS = Path("/sys/kernel/tracing")


class Skip(Exception):
    """A row that cannot run here; the message says why."""


def env_with(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("JPROBE_REPORT", None)
    env.update(extra or {})
    return env


def sh(cmd, env=None, check=True, timeout=900):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env_with(env), timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {r.returncode}: {r.stderr.strip()[-500:]}")
    return r


def jprobe(*args):
    r = sh([sys.executable, "-m", "jprobe", *args], check=False)
    if r.returncode != 0:
        raise Skip(f"jprobe {args[0]} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return r


# ---------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------

def build():
    BUILD.mkdir(exist_ok=True)
    loop = BUILD / "loop"
    sh(["gcc", "-O2", "-g", "-fPIE", "-pie", "-o", loop, BENCH / "loop.c"])
    libs = []
    for name in ("callback", "callback_fp"):
        lib = BUILD / f"{name}.so"
        sh(["gcc", "-O2", "-shared", "-fPIC", "-I", REPO / "jprobe" / "runtime_c", "-o", lib, BENCH / f"{name}.c"])
        libs.append(lib)
    return loop, *libs


def build_short():
    """loop.c with SHORT_TARGET: the same loop around a 4-byte function only a pun can probe."""
    out = BUILD / "loop_short"
    sh(["gcc", "-O2", "-g", "-DSHORT_TARGET", "-fPIE", "-pie", "-o", out, BENCH / "loop.c"])
    return out


def build_rdtsc():
    """loop.c with RDTSC_TARGET: `target` reads the time stamp counter, as a trace probe does."""
    out = BUILD / "loop_rdtsc"
    sh(["gcc", "-O2", "-g", "-DRDTSC_TARGET", "-fPIE", "-pie", "-o", out, BENCH / "loop.c"])
    return out


def build_threads():
    out = BUILD / "threads"
    sh(["gcc", "-O2", "-g", "-fPIE", "-pie", "-pthread", "-o", out, BENCH / "threads.c"])
    return out


def symbol_address(binary, name):
    out = sh(["nm", binary]).stdout
    m = re.search(rf"^([0-9a-f]+) [Tt] {re.escape(name)}$", out, re.M)
    if not m:
        raise RuntimeError(f"no symbol {name} in {binary}")
    return int(m.group(1), 16)


def call_site_in_main(binary):
    """Link-time address of the `call target` instruction in main's loop (objdump)."""
    out = sh(["objdump", "-d", "--no-show-raw-insn", f"--disassemble=main", binary]).stdout
    sites = [int(m.group(1), 16) for m in re.finditer(r"^\s*([0-9a-f]+):\s+call\s+[0-9a-f]+ <target>", out, re.M)]
    if len(sites) != 1:
        raise RuntimeError(f"expected one `call target` in main, found {len(sites)}")
    return sites[0]


def vaddr_to_offset(binary, vaddr):
    out = sh(["readelf", "-lW", binary]).stdout
    for m in re.finditer(r"^\s*LOAD\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)", out, re.M):
        off, va, filesz = (int(x, 16) for x in m.groups())
        if va <= vaddr < va + filesz:
            return vaddr - va + off
    raise RuntimeError(f"{vaddr:#x} not in a PT_LOAD segment of {binary}")


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------

def parse_ns(text):
    m = re.search(r"ns_per_iter=([0-9.]+)", text)
    if not m:
        raise RuntimeError(f"no ns_per_iter in output: {text!r}")
    return float(m.group(1))


def run_loop(binary, n, env=None, expect_hits=None):
    """One run; returns ns/iteration.  With expect_hits, checks the jprobe report's hits."""
    extra = dict(env or {})
    report = None
    if expect_hits is not None:
        report = Path(tempfile.mkdtemp(prefix="jpbench-")) / "report.json"
        extra["JPROBE_REPORT"] = str(report)
    r = sh([binary, n], env=extra)
    ns = parse_ns(r.stdout)
    if report is not None:
        if not report.exists():
            raise RuntimeError("the patched loop wrote no JPROBE_REPORT")
        hits = sum(p["hits"] for p in json.loads(report.read_text())["probes"])
        shutil.rmtree(report.parent, ignore_errors=True)
        if hits != expect_hits:
            raise RuntimeError(f"report says {hits} hits, expected {expect_hits}")
    return ns


def median_runs(fn, runs):
    vals = [fn() for _ in range(runs)]
    return statistics.median(vals), vals


# ---------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------

def row_jprobe(loop, spec, n, runs, name):
    """The loop rewritten by `jprobe patch` with `spec` (or a list of specs, each hit N times)."""
    specs = [spec] if isinstance(spec, str) else spec
    out = BUILD / name
    if out.exists():
        out.unlink()
    jprobe("patch", loop, "-o", out, *[a for s in specs for a in ("-p", s)])
    return median_runs(lambda: run_loop(out, n, expect_hits=n * len(specs)), runs)


def jprobe_run(argv, spec, expect_hits):
    """`jprobe run -p SPEC --report FILE -- ARGV`: its stdout, after checking the exit status
    and that the report counts exactly expect_hits."""
    d = Path(tempfile.mkdtemp(prefix="jpbench-run-"))
    try:
        report = d / "report.json"
        r = sh([sys.executable, "-m", "jprobe", "run", "-p", spec, "--report", report, "--", *argv], check=False)
        if r.returncode != 0:
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
            raise RuntimeError(f"jprobe run exited {r.returncode}: {last}")
        if not report.exists():
            raise RuntimeError("jprobe run wrote no --report")
        hits = sum(p["hits"] for p in json.loads(report.read_text())["probes"])
        if hits != expect_hits:
            raise RuntimeError(f"jprobe run's report says {hits} hits, expected {expect_hits}")
        return r.stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)


# A ring that holds every record of the trace row, mapped populated: nobody drains a rewritten
# program's ring, and what the row measures is a hit, not the first touch of the ring's pages
# (a lap of a drained ring under `jprobe run` touches them once).
TRACE_RING = {"JPROBE_RING_WORDS": str(1 << 22), "JPROBE_RING_PREFAULT": "1"}


def row_jprobe_trace(loop, n, runs):
    """`trace(arg1)` at `target` in a rewritten loop; the report must count n hits, none lost."""
    out = BUILD / "loop.trace"
    if out.exists():
        out.unlink()
    jprobe("patch", loop, "-o", out, "-p", "target=trace(arg1)")

    def once():
        d = Path(tempfile.mkdtemp(prefix="jpbench-trace-"))
        try:
            r = sh([out, n], env=dict(TRACE_RING, JPROBE_REPORT=str(d / "report.json")))
            (p,) = json.loads((d / "report.json").read_text())["probes"]
            if (p["hits"], p["lost"], p.get("events_count", len(p.get("events", [])))) != (n, 0, n):
                raise RuntimeError(f"report: {p['hits']} hits, {p['lost']} lost; expected {n} events")
            return parse_ns(r.stdout)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return median_runs(once, runs)


def row_jprobe_run(loop, spec, n, runs):
    """The loop started by `jprobe run`: the runtime patches it in-process at start-up."""
    return median_runs(lambda: parse_ns(jprobe_run([loop, n], spec, n)), runs)


def row_jprobe_attach(loop, n, runs):
    """The loop attached to while it waits to start (LOOP_WAIT): the probe written into it live."""
    return median_runs(lambda: parse_ns(attach_scale.live_count(loop, n)), runs)


def parse_rate(text):
    m = re.search(r"calls_per_sec=([0-9.]+)", text)
    if not m:
        raise RuntimeError(f"no calls_per_sec in output: {text!r}")
    return float(m.group(1))


THREAD_COUNTS = (1, 2, 4, 8)


def thread_scaling(prog, n, runs):
    """benchmarks/threads.c, T threads pinned round-robin to the CPUs, each calling `target`
    n times: {T: (median calls/s unprobed, median hits/s under `jprobe run -p target`)}.
    The runs of the different T are interleaved, so that a change in the machine's other load
    affects them alike.  Every probed run's report must count exactly T*n hits."""
    plain = {t: [] for t in THREAD_COUNTS}
    probed = {t: [] for t in THREAD_COUNTS}
    for _ in range(runs):
        for t in THREAD_COUNTS:
            plain[t].append(parse_rate(sh([prog, t, n, "pin"]).stdout))
            probed[t].append(parse_rate(jprobe_run([prog, t, n, "pin"], "target", t * n)))
    return {t: (statistics.median(plain[t]), statistics.median(probed[t])) for t in THREAD_COUNTS}


def thread_table(n, runs):
    lines = ["", f"### Threads: `jprobe run -p target` on benchmarks/threads.c "
                 f"({os.cpu_count()} CPUs; threads pinned round-robin; N = {fmt_n(n)} calls per thread)", ""]
    try:
        res = thread_scaling(build_threads(), n, runs)
    except Exception as e:
        return lines + [f"thread scaling failed: {e}"]
    lines.append("| T | no probe: calls/s | speed-up vs T=1 | `jprobe run` count: hits/s | speed-up vs T=1 "
                 "| report hits |")
    lines.append("|---:|---:|---:|---:|---:|---|")
    p1, j1 = res[1]
    for t in THREAD_COUNTS:
        p, j = res[t]
        lines.append(f"| {t} | {p / 1e6:.0f} M | {p / p1:.2f}x | {j / 1e6:.0f} M | {j / j1:.2f}x "
                     f"| = T x N in every run |")
    speedup = res[2][1] / j1
    lines.append("")
    lines.append(f"Bar: 2 threads >= 1.6x one thread under `jprobe run`: "
                 f"{speedup:.2f}x, {'met' if speedup >= 1.6 else 'NOT met'} "
                 f"(unprobed the machine gives {res[2][0] / p1:.2f}x).")
    return lines


def tracefs_reason():
    ev = TRACEFS / "uprobe_events"
    if not ev.exists() and os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
    if not ev.exists():
        return "no tracefs uprobe_events (needs root and CONFIG_UPROBE_EVENTS)"
    if not os.access(ev, os.W_OK):
        return "uprobe_events not writable (needs root)"
    return None


def append_line(path, line):
    # O_APPEND without truncation (other probes stay); Python's "a" mode seeks, which tracefs refuses
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def row_kernel_uprobe(loop, target, n, runs, kind="p"):
    """A kernel uprobe (`kind` "p") or uretprobe ("r") at `target`, enabled as a tracefs event."""
    reason = tracefs_reason()
    if reason:
        raise Skip(reason)
    d = Path(tempfile.mkdtemp(prefix="jpbench-uprobe-"))
    copy = d / "loop"
    shutil.copy2(loop, copy)  # a private inode: nothing else runs it while probed
    name = f"jpbench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    ev = TRACEFS / "uprobe_events"
    enable = TRACEFS / "events" / name / name / "enable"
    added = False
    try:
        append_line(ev, f"{kind}:{name}/{name} {copy}:{vaddr_to_offset(loop, target):#x}")
        added = True
        enable.write_text("1\n")
        res = median_runs(lambda: run_loop(copy, n), runs)
        hits = 0
        fd = os.open(TRACEFS / "uprobe_profile", os.O_RDONLY)
        try:  # one large read: a multi-call read can skip lines while others edit the list
            profile = os.read(fd, 1 << 22).decode(errors="replace")
        finally:
            os.close(fd)
        for line in profile.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[-2] == name:
                hits = int(parts[-1])
        if hits != n * runs:
            raise RuntimeError(f"kernel uprobe counted {hits}, expected {n * runs}")
        return res
    finally:
        if added:
            try:
                enable.write_text("0\n")
            except OSError:
                pass
            append_line(ev, f"-:{name}/{name}")
        shutil.rmtree(d, ignore_errors=True)


FRIDA_SCRIPT = """
const counter = Memory.alloc(8);
const cm = new CModule(`
#include <gum/guminterceptor.h>
extern volatile long hits;
void onEnter(GumInvocationContext *ic) { hits++; }
`, { hits: counter });
Interceptor.attach(Process.mainModule.base.add(%d), cm);
send("attached");
"""

# onEnter and onLeave, both C: what a `%return` probe with an entry probe does.
FRIDA_LEAVE_SCRIPT = """
const counter = Memory.alloc(8);
const cm = new CModule(`
#include <gum/guminterceptor.h>
extern volatile long hits;
void onEnter(GumInvocationContext *ic) { hits++; }
void onLeave(GumInvocationContext *ic) { hits++; }
`, { hits: counter });
Interceptor.attach(Process.mainModule.base.add(%d), cm);
send("attached");
"""


def frida_run(loop, target, n, script_text=FRIDA_SCRIPT):
    import frida
    dev = frida.get_local_device()
    d = Path(tempfile.mkdtemp(prefix="jpbench-frida-"))
    result = d / "result.txt"
    done = threading.Event()
    pid = dev.spawn([str(loop), str(n)], env={"LOOP_RESULT": str(result)}, stdio="pipe")
    try:
        session = dev.attach(pid)
        session.on("detached", lambda *a: done.set())
        script = session.create_script(script_text % target)  # a PIE: link-time address = offset
        script.load()
        dev.resume(pid)
        if not done.wait(600):
            raise RuntimeError("the Frida-instrumented loop did not finish")
        if not result.exists():
            raise RuntimeError("the Frida-instrumented loop wrote no result (crashed?)")
        return parse_ns(result.read_text())
    finally:
        shutil.rmtree(d, ignore_errors=True)


def row_frida(loop, target, n, runs, script_text=FRIDA_SCRIPT):
    try:
        import frida  # noqa: F401
    except ImportError:
        raise Skip("the frida Python package is not installed (pip install '.[bench]')")
    return median_runs(lambda: frida_run(loop, target, n, script_text), runs)


def row_e9patch(loop, target, n, runs):
    e9tool = shutil.which("e9tool")
    if e9tool is None:
        raise Skip("no e9tool on PATH")
    out = BUILD / "loop.e9"
    # an empty ("passthru") trampoline at target's entry: E9Patch's floor cost per hit
    sh([e9tool, "-M", f"addr == {target:#x}", "-P", "passthru", "-o", out, loop])
    return median_runs(lambda: run_loop(out, n), runs)


# ---------------------------------------------------------------------------
# syscall / SIGTRAP proof
# ---------------------------------------------------------------------------

def strace_total(argv, env):
    d = Path(tempfile.mkdtemp(prefix="jpbench-strace-"))
    try:
        log = d / "strace.txt"
        sh(["strace", "-f", "-c", "-o", log, *argv], env=env)
        m = re.search(r"^\s*100\.00\s+\S+\s+\S+\s+(\d+)\s+(?:\d+\s+)?total\s*$", log.read_text(), re.M)
        return int(m.group(1)) if m else None
    finally:
        shutil.rmtree(d, ignore_errors=True)


def syscall_proof(loop):
    if shutil.which("strace") is None:
        return "syscall proof skipped: strace is not installed"
    out = BUILD / "loop.count"
    if not out.exists():
        return "syscall proof skipped: the count-probed loop could not be built"
    d = Path(tempfile.mkdtemp(prefix="jpbench-sig-"))
    # a fresh report path per run: an existing report makes the runtime write PATH.PID instead
    totals = {n: strace_total([out, n], {"JPROBE_REPORT": str(d / f"r{n}.json")}) for n in (10**3, 10**6)}
    log = d / "signals.txt"
    sh(["strace", "-f", "-e", "trace=none", "-e", "signal=all", "-o", log, out, 10**6],
       env={"JPROBE_REPORT": str(d / "sig.json")})
    traps = log.read_text().count("SIGTRAP")
    shutil.rmtree(d, ignore_errors=True)
    return (f"Zero-syscall proof (`strace -f -c`, count probe at `target`): "
            f"{totals[10**3]} syscalls at 10^3 hits, {totals[10**6]} at 10^6 hits; "
            f"SIGTRAPs delivered during 10^6 hits: {traps}.")


def planning_table(runs):
    """Planning at scale (benchmarks/plan_scale.py): N libc probes under `jprobe run`, and
    python3.11 rewritten with 1,000 probes."""
    try:
        table = plan_scale.table(plan_scale.rows(list(plan_scale.SIZES), runs, patch=True))
    except Exception as e:  # the hit-cost rows above stand on their own
        table = f"failed: {e}\n"
    return (f"### Planning at scale (benchmarks/plan_scale.py; median of {runs} runs)\n\n{table}")


def attach_table(loop, runs):
    """Attach latency (benchmarks/attach_scale.py): 1, 100 and 1,000 libc probes into a running
    process through the API, step by step, and the `jprobe attach` command end to end."""
    try:
        table = attach_scale.table(*attach_scale.measure(loop, runs))
    except Exception as e:  # the other tables stand on their own
        table = f"failed: {e}\n"
    return f"### Attach latency (benchmarks/attach_scale.py; ms, median of {runs} runs)\n\n{table}"


def returns_bar(results):
    """Issue 13's bar for `%return`: a followed return <= +10 ns, an entry and return pair <= +20 ns,
    each >= 100x cheaper than the kernel's uretprobe and >= 5x cheaper than Frida's onLeave."""
    def over(rid):
        med = results[rid][2]
        return None if med is None or results["1"][2] is None else med - results["1"][2]
    ret, pair, kernel, frida = over("10"), over("10p"), over("11"), over("12")
    if ret is None or pair is None:
        return "Bar (%return): rows 10 and 10p did not run."
    parts = [f"Bar (%return): row 10 +{ret:.2f} ns (<= +10: {'met' if ret <= 10 else 'NOT met'}), "
             f"row 10p +{pair:.2f} ns (<= +20: {'met' if pair <= 20 else 'NOT met'})"]
    if kernel is not None:
        parts.append(f"kernel uretprobe / row 10 = {kernel / ret:.0f}x (>= 100x)")
    if frida is not None:
        parts.append(f"Frida onEnter+onLeave / row 10p = {frida / pair:.1f}x (>= 5x)")
    return "; ".join(parts) + "."


def live_bar(results):
    """The issue's bar for row 2a: a live count probe costs what a static one does."""
    static, live = results["2"][2], results["2a"][2]
    if static is None or live is None:
        return "Bar: live count probes cost what static ones do (<= +2 ns a hit): not measured."
    extra = live - static
    return (f"Bar: live count probes cost what static ones do (<= +2 ns a hit): row 2a - row 2 = "
            f"{extra:+.2f} ns, {'met' if extra <= 2 else 'NOT met'}.")


def trace_bar(results):
    """The issue's bar for row 9: a trace(arg1) hit costs <= 15 ns beyond one time stamp read."""
    base, tsc, trace = results["1"][2], results["9a"][2], results["9"][2]
    if None in (base, tsc, trace):
        return "Bar: trace(arg1) <= +15 ns a hit beyond rdtsc's own cost: not measured."
    extra = (trace - base) - (tsc - base)
    return (f"Bar: trace(arg1) <= +15 ns a hit beyond rdtsc's own cost ({tsc - base:.2f} ns, row 9a - row 1): "
            f"row 9 - row 9a = {extra:+.2f} ns, {'met' if extra <= 15 else 'NOT met'}.")


# ---------------------------------------------------------------------------

RESULTS_HEADER = """## Benchmark: the cost of a probe hit

Produced by `python benchmarks/bench.py` (or `make bench`) from the repository root.
`benchmarks/loop.c` calls a noinline `target(i)` N times and times the loop alone with
`clock_gettime`, so patching, start-up and report writing are not counted.  Each row is the
median of 5 runs; "overhead" subtracts row (1), and the ratio divides a row's overhead by
that of row (2).  jprobe rows check that the report counts exactly N hits.  Row (3) puts the
probe on the `call target` instruction of the loop, so it measures a relocated call that
pushes the original return address.  Row (5) enables the uprobe as a tracefs event (each hit
is a trap into the kernel plus a ring-buffer record); Row (6) spawns the loop under Frida and
attaches a CModule `onEnter` to `target` before resuming it.  Rows 2r and 4r start the same
loop with `jprobe run` (the preloaded runtime patches it in-process at start-up) instead of
running a file written by `jprobe patch`.  Row 2a starts the loop with LOOP_WAIT=1, so that it
waits for a line on stdin before its timed loop, attaches to it with `jprobe.attach(pid)`, places
the probe, lets it run and checks that `Probe.hits` read from the shared counters is exactly N.
Row 9a times the loop with a `target` that reads the time stamp counter (`rdtsc`), so that its
overhead is the time stamp's own cost; row 9 puts `trace(arg1)` at `target` (one 3-word record a
hit into the thread's ring, and the count), with a ring big enough for every record and mapped
populated (JPROBE_RING_PREFAULT), and checks that the report has N events and none lost.
Row (10) follows `target`'s return (`target%return`: the entry hijacks the return address, the
return trampoline counts and goes back); row (10p) adds a count at the entry too (both on one
site); rows (11) and (12) are the kernel's uretprobe and Frida's onEnter + onLeave on the same
function.
Rows whose tool is missing say why they were skipped.

The thread table runs `benchmarks/threads.c`: T threads, pinned round-robin to the CPUs the
process may use, each call a noinline `target` N times after a common start barrier; the time
runs from the barrier to the last join.  Each cell is the median over the runs of the aggregate
calls (hits) per second, unprobed and under `jprobe run -p target`; every probed run's report
must count exactly T x N hits.

The planning table times `jprobe run -p libc.so.6:F ... -- /bin/true` with N of libc's exported
functions (spread over the library; "all": every one) and `jprobe patch` of python3.11 with
1,000 of its exported functions: the whole command's wall time and peak RSS, then, in a
process of its own, the planning alone (what the command does before it runs the program or
writes the file), wall and CPU seconds, and the time to import jprobe, which it excludes.

The attach table puts N of libc's exported functions (spread over the library, as above, leaving
out those whose entry would need a trap, which attach refuses) into `benchmarks/loop.c` waiting
under LOOP_WAIT=1 (one thread, blocked in `read`).  Each run is a fresh interpreter with jprobe
imported and a fresh target: "cold" times `jprobe.attach(pid)` then `Process.probes(specs)`, from
the call until it returns with the probes live (libc parsed in the call; the first attach to libc
in the target injects its shared region), split into the steps `LiveSession.timings` records
(planning; stopping the threads; injecting, the remote `memfd_create` and `mmap`; patching;
resuming them) and the rest of the call (parsing the specs, reading /proc, finding the module);
"detach" times leaving the session.  "warm": the same interpreter attaches to the same target again
after that detach (a fresh `Process`: libc parsed again, the region found and reused).  The last
rows time `python -m jprobe attach PID -p ... --duration 0.01 --json` (a fresh target each run)
from its start to its exit, checking that its report lists every probe.

"""


def fmt_n(n):
    """10^8, 2x10^6, ..."""
    e = len(str(n)) - 1
    m = n // 10**e
    return (f"{m}x" if m != 1 else "") + f"10^{e}" if n == m * 10**e else str(n)


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="10x smaller N everywhere (a smoke test)")
    ap.add_argument("--out", default=str(BENCH / "RESULTS.md"))
    a = ap.parse_args()
    scale = 10 if a.quick else 1
    N_FAST, N_CB, N_FRIDA, N_KERNEL = 10**8 // scale, 10**7 // scale, 2 * 10**6 // scale, 10**6 // scale
    N_TRACE = 10**6 // scale

    loop, cb, cb_fp = build()
    target = symbol_address(loop, "target")
    main_a = symbol_address(loop, "main")
    call_site = call_site_in_main(loop)

    rows = [
        ("1", "no probe", N_FAST, lambda: median_runs(lambda: run_loop(loop, N_FAST), a.runs)),
        ("2", "jprobe static `count` at `target` entry", N_FAST,
         lambda: row_jprobe(loop, "target", N_FAST, a.runs, "loop.count")),
        ("2r", "`jprobe run` `count` at `target` entry", N_FAST,
         lambda: row_jprobe_run(loop, "target", N_FAST, a.runs)),
        ("2a", "count probe, live (`jprobe.attach` to the waiting loop) at `target` entry", N_FAST,
         lambda: row_jprobe_attach(loop, N_FAST, a.runs)),
        ("3", "jprobe static `count` on the `call target` site", N_FAST,
         lambda: row_jprobe(loop, f"main+{call_site - main_a:#x}", N_FAST, a.runs, "loop.callsite")),
        ("4", "jprobe static C callback (full context; vector state provably untouched) at `target`", N_CB,
         lambda: row_jprobe(loop, f"target={cb}:on_hit", N_CB, a.runs, "loop.callback")),
        ("4b", "jprobe static C callback using floating point (all vector state saved) at `target`", N_CB,
         lambda: row_jprobe(loop, f"target={cb_fp}:on_hit", N_CB, a.runs, "loop.callback_fp")),
        ("4r", "`jprobe run` C callback (the vector-free one of row 4) at `target`", N_CB,
         lambda: row_jprobe_run(loop, f"target={cb}:on_hit", N_CB, a.runs)),
        ("5", "kernel uprobe at `target` (tracefs event)", N_KERNEL,
         lambda: row_kernel_uprobe(loop, target, N_KERNEL, a.runs)),
        ("6", "Frida Interceptor, CModule onEnter at `target`", N_FRIDA,
         lambda: row_frida(loop, target, N_FRIDA, a.runs)),
        ("7", "E9Patch (e9tool, empty trampoline) at `target`", N_FAST,
         lambda: row_e9patch(loop, target, N_FAST, a.runs)),
        ("8a", "no probe, loop.c with SHORT_TARGET (a 4-byte `target`, another function right after it)", N_FAST,
         lambda: median_runs(lambda: run_loop(build_short(), N_FAST), a.runs)),
        ("8", "jprobe static `count` at that 4-byte `target` (punned jump; overhead vs 8a)", N_FAST,
         lambda: row_jprobe(build_short(), "target", N_FAST, a.runs, "loop_short.count")),
        ("9a", "no probe, loop.c with RDTSC_TARGET (`target` reads the time stamp: rdtsc's own cost)", N_FAST,
         lambda: median_runs(lambda: run_loop(build_rdtsc(), N_FAST), a.runs)),
        ("9", "jprobe static `trace(arg1)` at `target` (a record a hit; ring populated)", N_TRACE,
         lambda: row_jprobe_trace(loop, N_TRACE, a.runs)),
        ("10", "jprobe static `target%return` count (the return followed)", N_FAST,
         lambda: row_jprobe(loop, "target%return", N_FAST, a.runs, "loop.return")),
        ("10p", "jprobe static `target` + `target%return` counts (an entry and return pair, 2 hits/call)", N_FAST,
         lambda: row_jprobe(loop, ["target", "target%return"], N_FAST, a.runs, "loop.pair")),
        ("11", "kernel uretprobe at `target` (tracefs event)", N_KERNEL,
         lambda: row_kernel_uprobe(loop, target, N_KERNEL, a.runs, kind="r")),
        ("12", "Frida Interceptor, CModule onEnter + onLeave at `target`", N_FRIDA,
         lambda: row_frida(loop, target, N_FRIDA, a.runs, FRIDA_LEAVE_SCRIPT)),
    ]
    results = {}
    for rid, label, n, fn in rows:
        print(f"running ({rid}) {label} ...", file=sys.stderr, flush=True)
        try:
            med, vals = fn()
            results[rid] = (label, n, med, None)
        except Skip as e:
            results[rid] = (label, n, None, f"skipped: {e}")
        except Exception as e:  # a row that fails must not hide the others
            results[rid] = (label, n, None, f"failed: {e}")

    base = results["1"][2]
    count = results["2"][2]
    count_over = (count - base) if (count is not None and base is not None) else None
    lines = []
    lines.append(f"CPU: {cpu_model()}; kernel: {platform.release()}; "
                 f"{datetime.date.today().isoformat()}; median of {a.runs} runs per row.")
    lines.append("")
    lines.append("| # | configuration | N | ns/hit (ns per loop iteration) | overhead ns vs (1) | ratio vs jprobe count |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for rid, _, _, _ in rows:
        label, n, med, note = results[rid]
        if med is None:
            lines.append(f"| {rid} | {label} | {fmt_n(n)} | {note} | | |")
            continue
        own_base = results["8a"][2] if rid == "8" else base     # row 8 runs the SHORT_TARGET loop
        over = med - own_base if own_base is not None and rid not in ("1", "8a") else None
        ratio = (over / count_over) if (over is not None and count_over and count_over > 0) else None
        lines.append(f"| {rid} | {label} | {fmt_n(n)} | {med:.2f} | "
                     f"{'' if over is None else f'{over:.2f}'} | {'' if ratio is None else f'{ratio:.1f}x'} |")
    lines.append("")
    lines.append(live_bar(results))
    lines.append("")
    lines.append(trace_bar(results))
    lines.append("")
    lines.append(returns_bar(results))
    print("running thread scaling ...", file=sys.stderr, flush=True)
    lines.extend(thread_table(N_FAST, a.runs))
    lines.append("")
    try:
        lines.append(syscall_proof(loop))
    except Exception as e:
        lines.append(f"syscall proof failed: {e}")
    print("running planning at scale ...", file=sys.stderr, flush=True)
    lines.append("")
    lines.append(planning_table(a.runs))
    print("running attach latency ...", file=sys.stderr, flush=True)
    lines.append("")
    lines.append(attach_table(loop, a.runs))
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(RESULTS_HEADER + text)


if __name__ == "__main__":
    main()
