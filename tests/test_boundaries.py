"""Boundary maps (ProbePlan.boundaries, struct jp_plan_boundary): where a thread stopped between
the instructions a patch replaces goes, and where it comes back from (planner._boundaries).

Differential: for EVERY pair (vaddr, reloc) of the plans below, the module's original code from
vaddr and the plan's text from reloc run under unicorn from the same random registers, flags,
stack and memory. The relocated run sees the module as the runtime leaves it (every probe of
the plan written, islands mapped) and stops at the first original address outside the patched
bytes, x: returning strictly inside them, it runs what is there (an evicted instruction's new
jump, or bytes a T3 patch keeps). The original run stops when it reaches x (after one
instruction at least, and within as many as the relocated run took). Then every general
register, the flags, the xmm registers and all memory but the patched bytes must agree. A
relocated run that faults must fault alike in the original.

Plans: every instruction of the fixtures probed alone (B1, retargeted calls, puns, T2 and its
chains, T3, traps) and all the instructions of each function at once (re-aimed jumps and the
punned jumps over them, more traps), at -O0/-O2/-O3, PIE and not.
"""
from __future__ import annotations

import random
import struct
from collections import Counter
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Callable

import pytest
import unicorn
from capstone import CS_GRP_CALL
from elftools.elf.elffile import ELFFile
from support.build import ALL_VARIANTS, Variant
from support.emulation import contiguous
from unicorn import x86_const as R

from jprobe import layout
from jprobe.elf import ElfModule
from jprobe.plan import ModulePlan, ProbePlan
from jprobe.planfile import PlannedModule, encode
from jprobe.planner import build_plan, resolve_probes
from jprobe.runner import plan_modules
from jprobe.spec import parse_probes
from jprobe.trampolines import tactics
from jprobe.trampolines import x86_64 as arch

PAGE = 0x1000
HEAP, HEAP_SIZE = 0x5000_0000_0000, 0x20000
STACK, STACK_SIZE = 0x6000_0000_0000, 0x8000
TLS, TLS_SIZE = 0x7000_0000_0000, PAGE          # what fs addresses (the stack protector's canary)
STATES = 2                                      # random states per pair
MEMORIES = 8                                    # random memories they start from
STEPS = 256                                     # relocated instructions before a run counts as a loop
CALL_SCRATCH = 24                               # below a call's return address: the callee's (relocate.py)
PIE_BIAS = 0x5555_0000_0000                     # where a PIE runs: its islands may lie below its link-time 0
LOOP = "no exit within the limit"

GPRS = tuple(getattr(R, f"UC_X86_REG_{name}") for name in (
    "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"))
XMMS = tuple(getattr(R, f"UC_X86_REG_XMM{i}") for i in range(16))
FLAG_BITS = (1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 10, 1 << 11)       # CF PF AF ZF SF DF OF
FLAG_MASK = sum(FLAG_BITS)

SOURCES = ("basic.c", "calls.c", "every_insn.c", "tactics.c", "padded.c", "fpsum.c")
# The C runtime's start-up code, the same in every program: probed in the first one only.
CRT = frozenset({"_start", "_init", "_fini", "deregister_tm_clones", "register_tm_clones", "__do_global_dtors_aux",
                 "frame_dummy", "_dl_relocate_static_pie"})


# ---------------------------------------------------------------------------------------------
# Plans


