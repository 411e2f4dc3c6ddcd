#!/usr/bin/env python3
"""Attach latency (issue 12): how long `jprobe.attach(pid)` takes to put N libc probes into a
running process, step by step, and what the `jprobe attach` command takes end to end.

Run from the repository root:  python benchmarks/attach_scale.py [--runs 3]   (benchmarks/bench.py
shows the same table.)

The target: benchmarks/loop.c under LOOP_WAIT=1, blocked reading its stdin. The probes: libc's
exported functions (benchmarks/plan_scale.py) whose entry takes no trap (attach refuses those),
N of them spread over the library. Each run of the API measurement is an interpreter of its own
with jprobe imported and libc not yet parsed, and a target of its own: it attaches (cold: the
first attach to libc in that target injects the shared region) and detaches, then attaches to the
same target again in the same interpreter (warm) and detaches. Medians over the runs.
`live_count` is one run of bench.py's per-hit row 2a: the loop probed live, then let run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import plan_scale                   # benchmarks/plan_scale.py, next to this file

REPO = Path(__file__).resolve().parent.parent
LOOP = REPO / "benchmarks" / "build" / "loop"
SIZES = (1, 100, 1000)
CLI_SIZES = (1, 1000)
STEPS = ("planning", "stopping", "injecting", "patching", "resuming")


def attachable() -> list[str]:
    """libc exports (as `libc.so.6:NAME` specs) whose entry a jump can take: attach places no trap."""
    from jprobe.elf import ElfModule
    from jprobe.mechanisms import Mechanism
    from jprobe.planner import resolve_probes
    from jprobe.spec import parse_probes

    path = plan_scale.libc_path()
    specs = parse_probes([f"{plan_scale.LIBC}:{name}" for name in plan_scale.exports(path)])
    return [p.spec.text for p in resolve_probes(ElfModule(path), specs, False)
            if p.site.mechanism is not Mechanism.TRAP]


def start_waiting(loop: Path, n: int) -> subprocess.Popen:
    """loop.c started with LOOP_WAIT: it has printed "ready" and waits for a line to run n calls."""
    env = dict(os.environ, LOOP_WAIT="1")
    env.pop("JPROBE_REPORT", None)
    proc = subprocess.Popen([str(loop), str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    if proc.stdout.readline() != "ready\n":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{loop} did not print 'ready' under LOOP_WAIT")
    return proc


def go(proc: subprocess.Popen) -> str:
    """Let a waiting loop run; its result line."""
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc.stdout.readline()


def finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()


def live_count(loop: Path, n: int) -> str:
    """One run of the loop with a `count` probe at `target` attached while it waits: its output
    line, after checking that the probe counted exactly n hits."""
    from jprobe import attach

    proc = start_waiting(loop, n)
    try:
        with attach(proc.pid) as target:
            probe = target.probe("target")
            out = go(proc)
            hits = probe.hits
        if hits != n:
            raise RuntimeError(f"the attached probe counted {hits} hits, expected {n}")
        return out
    finally:
        finish(proc)


def attach_once(attach, pid: int, specs: list[str]) -> dict:
    """Seconds from the call to the probes live, by step, and the detach."""
    t0 = time.perf_counter()
    target = attach(pid)
    try:
        probes = target.probes(specs)
        t1 = time.perf_counter()
        steps = dict(target._session.timings)
    finally:
        target.detach()
    t2 = time.perf_counter()
    if len(probes) != len(specs):
        raise RuntimeError(f"{len(probes)} probes placed, expected {len(specs)}")
    return {**steps, "other": (t1 - t0) - sum(steps.values()), "total": t1 - t0, "detach": t2 - t1}


def worker(loop: Path, specs: list[str]) -> dict:
    """In this interpreter (jprobe imported, libc not parsed): a cold attach, then a warm one."""
    from jprobe import attach

    proc = start_waiting(loop, 1)
    try:
        cold = attach_once(attach, proc.pid, specs)
        warm = attach_once(attach, proc.pid, specs)
        if not go(proc).startswith("n=1 "):
            raise RuntimeError("the target's output changed after attach and detach")
        return {"cold": cold, "warm": warm}
    finally:
        finish(proc)


def run_worker(loop: Path, specs: list[str]) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="jprobe-attach-") as f:
        json.dump(specs, f)
        f.flush()
        r = subprocess.run([sys.executable, __file__, "--worker", str(loop), f.name], capture_output=True,
                           text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if r.returncode != 0:
        raise RuntimeError(f"attach worker exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout)


def cli_once(loop: Path, specs: list[str]) -> float:
    """Wall seconds of `python -m jprobe attach PID -p ... --duration 0.01` (interpreter start
    included), after checking that its report has every probe."""
    proc = start_waiting(loop, 1)
    try:
        argv = [sys.executable, "-m", "jprobe", "attach", str(proc.pid),
                *[a for s in specs for a in ("-p", s)], "--duration", "0.01", "--json"]
        t0 = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"jprobe attach exited {r.returncode}: {r.stderr.strip()[-300:]}")
        placed = len(json.loads(r.stdout)["probes"])
        if placed != len(specs):
            raise RuntimeError(f"jprobe attach reported {placed} probes, expected {len(specs)}")
        return wall
    finally:
        finish(proc)


def measure(loop: Path, runs: int) -> tuple[dict, dict]:
    """({N: {"cold"|"warm": median seconds by step}}, {N: median CLI seconds}); the sizes of a
    run are measured in turn, so a change in the machine's load touches them alike."""
    names = attachable()
    chosen = {n: plan_scale.spread(names, str(n)) for n in SIZES}
    api = {n: [] for n in SIZES}
    cli = {n: [] for n in CLI_SIZES}
    for _ in range(runs):
        for n in SIZES:
            api[n].append(run_worker(loop, chosen[n]))
        for n in CLI_SIZES:
            cli[n].append(cli_once(loop, chosen[n]))
    medians = {n: {kind: {key: statistics.median(s[kind][key] for s in samples) for key in samples[0][kind]}
                   for kind in ("cold", "warm")} for n, samples in api.items()}
    return medians, {n: statistics.median(v) for n, v in cli.items()}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(api: dict, cli: dict) -> str:
    lines = ["| probes | attach | " + " | ".join(STEPS) + " | other | total | detach |",
             "|---:|---|" + "---:|" * (len(STEPS) + 3)]
    for n, kinds in api.items():
        for kind, r in kinds.items():
            lines.append(f"| {n:,} | {kind} | " + " | ".join(ms(r[s]) for s in STEPS)
                         + f" | {ms(r['other'])} | {ms(r['total'])} | {ms(r['detach'])} |")
    lines.append("")
    lines.append("| `python -m jprobe attach PID -p ... --duration 0.01` | probes | wall ms |")
    lines.append("|---|---:|---:|")
    for n, wall in cli.items():
        lines.append(f"| end to end, interpreter start included | {n:,} | {ms(wall)} |")
    one, many, cli_many = api[1]["cold"]["total"], api[1000]["cold"]["total"], max(cli.values())
    met = one <= 0.1 and many < 1 and cli_many < 1.5
    lines.append("")
    lines.append(f"Bar: 1 probe <= 100 ms from the call ({ms(one)} ms cold), 1,000 < 1 s ({ms(many)} ms cold), "
                 f"the CLI < 1.5 s ({ms(cli_many)} ms at most): {'met' if met else 'NOT met'}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("LOOP", "SPECS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import jprobe.process  # noqa: F401  (a warm interpreter: jprobe imported before the clock runs)
        loop, specs = args.worker
        print(json.dumps(worker(Path(loop), json.loads(Path(specs).read_text()))))
        return
    if not LOOP.exists():
        raise SystemExit(f"{LOOP} is missing; run benchmarks/bench.py once (it builds it)")
    sys.stdout.write(table(*measure(LOOP, args.runs)))


if __name__ == "__main__":
    main()
