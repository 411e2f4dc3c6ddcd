#!/usr/bin/env python3
"""Planning at scale: how long `jprobe run` and `jprobe patch` take to plan N probes, and how much
memory they need (issue 11).

Run from the repository root:  python benchmarks/plan_scale.py [--runs 3] [--n 1 100 1000 all] [--patch]

Two measurements per run, each in fresh processes, medians over the runs:
- the command as a user runs it (`jprobe run -p ... -- /bin/true`, `jprobe patch python3.11 -o
  ... -p ...`): wall time and peak RSS (wait4), interpreter start and imports included;
- the planning alone, in an interpreter of its own: what `jprobe run` does before it starts
  the program (resolve, plan every module, encode the plan file: `runner.plan_modules` and
  `planfile.encode`) or what `jprobe patch` does (`patcher.static.patch_file`), wall and CPU
  time (the CPU time moves less when others share the machine), apart from importing jprobe
  (paid once by a long-lived attach).
`--profile KIND:N` prints the planning's cProfile top functions instead.

The probes: libc's exported functions (`nm -D`: `T` symbols with a default version, one name per
address, the alphabetically first), N of them spread evenly over the addresses; "all" is every
one. `--patch` also rewrites python3.11 (when /usr/bin/python3.11 exists) with 1,000 of its
exported functions.
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
LIBC = "libc.so.6"
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
    from jprobe.elf import ElfModule
    from jprobe.loader import find_module
    return find_module(LIBC, ElfModule(PROGRAM))


def probes(kind: str, n: str) -> list[str]:
    """The specs of a measurement: libc exports for `jprobe run`, python3.11's for `patch`."""
    if kind == "run":
        return [f"{LIBC}:{name}" for name in spread(exports(libc_path()), n)]
    return spread(exports(PYTHON311), n)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_only(kind: str, n: str, profile: bool) -> dict:
    """Plan as the command does, in this fresh interpreter: imports and planning timed apart."""
    started = time.perf_counter()
    from jprobe.spec import parse_probes
    if kind == "run":
        from jprobe.planfile import encode
        from jprobe.runner import plan_modules
    else:
        from jprobe.patcher.static import patch_file
    imported = time.perf_counter()
    texts = probes(kind, n)
    with tempfile.TemporaryDirectory(prefix="jprobe-bench-") as work:
        def plan() -> object:
            if kind == "run":
                return encode(plan_modules(PROGRAM, parse_probes(texts), strict=False))
            return patch_file(PYTHON311, os.path.join(work, "python3"), parse_probes(texts))

        chosen, cpu = time.perf_counter(), time.process_time()
        _profiled(plan) if profile else plan()
        return {"probes": len(texts), "imports_s": imported - started, "plan_s": time.perf_counter() - chosen,
                "plan_cpu_s": time.process_time() - cpu, "plan_peak_mib": peak_mib()}


def _profiled(fn):
    """fn(), its cProfile top 25 (cumulative and own time) printed on stderr."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    result = profiler.runcall(fn)
    for order in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=sys.stderr).sort_stats(order).print_stats(25)
    return result


def command(kind: str, texts: list[str], work: str) -> list[str]:
    """The jprobe command line of a measurement."""
    specs = [arg for text in texts for arg in ("-p", text)]
    if kind == "run":
        return [sys.executable, "-m", "jprobe", "run", *specs, "--", PROGRAM]
    return [sys.executable, "-m", "jprobe", "patch", PYTHON311, "-o", os.path.join(work, "python3"), *specs]


def run_command(argv: list[str]) -> dict:
    """Wall seconds and peak RSS of one command (its own, as wait4 reports it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("JPROBE_REPORT", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:5])} ... exited {proc.returncode}: {stderr.decode()[-300:]}")
    return {"command_s": wall, "command_peak_mib": usage.ru_maxrss / 1024}


def measure(kind: str, n: str, runs: int) -> dict:
    """Medians over `runs` of the command and of the planning alone."""
    texts = probes(kind, n)
    samples = []
    with tempfile.TemporaryDirectory(prefix="jprobe-bench-") as work:
        for _ in range(runs):
            out = subprocess.run([sys.executable, __file__, "--plan-only", kind, n], capture_output=True,
                                 text=True, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
            samples.append({**json.loads(out.stdout), **run_command(command(kind, texts, work))})
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def rows(sizes: list[str], runs: int, patch: bool) -> list[tuple[str, dict]]:
    """(label, medians) for each size, and python3.11's patch when asked and present."""
    out = [(f"`jprobe run` on {PROGRAM}, libc exports", measure("run", n, runs)) for n in sizes]
    if patch and os.path.exists(PYTHON311):
        out.append(("`jprobe patch` python3.11, its exports", measure("patch", "1000", runs)))
    return out


def table(results: list[tuple[str, dict]]) -> str:
    lines = ["| command | probes | wall s | peak MiB | planning s | planning CPU s | imports s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in results:
        lines.append(f"| {label} | {r['probes']:,.0f} | {r['command_s']:.2f} | {r['command_peak_mib']:.0f} | "
                     f"{r['plan_s']:.2f} | {r['plan_cpu_s']:.2f} | {r['imports_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--patch", action="store_true", help="also `jprobe patch` python3.11, 1000 probes")
    parser.add_argument("--profile", metavar="KIND:N", help="profile the planning, e.g. run:1000 or patch:1000")
    parser.add_argument("--plan-only", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plan_only or args.profile:
        kind, n = args.plan_only or args.profile.split(":")
        print(json.dumps(plan_only(kind, n, profile=bool(args.profile))))
        return
    sys.stdout.write(table(rows(args.n, args.runs, args.patch)))


if __name__ == "__main__":
    main()
