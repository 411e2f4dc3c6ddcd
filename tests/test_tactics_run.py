"""Punned and evicting jumps in real programs: exact hits, same output, and the trap
fallback when an island's page is taken."""
import sys
from pathlib import Path

import pytest
from support.build import SOME_VARIANTS
from support.elf import symbol
from support.report import hits_by_address
from support.run import patch, run_prog, run_with_report, sites

from jprobe import patch_file

N = 4321
NAMES = ("t3", "inc", "dec")
sys.path.insert(0, str(Path(__file__).parent))


def entries(prog) -> dict[str, int]:
    return {name: symbol(prog, name)[0] for name in NAMES}


@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_short_entries_get_puns_or_evictions_and_count_exactly(variant, build, tmp_path):
    prog = build("tactics.c", variant.flags)
    expected = run_prog([prog, str(N)])
    out = patch(prog, tmp_path / "p", list(NAMES))
    got, report = run_with_report([out, str(N)], tmp_path / "r.json")
    assert (got.returncode, got.stdout, got.stderr) == (expected.returncode, expected.stdout, "")
    at = entries(prog)
    assert hits_by_address(report) == {at[name]: N for name in NAMES}
    mechanisms = {p["address"]: p["mechanism"] for p in report["probes"]}
    assert set(mechanisms.values()) <= {"pun", "evict"}, mechanisms
    if variant.pie == "nopie":
        [row] = [r for r in sites(prog, "t3")["instructions"] if int(r["address"], 16) == at["t3"]]
        assert row["mechanism"] == "evict" and row["reason"].startswith("T3"), row


def test_the_run_mode_applies_them_too(build, tmp_path):
    from test_run import jprobe_run
    prog = build("tactics.c", ["-O2", "-no-pie"])
    expected = run_prog([prog, str(N)])
    got, report = jprobe_run(tmp_path, [prog, N], list(NAMES))
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout)
    assert {p["probe"]: p["hits"] for p in report["probes"]} == {name: N for name in NAMES}
    assert {p["mechanism"] for p in report["probes"]} <= {"pun", "evict"}


def test_a_taken_island_page_falls_back_to_a_trap_before_the_code_runs(build, tmp_path):
    prog = build("tactics.c", ["-O2", "-no-pie"])
    blocker = build.lib("island_blocker.c")
    expected = run_prog([prog, str(N)])
    out = tmp_path / "p"
    plan = patch_file(str(prog), str(out), ["inc"])
    [probe] = plan.probes
    assert probe.mechanism in ("pun", "evict") and probe.islands
    env = {"LD_AUDIT": str(blocker), "BLOCK_AT": hex(probe.islands[0])}
    got, report = run_with_report([out, str(N)], tmp_path / "r.json", env=env)
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout)
    [entry] = report["probes"]
    assert entry["mechanism"] == "trap" and entry["hits"] == N
    assert any("island page" in e and "falling back to a trap" in e for e in report["errors"]), report["errors"]


def test_a_pun_returns_past_the_bytes_its_rel32_overlaps(build, tmp_path):
    """Going back into the bytes a punned jump covers makes the processor decode two
    overlapping instruction streams (+12.8 ns a hit, measured): the trampoline of `inc`
    (`lea eax,[rdi+1]; ret`, 4 bytes) runs its own copy of the `ret` instead."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    prog = build("tactics.c", ["-O2", "-fPIE", "-pie"])
    plan = patch_file(str(prog), str(tmp_path / "p"), ["inc"])
    [probe] = plan.probes
    assert probe.mechanism == "pun"
    code = plan.text[probe.trampoline - plan.text_vaddr:]
    insns = []
    for insn in Cs(CS_ARCH_X86, CS_MODE_64).disasm(code, probe.trampoline):
        insns.append(insn)
        if insn.mnemonic == "ret":
            break
    assert insns[-1].mnemonic == "ret", [f"{i.mnemonic} {i.op_str}" for i in insns]
    inside = range(probe.address, probe.address + 5)
    assert not any(i.mnemonic.startswith("j") and i.op_str.startswith("0x") and int(i.op_str, 16) in inside
                   for i in insns)


RUNS = {"ret_run+0xa": N - N // 4, "ret_run+0xf": N // 4}     # `pop rbx; ret`, then code


@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_an_early_return_moves_whole_and_its_jump_runs_into_the_code_after_it(variant, build, tmp_path):
    """`pop rbx; ret` (2 bytes) before a branch target and before the next function: the
    jump covers both and puns or evicts into the bytes after the `ret`."""
    prog = build("tactics.c", variant.flags)
    expected = run_prog([prog, str(N)])
    out = patch(prog, tmp_path / "p", list(RUNS))
    got, report = run_with_report([out, str(N)], tmp_path / "r.json")
    assert (got.returncode, got.stdout, got.stderr) == (expected.returncode, expected.stdout, "")
    assert {p["probe"]: p["hits"] for p in report["probes"]} == RUNS
    assert {p["mechanism"] for p in report["probes"]} <= {"pun", "evict"}, report["probes"]
    at = symbol(prog, "ret_run")[0]
    rows = [r for r in sites(prog, "ret_run")["instructions"] if int(r["address"], 16) - at in (10, 15)]
    assert len(rows) == 2 and all("2 instructions moved together" in r["reason"] for r in rows), rows


def test_the_run_mode_moves_early_returns_whole_too(build, tmp_path):
    from test_run import jprobe_run
    prog = build("tactics.c", ["-O0", "-fPIE", "-pie"])
    expected = run_prog([prog, str(N)])
    got, report = jprobe_run(tmp_path, [prog, N], list(RUNS))
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout)
    assert {p["probe"]: p["hits"] for p in report["probes"]} == RUNS
    assert {p["mechanism"] for p in report["probes"]} <= {"pun", "evict"}
