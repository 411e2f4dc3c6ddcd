"""jprobe's hit counts against the kernel's own uprobes (SPEC section 3: "hits is exact:
equal to what a kernel uprobe counts on the same probe and workload").

These tests need tracefs (root); they skip with the reason otherwise.  The kernel
uprobes go on a private copy of the ORIGINAL binary, jprobe's probes on a patched
copy; both run the same workload.
"""
from __future__ import annotations

import pytest

from support.build import Variant
from support.elf import disasm_function, symbol, vaddr_to_offset
from support.kernel import kernel_uprobe_count, kernel_uprobe_counts
from support.report import hits_by_address
from support.run import assert_same_behaviour, patch, run_prog, run_with_report

SWEEP_VARIANTS = [Variant("-O0", "nopie"), Variant("-O2", "pie"), Variant("-O3", "nopie")]


def test_kernel_helper_counts_known_executions(tracefs, build):
    """The helper itself: a kernel uprobe at compute's entry counts its calls."""
    b = build("basic.c", ["-O2", "-g", "-fPIE", "-pie"], "basic-kcheck")
    comp_a, _ = symbol(b, "compute")
    assert kernel_uprobe_count(b, vaddr_to_offset(b, comp_a), [b, 10, 13]) == 13


# (fixture, function, argv): a workload that runs each instruction a known-by-the-kernel
# number of times; every instruction of the function gets a probe, all in one binary.
SWEEPS = [
    ("basic.c", "compute", [200, 5]),
    ("calls.c", "caller", [300, 12, 100]),
    ("calls.c", "fib", [10, 15, 10]),
    ("global.c", "read_global", [700]),
    ("fpsum.c", "fpsum", [300, 7]),
    ("cb.c", "df_probe", [3]),
    ("cb.c", "redzone", [3]),
]


@pytest.mark.parametrize("variant", SWEEP_VARIANTS, ids=str)
@pytest.mark.parametrize("source,func,args", SWEEPS, ids=[f"{s[1]}" for s in SWEEPS])
def test_every_instruction_matches_kernel(source, func, args, variant, tracefs, build, tmp_path):
    """Probe every instruction of `func` at once (jumps, relocated branches, calls,
    RIP-relative operands, overlapping sites): each count equals the kernel's."""
    stem = source.split(".")[0]
    b = build(source, variant.flags, f"{stem}-{variant}")
    f_a, _ = symbol(b, func)
    insns = disasm_function(b, func)
    addrs = [i.address for i in insns]
    specs = [func] + [f"{func}+{a - f_a:#x}" for a in addrs[1:]]
    out = patch(b, tmp_path / "patched", specs)
    orig = run_prog([b, *args])
    pr, rep = run_with_report([out, *args], tmp_path / "r.json")
    assert_same_behaviour(orig, pr)
    hits = hits_by_address(rep)
    counts, kr = kernel_uprobe_counts(b, [vaddr_to_offset(b, a) for a in addrs], [b, *args])
    assert kr.stdout == orig.stdout
    wrong = {f"{i.address:#x} {i.mnemonic} {i.op_str}": (hits.get(i.address), k)
             for i, k in zip(insns, counts) if hits.get(i.address) != k}
    assert not wrong, f"(jprobe, kernel) counts differ: {wrong}"


@pytest.mark.parametrize("variant", [Variant("-O2", "pie")], ids=str)
def test_threads_match_kernel(variant, tracefs, build, tmp_path):
    b = build("threads.c", variant.flags, f"threads-{variant}")
    work_a, _ = symbol(b, "work")
    insns = disasm_function(b, "work")
    addrs = [i.address for i in insns]
    specs = ["work"] + [f"work+{a - work_a:#x}" for a in addrs[1:]]
    out = patch(b, tmp_path / "patched", specs)
    args = [8, 5000]
    pr, rep = run_with_report([out, *args], tmp_path / "r.json")
    assert pr.returncode == 0
    hits = hits_by_address(rep)
    counts, _ = kernel_uprobe_counts(b, [vaddr_to_offset(b, a) for a in addrs], [b, *args])
    assert counts[0] == 8 * 5000
    assert [hits.get(a) for a in addrs] == counts
