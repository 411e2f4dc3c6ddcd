"""End-to-end tests of `jprobe patch` against the user contract (SPEC sections 1-4).

Every test builds a fixture (tests/fixtures/), patches it with the CLI, runs the
original and the patched program on the same workload and checks that
  * the patched program behaves like the original (stdout, stderr, exit status),
  * the report written under JPROBE_REPORT counts exactly the known number of
    executions of each probe (known from the workload), and
  * where tracefs is usable, a kernel uprobe on the same site and workload
    counts the same.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.build import SOME_VARIANTS, Variant
from support.elf import branch_target, disasm_function, elf_symbols, is_control_flow, symbol, vaddr_to_offset
from support.kernel import check_kernel_counts, kernel_uprobe_counts, require_tracefs
from support.report import hits_by_address, probe_entry
from support.run import assert_same_behaviour, jprobe, patch, run_prog, run_with_report, sites

MECHANISMS = {"jump", "pun", "evict", "trap"}


def patch_and_run(tmp_path, binary, probes, args, env=None, same_stderr=True, name="patched"):
    """Patch, run original and patched on `args`; return (report, patched_run, original_run)."""
    out = patch(binary, tmp_path / name, probes)
    orig = run_prog([binary, *args], env=env)
    assert orig.returncode >= 0
    pr, rep = run_with_report([out, *args], tmp_path / f"{name}.report.json", env=env)
    assert_same_behaviour(orig, pr, stderr=same_stderr)
    assert rep.get("errors", []) == [], rep["errors"]
    for p in rep["probes"]:
        assert p["mechanism"] in MECHANISMS, p
        assert p.get("lost", 0) == 0, p
    return rep, pr, orig


def site_mechanisms(binary, func) -> dict[int, str]:
    s = sites(binary, func)
    return {int(i["address"], 16): i["mechanism"] for i in s["instructions"]}


def straightline_offset(binary, func, indexes=(1, 2)) -> int:
    """Offset of the 2nd or 3rd instruction of func that runs exactly once per call
    (no control flow before it, not a branch target) and gets the "jump" mechanism."""
    insns = disasm_function(binary, func)
    targets = {branch_target(i) for i in insns} - {None}
    mech = site_mechanisms(binary, func)
    tried = []
    for k in indexes:
        if any(is_control_flow(i) for i in insns[:k]):
            break
        a = insns[k].address
        tried.append((hex(a), insns[k].mnemonic, mech.get(a)))
        if a in targets:
            continue
        if mech.get(a) == "jump":
            return a - insns[0].address
    pytest.fail(f"`jprobe sites` gives no 'jump' mechanism for the 2nd/3rd instruction of {func}: {tried}")


# --------------------------------------------------------------------------
# 1. entries and mid-function offsets
# --------------------------------------------------------------------------

def test_entries_and_mid_function_offset(variant, build, tmp_path):
    b = build("basic.c", variant.flags, f"basic-{variant}")
    main_a, _ = symbol(b, "main")
    comp_a, _ = symbol(b, "compute")
    mid = straightline_offset(b, "compute")
    n, reps = 300, 9
    rep, pr, _ = patch_and_run(tmp_path, b, ["main", "compute", f"compute+{mid:#x}"], [n, reps])
    assert f"compute calls={reps}" in pr.stdout
    hits = hits_by_address(rep)
    assert hits[main_a] == 1
    assert hits[comp_a] == reps
    assert hits[comp_a + mid] == reps
    # `sites` says what mechanism a probe there gets: the report must agree
    assert probe_entry(rep, comp_a + mid)["mechanism"] == "jump"
    check_kernel_counts(b, [main_a, comp_a, comp_a + mid], [b, n, reps], hits)


@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_address_and_decimal_offset_specs(variant, build, tmp_path):
    """ADDRESS is the link-time address `nm` prints; OFFSET may be decimal."""
    b = build("basic.c", variant.flags, f"basic-{variant}")
    comp_a, _ = symbol(b, "compute")
    mid = straightline_offset(b, "compute")
    nm = subprocess.run(["nm", str(b)], capture_output=True, text=True).stdout
    assert re.search(rf"^0*{comp_a:x} T compute$", nm, re.M)
    rep, _, _ = patch_and_run(tmp_path, b, [f"{comp_a:#x}", f"compute+{mid}"], [50, 4])
    hits = hits_by_address(rep)
    assert hits[comp_a] == 4
    assert hits[comp_a + mid] == 4


# --------------------------------------------------------------------------
# 2. RIP-relative instructions
# --------------------------------------------------------------------------

def rip_sites(binary, func):
    insns = disasm_function(binary, func)
    return [i for i in insns if "[rip" in i.op_str]


def test_rip_relative_site(variant, build, tmp_path):
    b = build("global.c", variant.flags, f"global-{variant}")
    func_a, _ = symbol(b, "read_global")
    rips = rip_sites(b, "read_global")
    assert rips, "read_global has no RIP-relative instruction"
    site = rips[0].address
    n = 2000
    rep, pr, _ = patch_and_run(tmp_path, b, [f"read_global+{site - func_a:#x}"], [n])
    assert f"read_global calls={n}" in pr.stdout
    hits = hits_by_address(rep)
    assert hits[site] == n, f"{rips[0].mnemonic} {rips[0].op_str}"
    check_kernel_counts(b, [site], [b, n], hits)


@pytest.mark.parametrize("variant", SOME_VARIANTS + [Variant("-O3", "nopie")], ids=str)
def test_every_rip_relative_site_at_once(variant, build, tmp_path):
    b = build("global.c", variant.flags, f"global-{variant}")
    func_a, _ = symbol(b, "read_global")
    rips = [i.address for i in rip_sites(b, "read_global")]
    n = 1500
    rep, _, _ = patch_and_run(tmp_path, b, [f"read_global+{a - func_a:#x}" for a in rips], [n])
    hits = hits_by_address(rep)
    for a in rips:
        assert hits[a] == n, hex(a)
    check_kernel_counts(b, rips, [b, n], hits)


# --------------------------------------------------------------------------
# 3. call sites, recursion, a hot loop
# --------------------------------------------------------------------------

def calls_to(binary, func, callee):
    target, _ = symbol(binary, callee)
    return [i.address for i in disasm_function(binary, func)
            if i.mnemonic == "call" and branch_target(i) == target]


def test_call_site(variant, build, tmp_path):
    b = build("calls.c", variant.flags, f"calls-{variant}")
    caller_a, _ = symbol(b, "caller")
    leaf_a, _ = symbol(b, "leaf")
    cs = calls_to(b, "caller", "leaf")
    assert cs, "no `call leaf` in caller"
    ncalls = 5000
    args = [ncalls, 10, 1000]
    rep, _, _ = patch_and_run(tmp_path, b, [f"caller+{a - caller_a:#x}" for a in cs] + ["leaf"], args)
    hits = hits_by_address(rep)
    assert sum(hits[a] for a in cs) == ncalls
    assert hits[leaf_a] == ncalls
    check_kernel_counts(b, cs + [leaf_a], [b, *args], hits)


def fib_calls(n):
    return 1 if n < 2 else 1 + fib_calls(n - 1) + fib_calls(n - 2)


def test_recursion(variant, build, tmp_path):
    b = build("calls.c", variant.flags, f"calls-{variant}")
    fib_a, _ = symbol(b, "fib")
    comb_a, _ = symbol(b, "combine")
    rec = calls_to(b, "fib", "fib")
    assert len(rec) == 2, "fib should call itself twice"
    fibn = 20
    expected = fib_calls(fibn)
    assert expected == 21891
    args = [10, fibn, 10]
    probes = ["fib", "combine"] + [f"fib+{a - fib_a:#x}" for a in rec]
    rep, pr, _ = patch_and_run(tmp_path, b, probes, args)
    assert f"fib_calls={expected}" in pr.stdout
    hits = hits_by_address(rep)
    assert hits[fib_a] == expected
    assert hits[comb_a] == (expected - 1) // 2
    assert sum(hits[a] for a in rec) == expected - 1
    check_kernel_counts(b, [fib_a, comb_a] + rec, [b, *args], hits)


def crosscheck_light(tmp_path, binary, patched, vaddrs, args):
    """Kernel uprobes cost ~20 us a hit on some VMs: compare with the kernel on a lighter
    run of the same program (the heavy run's counts are checked against the known value)."""
    require_tracefs(f"the counts at {', '.join(hex(v) for v in vaddrs)}")
    _, rep = run_with_report([patched, *args], tmp_path / "light.report.json")
    check_kernel_counts(binary, vaddrs, [binary, *args], hits_by_address(rep))


def test_hot_loop(variant, build, tmp_path):
    b = build("calls.c", variant.flags, f"calls-{variant}")
    hot_a, _ = symbol(b, "hot")
    args = [10, 5, 10**6]
    rep, _, _ = patch_and_run(tmp_path, b, ["hot"], args)
    hits = hits_by_address(rep)
    assert hits[hot_a] == 10**6
    crosscheck_light(tmp_path, b, tmp_path / "patched", [hot_a], [10, 5, 20000])


# --------------------------------------------------------------------------
# 4. a function shorter than a jmp
# --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_function_shorter_than_5_bytes(variant, build, tmp_path):
    b = build("tiny.c", variant.flags, f"tiny-{variant}")
    tiny_a, tiny_sz = symbol(b, "tiny")
    tiny2_a, tiny2_sz = symbol(b, "tiny2")
    assert tiny_sz == 4 and tiny2_sz == 4 and tiny2_a == tiny_a + 4
    n = 100000
    rep, pr, _ = patch_and_run(tmp_path, b, ["tiny", "tiny2"], [n])
    assert f"tiny calls={n}" in pr.stdout
    hits = hits_by_address(rep)
    assert hits[tiny_a] == n
    assert hits[tiny2_a] == n
    crosscheck_light(tmp_path, b, tmp_path / "patched", [tiny_a, tiny2_a], [5000])


# --------------------------------------------------------------------------
# 5. threads
# --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_threads_count_exactly(variant, build, tmp_path):
    b = build("threads.c", variant.flags, f"threads-{variant}")
    work_a, _ = symbol(b, "work")
    args = [8, 100000]
    rep, _, _ = patch_and_run(tmp_path, b, ["work"], args)
    hits = hits_by_address(rep)
    assert hits[work_a] == 8 * 100000
    crosscheck_light(tmp_path, b, tmp_path / "patched", [work_a], [8, 2000])


@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_threads_callback(variant, build, tmp_path):
    b = build("threads.c", variant.flags, f"threads-{variant}")
    lib = build.lib("cb_count.c")
    work_a, _ = symbol(b, "work")
    rep, pr, orig = patch_and_run(tmp_path, b, [f"work={lib}:on_hit"], [8, 100000], same_stderr=False)
    assert hits_by_address(rep)[work_a] == 8 * 100000
    assert probe_entry(rep, work_a)["handler"] != "count"
    assert f"cb_count={8 * 100000}" in pr.stderr


# --------------------------------------------------------------------------
# 6. C callbacks
# --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_callback_sets_rdi(variant, build, tmp_path):
    b = build("cb.c", variant.flags, f"cb-{variant}")
    lib = build.lib("cb_setrdi.c")
    out = patch(b, tmp_path / "cb.patched", [f"addone={lib}:on_hit"])
    orig = run_prog([b, 5])
    assert "addone(5)=6\n" in orig.stdout
    pr, rep = run_with_report([out, 5], tmp_path / "r.json")
    assert pr.returncode == 0, pr.stderr
    # the callback rewrote rdi: addone sees 5*10+100, the rest is unchanged
    assert pr.stdout == orig.stdout.replace("addone(5)=6\n", "addone(5)=151\n")
    assert hits_by_address(rep)[symbol(b, "addone")[0]] == 1


def parse_cb_info(stderr):
    m = re.search(r"cb_info hits=(\d+) address=(\S+) arg1=(\d+) rip=(\S+) id=(\d+) "
                  r"misaligned=(\d+) df=(\d+) bad_rip=(\d+)", stderr)
    assert m, f"the callback library's summary is missing from stderr: {stderr!r}"
    k = ["hits", "address", "arg1", "rip", "id", "misaligned", "df", "bad_rip"]
    return {key: int(v, 0) for key, v in zip(k, m.groups())}


@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_callback_context(variant, build, tmp_path):
    """ctx->address is the run-time address of the site, jprobe_arg(ctx, 1) the first argument."""
    b = build("cb.c", variant.flags, f"cb-{variant}")
    lib = build.lib("cb_info.c", ["-fno-omit-frame-pointer"])
    out = patch(b, tmp_path / "cb.patched", [f"addone={lib}:on_hit"])
    pr, rep = run_with_report([out, 77], tmp_path / "r.json", env={"CB_SHOW_ADDR": "1"})
    assert pr.returncode == 0, pr.stderr
    orig = run_prog([b, 77])
    assert pr.stdout == orig.stdout
    m = re.search(r"addone@(0x[0-9a-f]+)", pr.stderr)
    assert m, pr.stderr
    runtime_addr = int(m.group(1), 16)
    info = parse_cb_info(pr.stderr)
    assert info["hits"] == 1
    assert info["address"] == runtime_addr
    assert info["rip"] == runtime_addr
    assert info["arg1"] == 77
    assert info["misaligned"] == 0, "callback stack not 16-byte aligned"
    assert info["df"] == 0, "callback entered with DF set"
    assert hits_by_address(rep)[symbol(b, "addone")[0]] == 1


@pytest.mark.parametrize("handler", ["count", "callback"])
@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_program_state_preserved_df_redzone(variant, handler, build, tmp_path):
    """DF set by the program and values in the red zone survive a probe; the callback
    still runs with DF clear and an aligned stack."""
    b = build("cb.c", variant.flags, f"cb-{variant}")
    df_a, _ = symbol(b, "df_probe")
    rz_a, _ = symbol(b, "redzone")
    add_a, _ = symbol(b, "addone")
    rz_site = [i.address for i in disasm_function(b, "redzone") if i.mnemonic.startswith("nop")][0]
    sites_ = [add_a, df_a + 1, rz_site]
    specs = ["addone", "df_probe+1", f"redzone+{rz_site - rz_a:#x}"]
    if handler == "callback":
        lib = build.lib("cb_info.c", ["-fno-omit-frame-pointer"])
        specs = [f"{s}={lib}:on_hit" for s in specs]
    rep, pr, orig = patch_and_run(tmp_path, b, specs, [5], same_stderr=(handler == "count"))
    assert "df_probe(5)=1005\n" in pr.stdout and "redzone(5,10)=4675\n" in pr.stdout
    hits = hits_by_address(rep)
    for a in sites_:
        assert hits[a] == 1, hex(a)
    if handler == "callback":
        info = parse_cb_info(pr.stderr)
        assert info["hits"] == 3
        assert info["misaligned"] == 0, "callback stack not 16-byte aligned"
        assert info["df"] == 0, "callback entered with DF set (the program had set it)"
        assert info["bad_rip"] == 0, "ctx->regs.rip != ctx->address"
    check_kernel_counts(b, sites_, [b, 5], hits)


@pytest.mark.parametrize("handler", ["count", "avx-callback"])
def test_xmm_doubles_survive_probe_in_loop(variant, handler, build, tmp_path):
    """A probe inside a loop summing doubles (live in xmm registers) with a callback that
    uses AVX2, memset and printf: the program's result is bit-identical."""
    b = build("fpsum.c", variant.flags, f"fpsum-{variant}")
    f_a, _ = symbol(b, "fpsum")
    adds = [i.address for i in disasm_function(b, "fpsum") if i.mnemonic == "addsd"]
    assert len(adds) == 1, "expected one addsd (s += ...) in fpsum's loop"
    site = adds[0]
    spec = f"fpsum+{site - f_a:#x}"
    if handler != "count":
        lib = build.lib("cb_avx.c", ["-O2", "-mavx2"])
        spec += f"={lib}:on_hit"
    n, reps = 1000, 40
    rep, pr, orig = patch_and_run(tmp_path, b, [spec], [n, reps], same_stderr=(handler == "count"))
    assert pr.stdout.startswith("acc=")
    hits = hits_by_address(rep)
    assert hits[site] == sum(n - r % 3 for r in range(reps))
    if handler != "count":
        assert "cb_avx first call" in pr.stderr
    check_kernel_counts(b, [site], [b, n, reps], hits)


# --------------------------------------------------------------------------
# 7. C++: exceptions through probed code, return addresses
# --------------------------------------------------------------------------

def test_cxx_exceptions_and_return_address(variant, build, tmp_path):
    b = build("exc.cpp", variant.flags, f"exc-{variant}")
    mid_a, _ = symbol(b, "_Z6middlei")
    thr_a, _ = symbol(b, "_Z7throweri")
    cs = calls_to(b, "_Z6middlei", "_Z7throweri")
    assert len(cs) == 1
    n = 10
    probes = ["_Z6middlei", "_Z7throweri", f"_Z6middlei+{cs[0] - mid_a:#x}"]
    rep, pr, orig = patch_and_run(tmp_path, b, probes, [n])
    # same output: same caught exceptions, same destructor runs, same return addresses
    assert "caught=4 dtors=10" in pr.stdout
    assert "ra=middle+" in pr.stdout
    hits = hits_by_address(rep)
    assert hits[mid_a] == n
    assert hits[thr_a] == n
    assert hits[cs[0]] == n
    check_kernel_counts(b, [mid_a, thr_a, cs[0]], [b, n], hits)


@pytest.mark.parametrize("variant", [Variant("-O2", "pie")], ids=str)
def test_cxx_demangled_name(variant, build, tmp_path):
    b = build("exc.cpp", variant.flags, f"exc-{variant}")
    mid_a, _ = symbol(b, "_Z6middlei")
    rep, _, _ = patch_and_run(tmp_path, b, ["middle(int)"], [7])
    assert hits_by_address(rep)[mid_a] == 7


# --------------------------------------------------------------------------
# 8. errors: exit 2, one line on stderr, no traceback, nothing written
# --------------------------------------------------------------------------

def _error_case(tmp_path, build, case):
    """Returns (input, probes, output, words the message must contain)."""
    b = build("basic.c", ["-O2", "-g", "-fPIE", "-pie"], "basic-errors")
    out = tmp_path / "outdir" / "out"
    out.parent.mkdir()
    comp_a, comp_sz = symbol(b, "compute")
    if case == "not_elf":
        inp = tmp_path / "notelf.bin"
        inp.write_text("#!/bin/sh\necho this is not an ELF file\n")
        return inp, ["main"], out, [inp.name]
    if case == "not_x86_64":
        inp = tmp_path / "aarch64.elf"
        data = bytearray(b.read_bytes())
        data[18:20] = (183).to_bytes(2, "little")  # e_machine = EM_AARCH64
        inp.write_bytes(bytes(data))
        return inp, ["main"], out, [inp.name]
    if case == "truncated_elf":
        inp = tmp_path / "truncated.elf"
        inp.write_bytes(b.read_bytes()[:4096])
        return inp, ["main"], out, [inp.name, "truncated"]
    if case == "elf_class32":
        inp = tmp_path / "x32.elf"
        data = bytearray(b.read_bytes())
        data[4] = 1  # ELFCLASS32 with EM_X86_64: the x32 ABI
        inp.write_bytes(bytes(data))
        return inp, ["main"], out, [inp.name, "64-bit"]
    if case == "missing_input":
        inp = tmp_path / "no-such-file"
        return inp, ["main"], out, [inp.name]
    if case == "unknown_symbol":
        # a misspelling that does not contain the real name: the message must suggest it
        return b, ["comptue"], out, ["comptue", "compute"]
    if case == "offset_outside_function":
        return b, [f"compute+{comp_sz:#x}"], out, ["compute"]
    if case == "offset_far_outside_function":
        return b, ["compute+0x100000"], out, ["compute"]
    if case == "offset_not_on_boundary":
        insns = disasm_function(b, "compute")
        big = next(i for i in insns if i.size > 1)
        return b, [f"compute+{big.address - comp_a + 1:#x}"], out, ["compute"]
    if case == "missing_output_dir":
        return b, ["main"], tmp_path / "nodir" / "sub" / "out", ["out"]
    if case == "output_under_a_file":
        f = tmp_path / "plainfile"
        f.write_text("x")
        return b, ["main"], f / "out", ["out"]
    if case.startswith("malformed_spec"):
        spec = {"malformed_spec_plus": "compute+",
                "malformed_spec_handler": "=count",
                "malformed_spec_trace": "main=trace(",
                "malformed_spec_return": "main%retrun",
                "malformed_spec_offset": "compute+zz",
                "malformed_spec_handler_name": "main=countt"}[case]
        return b, [spec], out, []
    if case == "callback_library_not_found":
        return b, [f"main={tmp_path}/nope.so:on_hit"], out, ["nope.so"]
    if case == "callback_function_not_found":
        lib = build.lib("cb_count.c")
        return b, [f"main={lib}:no_such_function"], out, ["no_such_function"]
    raise AssertionError(case)


ERROR_CASES = [
    "not_elf", "not_x86_64", "truncated_elf", "elf_class32", "missing_input", "unknown_symbol", "offset_outside_function",
    "offset_far_outside_function", "offset_not_on_boundary", "missing_output_dir",
    "output_under_a_file", "malformed_spec_plus", "malformed_spec_handler", "malformed_spec_trace",
    "malformed_spec_return", "malformed_spec_offset", "malformed_spec_handler_name",
    "callback_library_not_found", "callback_function_not_found",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_patch_errors(case, build, tmp_path):
    inp, probes, out, words = _error_case(tmp_path, build, case)
    args = ["patch", inp, "-o", out]
    for p in probes:
        args += ["-p", p]
    r = jprobe(*args)
    assert r.returncode == 2, f"exit {r.returncode}; stderr: {r.stderr}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {r.stderr!r}"
    for w in words:
        assert w in lines[0], f"message should mention {w!r}: {lines[0]!r}"
    assert not out.exists(), "jprobe wrote the output despite the error"
    if out.parent.is_dir():
        assert list(out.parent.iterdir()) == [], "jprobe left files in the output directory"


def test_output_is_a_directory(build, tmp_path):
    b = build("basic.c", ["-O2", "-g", "-fPIE", "-pie"], "basic-errors")
    r = jprobe("patch", b, "-o", tmp_path, "-p", "main")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "is a directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [], "temporary files left behind"


@pytest.mark.parametrize("where", ["before", "after"])
def test_strict_before_or_after_the_command(where, build, tmp_path):
    """--strict is a common option: `jprobe --strict patch` means what `jprobe patch --strict` does."""
    b = build("own_sigtrap.c", ["-O2", "-g", "-no-pie"], "tiny-strict")
    out = tmp_path / "out"
    args = ["patch", b, "-o", out, "-p", "tiny"]
    r = jprobe(*(["--strict", *args] if where == "before" else [*args, "--strict"]))
    assert r.returncode == 2 and "needs a trap" in r.stderr, r.stderr
    assert not out.exists()


def test_error_leaves_existing_output_untouched(build, tmp_path):
    b = build("basic.c", ["-O2", "-g", "-fPIE", "-pie"], "basic-errors")
    out = tmp_path / "out"
    out.write_bytes(b"previous contents")
    r = jprobe("patch", b, "-o", out, "-p", "comptue")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary files left behind"


# --------------------------------------------------------------------------
# 9. static rewrite integrity
# --------------------------------------------------------------------------

# The dynamic-linking tables LIEF rebuilds to add the runtime's DT_NEEDED and, in a program,
# the symbol and relocation of its DT_PREINIT_ARRAY entry: .dynstr, .dynsym, .gnu.version and
# .rela.dyn grow (and so move to a new segment; their old bytes stay in place), the others
# are rewritten in place. They are checked for equivalence instead (_dynamic_view below).
REBUILDABLE = {".dynamic", ".dynstr", ".dynsym", ".gnu.hash", ".hash", ".gnu.version",
               ".gnu.version_r", ".gnu.version_d", ".rela.dyn", ".rela.plt"}
MAY_MOVE = {".dynstr", ".dynsym", ".gnu.version", ".rela.dyn"}
PREINIT = "jprobe_rt_preinit"


def _dynamic_view(path):
    """What the dynamic linker sees: symbols, needed libraries, relocations (with their
    symbols' names: adding one renumbers the others), and DT_PREINIT_ARRAY."""
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        elf = ELFFile(f)
        dynsym = elf.get_section_by_name(".dynsym")
        syms = [(s.name, s["st_value"], s["st_size"], s["st_info"]["type"], s["st_info"]["bind"])
                for s in dynsym.iter_symbols()]
        tags = list(elf.get_section_by_name(".dynamic").iter_tags())
        needed = [t.needed for t in tags if t.entry.d_tag == "DT_NEEDED"]
        relocs = sorted((r["r_offset"], r["r_info_type"], dynsym.get_symbol(r["r_info_sym"]).name)
                        for sec in elf.iter_sections()
                        if sec.name.startswith(".rela") for r in sec.iter_relocations())
        preinit = [t.entry.d_val for t in tags if t.entry.d_tag in ("DT_PREINIT_ARRAY", "DT_PREINIT_ARRAYSZ")]
    return syms, needed, relocs, preinit


def _alloc_sections(path):
    from elftools.elf.elffile import ELFFile
    out = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for s in elf.iter_sections():
            if s["sh_flags"] & 0x2 and s.name:  # SHF_ALLOC
                data = s.data() if s["sh_type"] != "SHT_NOBITS" else b""
                out[s.name] = (s["sh_addr"], s["sh_size"], s["sh_type"], data)
    return out


@pytest.mark.parametrize("variant", SOME_VARIANTS + [Variant("-O2", "nopie")], ids=str)
def test_static_rewrite_integrity(variant, build, tmp_path):
    b = build("basic.c", variant.flags, f"basic-{variant}")
    main_a, _ = symbol(b, "main")
    comp_a, _ = symbol(b, "compute")
    mech = {**site_mechanisms(b, "main"), **site_mechanisms(b, "compute")}
    assert mech[main_a] == "jump" and mech[comp_a] == "jump", "entries of main and compute should take a jmp"
    out = patch(b, tmp_path / "patched", ["main", "compute"])
    # bytes allowed to differ: the instructions displaced by each 5-byte jmp
    allowed = set()
    for func, a in (("main", main_a), ("compute", comp_a)):
        covered = 0
        for i in disasm_function(b, func):
            if covered >= 5:
                break
            allowed.update(range(i.address, i.address + i.size))
            covered += i.size
    before, after = _alloc_sections(b), _alloc_sections(out)
    problems = []  # all of them at once, so that one report tells the whole story
    for name, (addr, size, typ, data) in before.items():
        if name not in after:
            problems.append(f"section {name} disappeared")
            continue
        a2, s2, t2, d2 = after[name]
        if a2 != addr and name not in MAY_MOVE:
            problems.append(f"{name} moved from {addr:#x} to {a2:#x}")
        if name in REBUILDABLE:
            continue
        if s2 != size:
            problems.append(f"{name} changed size {size:#x} -> {s2:#x}")
            continue
        if typ == "SHT_NOBITS" or a2 != addr:
            continue
        diff = [addr + k for k in range(size) if data[k] != d2[k]]
        bad = [hex(x) for x in diff if x not in allowed]
        if bad:
            problems.append(f"{name}: bytes changed outside the probe sites at {bad[:10]}")
        if name == ".text" and not diff:
            problems.append("no byte of .text changed: where are the probes?")
    assert not problems, "; ".join(problems)
    (syms0, needed0, relocs0, preinit0), (syms1, needed1, relocs1, preinit) = _dynamic_view(b), _dynamic_view(out)
    # what the program gains: the runtime's set-up first of all initialisers
    assert not preinit0 and preinit[1] == 8
    assert [s for s in syms1 if s[0] != PREINIT] == syms0 and (PREINIT, 0, 0, "STT_FUNC", "STB_GLOBAL") in syms1
    assert relocs1 == sorted(relocs0 + [(preinit[0], 1, PREINIT)])      # R_X86_64_64
    assert needed1[1:] == needed0 and "libjprobe_rt" in needed1[0]
    nm = subprocess.run(["nm", str(out)], capture_output=True, text=True)
    assert nm.returncode == 0, nm.stderr
    assert re.search(r" T compute$", nm.stdout, re.M), ".symtab no longer names compute"
    rep, _, _ = patch_and_run(tmp_path, b, ["main", "compute"], [20, 3], name="again")
    assert hits_by_address(rep)[comp_a] == 3


# --------------------------------------------------------------------------
# 10. a real library from the machine: libz.so.1 under CPython's zlib module
# --------------------------------------------------------------------------
# Debian 12 ships libz.so.1 stripped (no .symtab) but with ~88 exported functions in
# .dynsym, and CPython's zlib extension module links it dynamically (DT_NEEDED libz.so.1,
# with at most a RUNPATH, which LD_LIBRARY_PATH overrides).  So: patch every exported
# function entry of a copy of libz.so.1, run a Python workload with LD_LIBRARY_PATH at
# the copy, and compare with the original library.

ZLIB_WORKLOAD = r"""
import zlib
data = bytes((i * 7 + (i >> 5) + (i * i >> 11)) & 0xff for i in range(200000))
out = []
for lvl in (1, 6, 9):
    c = zlib.compress(data, lvl)
    assert zlib.decompress(c) == data
    out.append((lvl, len(c), zlib.crc32(c)))
co = zlib.compressobj(6, zlib.DEFLATED, -15)
raw = co.compress(data) + co.flush()
do = zlib.decompressobj(-15)
assert do.decompress(raw) == data
crc = 0
for i in range(37):
    crc = zlib.crc32(data[i * 100:(i + 1) * 100], crc)
print(out, len(raw), crc)
"""
ZLIB_CRC32_CALLS = 3 + 37


def _libz_path():
    import zlib
    mod = getattr(zlib, "__file__", None)
    if not mod:
        pytest.skip("this Python's zlib module is built in: it does not load libz.so.1")
    r = subprocess.run(["ldd", mod], capture_output=True, text=True)
    m = re.search(r"libz\.so\.1 => (\S+)", r.stdout)
    if not m:
        pytest.skip(f"{mod} does not link libz.so.1 dynamically")
    return Path(m.group(1)).resolve()


def test_real_library_libz(tmp_path):
    libz = _libz_path()
    syms = elf_symbols(libz)
    by_addr = {}
    for name, (value, size) in sorted(syms.items()):
        if size > 0 and "@" not in name:
            by_addr.setdefault(value, name)
    assert len(by_addr) >= 50, f"only {len(by_addr)} exported functions in {libz}"
    names = sorted(by_addr.values())
    pdir = tmp_path / "patched"
    pdir.mkdir()
    patch(libz, pdir / "libz.so.1", names)
    cmd = [sys.executable, "-c", ZLIB_WORKLOAD]
    orig = run_prog(cmd)
    assert orig.returncode == 0, orig.stderr
    pr, rep = run_with_report(cmd, tmp_path / "r.json", env={"LD_LIBRARY_PATH": str(pdir)})
    assert_same_behaviour(orig, pr)
    hits = hits_by_address(rep)
    addr = {n: a for a, n in by_addr.items()}
    assert len(rep["probes"]) == len(names)
    assert hits[addr["crc32"]] == ZLIB_CRC32_CALLS
    for fn in ("deflate", "deflateInit2_", "deflateEnd", "inflate", "inflateEnd"):
        assert hits[addr[fn]] > 0, fn
    assert hits[addr["gzopen"]] == 0
    require_tracefs(f"the counts of {len(by_addr)} libz functions")
    vaddrs = sorted(by_addr)
    offsets = [vaddr_to_offset(libz, a) for a in vaddrs]
    # the kernel's probes go on a copy named by the soname, found through LD_LIBRARY_PATH
    odir = tmp_path / "orig"
    odir.mkdir()
    shutil.copy2(libz, odir / "libz.so.1")
    counts, kr = kernel_uprobe_counts(odir / "libz.so.1", offsets, cmd,
                                      env={"LD_LIBRARY_PATH": "{COPYDIR}"})
    assert kr.stdout == orig.stdout
    mismatch = {by_addr[a]: (hits[a], k) for a, k in zip(vaddrs, counts) if hits[a] != k}
    assert not mismatch, f"jprobe vs kernel uprobe counts differ: {mismatch}"
    assert counts[vaddrs.index(addr["crc32"])] == ZLIB_CRC32_CALLS


# --------------------------------------------------------------------------
# 11. no syscall per hit
# --------------------------------------------------------------------------

def _strace_total(argv, env, tmp_path, tag):
    out = tmp_path / f"strace-{tag}.txt"
    r = run_prog(["strace", "-f", "-c", "-o", out, *argv], env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    m = re.search(r"^\s*100\.00\s+\S+\s+\S+\s+(\d+)\s+(?:\d+\s+)?total\s*$", text, re.M)
    assert m, text
    return int(m.group(1)), r


def test_syscalls_do_not_grow_with_hits(build, tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    b = build("calls.c", ["-O2", "-g", "-fPIE", "-pie"], "calls-strace")
    hot_a, _ = symbol(b, "hot")
    out = patch(b, tmp_path / "patched", ["hot"])
    totals = {}
    for n in (10**3, 10**6):
        rpath = tmp_path / f"r{n}.json"
        totals[n], r = _strace_total([out, 10, 5, n], {"JPROBE_REPORT": str(rpath)}, tmp_path, n)
        assert hits_by_address(json.loads(rpath.read_text()))[hot_a] == n
    assert abs(totals[10**6] - totals[10**3]) <= 5, f"syscalls: {totals}"
    # and no SIGTRAP at all
    log = tmp_path / "signals.txt"
    r = run_prog(["strace", "-f", "-e", "trace=none", "-o", log, out, 10, 5, 10**5])
    assert r.returncode == 0
    assert "SIGTRAP" not in log.read_text()


# --------------------------------------------------------------------------
# 12. `jprobe sites --json` and `jprobe report`
# --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_sites_json_shape(variant, build):
    b = build("basic.c", variant.flags, f"basic-{variant}")
    s = sites(b, "compute")
    assert set(s) >= {"module", "instructions", "summary"}
    assert Path(s["module"]).name == b.name
    insns = disasm_function(b, "compute")
    assert [int(i["address"], 16) for i in s["instructions"]] == [i.address for i in insns]
    for i in s["instructions"]:
        assert set(i) >= {"address", "mechanism", "reason"}
        assert re.fullmatch(r"0x[0-9a-f]+", i["address"])
        assert i["mechanism"] in MECHANISMS
        assert isinstance(i["reason"], str)
    summ = s["summary"]
    assert "jump" in summ and "trap" in summ
    for k in MECHANISMS:
        assert summ.get(k, 0) == sum(1 for i in s["instructions"] if i["mechanism"] == k), k
    assert s["instructions"][0]["mechanism"] == "jump"
    # without a symbol: all executable code, which includes compute
    whole = sites(b)
    addrs = {int(i["address"], 16) for i in whole["instructions"]}
    assert {i.address for i in insns} <= addrs
    assert sum(whole["summary"].get(k, 0) for k in MECHANISMS) == len(whole["instructions"])
    # per tactic: B1 for plain jumps, B2/T1 for puns, T2/T3 for evictions, none for traps
    pairs = {(i["mechanism"], i["tactic"]) for i in whole["instructions"]}
    assert pairs <= {("jump", "B1"), ("pun", "B2"), ("pun", "T1"), ("evict", "T2"), ("evict", "T3"),
                     ("trap", None)}, pairs
    assert sum(whole["tactics"].values()) == len(whole["instructions"]) - whole["summary"]["trap"]


def test_report_command(build, tmp_path):
    b = build("basic.c", ["-O2", "-g", "-fPIE", "-pie"], "basic-report")
    rep, _, _ = patch_and_run(tmp_path, b, ["compute"], [10, 6])
    path = tmp_path / "patched.report.json"
    r = jprobe("report", path)
    assert r.returncode == 0, r.stderr
    assert "compute" in r.stdout and re.search(r"\b6\b", r.stdout), r.stdout
    assert rep["pid"] > 0
    p = rep["probes"][0]
    assert p["probe"].startswith("compute") and p["handler"] == "count"
    assert int(p["address"], 16) == symbol(b, "compute")[0]
