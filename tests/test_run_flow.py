"""`jprobe run`: control flow that does not return normally, bad input, and the plumbing.

- a probed function called from signal handlers, and functions left by longjmp():
  exact hits, the program's output unchanged;
- bad input is refused before the program starts: exit 2, one line on stderr, no
  traceback, and the program (which creates FLOW_MARKER when it runs) never ran;
- stdin and stdout pass through byte for byte; the report goes to stderr as text by
  default, to --report FILE as JSON; the program's exit status (or 128+signal) is jprobe's.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from support.build import SOME_VARIANTS
from support.run import assert_same_behaviour, child_env, run_prog
from test_run import entry, hits, jprobe_run

N = 500


@pytest.fixture(scope="module", params=SOME_VARIANTS, ids=str)
def flow(build, request):
    return build("run_flow.c", request.param.flags)


@pytest.fixture(scope="module")
def flow_o2(build):
    return build("run_flow.c", ["-O2", "-g", "-fPIE", "-pie"])


def run_cli(args, env=None, input=None, timeout=120):
    """`python -m jprobe ARGS`, bytes in and out."""
    return subprocess.run([sys.executable, "-m", "jprobe", *[str(a) for a in args]],
                          input=input, capture_output=True, env=child_env(env), timeout=timeout)


# --------------------------------------------------------------------------
# (a) signal handlers, (b) longjmp
# --------------------------------------------------------------------------

def test_probe_called_from_signal_handlers(flow, tmp_path):
    args = [flow, "signal", N]
    orig = run_prog(args)
    assert orig.returncode == 0 and f"alrm={N} usr1={N}" in orig.stdout
    got, report = jprobe_run(tmp_path, args, ["in_handler", "jump_outer"])
    assert_same_behaviour(orig, got)
    assert hits(report, "in_handler") == 2 * N
    assert hits(report, "jump_outer") == 0
    assert entry(report, "in_handler")["mechanism"] == "jump"
    assert report["errors"] == []


def test_longjmp_out_of_nested_probed_functions(flow, tmp_path):
    """jump_away() longjmp()s out of jump_inner() and jump_middle() back into jump_outer(),
    which called setjmp(): every probe counts each round once, and the program goes on."""
    args = [flow, "longjmp", N]
    orig = run_prog(args)
    assert orig.returncode == 0 and f"depth_sum={6 * N}" in orig.stdout
    probes = ["jump_outer", "jump_middle", "jump_inner", "jump_away", "in_handler"]
    got, report = jprobe_run(tmp_path, args, probes)
    assert_same_behaviour(orig, got)
    assert {p: hits(report, p) for p in probes} == {**{p: N for p in probes[:4]}, "in_handler": 0}
    assert report["errors"] == []


# --------------------------------------------------------------------------
# (c) bad input: exit 2 before the program starts
# --------------------------------------------------------------------------

def _refused(tmp_path, probes, command):
    marker = tmp_path / "ran"
    report = tmp_path / "report.json"
    r = run_cli(["run", *[a for p in probes for a in ("-p", p)], "--report", report, "--", *command],
                env={"FLOW_MARKER": str(marker)})
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("jprobe: error: ") and "Traceback" not in err, err
    assert r.stdout == b""
    assert not marker.exists(), "the program ran"
    assert not report.exists()
    return err


def test_flow_marker_proves_a_run(flow_o2, tmp_path):
    """The check the refusals rely on: under `jprobe run` the fixture does create its marker."""
    marker = tmp_path / "ran"
    r = run_cli(["run", "-p", "flow_work", "--", flow_o2, "exit", 0], env={"FLOW_MARKER": str(marker)})
    assert r.returncode == 0, r.stderr
    assert marker.exists()


def test_a_module_the_loader_cannot_find_waits_and_is_reported_never_loaded(flow_o2, tmp_path):
    """It may be a plugin the program dlopen()s by a path of its own (test_attach_loads.py):
    the probe waits for it, and the report says it never came."""
    r = subprocess.run([sys.executable, "-m", "jprobe", "run", "-p", "libnope.so.3:f", "--", str(flow_o2),
                        "exit", "0"], capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "never loaded" in r.stderr and "libnope.so.3" in r.stderr


def test_unknown_symbol_in_library(flow_o2, tmp_path):
    err = _refused(tmp_path, ["flow_work", "libc.so.6:no_such_fn"], [flow_o2, "exit", 0])
    assert "no_such_fn" in err


def test_unknown_symbol_in_program(flow_o2, tmp_path):
    err = _refused(tmp_path, ["no_such_fn"], [flow_o2, "exit", 0])
    assert "no_such_fn" in err


def test_command_not_executable(flow_o2, tmp_path):
    prog = tmp_path / "not_executable"
    shutil.copy(flow_o2, prog)
    prog.chmod(0o644)
    err = _refused(tmp_path, ["flow_work"], [prog, "exit", 0])
    assert "not_executable" in err


@pytest.mark.parametrize("command", ["/nonexistent/run_flow", "jprobe-no-such-command-xyz"])
def test_command_missing(tmp_path, command):
    err = _refused(tmp_path, ["flow_work"], [command, "exit", 0])
    assert command in err


# --------------------------------------------------------------------------
# (d) stdin/stdout, where the report goes, exit status
# --------------------------------------------------------------------------

DATA = bytes(range(256)) * 64 + b"\x00\r\n\xff" * 1000 + os.urandom(50000) + b"no newline at the end"


def test_stdin_stdout_binary_through_fixture(flow_o2, tmp_path):
    """All bytes through the probed program; the text report alone on stderr, after its output."""
    r = run_cli(["run", "-p", "copy_chunk", "--", flow_o2, "copy", 3], input=DATA)
    assert r.returncode == 3, r.stderr
    assert r.stdout == DATA
    err = r.stderr.decode()
    [line] = [ln for ln in err.splitlines() if ln.startswith("chunks=")]
    chunks = int(line.split()[0].split("=")[1])
    assert line == f"chunks={chunks} bytes={len(DATA)}"
    assert err.startswith(line + "\n"), err          # the program's own stderr comes first
    report = err[len(line) + 1:]
    rows = [ln.split() for ln in report.splitlines() if ln.startswith("copy_chunk")]
    assert len(rows) == 1 and rows[0][-1] == str(chunks), report
    assert not report.lstrip().startswith("{"), "the default report is text, not JSON"


@pytest.mark.skipif(shutil.which("cat") is None, reason="no cat")
def test_stdin_stdout_binary_through_cat(tmp_path):
    """A system program with a libc probe: bytes untouched; --report FILE gets JSON and
    stderr stays empty."""
    report = tmp_path / "report.json"
    r = run_cli(["run", "-p", "libc.so.6:read", "--report", report, "--", shutil.which("cat")], input=DATA)
    assert r.returncode == 0, r.stderr
    assert r.stdout == DATA
    assert r.stderr == b""
    rep = json.loads(report.read_text())
    assert hits(rep, "libc.so.6:read") >= 2          # at least one read with data and the EOF
    assert rep["errors"] == []


def test_json_to_stderr(flow_o2):
    r = run_cli(["run", "-p", "flow_work", "--json", "--", flow_o2, "exit", 0])
    assert r.returncode == 0
    assert r.stdout == b"work=55\n"
    rep = json.loads(r.stderr)
    assert hits(rep, "flow_work") == 10


@pytest.mark.parametrize("status", [0, 3, 255])
def test_exit_status(flow_o2, tmp_path, status):
    args = [flow_o2, "exit", status]
    orig = run_prog(args)
    got, report = jprobe_run(tmp_path, args, ["flow_work"])
    assert got.returncode == orig.returncode == status
    assert_same_behaviour(orig, got)
    assert hits(report, "flow_work") == 10


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1])
def test_killed_by_signal(flow_o2, tmp_path, sig):
    got, report = jprobe_run(tmp_path, [flow_o2, "kill", int(sig)], ["flow_work"])
    assert got.returncode == 128 + sig, got.stderr
    assert got.stdout == "work=55\n"
    assert hits(report, "flow_work") == 10
