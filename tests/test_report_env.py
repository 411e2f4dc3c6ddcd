"""JPROBE_REPORT that cannot be written (issue 11, silent gap): a patched program still runs
as the original did, and says on stderr, in one line at exit, that no report was written and
why, instead of writing nothing and saying nothing."""
from __future__ import annotations

import pytest

from support.run import patch, run_prog


@pytest.fixture(scope="module")
def patched(build, tmp_path_factory):
    prog = build("basic.c", ["-O2", "-g", "-fPIE", "-pie"])
    return prog, patch(prog, tmp_path_factory.mktemp("patched") / "basic.p", ["compute"])


@pytest.mark.parametrize("where", ["missing-dir", "directory", "read-only-fs", "empty"])
def test_unwritable_report_path_is_one_line_at_exit(patched, tmp_path, where):
    prog, out = patched
    value = {"missing-dir": str(tmp_path / "no" / "r.json"), "directory": str(tmp_path),
             "read-only-fs": "/proc/r.json", "empty": ""}[where]
    orig = run_prog([prog, 100, 3])
    got = run_prog([out, 100, 3], env={"JPROBE_REPORT": value})
    assert (got.returncode, got.stdout) == (orig.returncode, orig.stdout)
    lines = got.stderr.splitlines()
    assert len(lines) == 1 and "JPROBE_REPORT" in lines[0] and "no report" in lines[0], got.stderr
    if value:
        assert value in lines[0]
    assert list(tmp_path.iterdir()) == [], "something half-written was left"


def test_unset_report_path_stays_silent(patched):
    prog, out = patched
    got = run_prog([out, 100, 3])
    assert got.stderr == ""
