"""A rewritten program sets itself up before any library initialiser (issue 9, item 3).

A library's constructor may call into the program (a function of an -rdynamic program,
or the free() a program defines) before the runtime's constructor runs; the program's
DT_PREINIT_ARRAY, which glibc runs before every library initialiser, starts with the
runtime's jprobe_rt_preinit, so packed trampolines and islands are in place by then."""
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from support.build import PIE_FLAGS, Variant
from support.elf import symbol
from support.report import hits_by_address
from support.run import run_prog, run_with_report, sites
from test_patch_e2e import MAY_MOVE, _alloc_sections

from jprobe import patch_file

VARIANTS = [Variant(opt, pie) for opt in ("-O0", "-O2") for pie in PIE_FLAGS]
N = 1000
CALLS = 5                   # early_lib.c's constructor calls early_work and early_inc so often
STEPS = [f"step{k}{j}" for k in range(1, 9) for j in range(8)]


def program(build, variant: Variant, own_preinit: bool = False) -> Path:
    """early.c, linked with the library whose constructor calls it."""
    lib = build.lib("early_lib.c")
    extra = ["-DOWN_PREINIT"] if own_preinit else []
    flags = [*variant.flags, *extra, "-rdynamic", "-Wl,--no-as-needed", str(lib)]
    return build("early.c", flags, f"early-{variant}{'-preinit' if own_preinit else ''}")


def entries(prog: Path, names: list[str]) -> list[str]:
    """Address specs: the runtime writes their names, where names would take room in the
    packed table (with them, these probes would not pack)."""
    return [hex(symbol(prog, name)[0]) for name in names]


def run_both(prog: Path, out: Path, tmp_path: Path) -> dict[int, int]:
    """Run the original and the rewritten program; the same output, and the hits."""
    expected = run_prog([prog, N])
    assert expected.returncode == 0 and "library=" in expected.stdout, expected
    got, report = run_with_report([out, N], tmp_path / "r.json")
    assert (got.returncode, got.stdout, got.stderr) == (expected.returncode, expected.stdout, "")
    return hits_by_address(report)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_a_library_constructor_runs_through_packed_trampolines(variant, build, tmp_path):
    prog = program(build, variant)
    plan = patch_file(str(prog), str(tmp_path / "p"), entries(prog, ["early_work", *STEPS]))
    assert plan.packed, "enough probes for a packed table"
    assert {p.mechanism for p in plan.probes} == {"jump"}
    hits = run_both(prog, tmp_path / "p", tmp_path)
    at = {name: symbol(prog, name)[0] for name in ["early_work", *STEPS]}
    assert hits == {at["early_work"]: CALLS + N, **{at[name]: N for name in STEPS}}


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_a_library_constructor_runs_through_a_punned_jump(variant, build, tmp_path):
    prog = program(build, variant)
    plan = patch_file(str(prog), str(tmp_path / "p"), ["early_inc"])
    [probe] = plan.probes
    assert probe.mechanism in ("pun", "evict") and probe.islands
    assert run_both(prog, tmp_path / "p", tmp_path) == {probe.address: CALLS + N}


def test_callbacks_wait_for_the_runtimes_constructor(build, tmp_path):
    """Hits before the callback's library is loaded (the library constructor's) are counted;
    the callback runs for the later ones."""
    prog = program(build, Variant("-O2", "pie"))
    handler = f"={build.lib('cb_count.c')}:on_hit"
    plan = patch_file(str(prog), str(tmp_path / "p"), ["early_work" + handler, "early_inc" + handler])
    assert {p.mechanism for p in plan.probes} >= {"pun"}
    got, report = run_with_report([tmp_path / "p", N], tmp_path / "r.json")
    assert (got.returncode, got.stdout) == (0, run_prog([prog, N]).stdout)
    assert got.stderr == f"cb_count={2 * N}\n"
    assert hits_by_address(report) == {p.address: CALLS + N for p in plan.probes} and not report["errors"]


@pytest.mark.parametrize("variant", [Variant("-O0", "nopie"), Variant("-O2", "pie")], ids=str)
def test_the_programs_own_preinit_functions_run_after_the_runtimes(variant, build, tmp_path):
    prog = program(build, variant, own_preinit=True)
    patch_file(str(prog), str(tmp_path / "p"), ["early_inc", "early_work"])
    at = [symbol(prog, name)[0] for name in ("early_inc", "early_work")]
    assert run_both(prog, tmp_path / "p", tmp_path) == {a: CALLS + 1 + N for a in at}
    assert preinit_array(tmp_path / "p") == [("R_X86_64_64", "jprobe_rt_preinit", 0),
                                             ("R_X86_64_RELATIVE", "", symbol(prog, "own_preinit")[0])]


