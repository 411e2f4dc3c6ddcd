"""A callback is not re-entered on its thread, and every hit it did not run for is reported
(issue 11, defect 4 and the callback_skipped gap; SPEC §3 "missed", "callback_skipped").

For a callback probe, hits = the callback's calls + missed (the thread was already in a
callback, of this probe or another) + callback_skipped (the callback was not resolved yet:
hits from initialisers before the runtime's constructor opened its library).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.build import Variant
from support.run import jprobe, run_prog, run_with_report
from test_preinit import CALLS, program as early_program
from test_run import entry, jprobe_run

N = 1000


def counts(report: dict, name: str) -> tuple[str, int, int, int]:
    """(mechanism, hits, missed, callback_skipped) of a probe's entry."""
    e = entry(report, name)
    return e["mechanism"], e["hits"], e["missed"], e["callback_skipped"]


def calls_printed(stderr: str, name: str) -> int:
    """The calls a fixture callback printed at exit (`name=N`)."""
    [n] = re.findall(rf"^{name}=(\d+)$", stderr, re.M)
    return int(n)


@pytest.fixture(scope="module")
def reenter(build) -> tuple[Path, Path]:
    """reenter.c (work: a jump site, tiny: a trap site) and a callback that calls both."""
    prog = build("reenter.c", ["-O2", "-g", "-fPIE", "-pie", "-rdynamic"])
    return prog, build.lib("cb_reenter.c")


def reentering(lib: Path) -> list[str]:
    return [f"work={lib}:on_hit", f"tiny={lib}:on_hit"]


def check_reentry(report: dict, stderr: str) -> None:
    """Each of the 2N calls from main runs the callback once; each run calls work and tiny
    once, and both hits are missed: the thread is in a callback (the trap handler's or the
    trampoline's, one guard for both)."""
    assert calls_printed(stderr, "cb_reenter") == 2 * N
    assert counts(report, "work") == ("jump", 3 * N, 2 * N, 0)
    assert counts(report, "tiny") == ("trap", 3 * N, 2 * N, 0)


def test_a_patched_programs_callback_is_not_reentered(reenter, tmp_path):
    prog, lib = reenter
    out = tmp_path / "reenter.p"
    jprobe("patch", prog, "-o", out, *[a for p in reentering(lib) for a in ("-p", p)], check=True)
    expected = run_prog([prog, N])
    got, report = run_with_report([out, N], tmp_path / "r.json")
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout), got.stderr
    check_reentry(report, got.stderr)
    assert report["errors"] == []


def test_a_callback_under_run_is_not_reentered(reenter, tmp_path):
    prog, lib = reenter
    expected = run_prog([prog, N])
    got, report = jprobe_run(tmp_path, [prog, N], reentering(lib))
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout), got.stderr
    check_reentry(report, got.stderr)
    assert report["errors"] == []


def test_a_malloc_callback_that_allocates(build, tmp_path):
    """The issue's case: a libc malloc callback that calls malloc and free killed `echo hi`
    after 3,447 nested hits. Each call of the callback makes one malloc of its own (free is
    not probed): one missed hit."""
    lib = build.lib("cb_malloc.c")
    got, report = jprobe_run(tmp_path, ["/bin/echo", "hi"], [f"libc.so.6:malloc={lib}:on_hit"])
    assert (got.returncode, got.stdout) == (0, "hi\n"), got.stderr
    calls = calls_printed(got.stderr, "cb_malloc")
    mechanism, hits, missed, skipped = counts(report, "libc.so.6:malloc")
    assert calls > 0 and missed == calls
    assert hits == calls + missed + skipped
    assert report["errors"] == []
    text = jprobe("report", tmp_path / "report.json", check=True).stdout
    assert text.splitlines()[1].split()[-3:] == ["hits", "missed", "callback_skipped"]
    assert text.splitlines()[2].split()[-3:] == [str(hits), str(missed), str(skipped)]


@pytest.fixture(scope="module")
def early(build) -> tuple[Path, str]:
    """early.c, whose library's constructor calls early_work and early_inc CALLS times each
    before the runtime's constructor runs, and a counting callback for both."""
    prog = early_program(build, Variant("-O2", "pie"))
    return prog, f"={build.lib('cb_count.c')}:on_hit"


def check_skipped(report: dict, stderr: str) -> None:
    """The constructor's calls count, without the callback; main's run it."""
    assert calls_printed(stderr, "cb_count") == 2 * N
    for name in ("early_work", "early_inc"):
        assert counts(report, name)[1:] == (CALLS + N, 0, CALLS)
    assert report["errors"] == []


def test_hits_before_a_patched_programs_callback_is_ready(early, tmp_path):
    prog, handler = early
    out = tmp_path / "early.p"
    jprobe("patch", prog, "-o", out, "-p", "early_work" + handler, "-p", "early_inc" + handler, check=True)
    got, report = run_with_report([out, N], tmp_path / "r.json")
    assert (got.returncode, got.stdout) == (0, run_prog([prog, N]).stdout)
    check_skipped(report, got.stderr)


def test_hits_before_the_callback_is_ready_under_run(early, tmp_path):
    prog, handler = early
    got, report = jprobe_run(tmp_path, [prog, N], ["early_work" + handler, "early_inc" + handler])
    assert (got.returncode, got.stdout) == (0, run_prog([prog, N]).stdout)
    check_skipped(report, got.stderr)


def test_count_probes_report_neither(early, tmp_path):
    """missed and callback_skipped are a callback's: a count probe's entry has neither."""
    prog, _ = early
    got, report = jprobe_run(tmp_path, [prog, N], ["early_work"])
    assert got.returncode == 0
    e = entry(report, "early_work")
    assert e["hits"] == CALLS + N and "missed" not in e and "callback_skipped" not in e
