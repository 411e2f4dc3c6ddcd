"""Probes taken out and put back while threads run through them (issue 9).

`live_sites.c` runs 8 threads through 50 -O0 entries whose jump displaces three instructions
while its main thread takes every probe out and puts it back through the runtime
(jprobe_rt_set_probes); in windows where the probes stay in, the hits read live must grow by
exactly the calls made. `make stress` runs 1,000 rounds; `make test` a short version, one
with threads blocked in read, clock_nanosleep, epoll_wait and a futex wait, which must never
see EINTR (the runtime signals only threads that are running), and `live_frame.c`, whose
thread waits in a signal handler to resume strictly inside the patch.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from support.run import child_env

FUNCS = [f"f{n}" for n in range(50)]


def run_live(build, tmp_path, **knobs) -> subprocess.CompletedProcess:
    prog = build("live_sites.c", ["-O0", "-g"], out_name="live_sites")
    cmd = [sys.executable, "-m", "jprobe", "run", *[a for f in FUNCS for a in ("-p", f)],
           "--report", str(tmp_path / "report.json"), "--", str(prog)]
    env = child_env({name.upper(): str(value) for name, value in knobs.items()})
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def assert_ok(r: subprocess.CompletedProcess, rounds: int) -> None:
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    m = re.fullmatch(r"ok rounds=(\d+) windows=(\d+) calls=(\d+)\n", r.stdout)
    assert m, r.stdout
    assert int(m[1]) == rounds and int(m[2]) > 0 and int(m[3]) > 0


def test_probes_out_and_in_while_threads_run(build, tmp_path):
    assert_ok(run_live(build, tmp_path, rounds=100, window=10, calls=200), 100)


def test_blocked_system_calls_see_no_eintr(build, tmp_path):
    assert_ok(run_live(build, tmp_path, rounds=100, window=25, calls=100, blockers=1), 100)


def test_a_rip_saved_in_a_signal_frame_is_moved(build, tmp_path):
    """A thread's handler holds a saved rip strictly inside target's patch, blocked in read()
    while the probe goes in: the runtime moves the saved rip (traps.c lists the program's
    signal frames), and the thread finishes target from its relocated copy."""
    prog = build("live_frame.c", ["-O0", "-g"], out_name="live_frame")
    cmd = [sys.executable, "-m", "jprobe", "run", "-p", "target", "--report", str(tmp_path / "r.json"),
           "--", str(prog)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=120)
    assert (r.returncode, r.stdout) == (0, "ok result=43 hits=1\n"), r.stderr[-2000:]


@pytest.mark.stress
def test_stress_a_thousand_rounds(build, tmp_path):
    assert_ok(run_live(build, tmp_path, rounds=1000, window=50, calls=1000, blockers=1), 1000)
