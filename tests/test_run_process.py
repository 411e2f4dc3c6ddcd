"""`jprobe run` as a process between the user and the program (SPEC §2, issue 11):

- the program inherits every file descriptor jprobe was given, as under `perf stat`;
- a `--report` that cannot be written is refused before the program starts;
- SIGTERM, SIGHUP and SIGINT sent to jprobe reach the program once, and jprobe still
  writes the report, removes its temporary directory and exits with the program's status.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.run import child_env
from test_run import hits

N = 300


@pytest.fixture(scope="module")
def sigprog(build):
    return build("run_signals.c", ["-O2", "-g", "-fPIE", "-pie"])


def _jprobe_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "jprobe", *[str(a) for a in args]]


# --------------------------------------------------------------------------
# file descriptors
# --------------------------------------------------------------------------

def _with_fds(cmd: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, bytes, bytes]:
    """Run `cmd` from a shell that opens fd 5 and fd 7 on two files (`5>fd5 7>fd7`); their contents."""
    out5, out7 = tmp_path / "fd5", tmp_path / "fd7"
    shell = ["sh", "-c", f'exec "$@" 5>{out5} 7>{out7}', "sh", *[str(a) for a in cmd]]
    r = subprocess.run(shell, capture_output=True, text=True, env=child_env(), timeout=120)
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
                       capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 2, r.stderr
    assert not marker.exists(), "the program ran although its report could not be written"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(report) in lines[0] and "--report" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------
# signals sent to jprobe run
# --------------------------------------------------------------------------

@contextmanager
def _running(sigprog, tmp_path, mode: str, **popen) -> Iterator[subprocess.Popen]:
    """`jprobe run -p work -- run_signals N MODE` with a TMPDIR of its own, once the program
    is ready; whatever the test does, neither is left running."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(_jprobe_cmd("run", "-p", "work", "--report", tmp_path / "r.json", "--",
                                        sigprog, N, mode),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env({"TMPDIR": str(tmp)}), **popen)
    pid = None
    try:
        line = proc.stdout.readline()
        assert "ready" in line, proc.stderr.read()
        pid = int(re.search(r"ready pid=(\d+)", line)[1])
        yield proc
    finally:
        if pid is not None and _is_running(pid, sigprog):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _is_running(pid: int, program) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(str(program).encode() + b"\0")
    except OSError:
        return False


def _finish(proc: subprocess.Popen, tmp_path) -> tuple[int, str, dict]:
    """jprobe's status, the program's stdout and the report, once both have ended."""
    out, _ = proc.communicate(timeout=30)
    assert not list((tmp_path / "tmp").iterdir()), "jprobe left its temporary directory"
    return proc.returncode, out, json.loads((tmp_path / "r.json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_is_forwarded_once_and_the_report_written(sigprog, tmp_path, sig):
    """`kill -TERM <jprobe>` (issue 11, defect 7): the program gets it, handles it and exits;
    jprobe writes the report, removes jprobe-run-* and exits with the program's status."""
    with _running(sigprog, tmp_path, "handle") as proc:
        os.kill(proc.pid, sig)
        status, out, report = _finish(proc, tmp_path)
    assert out == f"signal={int(sig)} count=1\n"
    assert status == 40 + sig
    assert hits(report, "work") == N + 1          # the handler's call counts too


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_program_killed_by_the_forwarded_signal(sigprog, tmp_path, sig):
    with _running(sigprog, tmp_path, "default") as proc:
        os.kill(proc.pid, sig)
        status, _, report = _finish(proc, tmp_path)
    assert status == 128 + sig
    assert hits(report, "work") == N


def _controlling_terminal(tty: int) -> None:
    """In the child: a session of its own whose controlling terminal is `tty`."""
    os.setsid()
    fcntl.ioctl(tty, termios.TIOCSCTTY, 0)


def test_ctrl_c_reaches_the_program_once(sigprog, tmp_path):
    """A terminal's ^C goes to jprobe and the program both: jprobe must not send a second."""
    master, tty = os.openpty()
    try:
        with _running(sigprog, tmp_path, "handle", stdin=tty,
                      preexec_fn=lambda: _controlling_terminal(tty)) as proc:
            time.sleep(0.1)
            os.write(master, b"\x03")
            status, out, report = _finish(proc, tmp_path)
    finally:
        os.close(master)
        os.close(tty)
    assert out == f"signal={int(signal.SIGINT)} count=1\n"
    assert status == 40 + signal.SIGINT
    assert hits(report, "work") == N + 1


def test_unprobed_program_behaves_the_same(sigprog):
    """The fixture itself: without jprobe a signal ends it with 40 + SIG."""
    proc = subprocess.Popen([str(sigprog), str(N), "handle"], stdout=subprocess.PIPE, text=True)
    assert "ready" in proc.stdout.readline()
    proc.send_signal(signal.SIGHUP)
    out, _ = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (40 + signal.SIGHUP, f"signal={int(signal.SIGHUP)} count=1\n")


# --------------------------------------------------------------------------
# a module that never loaded
# --------------------------------------------------------------------------

def test_probe_on_a_module_never_loaded_is_marked(build, tmp_path):
    """It showed as `jump ... 0 hits` with no note (issue 11, silent gap): SPEC §3's
    `"loaded": false`, a note in the text report, and a line on stderr with --report."""
    lib = build.lib("short_lib.c", ["-O2"])
    prog = build("basic.c", ["-O2", "-g", "-fPIE", "-pie"])
    report = tmp_path / "r.json"
    r = subprocess.run(_jprobe_cmd("run", "-p", f"{lib}:tiny", "-p", "compute", "--report", report,
                                   "--", prog, 100, 3), capture_output=True, text=True, env=child_env())
    assert r.returncode == subprocess.run([prog, "100", "3"]).returncode, r.stderr
    rep = json.loads(report.read_text())
    never = [p for p in rep["probes"] if p["module"] == str(lib)]
    assert [(p["probe"], p["hits"], p["loaded"]) for p in never] == [(f"{lib}:tiny", 0, False)]
    [loaded] = [p for p in rep["probes"] if p["probe"] == "compute"]
    assert loaded["hits"] == 3 and "loaded" not in loaded
    lines = [line for line in r.stderr.splitlines() if "never loaded" in line]
    assert len(lines) == 1 and str(lib) in lines[0], r.stderr
    text = subprocess.run(_jprobe_cmd("report", report), capture_output=True, text=True, env=child_env()).stdout
    assert "never loaded" in text
    row = [line for line in text.splitlines() if line.startswith(f"{lib}:tiny")]
    assert row and " jump " not in row[0] and " pun " not in row[0], text
