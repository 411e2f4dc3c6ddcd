"""`jprobe attach PID` and `jprobe.attach(pid)` (SPEC §2, §5; issue 12) on a live service.

The target (fixtures/attach_target.c) runs 8 workers through the probed functions the whole
time and checks every result; its blocked threads report any EINTR.  After every session the
tests ask the same of it: the original code back, no thread traced, stopped or with a signal
pending, counts exact over a known window, and "ok eintr=0 bad=0" when it quits.  Everything
that could wait forever runs under a time limit (support/target.py), so a broken attach fails.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import jprobe
from support.build import SOME_VARIANTS, Variant
from support.elf import read_vaddr, symbol
from support.run import child_env
from support.target import ANSWER_S, Target, bounded, running_target

TICKS = [f"tick{k}" for k in range(8)]
CLEAN = "ok eintr=0 bad=0"
WARNINGS = ["-Wall", "-Wextra", "-Werror"]


@pytest.fixture(scope="module", params=SOME_VARIANTS, ids=str)
def service(build, request) -> Path:
    return build("attach_target.c", [*request.param.flags, *WARNINGS])


@pytest.fixture(scope="module")
def service_o2(build) -> Path:
    return build("attach_target.c", [*Variant("-O2", "pie").flags, *WARNINGS])


@contextmanager
def attached(pid: int, **kwargs) -> Iterator:
    """`with jprobe.attach(pid) as proc`, each step under a time limit."""
    proc = bounded(ANSWER_S, jprobe.attach, pid, **kwargs)
    session = bounded(ANSWER_S, proc.__enter__)
    try:
        yield session
    except BaseException as e:
        bounded(ANSWER_S, proc.__exit__, type(e), e, e.__traceback__)
        raise
    bounded(ANSWER_S, proc.__exit__, None, None, None)


def grows(read, what: str, timeout: float = 10) -> None:
    """read() returns more than it did, within `timeout` seconds."""
    first = read()
    deadline = time.monotonic() + timeout
    while read() <= first:
        assert time.monotonic() < deadline, f"{what} stuck at {first} for {timeout} s"
        time.sleep(0.01)


def assert_restored(t: Target, names, size: int = 16) -> None:
    for name in names:
        assert t.code(name, size) == t.original_code(name, size), f"{name}'s code not restored"


def assert_healthy(t: Target) -> None:
    """What every test asks of the target once jprobe is gone: it runs as before."""
    t.assert_free()
    grows(t.progress, "the workers' progress")
    t.count(100)
    assert t.quit() == CLEAN, t.describe()


def one_line_error(err: object) -> str:
    """An error message (an exception or what was printed), checked to be one line."""
    msg = str(err).strip()
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def cli(*args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jprobe", *[str(a) for a in args]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), **popen)


@contextmanager
def cli_attach(*args, **popen) -> Iterator[subprocess.Popen]:
    """`jprobe attach ARGS`, never left running."""
    proc = cli("attach", *args, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=ANSWER_S)


def report_hits(report: dict, probe: str) -> int:
    found = [p["hits"] for p in report["probes"] if p["probe"] == probe]
    assert len(found) == 1, f"{probe} not reported once: {report['probes']}"
    return found[0]


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------
# the fixture itself: it is quiet alone and notices a tracer's EINTR
# --------------------------------------------------------------------------

def test_the_target_alone_is_clean(service):
    with running_target(service) as t:
        t.count(1000)
        time.sleep(0.3)
        assert_healthy(t)


def test_the_target_notices_a_tracers_eintr(service_o2):
    """`strace -p` stops and resumes every thread: its epoll_wait, semop and sigtimedwait
    return EINTR.  This is what "eintr=0" means in the tests below."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: the fixture's EINTR detection goes unchecked")
    with running_target(service_o2) as t:
        tracer = subprocess.Popen(["strace", "-f", "-o", "/dev/null", "-p", str(t.pid)],
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + ANSWER_S
            while not all(tr == tracer.pid for _, tr, _ in t.threads().values()):
                assert time.monotonic() < deadline, "strace never traced every thread"
                time.sleep(0.02)
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(ANSWER_S)
        t.assert_free()
        line = t.quit()
    eintr = int(line.split("eintr=")[1].split()[0])
    assert eintr > 0, f"strace came and went and the fixture saw no EINTR: {line}"
    assert "EINTR epoll_wait" in "".join(t.errors)


# --------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------

def test_exact_counts_and_one_probe_removed_while_threads_run(service):
    """Workers spin through tick0..tick7 while they are patched and unpatched."""
    with running_target(service, pause_us=0) as t:
        with attached(t.pid) as proc:
            counted = bounded(ANSWER_S, proc.probe, "counted")
            ticks = bounded(ANSWER_S, proc.probes, TICKS)
            assert (counted.spec, counted.mechanism) == ("counted", "jump")
            assert counted.address == symbol(service, "counted")[0]
            assert Path(counted.module).resolve() == service.resolve()
            assert [p.spec for p in ticks] == TICKS
            for name in ["counted", *TICKS]:
                assert t.code(name, 1) == b"\xe9", f"no jump at {name}"
            t.assert_free(grace=0)              # jprobe is the tracer only while writing

            t.count(10000)
            assert counted.hits == 10000
            for p in ticks:
                grows(lambda: p.hits, f"{p.spec}'s hits")

            bounded(ANSWER_S, proc.remove, ticks[0])
            assert_restored(t, ["tick0"])
            final, other = ticks[0].hits, ticks[1].hits
            time.sleep(0.3)
            assert ticks[0].hits == final, "a removed probe still counts"
            assert ticks[1].hits > other, "removing tick0 stopped tick1's probe"

            t.count(1000)
            assert counted.hits == 11000
            report = bounded(ANSWER_S, proc.report)
        assert counted.hits == 11000, "a probe's hits must stay final after detach"
        assert_restored(t, ["counted", *TICKS])
        t.count(100)
        assert counted.hits == 11000, "counted after detach"
        assert_healthy(t)

    assert report["pid"] == t.pid and report["errors"] == []
    assert Path(report["executable"]).resolve() == service.resolve()
    entry = next(p for p in report["probes"] if p["probe"] == "counted")
    assert (entry["mechanism"], entry["handler"], entry["hits"], entry["lost"]) == ("jump", "count", 11000, 0)
    assert int(entry["address"], 16) == symbol(service, "counted")[0]
    assert Path(entry["module"]).resolve() == service.resolve()


def test_probe_in_libc_while_a_thread_mallocs(service_o2):
    """One thread mallocs and frees in a tight loop: attach often finds it inside malloc,
    holding its arena's lock."""
    with running_target(service_o2, pause_us=0) as t:
        with attached(t.pid) as proc:
            malloc = bounded(ANSWER_S, proc.probe, "libc.so.6:malloc")
            assert malloc.mechanism == "jump"
            assert Path(malloc.module).name.startswith("libc.so")
            grows(lambda: malloc.hits, "malloc's hits")
            t.count(100)
            libc, at = Path(malloc.module), malloc.address
        original = read_vaddr(libc, at, 16)
        assert t.memory(t.module_address(libc, at), 16) == original, "malloc's code not restored"
        assert_healthy(t)


def test_attach_while_a_thread_holds_mallocs_lock(service_o2):
    """kubo/injector's warning: a thread parked inside malloc_stats, holding the main arena's
    lock, blocked writing to a full pipe.  An injector that calls malloc or dlopen in a
    borrowed thread deadlocks here; jprobe must attach, count and detach, three times."""
    with running_target(service_o2) as t:
        t.send("park", "parked")
        for cycle in range(3):
            with attached(t.pid) as proc:
                counted = bounded(ANSWER_S, proc.probe, "counted")
                t.count(100)
                assert counted.hits == 100, f"session {cycle}"
            assert_restored(t, ["counted"])
        t.send("unpark", "unparked")
        assert_healthy(t)


def test_a_hundred_sessions_on_one_process(service):
    """Attach, probe, count, detach, 100 times: each session counts exactly, and after the
    first no session leaves a mapping more."""
    sessions(service, 100)


@pytest.mark.stress
def test_stress_a_thousand_sessions(service_o2):
    sessions(service_o2, 1000)


def sessions(service, n: int) -> None:
    with running_target(service) as t:
        t.count(1)                  # stdin's buffer allocated before the first look at maps
        maps = [t.maps_lines()]
        for cycle in range(n):
            with attached(t.pid) as proc:
                counted = bounded(ANSWER_S, proc.probe, "counted")
                bounded(ANSWER_S, proc.probes, ["tick3", "libc.so.6:free"])
                t.count(100)
                assert counted.hits == 100, f"session {cycle}"
            assert counted.hits == 100, f"session {cycle}: changed after detach"
            maps.append(t.maps_lines())
        assert max(maps[2:]) <= maps[1], f"/proc/PID/maps lines before and after each session: {maps}"
        assert_restored(t, ["counted", "tick3"])
        assert_healthy(t)


def test_threads_born_while_attaching(service_o2):
    """Two threads start and join threads all the time (each calls `born` 100 times): jprobe
    must stop those born while it stops the others, and let those that die go."""
    with running_target(service_o2, pause_us=0, spawners=2) as t:
        for cycle in range(20):
            with attached(t.pid) as proc:
                born, counted = bounded(ANSWER_S, proc.probes, ["born", "counted"])
                grows(lambda: born.hits, f"session {cycle}: born's hits")
                t.count(100)
                assert counted.hits == 100, f"session {cycle}"
            assert_restored(t, ["born", "counted"])
        assert_healthy(t)


def test_a_child_forked_while_attached_keeps_no_probe(service_o2):
    """The child (it calls `counted` every millisecond) inherits the patched code; after the
    detach its code is the original and it runs on."""
    with running_target(service_o2) as t:
        with attached(t.pid) as proc:
            counted = bounded(ANSWER_S, proc.probe, "counted")
            child = t.fork()
            t.count(100)
            time.sleep(0.1)
            assert counted.hits >= 100
        time.sleep(0.2)
        assert child.alive(), f"the child died: {t.describe()}"
        assert child.code("counted", 16) == child.original_code("counted", 16), "the child keeps the probe"
        child.assert_free()
        assert_restored(t, ["counted"])
        time.sleep(0.2)
        assert child.alive(), f"the child died after the detach: {t.describe()}"
        assert_healthy(t)


def test_exec_ends_the_session(service):
    """The target executes itself again: the session ends with a message, nothing is written
    into the new image, and it runs as a fresh start does."""
    with running_target(service) as t:
        proc = bounded(ANSWER_S, jprobe.attach, t.pid)
        session = bounded(ANSWER_S, proc.__enter__)
        counted = bounded(ANSWER_S, session.probe, "counted")
        t.count(100)
        t.send("exec", "ready")
        with pytest.raises(jprobe.JprobeError) as e:
            bounded(ANSWER_S, session.probe, "tick1")
        assert "exec" in one_line_error(e.value)
        try:
            bounded(ANSWER_S, proc.__exit__, None, None, None)
        except jprobe.JprobeError as e:
            one_line_error(e)
        assert counted.hits == 100
        assert_restored(t, ["counted", "tick1"])
        assert_healthy(t)


def test_probes_on_the_calls_threads_are_blocked_in(service_o2):
    """libc's epoll_wait, poll, semop, sigtimedwait and read, with a thread blocked in each:
    no EINTR, and `read` (the main thread's, one per command) counted."""
    blocking = ["epoll_wait", "poll", "semop", "sigtimedwait", "clock_nanosleep", "read"]
    with running_target(service_o2) as t:
        with attached(t.pid) as proc:
            probes = dict(zip(blocking, bounded(ANSWER_S, proc.probes, [f"libc.so.6:{f}" for f in blocking])))
            for _ in range(20):
                t.progress()
            assert probes["read"].hits in (19, 20), "one read per command (the last may be on its way)"
            grows(lambda: probes["clock_nanosleep"].hits, "the workers' rests")
            assert probes["epoll_wait"].hits == probes["semop"].hits == probes["sigtimedwait"].hits == 0
        assert_healthy(t)


# --------------------------------------------------------------------------
# errors (one line, JprobeError)
# --------------------------------------------------------------------------

def test_no_such_process():
    pid = dead_pid()
    with pytest.raises(jprobe.JprobeError) as e:
        bounded(ANSWER_S, jprobe.attach, pid)
    assert str(pid) in one_line_error(e.value)


SEIZE = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_SEIZE = 0x4206
if libc.ptrace(ctypes.c_long(PTRACE_SEIZE), ctypes.c_long(int(sys.argv[1])), None, None) != 0:
    sys.exit(f"PTRACE_SEIZE: errno {ctypes.get_errno()}")
print("seized", flush=True)
time.sleep(600)
"""


@contextmanager
def traced_by(how: str, pid: int) -> Iterator[int]:
    """`pid` traced by another process (its pid yielded): a PTRACE_SEIZE that stops nothing,
    or strace -f."""
    if how == "strace":
        if shutil.which("strace") is None:
            pytest.skip("strace is not installed")
        tracer = subprocess.Popen(["strace", "-f", "-o", "/dev/null", "-p", str(pid)], stderr=subprocess.DEVNULL)
    else:
        tracer = subprocess.Popen([sys.executable, "-c", SEIZE, str(pid)], stdout=subprocess.PIPE, text=True)
        assert bounded(ANSWER_S, tracer.stdout.readline) == "seized\n"
    try:
        deadline = time.monotonic() + ANSWER_S
        while f"TracerPid:\t{tracer.pid}\n" not in Path(f"/proc/{pid}/status").read_text():
            assert time.monotonic() < deadline, f"{how} never traced {pid}"
            time.sleep(0.02)
        yield tracer.pid
    finally:
        tracer.send_signal(signal.SIGINT if how == "strace" else signal.SIGKILL)
        tracer.wait(ANSWER_S)


@pytest.mark.parametrize("how", ["seize", "strace"])
def test_a_process_already_traced_is_refused(service_o2, how):
    with running_target(service_o2) as t:
        with traced_by(how, t.pid) as tracer:
            with pytest.raises(jprobe.JprobeError) as e:
                with attached(t.pid) as proc:
                    proc.probe("counted")
            assert str(tracer) in one_line_error(e.value), "the message must name the tracer"
            assert t.code("counted", 16) == t.original_code("counted", 16)
        if how == "seize":                  # a tracer that stopped nothing: jprobe left no trace
            assert_healthy(t)
        else:
            t.assert_free()


def test_a_module_not_loaded_yet_waits(service_o2):
    """A library the process has not loaded: the probe waits for it (test_attach_loads.py),
    said in the report; the session goes on."""
    with running_target(service_o2) as t:
        with attached(t.pid) as proc:
            waiting = bounded(ANSWER_S, proc.probe, "libjprobe-no-such-module.so:f")
            assert (waiting.pending, waiting.mechanism, waiting.hits) == (True, "pending", 0)
            counted = bounded(ANSWER_S, proc.probe, "counted")
            t.count(300)
            assert counted.hits == 300
            entry = next(p for p in proc.report()["probes"] if p["probe"] == waiting.spec)
            assert entry["loaded"] is False
        assert_restored(t, ["counted"])
        assert_healthy(t)


@pytest.mark.parametrize("spec, named", [
    ("no_such_function", "no_such_function"),
    ("libc.so.6:no_such_function", "no_such_function"),
])
def test_a_symbol_not_in_the_target(service_o2, spec, named):
    """Refused with a one-line error; the session goes on and counts what it can."""
    with running_target(service_o2) as t:
        with attached(t.pid) as proc:
            with pytest.raises(jprobe.JprobeError) as e:
                bounded(ANSWER_S, proc.probe, spec)
            assert named in one_line_error(e.value)
            counted = bounded(ANSWER_S, proc.probe, "counted")
            t.count(300)
            assert counted.hits == 300
        assert_restored(t, ["counted"])
        assert_healthy(t)


PR_CAPBSET_DROP, CAP_SYS_PTRACE = 24, 19
NOBODY = 65534


def _without_cap_sys_ptrace() -> None:
    """In the child, before exec: root, but without CAP_SYS_PTRACE."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE, 0, 0, 0) != 0:
        os._exit(77)


def _as_nobody() -> None:
    os.setgid(NOBODY)
    os.setuid(NOBODY)


ATTACH_ONCE = """
import sys, jprobe
try:
    jprobe.attach(int(sys.argv[1]))
except jprobe.JprobeError as e:
    print("JprobeError:", e)
"""


@contextmanager
def nobodys_target(service: Path, why: str) -> Iterator[Target]:
    """The fixture run as `nobody`, from a copy it may execute; skipped unless jprobe is root."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")
    home = Path(tempfile.mkdtemp(prefix="jprobe-attach-"))
    try:
        home.chmod(0o755)
        binary = Path(shutil.copy2(service, home / "service"))
        with running_target(binary, preexec_fn=_as_nobody) as t:
            yield t
    finally:
        shutil.rmtree(home)


def test_permission_denied(service_o2):
    """Another user's process, attached without CAP_SYS_PTRACE (root dropping it)."""
    with nobodys_target(service_o2, "the target runs as nobody and jprobe as root without CAP_SYS_PTRACE") as t:
        r = subprocess.run([sys.executable, "-c", ATTACH_ONCE, str(t.pid)], capture_output=True, text=True,
                           env=child_env(), timeout=ANSWER_S, preexec_fn=_without_cap_sys_ptrace)
        if r.returncode == 77:
            pytest.skip("could not drop CAP_SYS_PTRACE (no CAP_SETPCAP)")
        assert r.stdout.startswith("JprobeError:"), (r.stdout, r.stderr)
        assert "permission" in one_line_error(r.stdout).lower()
        assert str(t.pid) in r.stdout

        c = cli("attach", t.pid, "-p", "counted", preexec_fn=_without_cap_sys_ptrace)
        out, err = c.communicate(timeout=ANSWER_S)
        assert c.returncode == 2, err
        assert "Traceback" not in err and "permission" in one_line_error(err).lower()
        assert_healthy(t)


def test_root_attaches_to_another_users_process(service_o2):
    """Part 7: root probes a process of `nobody`'s: exact counts, the process as it was after."""
    with nobodys_target(service_o2, "the target runs as nobody") as t:
        assert Path(f"/proc/{t.pid}/status").read_text().split("Uid:")[1].split()[0] == str(NOBODY)
        with attached(t.pid) as proc:
            counted = bounded(ANSWER_S, proc.probe, "counted")
            t.count(400)
            assert counted.hits == 400
        assert_restored(t, ["counted"])
        assert_healthy(t)


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------

def test_cli_counts_over_its_duration(service_o2):
    with running_target(service_o2) as t:
        with cli_attach(t.pid, "-p", "counted", "-p", "tick5", "--json", "--duration", 3) as c:
            t.wait_patched("counted", lambda: c.poll() is None)
            t.count(500)
            out, err = c.communicate(timeout=ANSWER_S)
        assert c.returncode == 0, err
        assert "Traceback" not in err
        report = json.loads(out)
        assert report["pid"] == t.pid
        assert report_hits(report, "counted") == 500
        assert report_hits(report, "tick5") > 0
        assert_restored(t, ["counted", "tick5"])
        assert_healthy(t)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_cli_ends_normally_on_a_signal(service_o2, sig):
    """Ctrl-C (or SIGTERM) of `jprobe attach` without --duration is a normal end."""
    with running_target(service_o2) as t:
        with cli_attach(t.pid, "-p", "counted", "--json") as c:
            t.wait_patched("counted", lambda: c.poll() is None)
            t.count(300)
            time.sleep(0.2)
            assert c.poll() is None, "jprobe attach ended by itself"
            c.send_signal(sig)
            out, err = c.communicate(timeout=ANSWER_S)
        assert c.returncode == 0, err
        assert "Traceback" not in err
        assert report_hits(json.loads(out), "counted") == 300
        assert_restored(t, ["counted"])
        assert_healthy(t)


def test_cli_no_such_process():
    pid = dead_pid()
    r = subprocess.run([sys.executable, "-m", "jprobe", "attach", str(pid), "-p", "main"],
                       capture_output=True, text=True, env=child_env(), timeout=ANSWER_S)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert str(pid) in one_line_error(r.stderr)


def test_cli_unknown_symbol(service_o2):
    with running_target(service_o2) as t:
        with cli_attach(t.pid, "-p", "counted", "-p", "no_such_function", "--duration", 1) as c:
            out, err = c.communicate(timeout=ANSWER_S)
        assert c.returncode == 2
        assert "Traceback" not in err
        assert "no_such_function" in one_line_error(err)
        assert_restored(t, ["counted"])
        assert_healthy(t)


def test_cli_exec_ends_it(service_o2):
    with running_target(service_o2) as t:
        with cli_attach(t.pid, "-p", "counted", "--json") as c:
            t.wait_patched("counted", lambda: c.poll() is None)
            t.count(50)
            t.send("exec", "ready")
            out, err = c.communicate(timeout=ANSWER_S)
        assert c.returncode >= 0, f"jprobe attach killed by signal {-c.returncode}"
        assert "Traceback" not in err
        assert "exec" in err, f"no message saying the process executed a program: {err!r}"
        assert_restored(t, ["counted"])
        assert_healthy(t)


# --------------------------------------------------------------------------
# the target dies
# --------------------------------------------------------------------------

def _die(t: Target, reap: bool) -> None:
    # os.kill, not Popen.kill: that polls first, and the test process is the target's tracer
    # too while it attaches, so the poll would take a stop meant for jprobe.
    os.kill(t.pid, signal.SIGKILL)
    deadline = time.monotonic() + ANSWER_S
    while t.alive():
        assert time.monotonic() < deadline, "SIGKILL did not end the target"
        time.sleep(0.01)
    if reap:
        t.proc.wait(ANSWER_S)


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_target_killed_mid_session(service_o2, reap):
    """Leaving the session raises at most a JprobeError, and does not hang; counts stay final."""
    with running_target(service_o2) as t:
        proc = bounded(ANSWER_S, jprobe.attach, t.pid)
        session = bounded(ANSWER_S, proc.__enter__)
        counted = bounded(ANSWER_S, session.probe, "counted")
        t.count(100)
        _die(t, reap)
        try:
            bounded(ANSWER_S, proc.__exit__, None, None, None)
        except jprobe.JprobeError as e:
            one_line_error(e)
        assert counted.hits == 100


@pytest.mark.parametrize("delay_ms", [0, 2, 5, 10, 20, 50])
def test_target_killed_during_attach(service_o2, delay_ms):
    """Killed while jprobe stops threads, injects or patches: a JprobeError or success, no hang."""
    with running_target(service_o2, pause_us=0) as t:
        killer = threading.Timer(delay_ms / 1000, _die, (t, True))
        killer.start()
        try:
            with attached(t.pid) as proc:
                bounded(ANSWER_S, proc.probes, ["counted", *TICKS, "libc.so.6:malloc"])
        except jprobe.JprobeError as e:
            one_line_error(e)
        finally:
            killer.join()


def test_cli_target_killed(service_o2):
    """`jprobe attach` ends with a message and the report of what was counted."""
    with running_target(service_o2) as t:
        with cli_attach(t.pid, "-p", "counted", "--json") as c:
            t.wait_patched("counted", lambda: c.poll() is None)
            t.count(50)
            _die(t, True)
            out, err = c.communicate(timeout=ANSWER_S)
        assert c.returncode >= 0, f"jprobe attach killed by signal {-c.returncode}"
        assert "Traceback" not in err
        assert err.strip(), "no message saying the process exited"
        assert report_hits(json.loads(out), "counted") == 50


# --------------------------------------------------------------------------
# jprobe dies
# --------------------------------------------------------------------------

HOLD = """
import sys, time, jprobe
with jprobe.attach(int(sys.argv[1])) as proc:
    proc.probes(sys.argv[2:])
    print("attached", flush=True)
    time.sleep(600)
"""


def test_jprobe_killed_while_attached(service_o2):
    """SIGKILL gives jprobe no chance to detach: the probes stay, the target runs on."""
    with running_target(service_o2) as t:
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(t.pid), "counted", *TICKS, "libc.so.6:malloc"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        try:
            line = bounded(ANSWER_S, holder.stdout.readline)
            assert line == "attached\n", holder.stderr.read() if holder.poll() is not None else line
            t.count(100)
        finally:
            holder.kill()
            holder.communicate(timeout=ANSWER_S)
        time.sleep(0.3)
        assert_healthy(t)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("delay_ms", [100, 200, 300, 400, 600])
def test_jprobe_interrupted_during_attach(service_o2, sig, delay_ms):
    """SIGKILL or Ctrl-C at some point of `jprobe attach` (starting, stopping threads,
    injecting, patching): it ends, and the target runs on, no thread stopped or traced."""
    with running_target(service_o2, pause_us=0) as t:
        with cli_attach(t.pid, "-p", "counted", *[a for k in TICKS for a in ("-p", k)]) as c:
            time.sleep(delay_ms / 1000)
            c.send_signal(sig)
            bounded(ANSWER_S, c.wait)
        time.sleep(0.3)
        assert_healthy(t)
