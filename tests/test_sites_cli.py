"""`jprobe sites` as a user reaches it (issue 11):

- every command an error message suggests runs (`jprobe sites FILE frame@0x4fe0` for stripped
  code was refused), and LOCATION is what `-p` takes: SYMBOL, SYMBOL+OFFSET, ADDRESS, or a
  name jprobe itself prints (`frame@0x...` for code only the unwind table describes);
- on a library the two appliers differ (`jprobe patch` gives short sites a trap, `jprobe run`
  a pun): `sites` says which one it predicts, `--for patch|run|attach` chooses, and the prediction is
  what the applier then does.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from support.elf import symbol
from support.run import child_env, jprobe

DASH = Path("/usr/bin/dash")


def _suggested_commands(message: str) -> list[list[str]]:
    """The `jprobe COMMAND ARGS...` a message suggests (not a mere `jprobe sites`), as argument lists."""
    return [args for args in (shlex.split(m)[1:] for m in re.findall(r"`(jprobe [^`]+)`", message))
            if len(args) > 1]


def _rows(args) -> dict[int, dict]:
    """{address: row} of `jprobe sites ARGS --json` (ARGS without the leading `sites`)."""
    args = list(args)[1:] if list(args)[:1] == ["sites"] else args
    r = jprobe("sites", *args, "--json", check=True)
    return {int(row["address"], 16): row for row in json.loads(r.stdout)["instructions"]}


def _off_boundary_address(path: Path) -> tuple[int, int]:
    """(function start, an address inside its first instruction) of stripped code."""
    from jprobe.elf import ElfModule
    from jprobe.sites import SiteAnalyzer

    analyzer = SiteAnalyzer(ElfModule(str(path)))
    for start, end in analyzer.frames.ranges:
        sym = analyzer.function_at(start)
        insns = analyzer.facts(sym).insns if sym is not None else []
        if insns and insns[0].size > 1 and not analyzer.module.function_at(start):
            return start, start + 1
    pytest.skip(f"{path}: no unwind range to test with")


@pytest.mark.parametrize("command", ["patch", "run"])
def test_the_hint_for_an_address_off_a_boundary_runs(tmp_path, command):
    """`-p /usr/bin/dash:0x5000` (issue 11, defect 8) suggested `jprobe sites /usr/bin/dash
    frame@0x4fe0`, which answered "no function symbol"."""
    if not DASH.exists():
        pytest.skip(f"{DASH} is not installed")
    start, inside = _off_boundary_address(DASH)
    if command == "patch":
        r = jprobe("patch", DASH, "-o", tmp_path / "dash", "-p", f"{inside:#x}")
    else:
        r = jprobe("run", "-p", f"{DASH}:{inside:#x}", "--", "true")
    assert r.returncode == 2
    commands = _suggested_commands(r.stderr)
    assert commands, r.stderr
    for args in commands:
        rows = _rows(args)
        assert start in rows and inside not in rows, args        # the boundaries around it


def test_the_hint_for_a_symbol_offset_off_a_boundary_runs(build):
    prog = build("basic.c", ["-O2", "-g", "-fPIE", "-pie"])
    r = jprobe("patch", prog, "-o", prog.parent / "never-written", "-p", "compute+1")
    assert r.returncode == 2
    commands = _suggested_commands(r.stderr)
    assert commands, r.stderr
    for args in commands:
        assert symbol(prog, "compute")[0] in _rows(args)


def test_location_as_probes_give_it(build):
    """SYMBOL, SYMBOL+OFFSET and ADDRESS name the function that holds them; all agree."""
    prog = build("basic.c", ["-O2", "-g", "-fPIE", "-pie"])
    start, size = symbol(prog, "compute")
    by_symbol = _rows([prog, "compute"])
    second = sorted(by_symbol)[1]
    assert sum(1 for a in by_symbol if start <= a < start + size) == len(by_symbol)
    for location in (f"compute+{second - start:#x}", f"{second:#x}", str(second), f"{start:#x}"):
        assert _rows([prog, location]) == by_symbol, location


@pytest.mark.parametrize("location, words", [
    ("libc.so.6:malloc", "MODULE"),
    ("compute=./h.so:on_hit", "handler"),
    ("compute%return", "%return"),
    ("compute+0x10000", "outside compute"),
    ("frame@0x10", "frame@0x10"),
])
def test_bad_location_is_one_line(build, location, words):
    prog = build("basic.c", ["-O2", "-g", "-fPIE", "-pie"])
    r = jprobe("sites", prog, location)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and location.split("=")[0].split("%")[0] in lines[0], r.stderr
    for args in _suggested_commands(r.stderr):
        assert _rows(args)


# --------------------------------------------------------------------------
# which applier: --for patch|run|attach
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_lib(build):
    return build.lib("short_lib.c", ["-O2"])


def _mechanism(args) -> tuple[str, str]:
    r = jprobe("sites", *args, "--json", check=True)
    out = json.loads(r.stdout)
    [row] = [row for row in out["instructions"] if row["instruction"].startswith("lea")]
    return out["for"], row["mechanism"]


def test_sites_of_a_library_says_which_applier(short_lib):
    """`jprobe sites` on a library showed what `run` does (a pun), not what `patch` does (a trap)."""
    assert _mechanism([short_lib, "tiny"]) == ("run", _mechanism([short_lib, "tiny", "--for", "run"])[1])
    r = jprobe("sites", short_lib, "tiny", check=True)
    [summary] = [line for line in r.stdout.splitlines() if re.match(r"\d+ instructions", line)]
    assert "`jprobe run`" in summary and "--for patch" in summary, summary


def test_sites_for_patch_is_what_patch_does(short_lib, tmp_path):
    assert _mechanism([short_lib, "tiny", "--for", "patch"]) == ("patch", "trap")
    r = jprobe("patch", short_lib, "-o", tmp_path / "lib.so", "-p", "tiny", check=True)
    assert r.stdout.split()[2] == "trap"


def test_sites_for_attach_is_what_attach_does(short_lib):
    """`jprobe attach` places no trap and no island: the short site is refused, and attaching
    refuses it the same way."""
    import ctypes
    import os

    import jprobe
    from jprobe.errors import SiteError

    applier, predicted = _mechanism([short_lib, "tiny", "--for", "attach"])
    assert (applier, predicted) == ("attach", "none")
    ctypes.CDLL(str(short_lib))
    with jprobe.attach(os.getpid()) as me, pytest.raises(SiteError, match="jprobe attach"):
        me.probe(f"{short_lib}:tiny")


def test_sites_for_run_is_what_run_does(short_lib, tmp_path):
    applier, predicted = _mechanism([short_lib, "tiny", "--for", "run"])
    assert predicted in ("pun", "evict")
    report = tmp_path / "r.json"
    # the library preloaded into `true` (jprobe puts its runtime first)
    r = subprocess.run([sys.executable, "-m", "jprobe", "run", "-p", f"{short_lib}:tiny", "--report", str(report),
                        "--", "true"], capture_output=True, text=True, env=child_env({"LD_PRELOAD": str(short_lib)}))
    assert r.returncode == 0, r.stderr
    [entry] = json.loads(report.read_text())["probes"]
    assert entry["mechanism"] == predicted and entry.get("loaded", True), entry


def test_sites_of_a_program_predicts_both(build):
    prog = build("tiny.c", ["-O2", "-fPIE", "-pie"])
    assert _mechanism([prog, "tiny"])[0] == "patch and run"
    assert _mechanism([prog, "tiny", "--for", "patch"])[1] == _mechanism([prog, "tiny", "--for", "run"])[1]