def plan_of(module: ElfModule, addresses: list[int]) -> ModulePlan:
    """One plan probing `addresses` together, its text right after the image (as `jprobe run`)."""
    probes = resolve_probes(module, parse_probes([f"{a:#x}" for a in addresses]), strict=False)
    text = -(-module.end_of_image() // PAGE) * PAGE
    return build_plan(module, probes, text, text + 0x100000)


def function_insns(module: ElfModule, skip: frozenset[str]) -> list[list]:
    """The instructions of each sized function in code (decoded whole), but those in `skip`."""
    out = []
    for sym in module.functions:
        if sym.size and module.is_code(sym.address, sym.size) and sym.name not in skip:
            insns = arch.decode(module.read(sym.address, sym.size), sym.address)
            if sum(i.size for i in insns) == sym.size:
                out.append(insns)
    return out


def plans_for(module: ElfModule, skip: frozenset[str] = frozenset()) -> list[ModulePlan]:
    """Every instruction probed alone, then every function's instructions probed at once."""
    functions = function_insns(module, skip)
    alone = [plan_of(module, [insn.address]) for insns in functions for insn in insns]
    return alone + [plan_of(module, [insn.address for insn in insns]) for insns in functions if len(insns) > 1]


def tactic(probe: ProbePlan) -> str:
    """How the site was patched, finer than its mechanism (which tactic, re-aimed or not)."""
    if probe.mechanism == "jump":
        if probe.patched[0] != tactics.JMP:                     # `call rel32`, `nop; call rel32`
            return "call"
        return "B1 padding" if "of the padding after" in probe.reason else "B1"
    if probe.mechanism == "trap":
        return "trap"
    if "re-aimed" in probe.reason:
        return "re-aimed"
    if probe.reason.startswith("T2: punned jump over the next probe's jump"):
        return "pun over re-aimed"
    if probe.mechanism == "pun":
        return probe.reason[:2]                                  # B2 or T1
    if probe.reason.startswith("T3"):
        return "T3"
    return "T2 chain" if len(probe.islands) > 2 else "T2"


# ---------------------------------------------------------------------------------------------
# Memory images and random states


def image_pages(path: str, bias: int) -> dict[int, bytes]:
    """The module's loadable segments at their link-time addresses + `bias`, page by page."""
    pages: dict[int, bytearray] = {}
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD":
                put(pages, bias + seg["p_vaddr"], seg.data() + bytes(seg["p_memsz"] - seg["p_filesz"]))
    return {page: bytes(contents) for page, contents in pages.items()}


def put(pages: dict[int, bytearray], address: int, data: bytes) -> None:
    """Store `data`, adding the pages it needs."""
    for i in range(len(data)):
        pages.setdefault((address + i) & -PAGE, bytearray(PAGE))[(address + i) % PAGE] = data[i]


def islands(plan: ModulePlan) -> list[tuple[int, bytes]]:
    """(address, hop code) of each island, from the probe table."""
    ffi = layout.ffi
    table = ffi.from_buffer("struct jp_table *", plan.data)
    at = table.islands - plan.data_vaddr
    records = ffi.from_buffer("struct jp_island[]", plan.data[at:at + table.nislands * layout.sizeof("jp_island")])
    return [(r.at, bytes(ffi.unpack(r.code, r.len))) for r in records]


def written(probe: ProbePlan, fallen: bool) -> bytes:
    """What the runtime writes at a site: its patch, or when it falls back to a trap (its
    island's page is taken) an int3 on the first byte alone."""
    return arch.trap_bytes(1, b"") if fallen else probe.patched


def with_plan(image: dict[int, bytes], plan: ModulePlan, bias: int, fallen: ProbePlan | None) -> dict[int, bytes]:
    """The module as the runtime leaves it: every site patched (`fallen` fell back to a
    trap), text, data and islands mapped."""
    pages = {page: bytearray(contents) for page, contents in image.items()}
    for start, data in [(plan.text_vaddr, plan.text), (plan.data_vaddr, plan.data)] + islands(plan):
        put(pages, bias + start, data)
    for probe in plan.probes:
        put(pages, bias + probe.address, written(probe, probe is fallen))
    return {page: bytes(contents) for page, contents in pages.items()}


@dataclass
class State:
    """Registers and the memory pages outside the module that both runs start from."""

    regs: dict[int, int]
    flags: int
    pages: dict[int, bytes]


def pointer(rng: random.Random, base: int, size: int) -> int:
    """An address well inside a region, so that [reg + small displacement] is mapped."""
    return base + rng.randrange(0x800, size - 0x800) & ~rng.choice((0, 7))


def value(rng: random.Random) -> int:
    """What a register or a memory word holds: mostly pointers, so that code that follows
    them (locals through rbp, arguments, structures) runs instead of faulting."""
    kind = rng.random()
    if kind < 0.5:
        return pointer(rng, HEAP, HEAP_SIZE)
    if kind < 0.65:
        return pointer(rng, STACK, STACK_SIZE)
    if kind < 0.85:
        return rng.randrange(64)
    return rng.getrandbits(64)


@cache
def random_memory(k: int) -> dict[int, bytes]:
    """The k-th of MEMORIES random heaps, stacks and thread blocks (slow to make: shared)."""
    rng = random.Random(k)
    pages = {}
    for base, size in ((HEAP, HEAP_SIZE), (STACK, STACK_SIZE), (TLS, TLS_SIZE)):
        for page in range(base, base + size, PAGE):
            pages[page] = b"".join(struct.pack("<Q", value(rng)) for _ in range(PAGE // 8))
    return pages


def random_state(rng: random.Random) -> State:
    """Random registers and flags over one of the random memories."""
    pages = random_memory(rng.randrange(MEMORIES))
    regs = {reg: value(rng) for reg in GPRS}
    regs[R.UC_X86_REG_RSP] = STACK + rng.randrange(0x2000, 0x6000) & ~7
    regs[R.UC_X86_REG_RBP] = regs[R.UC_X86_REG_RSP] + rng.randrange(0, 0x800) & ~7
    regs.update((xmm, rng.getrandbits(128)) for xmm in XMMS)
    regs[R.UC_X86_REG_FS_BASE] = TLS + PAGE // 2
    return State(regs, sum(bit for bit in FLAG_BITS if rng.random() < 0.5), pages)


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass
class Outcome:
    """Where a run stopped and what it left."""

    exit: int = 0
    executed: int = 0
    last: int | None = None                    # address of the last instruction it ran
    fault: str | None = None                   # a fault, LOOP, or unicorn's own stop (hlt)
    gprs: tuple[int, ...] = ()
    flags: int = 0
    xmms: tuple[int, ...] = ()
    memory: dict[int, bytes] = field(default_factory=dict)


def emulate(pages: dict[int, bytes], state: State, start: int, stop: Callable[[int, int], bool],
            limit: int) -> Outcome:
    """Run from `start` until `stop(pc, instructions run)` or a jump out of every mapping;
    a fault, `limit` instructions or a `hlt` (which ends unicorn's run) set `fault`."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.ctl_set_cpu_model(R.UC_CPU_X86_HASWELL)
    runs = contiguous({**pages, **state.pages})
    for address, contents in runs:
        uc.mem_map(address, len(contents))
        uc.mem_write(address, contents)
    for reg, val in state.regs.items():
        uc.reg_write(reg, val)
    uc.reg_write(R.UC_X86_REG_RFLAGS, state.flags | 2)
    out = Outcome(fault="the emulation ended by itself (hlt)")

    def hook(uc, address, size, _):
        if stop(address, out.executed):
            out.fault = None
        elif out.executed >= limit:
            out.fault = LOOP
        else:
            out.executed += 1
            out.last = address
            return
        uc.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_CODE, hook)
    try:
        uc.emu_start(start, 0)
    except unicorn.UcError as error:
        # A jump out of every mapping (a `ret` to a random address) is an exit like any other.
        out.fault = None if error.errno == unicorn.UC_ERR_FETCH_UNMAPPED else str(error)
    out.exit = uc.reg_read(R.UC_X86_REG_RIP)
    out.gprs = tuple(uc.reg_read(reg) for reg in GPRS)
    out.flags = uc.reg_read(R.UC_X86_REG_RFLAGS) & FLAG_MASK
    out.xmms = tuple(uc.reg_read(reg) for reg in XMMS)
    for address, contents in runs:
        after = bytes(uc.mem_read(address, len(contents)))
        out.memory.update((page, after[page - address:page - address + PAGE])
                          for page in range(address, address + len(contents), PAGE))
    return out


@dataclass
class Program:
    """One module with its original image, for the runs of its plans (a PIE at PIE_BIAS)."""

    path: str

    @cached_property
    def module(self) -> ElfModule:
        return ElfModule(self.path)

    @cached_property
    def bias(self) -> int:
        return 0 if self.module.fixed_address else PIE_BIAS

    @cached_property
    def image(self) -> dict[int, bytes]:
        return image_pages(self.path, self.bias)

    def is_call(self, address: int) -> bool:
        """The instruction at run-time `address` is a call."""
        insn = arch.decode_one(self.module.read(address - self.bias, 15), address)
        return insn is not None and insn.group(CS_GRP_CALL)


@dataclass
class Tally:
    """Cases per tactic: compared, and why the others were not."""

    compared: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def total(self) -> int:
        return sum(self.compared.values()) + sum(self.skipped.values())


def differences(orig: Outcome, moved: Outcome, ignored: list[range]) -> list[str]:
    """What the two runs disagree on; bytes in `ignored` do not count."""
    found = [f"gpr {i}: {a:#x} != {b:#x}" for i, (a, b) in enumerate(zip(orig.gprs, moved.gprs)) if a != b]
    if orig.flags != moved.flags:
        found.append(f"flags {orig.flags:#x} != {moved.flags:#x}")
    if orig.xmms != moved.xmms:
        found.append("xmm registers differ")
    for page, contents in orig.memory.items():
        other = moved.memory[page]
        if contents != other:
            changed = [page + i for i in range(PAGE) if contents[i] != other[i]]
            bad = [at for at in changed if not any(at in r for r in ignored)]
            if bad:
                found.append(f"memory differs at {', '.join(hex(a) for a in bad[:4])}")
    return found


@dataclass
class Case:
    """One plan applied to a program, as the relocated runs see it."""

    program: Program
    plan: ModulePlan

    @cached_property
    def patched(self) -> dict[int, bytes]:
        return with_plan(self.program.image, self.plan, self.program.bias, None)

    def written(self, fallen: ProbePlan | None) -> list[range]:
        """The bytes each patch writes, at run time."""
        bias = self.program.bias
        return [range(bias + p.address, bias + p.address + len(written(p, p is fallen))) for p in self.plan.probes]

    @cached_property
    def moved_code(self) -> list[range]:
        """Where a relocated run goes on: the text and the islands' hops."""
        bias = self.program.bias
        return ([range(bias + self.plan.text_vaddr, bias + self.plan.text_vaddr + len(self.plan.text))]
                + [range(bias + at, bias + at + len(code)) for at, code in islands(self.plan)])

    def relocated_until(self, fallen: ProbePlan | None) -> Callable[[int, int], bool]:
        """Where a relocated run stops: the first original address outside the patches' bytes.
        Strictly inside them it goes on, into an evicted instruction's new jump or through
        instructions that keep their bytes (T3): what a thread returning there runs."""
        inside = self.written(fallen)
        return lambda pc, n: not any(pc in r for r in self.moved_code) and not any(
            r.start < pc < r.stop for r in inside)

    def check(self, probe: ProbePlan, vaddr: int, reloc: int, seed: int, tally: Tally) -> None:
        """The copy at `reloc` against the original from `vaddr`, in each state of the site
        in which a thread can be at the copy.

        A site whose island's page is taken falls back to a trap, after which a thread goes
        on at the probe's `resume` copy: that one runs with the trap written alone too; an
        eviction's only so (with the jump written, no thread gets there).
        """
        states = [None]
        if probe.mechanism in ("pun", "evict") and reloc == probe.resume:
            states = [probe] if probe.mechanism == "evict" else [None, probe]
        for fallen in states:
            self.check_in(probe, fallen, vaddr, reloc, seed, tally)

    def check_in(self, probe: ProbePlan, fallen: ProbePlan | None, vaddr: int, reloc: int, seed: int,
                 tally: Tally) -> None:
        """One differential case, with `fallen` fallen back to its trap."""
        kind, bias = tactic(probe), self.program.bias
        pages = self.patched if fallen is None else with_plan(self.program.image, self.plan, bias, fallen)
        state = random_state(random.Random(seed))
        moved = emulate(pages, state, bias + reloc, self.relocated_until(fallen), STEPS)
        where = (f"{kind} at {probe.address:#x} ({probe.reason}), pair ({vaddr:#x}, {reloc:#x}), seed {seed}"
                 + (", fallen back to a trap" if fallen else ""))
        if moved.fault == LOOP:
            tally.skipped[kind, LOOP] += 1
            return
        x = moved.exit
        # A fault must happen in the original too (it stops short of any exit).
        stop = (lambda pc, n: pc == x and n > 0) if moved.fault is None else (lambda pc, n: False)
        orig = emulate(self.program.image, state, bias + vaddr, stop, moved.executed)
        if orig.fault != moved.fault or (moved.fault is None and orig.exit != x):
            tally.failures.append(f"{where}: the original stopped at {orig.exit:#x} ({orig.fault or 'no fault'}), "
                                  f"the copy at {x:#x} ({moved.fault or 'no fault'})")
        elif moved.fault:
            tally.skipped[kind, "faulted alike"] += 1
        else:
            self.compare(orig, moved, where, tally)
            tally.compared[kind] += 1

    def compare(self, orig: Outcome, moved: Outcome, where: str, tally: Tally) -> None:
        """Registers, flags and memory but the patched bytes (and a callee's scratch)."""
        ignored = self.written(None)
        if orig.last is not None and self.program.is_call(orig.last):
            rsp = orig.gprs[GPRS.index(R.UC_X86_REG_RSP)]
            ignored.append(range(rsp - CALL_SCRATCH, rsp))
        found = differences(orig, moved, ignored)
        if found:
            tally.failures.append(f"{where}: {'; '.join(found[:5])}")


def run_all(program: Program, plans: list[ModulePlan], tally: Tally) -> None:
    """Every pair of every probe of `plans`, from STATES random states each."""
    for plan in plans:
        case = Case(program, plan)
        for probe in plan.probes:
            for vaddr, reloc in probe.boundaries:
                for k in range(STATES):
                    case.check(probe, vaddr, reloc, vaddr * 7919 + reloc * 31 + k, tally)


# ---------------------------------------------------------------------------------------------
# The differential tests


# Two builds in `make test` (PIE at -O0, not PIE at -O3: ~1 minute of emulation each); the
# other four under `make stress`.
QUICK = {"O0-pie", "O3-nopie"}


@pytest.mark.parametrize("variant", [v if str(v) in QUICK else pytest.param(v, marks=pytest.mark.stress)
                                     for v in ALL_VARIANTS], ids=str)
def test_every_pair_runs_like_the_original(variant: Variant, build) -> None:
    tally = Tally()
    for source in SOURCES:
        program = Program(str(build(source, variant.flags)))
        run_all(program, plans_for(program.module, frozenset() if source == SOURCES[0] else CRT), tally)
    assert not tally.failures, "\n".join(tally.failures[:20])
    compared = sum(tally.compared.values())
    # A case that never reaches the comparison proves nothing: most must.
    assert compared >= 1000 and compared >= 0.8 * tally.total(), (tally.compared, tally.skipped)


def tally_of(programs: list[Program]) -> Tally:
    tally = Tally()
    for program in programs:
        run_all(program, plans_for(program.module), tally)
    return tally


def test_each_tactic_reaches_the_comparison(build) -> None:
    """Programs where every tactic occurs (T3 in tactics.c's `t3` without PIE, chains and
    re-aimed jumps at -O0, spills into padding in padded.c): each one's pairs are compared."""
    builds = [("every_insn.c", "-O0"), ("tactics.c", "-O0"), ("tactics.c", "-O3"), ("padded.c", "-O0")]
    tally = tally_of([Program(str(build(source, [opt, "-g", "-fno-pie", "-no-pie"]))) for source, opt in builds])
    assert not tally.failures, "\n".join(tally.failures[:20])
    for kind in ("B1", "B1 padding", "B2", "T1", "T2", "T2 chain", "T3", "re-aimed", "pun over re-aimed", "trap"):
        assert tally.compared[kind] >= 4, (kind, tally.compared, tally.skipped)


# ---------------------------------------------------------------------------------------------
# Structural invariants


def starts_within(module: ElfModule, lo: int, hi: int) -> list:
    """The original instructions that start in [lo, hi), decoded from their function's start
    (or, past the function, as the fill after it)."""
    sym = module.function_at(lo)
    at = sym.address if sym is not None else lo
    insns = arch.decode(module.read(at, hi - at + 15), at)
    return [insn for insn in insns if lo <= insn.address < hi]


def unmapped_reason(module: ElfModule, probe: ProbePlan, insn) -> str | None:
    """Why an instruction start in the written bytes may have no pair (planner._boundaries),
    or None when it has none of these reasons."""
    at = insn.address - probe.address
    sym = module.function_at(probe.address)
    if tactic(probe) == "call" and insn.address == probe.address:
        return "a retargeted call runs in place"
    if tactic(probe) == "T3" and at > 0 and probe.patched[at:at + insn.size] == bytes(insn.bytes):
        return "T3: keeps its bytes and runs in place"
    if tactic(probe) == "B1 padding" and insn.address >= sym.end and insn.id in arch.FILL:
        last = starts_within(module, sym.address, sym.end)[-1]
        if arch.ends_flow(last):
            return "fill after a function that ends in a ret or jmp: never executed"
    return None


def check_structure(module: ElfModule, plan: ModulePlan) -> Counter:
    """The invariants of every probe's map; how many starts went unmapped and why."""
    text = range(plan.text_vaddr, plan.text_vaddr + len(plan.text))
    why = Counter()
    for probe in plan.probes:
        pairs = probe.boundaries
        site = f"{probe.address:#x} ({probe.reason})"
        assert pairs == sorted(set(pairs)), site
        assert all(reloc in text for _, reloc in pairs), site
        mapped = {vaddr for vaddr, _ in pairs}
        if tactic(probe) == "call":
            assert not pairs, f"{site}: a retargeted call has no copy"
        else:
            assert probe.address in mapped, f"{site}: the site has no pair"
        assert probe.resume is None or (probe.address, probe.resume) in pairs, f"{site}: its resume copy is unmapped"
        end = probe.address + len(probe.patched)
        starts = starts_within(module, probe.address, max([end] + [v + 1 for v in mapped]))
        assert mapped <= {insn.address for insn in starts}, f"{site}: a pair is no instruction start"
        for insn in starts:
            if insn.address < end and insn.address not in mapped:
                reason = unmapped_reason(module, probe, insn)
                assert reason, f"{site}: {insn.mnemonic} {insn.op_str} at {insn.address:#x} has no pair"
                why[reason] += 1
    return why


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=str)
def test_every_start_in_the_written_bytes_has_a_pair_or_runs_in_place(variant: Variant, build) -> None:
    why = Counter()
    for source in SOURCES + ("tactics.c",):
        module = ElfModule(str(build(source, variant.flags)))
        for plan in plans_for(module):
            why += check_structure(module, plan)
    assert why["a retargeted call runs in place"] > 0, why


def test_the_unmapped_starts_of_t3_and_of_a_spill_into_padding_are_seen(build) -> None:
    """The two exceptions really occur (so the structural test exercises them)."""
    why = Counter()
    for source in ("tactics.c", "padded.c"):
        module = ElfModule(str(build(source, ["-O0", "-g", "-fno-pie", "-no-pie"])))
        for plan in plans_for(module):
            why += check_structure(module, plan)
    assert why["T3: keeps its bytes and runs in place"] > 0 and why[
        "fill after a function that ends in a ret or jmp: never executed"] > 0, why


def test_a_plan_with_boundaries_round_trips_through_json(build) -> None:
    module = ElfModule(str(build("tactics.c", ["-O0", "-g", "-fno-pie", "-no-pie"])))
    plan = plans_for(module)[-1]
    assert any(p.boundaries for p in plan.probes)
    assert ModulePlan.from_json(plan.to_json()) == plan


def decode_bounds(blob: bytes) -> list[list[list[tuple[int, int]]]]:
    """Per module, per patch: its (vaddr, reloc offset) pairs, as the runtime reads the file."""
    ffi = layout.ffi
    header = ffi.from_buffer("struct jp_plan_header *", blob)
    assert header.version == layout.CONST["JP_PLAN_VERSION"] == 2
    out = []
    for i in range(header.nmodules):
        at = layout.sizeof("jp_plan_header") + i * layout.sizeof("jp_plan_module")
        entry = ffi.from_buffer("struct jp_plan_module *", blob[at:])
        size = layout.sizeof("jp_plan_boundary")
        bounds = ffi.from_buffer("struct jp_plan_boundary[]", blob[entry.bounds:entry.bounds + entry.nbounds * size])
        patches = ffi.from_buffer("struct jp_plan_patch[]",
                                  blob[entry.patches:entry.patches + entry.npatches * layout.sizeof("jp_plan_patch")])
        assert entry.bounds % 8 == 0 and sum(p.nbounds for p in patches) == entry.nbounds
        out.append([[(b.vaddr, b.reloc) for b in bounds[p.first_bound:p.first_bound + p.nbounds]] for p in patches])
    return out


def test_the_plan_file_holds_each_patchs_boundaries_as_text_offsets(build) -> None:
    """`jprobe run`'s own planning (two modules), then every plan of a program at once."""
    prog = str(build("tactics.c", ["-O0", "-g", "-fno-pie", "-no-pie"]))
    modules = plan_modules(prog, parse_probes(["t3", "inc", "dec", "ret_run+0xa", "main", "libc.so.6:malloc"]), False)
    plans = [PlannedModule(plan, "", 0, 0) for plan in plans_for(ElfModule(prog))]
    for planned in (modules, plans):
        expected = [[[(vaddr, reloc - m.plan.text_vaddr) for vaddr, reloc in p.boundaries] for p in m.plan.probes]
                    for m in planned]
        assert decode_bounds(encode(planned)) == expected
        assert all(0 <= reloc < len(m.plan.text) for m, patches in zip(planned, expected)
                   for pairs in patches for _, reloc in pairs)
    assert {p.mechanism for m in modules for p in m.plan.probes} >= {"jump", "pun", "evict"}
