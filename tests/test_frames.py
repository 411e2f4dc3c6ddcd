"""Stripped code: function ranges from .eh_frame (jprobe/frames.py) let a short instruction
move together with the next ones, as inside a function symbol, and nothing breaks."""
import subprocess

import pytest
from elftools.dwarf.callframe import FDE
from elftools.elf.elffile import ELFFile
from support.elf import symbol
from support.report import hits_by_address
from support.run import patch, run_prog, run_with_report, sites
from test_stress import FIXTURE_N, expected_calls

from jprobe.elf import ElfModule
from jprobe.frames import frame_ranges
from jprobe.loader import find_library
from jprobe.sites import SiteAnalyzer

FUNCTIONS = ("classify", "rec", "sum_loop", "inc")


@pytest.fixture(scope="module", params=["-no-pie", "-pie"])
def stripped(request, build, tmp_path_factory):
    """(every_insn built -O2, the same file with no .symtab)."""
    flags = ["-O2", "-fPIE" if request.param == "-pie" else "-fno-pie", request.param]
    full = build("every_insn.c", flags, f"frames{request.param}")
    bare = tmp_path_factory.mktemp("frames") / "bare"
    subprocess.run(["strip", "-s", "-o", str(bare), str(full)], check=True)
    return full, bare


def test_unwind_ranges_cover_the_functions_a_strip_left_unnamed(stripped):
    full, bare = stripped
    module = ElfModule(str(bare))
    assert all(module.function_at(symbol(full, f)[0]) is None for f in FUNCTIONS)
    ranges = frame_ranges(module)
    for name in FUNCTIONS:
        at, size = symbol(full, name)
        assert any(lo <= at and at + size <= hi for lo, hi in ranges), name


def _pyelftools_ranges(module: ElfModule) -> list[tuple[int, int]]:
    """frame_ranges as a general CFI parser reads them (every entry, instructions too)."""
    with open(module.path, "rb") as f:
        entries = ELFFile(f).get_dwarf_info().EH_CFI_entries()
        ranges = {(e.header["initial_location"], e.header["initial_location"] + e.header["address_range"])
                  for e in entries if isinstance(e, FDE) and e.header["address_range"] > 0}
    return sorted((lo, hi) for lo, hi in ranges if module.is_code(lo, hi - lo))


def test_unwind_ranges_read_from_the_headers_alone_are_pyelftools_ones(stripped, build):
    """C (`zR`), C++ with personality and LSDA (`zPLR`), and libraries of the machine."""
    paths = [str(stripped[1]), str(build("exc.cpp", ["-O2"], "frames-exc"))]
    paths += [p for p in (find_library("libc.so.6"), find_library("libstdc++.so.6")) if p]
    for path in paths:
        module = ElfModule(path)
        assert frame_ranges(module) == _pyelftools_ranges(module) != [], path


def test_switch_groups_stay_single_instruction_and_others_move_several(stripped):
    full, bare = stripped
    analyzer = SiteAnalyzer(ElfModule(str(bare)))
    at, size = symbol(full, "classify")                     # a jump table: no multi-instruction jump
    rows = [r for r in sites(bare)["instructions"] if at <= int(r["address"], 16) < at + size]
    assert rows and not any("displaces 2" in r["reason"] or "displaces 3" in r["reason"] for r in rows)
    assert analyzer.facts(analyzer.function_at(at)).indirect_jump is not None
    moved = [r for r in sites(bare)["instructions"] if "instructions (" in r["reason"]]
    assert moved, "no short instruction moved with its successors in stripped code"


def test_every_instruction_of_stripped_functions_runs_with_exact_entry_counts(stripped, tmp_path):
    full, bare = stripped
    expected = run_prog([bare, str(FIXTURE_N)])
    entries, specs = {}, []
    rows = sites(bare)["instructions"]
    for name in FUNCTIONS:
        at, size = symbol(full, name)
        entries[at] = name
        specs += [r["address"] for r in rows if at <= int(r["address"], 16) < at + size]
    out = patch(bare, tmp_path / "p", specs)
    got, report = run_with_report([out, str(FIXTURE_N)], tmp_path / "r.json")
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout)
    hits = hits_by_address(report)
    calls = expected_calls(FIXTURE_N)
    assert {name: hits[at] for at, name in entries.items()} == {name: calls[name] for name in FUNCTIONS}


def test_a_tail_call_does_not_join_a_switch_to_the_function_it_calls(build, tmp_path):
    """`pick` (a jump table) ends in `ja leaf`: a jump from one unwind range to the start
    of another that `main` calls. `leaf` keeps multi-instruction jumps, and runs right."""
    full = build("tailcall.c", ["-O2", "-fno-pie", "-no-pie"])
    bare = tmp_path / "bare"
    subprocess.run(["strip", "-s", "-o", str(bare), str(full)], check=True)
    analyzer = SiteAnalyzer(ElfModule(str(bare)))
    pick, leaf = symbol(full, "pick"), symbol(full, "leaf")
    assert analyzer.facts(analyzer.function_at(pick[0])).indirect_jump is not None
    assert analyzer.facts(analyzer.function_at(leaf[0])).indirect_jump is None
    rows = [r for r in sites(bare)["instructions"] if leaf[0] <= int(r["address"], 16) < leaf[0] + leaf[1]]
    moved = [r for r in rows if r["tactic"] == "B1" and "displaces 1 " not in r["reason"]]
    assert len(moved) >= 3 and all(r["mechanism"] != "trap" for r in rows), rows
    n = 3000
    expected = run_prog([bare, str(n)])
    out = patch(bare, tmp_path / "p", [r["address"] for r in rows] + [hex(pick[0])])
    got, report = run_with_report([out, str(n)], tmp_path / "r.json")
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout)
    hits = hits_by_address(report)
    tail_calls = sum(1 for i in range(n) if i % 6 > 3)
    assert (hits[pick[0]], hits[leaf[0]]) == (n, n + tail_calls)
