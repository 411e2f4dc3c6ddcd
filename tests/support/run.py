"""Running jprobe's CLI and the programs it patched, as a user would (SPEC sections 2, 3)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable

from . import REPO


def child_env(extra: dict | None = None) -> dict:
    """The environment of a child process: this checkout's jprobe first on PYTHONPATH, and no
    JPROBE_REPORT inherited from whoever runs the tests."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("JPROBE_REPORT", None)
    if extra:
        env.update(extra)
    return env


def jprobe(*args, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m jprobe ARGS...` and return the completed process."""
    cmd = [sys.executable, "-m", "jprobe", *[str(a) for a in args]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def patch(inp, out, probes: Iterable[str], *extra) -> Path:
    """`jprobe patch INP -o OUT -p P ...`; fails the test unless it exits 0."""
    args = ["patch", inp, "-o", out]
    for p in probes:
        args += ["-p", p]
    jprobe(*args, *extra, check=True)
    out = Path(out)
    assert out.exists(), f"jprobe patch exited 0 but wrote no {out}"
    return out


def sites(binary, symbol: str | None = None) -> dict:
    """`jprobe sites BINARY [SYMBOL] --json`, parsed."""
    args = ["sites", binary] + ([symbol] if symbol else []) + ["--json"]
    r = jprobe(*args, check=True)
    return json.loads(r.stdout)


def run_prog(argv, env: dict | None = None, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          env=child_env(env), timeout=timeout, cwd=cwd)


def run_with_report(argv, report_path, env: dict | None = None,
                    timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict]:
    """Run a patched program with JPROBE_REPORT set; return (completed, report)."""
    report_path = Path(report_path)
    if report_path.exists():
        report_path.unlink()
    e = dict(env or {})
    e["JPROBE_REPORT"] = str(report_path)
    r = run_prog(argv, env=e, timeout=timeout)
    assert report_path.exists(), (
        f"no report written to JPROBE_REPORT={report_path} (exit {r.returncode}, stderr: {r.stderr[-2000:]})")
    with open(report_path) as f:
        rep = json.load(f)
    return r, rep


def assert_same_behaviour(orig: subprocess.CompletedProcess, patched: subprocess.CompletedProcess,
                          stderr: bool = True) -> None:
    assert patched.returncode == orig.returncode, (
        f"exit status {patched.returncode} != original {orig.returncode}; stderr: {patched.stderr[-2000:]}")
    assert patched.stdout == orig.stdout
    if stderr:
        assert patched.stderr == orig.stderr, "a patched binary must be silent"
