"""`jprobe run` as a process between the user and the program (SPEC §2, issue 11):

- the program inherits every file descriptor jprobe was given, as under `perf stat`;
- a `--report` that cannot be written is refused before the program starts.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import _env
from test_run import hits


def _jprobe_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "jprobe", *[str(a) for a in args]]


# --------------------------------------------------------------------------
# file descriptors
# --------------------------------------------------------------------------

def _with_fds(cmd: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, bytes, bytes]:
    """Run `cmd` from a shell that opens fd 5 and fd 7 on two files (`5>fd5 7>fd7`); their contents."""
    out5, out7 = tmp_path / "fd5", tmp_path / "fd7"
    shell = ["sh", "-c", f'exec "$@" 5>{out5} 7>{out7}', "sh", *[str(a) for a in cmd]]
    r = subprocess.run(shell, capture_output=True, text=True, env=_env(), timeout=120)
    return r, out5.read_bytes(), out7.read_bytes()


def _descriptors(ls_output: str) -> set[int]:
    """The descriptors `ls -l /proc/PID/fd` lists, but the counters file the runtime keeps
    open (close-on-exec) in a program that `jprobe run` started."""
    return {int(m[1]) for m in re.finditer(r" (\d+) -> (.*)$", ls_output, re.M) if "/jprobe-run-" not in m[2]}


def test_inherited_descriptors_pass_through(tmp_path):
    """`jprobe run ... -- sh -c 'echo ok >&5' 5>out` (issue 11, defect 1): the program gets
    every descriptor it gets without jprobe (make's jobserver is two such)."""
    script = "echo ok >&5 && echo jobs >&7 && ls -l /proc/$$/fd"
    orig, _, _ = _with_fds(["sh", "-c", script], tmp_path)
    got, fd5, fd7 = _with_fds(_jprobe_cmd("run", "-p", "libc.so.6:malloc", "--report", tmp_path / "r.json",
                                          "--", "sh", "-c", script), tmp_path)
    assert got.returncode == 0, got.stderr
    assert (fd5, fd7) == (b"ok\n", b"jobs\n")
    assert _descriptors(got.stdout) == _descriptors(orig.stdout) == {0, 1, 2, 5, 7}
    assert hits(json.loads((tmp_path / "r.json").read_text()), "libc.so.6:malloc") > 0


# --------------------------------------------------------------------------
# --report checked before the program runs
# --------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["missing-dir", "directory", "read-only-fs"])
def test_bad_report_path_is_refused_before_the_program_runs(tmp_path, where):
    report = {"missing-dir": tmp_path / "no" / "such" / "r.json",
              "directory": tmp_path,
              "read-only-fs": "/proc/r.json"}[where]
    marker = tmp_path / "ran"
    r = subprocess.run(_jprobe_cmd("run", "-p", "libc.so.6:malloc", "--report", report, "--",
                                   "sh", "-c", f"touch {marker}; exit 7"),
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2, r.stderr
    assert not marker.exists(), "the program ran although its report could not be written"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(report) in lines[0] and "--report" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
