"""`--strict`: no probe becomes a trap at any stage (issue 11, defect 5).

Where Python can tell, the probe is refused before the program starts (exit 2, one line).
Where only the runtime can (an island's page taken when the module is mapped), the probe is
left as it was: the report says `"patched": false` and why, and `jprobe run` exits 2 once
the program is done.
"""
from __future__ import annotations

import json
import subprocess
import sys

from support.run import child_env, jprobe, run_prog, run_with_report

from jprobe import patch_file
from jprobe.runner import plan_modules
from jprobe.spec import parse_probes

N = 4321
LEFT = "left unpatched, since --strict allows no trap"


def run_strict(tmp_path, argv, probes, env=None) -> tuple[subprocess.CompletedProcess, dict | None]:
    """`jprobe run --strict -p P... --report FILE -- ARGV`: the process and the report, if any."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "jprobe", "run", "--strict", *[a for p in probes for a in ("-p", p)],
           "--report", str(report), "--", *[str(a) for a in argv]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(env), timeout=120)
    return r, json.loads(report.read_text()) if report.exists() else None


def test_a_pun_over_a_jump_run_may_move_is_refused_before_the_program_starts(tmp_path):
    """The issue's probes: malloc's entry is too short for a jump before malloc+0x4's, and
    a pun over that jump would read its rel32, which changes wherever `jprobe run` places
    the trampolines (for libc, never where planned): refused up front, unless the planner
    re-aims the jump through an island, which does not move. Either way, no trap."""
    ran = tmp_path / "ran"
    got, report = run_strict(tmp_path, ["/bin/sh", "-c", f"echo > {ran}"],
                             ["libc.so.6:malloc", "libc.so.6:malloc+0x4"])
    if got.returncode == 2:
        assert report is None and not ran.exists(), "refused before the program started"
        [line] = got.stderr.splitlines()
        assert line.startswith("jprobe: error: 'libc.so.6:malloc': needs a trap"), line
    else:
        assert got.returncode == 0 and ran.exists(), got.stderr
        assert "trap" not in {p["mechanism"] for p in report["probes"]} and not report["errors"]


def island_blocked(build, prog, island: int) -> dict:
    """An audit library that takes the island's page before the runtime can map it."""
    return {"LD_AUDIT": str(build.lib("island_blocker.c")), "BLOCK_AT": hex(island)}


def test_a_taken_island_page_leaves_the_probe_unpatched_under_run(build, tmp_path):
    prog = build("tactics.c", ["-O2", "-no-pie"])
    [module] = plan_modules(str(prog), parse_probes(["inc"]), strict=True)
    [probe] = module.plan.probes
    assert probe.mechanism in ("pun", "evict") and probe.islands
    expected = run_prog([prog, N])
    got, report = run_strict(tmp_path, [prog, N], ["inc"], env=island_blocked(build, prog, probe.islands[0]))
    assert got.stdout == expected.stdout, "the program ran as it would"
    assert got.returncode == 2
    assert got.stderr.splitlines()[-1] == (
        "jprobe: error: --strict: inc left unpatched (the report's errors say why; drop --strict to accept "
        f"the int3 fallback); the program exited with status {expected.returncode}")
    [entry] = report["probes"]
    assert (entry["mechanism"], entry["hits"], entry["patched"]) == (probe.mechanism, 0, False)
    [error] = report["errors"]
    assert error.startswith("probe inc: island page") and error.endswith(LEFT), error
    text = jprobe("report", tmp_path / "report.json", check=True).stdout
    assert "  not patched: its site was left as it was (the errors say why)" in text.splitlines()


def test_without_strict_the_same_probe_falls_back_to_a_trap(build, tmp_path):
    """The same run without --strict: a trap, counting, and the program's own status."""
    from test_run import jprobe_run
    prog = build("tactics.c", ["-O2", "-no-pie"])
    [module] = plan_modules(str(prog), parse_probes(["inc"]), strict=False)
    env = island_blocked(build, prog, module.plan.probes[0].islands[0])
    got, report = jprobe_run(tmp_path, [prog, N], ["inc"], env=env)
    assert got.returncode == 0
    [entry] = report["probes"]
    assert (entry["mechanism"], entry["hits"], "patched" in entry) == ("trap", N, False)


def test_a_taken_island_page_leaves_a_strictly_patched_files_probe_out(build, tmp_path):
    """`jprobe patch --strict` writes the mode into the table: the rewritten program gives
    the site its original code back, runs as it would, and its report says so."""
    prog = build("tactics.c", ["-O2", "-no-pie"])
    out = tmp_path / "p"
    plan = patch_file(str(prog), str(out), ["inc"], strict=True)
    [probe] = plan.probes
    assert probe.mechanism in ("pun", "evict") and probe.islands
    expected = run_prog([prog, str(N)])
    got, report = run_with_report([out, str(N)], tmp_path / "r.json",
                                  env=island_blocked(build, prog, probe.islands[0]))
    assert (got.returncode, got.stdout, got.stderr) == (expected.returncode, expected.stdout, "")
    [entry] = report["probes"]
    assert (entry["mechanism"], entry["hits"], entry["patched"]) == (probe.mechanism, 0, False)
    [error] = report["errors"]
    assert error.startswith("probe inc: island page") and error.endswith(LEFT), error
