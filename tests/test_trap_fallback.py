"""The trap fallback next to a program's own SIGTRAP and SIGILL handlers, and under gdb.

Without a debugger a trap site is an int3 (SIGTRAP).  Under one, or with
JPROBE_TRAP=ud, the runtime trades it for 0xd6, which raises SIGILL: gdb takes
every SIGTRAP for its own, but passes SIGILL to the program.  The fixture prints
the first byte of the probed function at exit on stderr, which tells the two
apart.
"""
import json
import os
import re
import shutil
import signal
import subprocess

import pytest

from support.build import SOME_VARIANTS
from support.report import hits_by_address
from support.run import patch, run_prog, run_with_report, sites

N = 1000


@pytest.fixture(params=SOME_VARIANTS, ids=str)
def patched(request, build, tmp_path):
    prog = build("own_sigtrap.c", request.param.flags)
    tiny = int(sites(prog, "tiny")["instructions"][0]["address"], 16)
    out = patch(prog, tmp_path / "own_sigtrap.p", ["tiny"])
    return prog, out, tiny


def test_program_keeps_its_own_sigtrap_handler(patched, tmp_path):
    prog, out, tiny = patched
    expected = run_prog([prog, str(N)])
    assert expected.returncode == 0 and "traps=11 ills=4" in expected.stdout
    got, report = run_with_report([out, str(N)], tmp_path / "r.json")
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout)
    assert "tiny[0]=0xcc" in got.stderr, "without a debugger the site stays an int3"
    [probe] = report["probes"]
    assert probe["mechanism"] == "trap"
    assert hits_by_address(report)[tiny] == N


def test_ud_on_request_keeps_the_programs_own_sigill_handler(patched, tmp_path):
    """JPROBE_TRAP=ud: what the runtime does under a debugger, without one."""
    prog, out, tiny = patched
    expected = run_prog([prog, str(N)])
    got, report = run_with_report([out, str(N)], tmp_path / "r.json", env={"JPROBE_TRAP": "ud"})
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout)
    assert "tiny[0]=0xd6" in got.stderr, got.stderr
    [probe] = report["probes"]
    assert probe["mechanism"] == "trap"
    assert hits_by_address(report)[tiny] == N
    assert report["errors"] == []


@pytest.mark.parametrize("trap", ["int3", "ud"])
def test_default_sigill_still_kills(patched, tmp_path, trap):
    """A genuine ud2 with SIGILL at its default kills the program, as without jprobe."""
    prog, out, _ = patched
    argv = [str(N), "no-sigill-handler"]
    expected = run_prog([prog, *argv], cwd=tmp_path)
    assert expected.returncode == -signal.SIGILL
    got = run_prog([out, *argv], env={"JPROBE_TRAP": trap}, cwd=tmp_path)
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout)


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_runs_under_gdb(patched, tmp_path):
    """Under gdb the sites raise SIGILL, which gdb passes on and is told not to show.

    The probes count exactly, the program's own SIGILLs still reach its handler
    (its own SIGTRAPs are left out: gdb takes them for its own, with or without
    jprobe), and a gdb breakpoint still stops.
    """
    prog, out, tiny = patched
    argv = [str(N), "no-sigtrap"]
    expected = run_prog([prog, *argv])
    assert expected.returncode == 0 and "traps=0 ills=4" in expected.stdout
    report = tmp_path / "gdb.json"
    cmd = ["gdb", "-nx", "-batch", "-ex", "handle SIGILL nostop noprint",
           "-ex", f"set environment JPROBE_REPORT={report}",
           "-ex", "break main", "-ex", "run", "-ex", "info symbol $pc", "-ex", "continue",
           "--args", str(out), *argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JPROBE_")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    log = r.stdout + r.stderr
    assert expected.stdout in r.stdout, log
    assert "tiny[0]=0xd6" in r.stderr, "the runtime did not see the debugger: " + log
    assert re.search(r"^main( \+ \d+)? in section \.text", r.stdout, re.M), log
    assert "exited normally" in r.stdout, log
    rep = json.loads(report.read_text())
    assert hits_by_address(rep)[tiny] == N
    assert rep["errors"] == []
