#!/usr/bin/env python3
"""Planning at scale: how long `jprobe run` and `jprobe patch` take to plan N probes, and how much
memory they need (issue 11).

Run from the repository root:  python benchmarks/plan_scale.py [--runs 3] [--n 1 100 1000 all] [--patch]

Each measurement runs in a fresh interpreter (peak RSS only grows), which times three things
apart: importing jprobe (the same for every N, and paid once by a long-lived attach), planning
(what `jprobe run` does before it starts the program: resolve, plan every module, encode the
plan file; `runner.plan_modules` and `planfile.encode`), wall and CPU time (the CPU time moves
less when others share the machine), and the peak RSS of the whole process (getrusage).
`--profile` prints the planning's cProfile top functions instead.

The probes: libc's exported functions (`nm -D`: `T` symbols with a default version, one name per
address, the alphabetically first), N of them spread evenly over the addresses; "all" is every
one. `--patch` also plans and writes python3.11 (when /usr/bin/python3.11 exists) with 1,000 of
its exported functions, as `jprobe patch` does (`patcher.static.patch_file`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROGRAM = "/bin/true"
PYTHON311 = "/usr/bin/python3.11"
SIZES = ("1", "100", "1000", "all")


def exports(path: str) -> list[str]:
    """The functions `path` exports (the default version of versioned ones), one name per
    address, by address."""
    out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True,
                         check=True).stdout
    by_address: dict[int, str] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1] == "T" and ("@@" in fields[2] or "@" not in fields[2]):
            address, name = int(fields[0], 16), fields[2].split("@", 1)[0]
            by_address[address] = min(name, by_address.get(address, name))
    return [by_address[a] for a in sorted(by_address)]


def spread(names: list[str], n: str) -> list[str]:
    """`n` of `names` (all for "all"), evenly spaced so that they cover the whole module."""
    if n == "all":
        return names
    count = min(int(n), len(names))
    return [names[i * len(names) // count] for i in range(count)]


def libc_path() -> str:
    from jprobe.loader import find_module
    from jprobe.elf import ElfModule
    return find_module("libc.so.6", ElfModule(PROGRAM))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_run(n: str, profile: bool) -> dict:
    """Plan `n` libc probes as `jprobe run` does before it starts PROGRAM."""
    started = time.perf_counter()
    from jprobe.planfile import encode
    from jprobe.runner import plan_modules
    from jprobe.spec import parse_probes
    imported = time.perf_counter()
    texts = [f"libc.so.6:{name}" for name in spread(exports(libc_path()), n)]
    before, chosen, cpu = peak_mib(), time.perf_counter(), time.process_time()

    def plan() -> bytes:
        return encode(plan_modules(PROGRAM, parse_probes(texts), strict=False))

    blob = _profiled(plan) if profile else plan()
    return {"probes": len(texts), "imports_s": imported - started, "plan_s": time.perf_counter() - chosen,
            "plan_cpu_s": time.process_time() - cpu, "rss_before_mib": before, "peak_mib": peak_mib(),
            "plan_bytes": len(blob)}


def child_patch(n: str, profile: bool) -> dict:
    """Plan and write python3.11 with `n` of its exported functions, as `jprobe patch` does."""
    started = time.perf_counter()
    from jprobe.patcher.static import patch_file
    from jprobe.spec import parse_probes
    imported = time.perf_counter()
    texts = spread(exports(PYTHON311), n)
    before, chosen, cpu = peak_mib(), time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="jprobe-bench-") as work:
        def patch() -> object:
            return patch_file(PYTHON311, os.path.join(work, "python3"), parse_probes(texts))
        _profiled(patch) if profile else patch()
    return {"probes": len(texts), "imports_s": imported - started, "plan_s": time.perf_counter() - chosen,
            "plan_cpu_s": time.process_time() - cpu, "rss_before_mib": before, "peak_mib": peak_mib()}


def _profiled(fn):
    """fn(), its cProfile top 25 (cumulative and own time) printed on stderr."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    result = profiler.runcall(fn)
    for order in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=sys.stderr).sort_stats(order).print_stats(25)
    return result


def measure(kind: str, n: str, runs: int) -> dict:
    """Medians over `runs` fresh interpreters; wall_s is the whole child, imports included."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", kind, n], capture_output=True, text=True,
                             check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO))).stdout
        wall = time.perf_counter() - t0
        samples.append({**json.loads(out), "wall_s": wall})
    keys = [k for k in samples[0] if isinstance(samples[0][k], float)]
    return {**samples[0], **{k: statistics.median(s[k] for s in samples) for k in keys}}


def rows(sizes: list[str], runs: int, patch: bool) -> list[tuple[str, dict]]:
    """(label, medians) for each size, and python3.11's patch when asked and present."""
    out = [(f"`jprobe run` plan, {n} libc export(s)", measure("run", n, runs)) for n in sizes]
    if patch and os.path.exists(PYTHON311):
        out.append(("`jprobe patch` python3.11, 1000 exports", measure("patch", "1000", runs)))
    return out


def table(results: list[tuple[str, dict]]) -> str:
    lines = ["| what | probes | planning s | planning CPU s | imports s | whole process s | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in results:
        lines.append(f"| {label} | {r['probes']:,} | {r['plan_s']:.2f} | {r['plan_cpu_s']:.2f} | "
                     f"{r['imports_s']:.2f} | {r['wall_s']:.2f} | {r['peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--patch", action="store_true", help="also `jprobe patch` python3.11, 1000 probes")
    parser.add_argument("--profile", metavar="KIND:N", help="profile one child, e.g. run:1000 or patch:1000")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, n = args.child
        print(json.dumps((child_run if kind == "run" else child_patch)(n, profile=False)))
        return
    if args.profile:
        kind, n = args.profile.split(":")
        print(json.dumps((child_run if kind == "run" else child_patch)(n, profile=True)))
        return
    sys.stdout.write(table(rows(args.n, args.runs, args.patch)))


if __name__ == "__main__":
    main()