def preinit_array(path: Path) -> list[tuple[str, str, int]]:
    """(relocation type, symbol, addend) of each DT_PREINIT_ARRAY entry of a file, as the
    loader finds them: through the dynamic section's tags."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        dynamic = elf.get_section_by_name(".dynamic")
        tags = {t.entry.d_tag: t.entry.d_val for t in dynamic.iter_tags()}
        at, size = tags["DT_PREINIT_ARRAY"], tags["DT_PREINIT_ARRAYSZ"]
        symbols = elf.get_section_by_name(".dynsym")
        relocations = {r["r_offset"]: r for r in dynamic.get_relocation_tables()["RELA"].iter_relocations()}
        out = []
        for slot in range(at, at + size, 8):
            r = relocations[slot]
            name = symbols.get_symbol(r["r_info_sym"]).name if r["r_info_sym"] else ""
            out.append((_relocation_type(r["r_info_type"]), name, r["r_addend"]))
    return out


def _relocation_type(number: int) -> str:
    return {1: "R_X86_64_64", 8: "R_X86_64_RELATIVE"}.get(number, str(number))


@pytest.mark.parametrize("variant", [Variant("-O2", "nopie"), Variant("-O0", "pie")], ids=str)
def test_the_preinit_entry_is_all_the_program_gains(variant, build, tmp_path):
    """The rewritten program's DT_PREINIT_ARRAY is the runtime's entry alone; every
    section but the dynamic linking tables that grow stays where it was."""
    prog = program(build, variant)
    out = tmp_path / "p"
    patch_file(str(prog), str(out), ["early_work"])
    assert preinit_array(out) == [("R_X86_64_64", "jprobe_rt_preinit", 0)]
    before, after = _alloc_sections(prog), _alloc_sections(out)
    moved = {name for name, (addr, *_) in before.items() if after[name][0] != addr}
    assert moved <= MAY_MOVE, moved


def test_a_library_gets_no_preinit_entry(build, tmp_path):
    """Only a program's DT_PREINIT_ARRAY runs: a library keeps its constructor's set-up."""
    lib = build.lib("early_lib.c")
    out = tmp_path / "lib.so"
    patch_file(str(lib), str(out), ["lib_result"])
    with open(out, "rb") as f:
        tags = {t.entry.d_tag for t in ELFFile(f).get_section_by_name(".dynamic").iter_tags()}
    assert "DT_PREINIT_ARRAY" not in tags and "DT_PREINIT_ARRAYSZ" not in tags


@pytest.mark.parametrize("pie", list(PIE_FLAGS))
def test_a_program_without_a_relocation_table_gets_one_for_the_entry(pie, build, tmp_path):
    """A program whose only dynamic relocations are its PLT's has no DT_RELA to add the
    entry's relocation to: it gains one."""
    prog = build("no_rela.c", ["-O2", "-g", *PIE_FLAGS[pie], "-nostartfiles"])
    out = tmp_path / "p"
    patch_file(str(prog), str(out), ["twice"])
    expected = run_prog([prog])
    got, report = run_with_report([out], tmp_path / "r.json")
    assert (got.returncode, got.stdout, got.stderr) == (expected.returncode, expected.stdout, "")
    assert hits_by_address(report) == {symbol(prog, "twice")[0]: 1}
    assert preinit_array(out) == [("R_X86_64_64", "jprobe_rt_preinit", 0)]


ALLOCATOR = ["malloc", "calloc", "realloc", "free"]


def own_allocator(build, variant: Variant, empty_free: bool = False) -> Path:
    """own_malloc.c (its own malloc/free/calloc/realloc), linked with a library whose
    constructor allocates through them before any other initialiser of the program."""
    lib = build("ctor_alloc.c", ["-shared", "-fPIC", "-O2"], out_name="libctor_alloc.so")
    # No padding after the 1-byte free(): its jump cannot spill into any, so it is punned.
    extra = ["-DEMPTY_FREE", "-falign-functions=1"] if empty_free else []
    flags = [*variant.flags, *extra, "-fno-builtin", "-rdynamic", "-Wl,--no-as-needed", str(lib)]
    return build("own_malloc.c", flags, f"own_malloc-{variant}{'-empty' if empty_free else ''}")


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_a_program_with_its_own_allocator_patched_at_all_four(variant, build, tmp_path):
    """The runtime's set-up calls none of the program's allocator functions (it has its own,
    freestanding.c), and runs before the library's constructor allocates through them: the
    table is packed (every instruction of main is probed too), the counts exact."""
    prog = own_allocator(build, variant)
    main_insns = [i["address"] for i in sites(prog, "main")["instructions"] if i["mechanism"] != "trap"]
    plan = patch_file(str(prog), str(tmp_path / "p"), [*ALLOCATOR, *main_insns])
    assert plan.packed, "more probes than the packing threshold"
    expected = run_prog([prog, 300])
    got, report = run_with_report([tmp_path / "p", 300], tmp_path / "r.json")
    assert (got.returncode, got.stdout, got.stderr) == (expected.returncode, expected.stdout, "")
    own = dict(pair.split("=") for pair in got.stdout.split())
    hits = hits_by_address(report)
    assert {name: hits[symbol(prog, name)[0]] for name in ALLOCATOR} == {n: int(own[n]) for n in ALLOCATOR}
    assert not report["errors"]


def test_an_empty_free_with_a_punned_jump(build, tmp_path):
    """The issue's program: free() is a 1-byte `ret`, probed with a punned jump whose island
    the runtime maps; neither its start-up (which sorted with qsort, reaching this free) nor
    the library constructor may reach it before the island is there."""
    prog = own_allocator(build, Variant("-O2", "pie"), empty_free=True)
    plan = patch_file(str(prog), str(tmp_path / "p"), ["free", "malloc"])
    assert {p.spec: p.mechanism for p in plan.probes}["free"] in ("pun", "evict")
    got, report = run_with_report([tmp_path / "p", 300], tmp_path / "r.json")
    assert got.returncode == 0 and got.stderr == "", got
    hits = hits_by_address(report)
    assert hits[symbol(prog, "malloc")[0]] == 305
    assert hits[symbol(prog, "free")[0]] == 5 + 2 * 300
    assert not report["errors"]
