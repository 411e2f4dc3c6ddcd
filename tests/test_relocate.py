"""Differential tests of the x86-64 relocator.

Each case runs the ORIGINAL instructions at address A and the RELOCATED code at address B
(followed by `jmp A_end`) under unicorn, from the same random registers, flags and memory, until
the program counter reaches an exit (A_end or a branch target).  Both runs must agree on the exit,
every general register, the flags, the xmm registers and all mapped memory.  In the relocated run
the original bytes at A are int3, as the probe overwrote them: running them faults.

The only memory exempt from comparison: after a `call`, the stack below the pushed return address,
which belongs to the callee (the call emulation uses it as scratch, as any callee frame would).

Originals are assembled with keystone (which picks rel8 or rel32 by distance) and each case checks
with capstone that the code decodes into exactly the instructions it generated.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import capstone
import keystone
import pytest
import unicorn
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from support import properties
from support.emulation import contiguous
from unicorn import x86_const as R

from jprobe.errors import RelocationError
from jprobe.trampolines.relocate import can_relocate, decoder, relocate

PAGE = 0x1000
REGION = 0x10000  # the near region around A: code, near exits, near data, pointers
CODE_AT = 0x8000  # A = region + CODE_AT + (0 .. 0xf00)
EXIT_ZONE = range(0x4000, 0x7000)  # near branch targets (never executed: they are exits)
DATA_ZONE = range(0x9000, 0xF000)  # near rip-relative data
POINTER_ZONE = range(0x1000, 0x2000, 8)  # near function pointers read by indirect calls
STACK = 0x7FF0_0000_0000
STACK_SIZE = 0x4000
REACH = 2**31
MARGIN = PAGE  # references this close to the ±2 GiB limit may be accepted or refused
CALL_SCRATCH = 24  # bytes below the return-address slot that are the callee's after a call

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip
REG = {name: getattr(R, f"UC_X86_REG_{name.upper()}") for name in GPR_NAMES}
GPRS = tuple(REG.values())
RSP = REG["rsp"]
XMMS = tuple(getattr(R, f"UC_X86_REG_XMM{i}") for i in range(16))
# CF PF AF ZF SF DF OF: every flag user code can read or write.
FLAG_BITS = (1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 10, 1 << 11)
FLAG_MASK = sum(FLAG_BITS)
CONDITION_FLAGS = (1 << 0, 1 << 2, 1 << 6, 1 << 7, 1 << 11)  # CF PF ZF SF OF: what jcc reads
CONDITIONS = ("jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja",
              "js", "jns", "jp", "jnp", "jl", "jge", "jle", "jg")  # fmt: skip

KS = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)


def hypothesis_settings(examples: int) -> settings:
    """Enough examples to hit every form and flag combination, few enough to stay fast."""
    return settings(
        deadline=None, max_examples=properties.examples(examples), suppress_health_check=[HealthCheck.too_slow]
    )


# ---------------------------------------------------------------------------------------------
# Machine state and one run


@dataclass
class State:
    """Registers and memory (by 4 KiB page) that both runs start from."""

    regs: dict[int, int]
    flags: int
    memory: dict[int, bytearray] = field(default_factory=dict)

    def write(self, address: int, data: bytes) -> None:
        """Store into mapped pages (how a case plants pointers)."""
        for i, byte in enumerate(data):
            self.memory[(address + i) & ~(PAGE - 1)][(address + i) % PAGE] = byte

    def map_random(self, address: int, size: int, rng: random.Random) -> None:
        """Map the pages covering [address, address+size) with random contents."""
        for page in range((address & ~(PAGE - 1)), address + size, PAGE):
            self.memory.setdefault(page, bytearray(rng.randbytes(PAGE)))


@dataclass(frozen=True)
class Outcome:
    """What a run leaves behind."""

    exit: int
    gprs: tuple[int, ...]
    flags: int
    xmms: tuple[int, ...]
    memory: dict[int, bytes]


def execute(state: State, code: bytes, start: int, exits: set[int], poison: range) -> Outcome:
    """Run `code` placed at `start` until pc reaches an exit; `poison` is overwritten by int3."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.ctl_set_cpu_model(R.UC_CPU_X86_HASWELL)  # SSE4.1 (pinsrd) and friends
    pages = {page: bytes(contents) for page, contents in state.memory.items()}
    for page in range(start & ~(PAGE - 1), start + len(code), PAGE):
        pages.setdefault(page, bytes(PAGE))
    runs = contiguous(pages)
    for address, contents in runs:
        uc.mem_map(address, len(contents))
        uc.mem_write(address, contents)
    uc.mem_write(poison.start, b"\xcc" * len(poison))
    uc.mem_write(start, code)
    for reg, value in state.regs.items():
        uc.reg_write(reg, value)
    uc.reg_write(R.UC_X86_REG_RFLAGS, state.flags | 2)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits(sorted(exits))
    uc.emu_start(start, 0, count=64)
    memory = {}
    for address, contents in runs:
        after = bytes(uc.mem_read(address, len(contents)))
        for page in range(address, address + len(contents), PAGE):
            if page in state.memory:
                memory[page] = after[page - address : page - address + PAGE]
    return Outcome(
        exit=uc.reg_read(R.UC_X86_REG_RIP),
        gprs=tuple(uc.reg_read(r) for r in GPRS),
        flags=uc.reg_read(R.UC_X86_REG_RFLAGS) & FLAG_MASK,
        xmms=tuple(uc.reg_read(r) for r in XMMS),
        memory=memory,
    )


# ---------------------------------------------------------------------------------------------
# Cases: original instructions ("parts") laid out at A


Assemble = Callable[[int, Sequence[int]], bytes]
"""(own address, start address of every part followed by A_end) -> machine code."""


@dataclass(frozen=True)
class Part:
    """One original instruction.  Its size is known before the layout (so that a branch can
    target a later part); `setup` plants in the state what it needs (a pointer, a register)."""

    size: int
    assemble: Assemble
    exits: frozenset[int] = frozenset()  # where control may leave the displaced code
    references: frozenset[int] = frozenset()  # absolute addresses the moved code must reach
    setup: Callable[[State], None] = lambda state: None
    is_call: bool = False


@dataclass
class Case:
    """One differential experiment."""

    a: int
    b: int
    parts: list[Part]
    state: State

    @property
    def addresses(self) -> list[int]:
        """Start of each part, then A_end."""
        out = [self.a]
        for part in self.parts:
            out.append(out[-1] + part.size)
        return out

    @property
    def end(self) -> int:
        return self.addresses[-1]

    def __repr__(self) -> str:
        """Short enough for hypothesis to print: the placement and the original code."""
        return f"Case(a={self.a:#x}, b={self.b:#x}, code={self.code().hex()})"

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(repr(self))

    def code(self) -> bytes:
        """The original machine code, checked to decode into exactly the generated parts."""
        addrs = self.addresses
        code = b"".join(part.assemble(at, addrs) for part, at in zip(self.parts, addrs))
        sizes = [insn.size for insn in decoder().disasm(code, self.a)]
        assert sizes == [part.size for part in self.parts], code.hex()
        return code

    def exits(self) -> set[int]:
        return {self.end}.union(*(part.exits for part in self.parts))

    def references(self) -> set[int]:
        """What the relocated code must reach with a rel32: direct targets, rip-relative data,
        A_end (a call's return address; the jmp back)."""
        return {self.end}.union(*(part.references for part in self.parts))


def asm(text: str, at: int, prefix: bytes = b"") -> bytes:
    """Keystone at `at`; a raw `prefix` (what keystone cannot spell: notrack, bnd, addr32 loop)
    keeps targets right because the instruction proper is assembled just after it."""
    code, _ = KS.asm(text, at + len(prefix))
    return prefix + bytes(code)


def rip(disp: int) -> str:
    """Keystone's spelling of a rip-relative displacement."""
    return f"rip {'-' if disp < 0 else '+'} {abs(disp):#x}"


def fixed(text: str, prefix: bytes = b"", **extra) -> Part:
    """A position-independent instruction."""
    code = asm(text, 0, prefix)
    return Part(len(code), lambda at, addrs: code, **extra)


def rip_relative(template: str, target: int, **extra) -> Part:
    """`template` whose `{rip}` addresses the absolute `target` wherever the part lands."""
    size = len(asm(template.format(rip=rip(0x1000_0000)), 0))

    def assemble(at: int, addrs: Sequence[int]) -> bytes:
        code = asm(template.format(rip=rip(target - at - size)), at)
        assert len(code) == size, (template, code.hex())
        return code

    return Part(size, assemble, references=frozenset({target}), **extra)


def branch(
    mnemonic: str, target: int | None, size: int, later: int = 0, prefix: bytes = b"", **extra
) -> Part:
    """A relative branch to `target`, or (target None) to the part `later` places after itself
    (A_end if that is the end).  `size` says which form keystone must have picked."""

    def assemble(at: int, addrs: Sequence[int]) -> bytes:
        to = target if target is not None else addrs[addrs.index(at) + later]
        code = asm(f"{mnemonic} {to:#x}", at, prefix)
        assert len(code) == size, (mnemonic, hex(at), hex(to), code.hex())
        return code

    exits = frozenset() if target is None else frozenset({target})
    return Part(size, assemble, exits=exits, references=exits, **extra)


def set_reg(name: str, value: int) -> Callable[[State], None]:
    """Setup: a register an instruction needs (a call target, a base register, rcx)."""
    return lambda state: state.regs.__setitem__(REG[name], value % 2**64)


def plant(address: int, value: int) -> Callable[[State], None]:
    """Setup: a 64-bit pointer an indirect branch reads."""
    return lambda state: state.write(address, value.to_bytes(8, "little"))


def combined(*setups: Callable[[State], None]) -> Callable[[State], None]:
    """Setup: several of them, in order."""

    def setup(state: State) -> None:
        for one in setups:
            one(state)

    return setup


# ---------------------------------------------------------------------------------------------
# Strategies

u64 = st.integers(0, 2**64 - 1)
Draw = st.DrawFn


def new_state(rng: random.Random, region: int, rsp: int, flags: int, gprs: Sequence[int]) -> State:
    """Random xmm registers and memory (near region, stack) around the given registers."""
    state = State(dict(zip(GPRS, gprs)) | {RSP: rsp}, flags)
    state.regs.update((xmm, rng.getrandbits(128)) for xmm in XMMS)
    state.map_random(region, REGION, rng)
    state.map_random(STACK, STACK_SIZE, rng)
    return state


@dataclass(frozen=True)
class World:
    """Where a case lives: A, B, the near region, a seeded random source."""

    a: int
    b: int
    state: State
    rng: random.Random

    @property
    def region(self) -> int:
        return self.a & ~(REGION - 1)


@st.composite
def worlds(draw: Draw) -> World:
    """A in a random near region; B near it or up to ~1.9 GiB away; random registers (rsp in
    the stack), flags and memory."""
    region = REGION * draw(st.integers(0x1_0000, 0x6FFF_0000))
    a = region + CODE_AT + draw(st.integers(0, 0xF00))
    if draw(st.booleans()):
        distance = st.integers(0x2_0000, 0x7900_0000) | st.integers(0x6000_0000, 0x7900_0000)
        b = a + draw(st.sampled_from((-1, 1))) * draw(distance)
    else:
        b = region + REGION + draw(st.integers(0, 0xF00))
    rng = random.Random(draw(st.integers(0, 2**32)))
    rsp = STACK + STACK_SIZE // 2 + 8 * draw(st.integers(-64, 64))
    flags = draw(st.integers(0, 2 ** len(FLAG_BITS) - 1))
    flags = sum(bit for i, bit in enumerate(FLAG_BITS) if flags >> i & 1)
    gprs = [rng.getrandbits(64) for _ in GPRS]
    return World(a, b, new_state(rng, region, rsp, flags, gprs), rng)


PartsOf = Callable[[Draw, World], list[Part]]


@st.composite
def cases(draw: Draw, parts_of: PartsOf) -> Case:
    """A case whose instructions come from `parts_of`; the pages they reference are mapped,
    and must not collide with B's code."""
    world = draw(worlds())
    case = Case(world.a, world.b, parts_of(draw, world), world.state)
    for part in case.parts:
        part.setup(case.state)
    assume(not set(range(case.b & ~(PAGE - 1), case.b + 512, PAGE)) & set(case.state.memory))
    return case


def single(make: Callable[[Draw, World], Part]) -> PartsOf:
    return lambda draw, world: [make(draw, world)]


def far_address(draw: Draw, world: World, size: int = 16) -> int:
    """An address up to 2 GiB from A, on a freshly mapped page."""
    offset = draw(st.integers(0x2_0000, REACH - PAGE) | st.integers(REACH - 2**28, REACH - PAGE))
    address = world.a + draw(st.sampled_from((-1, 1))) * offset
    world.state.map_random(address, size, world.rng)
    return address


def exit_target(draw: Draw, world: World) -> int:
    """An external branch target: near A, or far away."""
    if draw(st.booleans()):
        return far_address(draw, world)
    return world.region + draw(st.sampled_from(EXIT_ZONE))


def short_target(draw: Draw, world: World) -> int:
    """An external target within rel8 reach from any instruction of a case: outside the first
    48 bytes at A, which hold all the code a case generates."""
    return world.a + draw(st.integers(-80, -1) | st.integers(48, 100))


RIP_DATA = (  # (template, alignment of the access)
    ("mov rax, qword ptr [{rip}]", 1),
    ("mov qword ptr [{rip}], rbx", 1),
    ("mov dword ptr [{rip}], {imm32:#x}", 1),
    ("mov word ptr [{rip}], {imm16:#x}", 1),
    ("mov byte ptr [{rip}], {imm8:#x}", 1),
    ("lea rcx, [{rip}]", 1),
    ("lea r13, [{rip}]", 1),
    ("cmp byte ptr [{rip}], {imm8:#x}", 1),
    ("cmp qword ptr [{rip}], {imm32:#x}", 1),
    ("add dword ptr [{rip}], {imm32:#x}", 1),
    ("add r9, qword ptr [{rip}]", 1),
    ("test byte ptr [{rip}], {imm8:#x}", 1),
    ("imul rdx, qword ptr [{rip}], {imm32:#x}", 1),
    ("shl dword ptr [{rip}], {imm5}", 1),
    ("inc qword ptr [{rip}]", 1),
    ("bt dword ptr [{rip}], {imm5}", 1),
    ("setne byte ptr [{rip}]", 1),
    ("cmovne rax, qword ptr [{rip}]", 1),
    ("movzx eax, word ptr [{rip}]", 1),
    ("xchg qword ptr [{rip}], rsi", 1),
    ("lock cmpxchg qword ptr [{rip}], rdi", 1),
    ("push qword ptr [{rip}]", 1),
    ("pop qword ptr [{rip}]", 1),
    ("movsd xmm1, qword ptr [{rip}]", 1),
    ("movss dword ptr [{rip}], xmm3", 1),
    ("addsd xmm0, qword ptr [{rip}]", 1),
    ("movaps xmm2, xmmword ptr [{rip}]", 16),
    ("pshufd xmm4, xmmword ptr [{rip}], {imm8:#x}", 16),
    ("pinsrd xmm5, dword ptr [{rip}], {imm2}", 1),
)


def rip_data(draw: Draw, world: World) -> Part:
    """A rip-relative data instruction (with or without an immediate after the displacement)
    addressing near data or a page up to 2 GiB away."""
    template, align = draw(st.sampled_from(RIP_DATA))
    if draw(st.booleans()):
        target = far_address(draw, world)
    else:
        target = world.region + draw(st.sampled_from(DATA_ZONE))
    rng = world.rng
    imms = dict(imm32=rng.getrandbits(31), imm16=rng.getrandbits(16), imm8=rng.getrandbits(7),
                imm5=rng.getrandbits(5), imm2=rng.getrandbits(2))  # fmt: skip
    text = template.replace("{rip}", "{{rip}}").format(**imms)
    return rip_relative(text, target - target % align)


def jump(draw: Draw, world: World) -> Part:
    """jmp or any jcc to an external target: rel8 when near A, rel32 otherwise; sometimes with
    a branch hint (2E/3E) or bnd (F2) prefix, which relocation may drop."""
    mnemonic = draw(st.sampled_from(("jmp",) + CONDITIONS))
    prefixes = (b"", b"\xf2") if mnemonic == "jmp" else (b"", b"\x2e", b"\x3e")
    prefix = draw(st.sampled_from(prefixes))
    if draw(st.booleans()):
        return branch(mnemonic, short_target(draw, world), 2 + len(prefix), prefix=prefix)
    size = (5 if mnemonic == "jmp" else 6) + len(prefix)
    return branch(mnemonic, exit_target(draw, world), size, prefix=prefix)


LOOPS = (("loop", b""), ("loope", b""), ("loopne", b""), ("jrcxz", b""), ("jecxz", b""),
         ("loop", b"\x67"), ("loopne", b"\x67"))  # fmt: skip  (0x67: counts in ecx)


def loop(draw: Draw, world: World, later: int = 0) -> Part:
    """A loop-like instruction to an external target, or to the part `later` places after it;
    rcx around 0, 1 and 2^32 (where ecx and rcx disagree)."""
    mnemonic, prefix = draw(st.sampled_from(LOOPS))
    size = 2 + (prefix != b"" or mnemonic == "jecxz")
    target = None if later else short_target(draw, world)
    rcx = draw(st.sampled_from((0, 1, 2, 2**32, 2**32 + 1, 2**64 - 1)) | u64)
    return branch(mnemonic, target, size, later, prefix, setup=set_reg("rcx", rcx))


CALL_PREFIXES = (b"", b"\x3e", b"\xf2")  # none, notrack, bnd


def pointer_slot(draw: Draw, world: World, near_rsp: bool) -> int:
    """Where an indirect call finds its target: near data, or the stack right around rsp
    (including the slots the call itself and its emulation write: rsp-8, -16, -24)."""
    if not near_rsp and draw(st.booleans()):
        return world.region + draw(st.sampled_from(POINTER_ZONE))
    return world.state.regs[RSP] + draw(st.sampled_from((-24, -16, -8, 0, 8, 0x40, -0x48, 0x400)))


def memory_operand(draw: Draw, world: World) -> tuple[str, int, Callable[[State], None]]:
    """`[base + index*scale + disp]` (optionally fs:), the slot it addresses and the register
    setup.  An rsp base is used as it is (the slot is then on the stack); other registers are
    solved for."""
    base = draw(st.sampled_from(GPR_NAMES))
    slot = pointer_slot(draw, world, near_rsp=base == "rsp")
    index = draw(st.sampled_from([None] + [r for r in GPR_NAMES if r not in ("rsp", base)]))
    scale = draw(st.sampled_from((1, 2, 4, 8)))
    index_value = draw(st.integers(-4, 4))
    fs = base != "rsp" and draw(st.booleans())
    fs_base = world.rng.getrandbits(40) if fs else 0
    if base == "rsp":
        disp = slot - world.state.regs[RSP] - index_value * scale * (index is not None)
    else:
        disp = draw(st.sampled_from((0, 8, -8, 0x7F, 0x80, -0x81, 0x12345)))
    scaled = f" + {index}*{scale}" if index else ""
    text = f"{'fs:' if fs else ''}[{base}{scaled} {'-' if disp < 0 else '+'} {abs(disp):#x}]"
    base_value = slot - fs_base - disp - index_value * scale * (index is not None)

    def setup(state: State) -> None:
        if index:
            set_reg(index, index_value)(state)
        if base != "rsp":
            set_reg(base, base_value)(state)
        state.regs[R.UC_X86_REG_FS_BASE] = fs_base

    return text, slot, setup


def call(draw: Draw, world: World, forms: Sequence[str] = ("rel32", "reg", "mem", "rip")) -> Part:
    """Every form of near call, with the prefixes compilers emit (notrack, bnd)."""
    form = draw(st.sampled_from(forms))
    prefix = draw(st.sampled_from(CALL_PREFIXES if form != "rel32" else (b"", b"\xf2")))
    target = exit_target(draw, world)
    if form == "rel32":
        return branch("call", target, 5 + len(prefix), prefix=prefix, is_call=True)
    if form == "reg":
        reg = draw(st.sampled_from(GPR_NAMES))
        if reg == "rsp":  # calls into the stack: the target is rsp as it was
            target = world.state.regs[RSP]
        return fixed(f"call {reg}", prefix, exits=frozenset({target}), setup=set_reg(reg, target),
                     is_call=True)  # fmt: skip
    if form == "rip":
        slot = world.region + draw(st.sampled_from(POINTER_ZONE))
        return rip_relative("call qword ptr [{rip}]", slot, exits=frozenset({target}),
                            setup=plant(slot, target), is_call=True)  # fmt: skip
    operand, slot, setup = memory_operand(draw, world)
    return fixed(f"call qword ptr {operand}", prefix, exits=frozenset({target}),
                 setup=combined(setup, plant(slot, target)), is_call=True)  # fmt: skip


def indirect(draw: Draw, world: World) -> Part:
    """Indirect jumps and returns: copied, with a rip-relative fix-up for `jmp [rip+x]`."""
    form = draw(st.sampled_from(("jmp reg", "jmp mem", "jmp rip", "ret", "ret imm")))
    target = exit_target(draw, world)
    exits = frozenset({target})
    if form == "jmp reg":
        reg = draw(st.sampled_from([r for r in GPR_NAMES if r != "rsp"]))
        return fixed(f"jmp {reg}", exits=exits, setup=set_reg(reg, target))
    if form == "jmp rip":
        slot = world.region + draw(st.sampled_from(POINTER_ZONE))
        return rip_relative("jmp qword ptr [{rip}]", slot, exits=exits, setup=plant(slot, target))
    if form.startswith("ret"):
        text = "ret" if form == "ret" else f"ret {draw(st.integers(0, 0x100)) * 8:#x}"
        return fixed(text, exits=exits, setup=plant(world.state.regs[RSP], target))
    operand, slot, setup = memory_operand(draw, world)
    setup = combined(setup, plant(slot, target))
    return fixed(f"jmp qword ptr {operand}", exits=exits, setup=setup)


PLAIN = ("add rax, rbx", "sub rcx, 1", "mov ecx, 5", "xor edx, edx", "cmp rdi, rsi",
         "test eax, eax", "inc r8", "push rbx", "pop r10", "nop", "lea rdx, [rax + rbx*2 + 5]",
         "movsxd rax, ecx", "setne al", "cmovl rbx, rcx", "std", "cld", "stc", "sahf", "lahf",
         "neg r11", "shl rax, cl", "bswap rdx", "mov rbp, rsp", "sub rsp, 0x18", "pushfq",
         "cmp byte ptr [rsp + 8], 3")  # fmt: skip


def sequence(draw: Draw, world: World) -> list[Part]:
    """2-3 instructions: plain ones, rip-relative data, branches leaving or skipping forward
    inside the displaced code (rel8), loop-likes; possibly ending in a call."""
    count = draw(st.integers(2, 3))
    parts: list[Part] = []
    for position in range(count):
        kinds = ["plain", "rip", "jump", "skip", "loop"]
        kinds += ["call"] if position == count - 1 else []
        kind = draw(st.sampled_from(kinds))
        later = draw(st.integers(1, count - position))  # forward, A_end included
        if kind == "plain":
            parts.append(fixed(draw(st.sampled_from(PLAIN))))
        elif kind == "rip":
            parts.append(rip_data(draw, world))
        elif kind == "jump":
            parts.append(jump(draw, world))
        elif kind == "skip":
            parts.append(branch(draw(st.sampled_from(("jmp",) + CONDITIONS)), None, 2, later))
        elif kind == "loop":
            parts.append(loop(draw, world, later if draw(st.booleans()) else 0))
        else:  # forms whose target no earlier instruction can disturb
            parts.append(call(draw, world, forms=("rel32", "rip")))
    return parts


# ---------------------------------------------------------------------------------------------
# The differential check

Relocator = Callable[[Sequence[capstone.CsInsn], int], bytes]


@dataclass(frozen=True)
class Verdict:
    """How a case went: `kind` (for statistics) and every observable difference."""

    kind: str
    differences: list[str]


def check(case: Case, relocator: Relocator = relocate) -> Verdict:
    """Relocate `case` to B and compare the runs.  A case that references something beyond
    ±2 GiB of B must be refused instead, and only such a case."""
    code = case.code()
    insns = list(decoder().disasm(code, case.a))
    distance = max(abs(ref - case.b) for ref in case.references())
    try:
        moved = relocator(insns, case.b)
    except RelocationError as error:
        assert distance > REACH - MARGIN, f"refused a reachable case: {error}"
        assert "out of ±2 GiB reach" in str(error), str(error)
        return Verdict("refused: out of reach", [])
    assert distance < REACH + MARGIN, f"relocated a case with a reference {distance:#x} from B"
    if relocator is relocate:
        assert_layout_is_fixed(insns, case.b, moved)
    exits = case.exits()
    original = execute(case.state, code, case.a, exits, poison=range(0))
    assert original.exit in exits, f"generated case never exits: {code.hex()}"
    tail = asm(f"jmp {case.end:#x}", case.b + len(moved))
    try:
        relocated = execute(case.state, moved + tail, case.b, exits, poison=range(case.a, case.end))
    except unicorn.UcError as error:
        return Verdict("fault", [f"relocated run faulted: {error}"])
    kind = "left at A_end" if original.exit == case.end else "left by a branch"
    kind += ", moved over 1 GiB from a reference" if distance > 2**30 else ""
    return Verdict(kind, differences(case, original, relocated))


def assert_layout_is_fixed(insns: Sequence[capstone.CsInsn], dest: int, moved: bytes) -> None:
    """Deterministic output whose size does not depend on where it goes, and a one-instruction
    verdict (`can_relocate`) that agrees with the whole."""
    assert relocate(insns, dest) == moved
    assert len(relocate(insns, insns[0].address + 0x100)) == len(moved)
    assert all(can_relocate(insn) is None for insn in insns)


def differences(case: Case, original: Outcome, relocated: Outcome) -> list[str]:
    """Every observable difference: exit, registers, flags, memory (bar the exempt bytes)."""
    found = []
    if original.exit != relocated.exit:
        found.append(f"exit {original.exit:#x} != {relocated.exit:#x}")
    for name, want, got in zip(GPR_NAMES, original.gprs, relocated.gprs):
        if want != got:
            found.append(f"{name} {want:#x} != {got:#x}")
    if original.flags != relocated.flags:
        found.append(f"flags {original.flags:#x} != {relocated.flags:#x}")
    for i, (want, got) in enumerate(zip(original.xmms, relocated.xmms)):
        if want != got:
            found.append(f"xmm{i} {want:#x} != {got:#x}")
    exempt = range(case.a, case.end)
    if case.parts[-1].is_call:
        rsp = original.gprs[GPRS.index(RSP)]
        exempt = [*exempt, *range(rsp - CALL_SCRATCH, rsp)]
        return_address = case.end.to_bytes(8, "little")
        pushed = [run.memory[rsp & ~(PAGE - 1)][rsp % PAGE :][:8] for run in (original, relocated)]
        if pushed[0] == return_address != pushed[1]:  # the call ran: the callee must see A_end
            seen = pushed[1][::-1].hex()
            found.append(f"the callee sees return address {seen}, not {case.end:#x}")
    for page, want in original.memory.items():
        got = relocated.memory[page]
        if want != got:
            changed = [page + i for i, (x, y) in enumerate(zip(want, got)) if x != y]
            found += [f"memory at {address:#x}" for address in changed if address not in exempt][:4]
    return found


def describe(case: Case, relocator: Relocator = relocate) -> str:
    """The original and the relocated code, for a failure message."""
    insns = list(decoder().disasm(case.code(), case.a))
    lines = [f"{i.address:#x}: {i.mnemonic} {i.op_str}" for i in insns]
    try:
        moved = relocator(insns, case.b)
        relocated = decoder().disasm(moved, case.b)
        lines += [f"  {i.address:#x}: {i.mnemonic} {i.op_str}" for i in relocated]
    except RelocationError as error:
        lines.append(f"  {error}")
    return "\n".join(lines)


def assert_same_effect(case: Case) -> Verdict:
    verdict = check(case)
    assert not verdict.differences, f"{verdict.differences}\n{describe(case)}"
    return verdict


def differential(examples: int, parts_of: PartsOf) -> Callable:
    """A hypothesis test of `examples` cases from `parts_of`, each required to have the same
    effect relocated; the kinds of outcome are reported with --hypothesis-show-statistics."""

    def decorate(test: Callable) -> Callable:
        @hypothesis_settings(examples)
        @given(case=cases(parts_of))
        def run(case: Case) -> None:
            event(assert_same_effect(case).kind)

        run.__doc__ = test.__doc__
        run.__name__ = test.__name__
        return run

    return decorate


# ---------------------------------------------------------------------------------------------
# Differential tests, by category

REGION_AT = 0x5555_0000_0000
A = REGION_AT + CODE_AT


def fixed_state(rng: random.Random, flags: int = 0) -> State:
    """A random state for the hand-made cases below (A and B fixed)."""
    gprs = [rng.getrandbits(64) for _ in GPRS]
    return new_state(rng, REGION_AT, STACK + STACK_SIZE // 2, flags, gprs)




@differential(600, single(rip_data))
def test_rip_relative_data() -> None:
    """Loads, stores, lea, ALU with an immediate after the disp32, SSE; near and far data."""


@differential(500, single(jump))
def test_jmp_and_jcc() -> None:
    """jmp and all 16 jcc, rel8 and rel32, taken or not by random flags."""


@differential(400, single(loop))
def test_loop_like() -> None:
    """loop/loope/loopne/jrcxz/jecxz and addr32 loops, rcx around 0, 1 and 2^32."""


@differential(800, single(call))
def test_call() -> None:
    """call rel32, call reg (rsp too), call [base+index*scale+disp] (rsp base, slots aliasing
    the pushed one, fs:), call [rip+x]; plain, notrack and bnd."""


@differential(300, single(indirect))
def test_indirect_jmp_and_ret() -> None:
    """jmp reg, jmp [mem], jmp [rip+x], ret, ret imm16."""


@differential(800, sequence)
def test_sequences() -> None:
    """2-3 instructions with branches inside the displaced code, ending anywhere or in a call."""


@pytest.mark.parametrize("mnemonic", CONDITIONS)
def test_jcc_every_flag_combination(mnemonic: str) -> None:
    """Each condition, rel8 and rel32, under all 32 combinations of CF PF ZF SF OF: both
    outcomes happen, and always as in the original."""
    rng = random.Random(mnemonic)
    kinds = set()
    for flags in range(32):
        bits = sum(bit for i, bit in enumerate(CONDITION_FLAGS) if flags >> i & 1)
        for target, size in ((A + 0x40, 2), (REGION_AT + EXIT_ZONE.start, 6)):
            state = fixed_state(rng, flags=bits)
            case = Case(A, A + 0x5000_0000, [branch(mnemonic, target, size)], state)
            kinds.add(assert_same_effect(case).kind)
    assert {kind.split(",")[0] for kind in kinds} == {"left at A_end", "left by a branch"}


# ---------------------------------------------------------------------------------------------
# The harness can fail: deliberately wrong relocations are caught

def copied(insns: Sequence[capstone.CsInsn], dest: int) -> bytes:
    """The classic mistake: moving instructions without re-encoding anything."""
    return b"".join(bytes(insn.bytes) for insn in insns)


def call_pushing_its_own_address(insns: Sequence[capstone.CsInsn], dest: int) -> bytes:
    """A `call rel32` re-encoded as a plain call: the callee returns into the trampoline."""
    return b"\xe8" + (insns[-1].operands[0].imm - dest - 5).to_bytes(4, "little", signed=True)


def jumps_not_mapped(insns: Sequence[capstone.CsInsn], dest: int) -> bytes:
    """Branches re-encoded to their original targets, even those inside the displaced code."""
    out = b""
    for insn in insns:
        if insn.group(capstone.CS_GRP_JUMP):
            rel = insn.operands[0].imm - (dest + len(out) + 5)
            out += b"\xe9" + rel.to_bytes(4, "little", signed=True)
        else:
            out += bytes(insn.bytes)
    return out


def test_harness_catches_an_unfixed_rip_relative_operand() -> None:
    data = REGION_AT + DATA_ZONE.start
    parts = [rip_relative("lea rcx, [{rip}]", data)]
    case = Case(A, A + 0x4000_0000, parts, fixed_state(random.Random(1)))
    assert check(case, copied).differences == [f"rcx {data:#x} != {data + 0x4000_0000:#x}"]
    assert check(case).differences == []


def test_harness_catches_a_wrong_return_address() -> None:
    target = REGION_AT + EXIT_ZONE.start
    parts = [branch("call", target, 5, is_call=True)]
    case = Case(A, A + 0x4000_0000, parts, fixed_state(random.Random(2)))
    found = check(case, call_pushing_its_own_address).differences
    assert found and found[0].startswith("the callee sees return address")
    assert check(case).differences == []


def test_harness_catches_a_branch_into_the_overwritten_code() -> None:
    parts = [branch("jmp", None, 2, later=1), fixed("inc rax"), fixed("nop")]
    case = Case(A, A + 0x100_0000, parts, fixed_state(random.Random(3)))
    assert check(case, jumps_not_mapped).differences[0].startswith("relocated run faulted")
    assert check(case).differences == []


# ---------------------------------------------------------------------------------------------
# Refusals and their messages


def decode(text: str, at: int = A) -> list[capstone.CsInsn]:
    """Assembly (or hex bytes, for what keystone cannot spell) decoded at `at`."""
    code = bytes.fromhex(text) if re.fullmatch(r"[0-9a-f]+", text) else asm(text, at)
    return list(decoder().disasm(code, at))


def test_rip_relative_target_out_of_reach() -> None:
    insns = decode("mov rax, qword ptr [rip + 0x100]")
    with pytest.raises(RelocationError) as error:
        relocate(insns, A + REACH + PAGE)
    assert str(error.value) == (
        f"cannot relocate 'mov rax, qword ptr [rip + 0x100]' at {A:#x}: rip-relative target "
        f"{A + 0x107:#x} out of ±2 GiB reach from {A + REACH + PAGE + 7:#x}"
    )
    assert len(relocate(insns, A + REACH - PAGE)) == 7  # just within reach


def test_branch_target_out_of_reach() -> None:
    insns = decode(f"jne {A - PAGE:#x}")
    expected = rf"^cannot relocate 'jne {A - PAGE:#x}' at {A:#x}: branch target .* out of ±2 GiB"
    with pytest.raises(RelocationError, match=expected):
        relocate(insns, A + REACH)


def test_call_must_be_last() -> None:
    insns = decode(f"call {A + 0x100:#x}; nop")
    with pytest.raises(RelocationError) as error:
        relocate(insns, A + 0x1000)
    assert str(error.value) == (
        f"cannot relocate 'call {A + 0x100:#x}' at {A:#x}: a call returns to the original code, "
        "so it must be the last displaced instruction"
    )
    assert relocate(insns[:1], A + 0x1000)


@pytest.mark.parametrize(
    "code, reason",
    [
        ("c7f800000000", "xbegin cannot move: its relative target has no re-encoding"),
        ("syscall", "syscall hands its own rip to the kernel"),
        ("int3", "int3 hands its own rip to the kernel"),
        ("int 0x80", "int hands its own rip to the kernel"),
        ("ff1c24", "a far call pushes cs:rip"),
        ("48ff1c24", "a far call pushes cs:rip"),
        ("66e800000000", "prefix 66 may change a relative branch"),
        ("66ffd0", "prefix 66 may change an indirect call"),
        ("6766e300", "prefix 66 may change a relative branch"),
        ("678b0500000000", "addr32 truncates its rip-relative address"),
        ("ebff", f"branches into the middle of a displaced instruction ({A + 1:#x})"),
        ("8b05faffffff", f"accesses {A:#x}, inside the displaced code"),
        ("488d05fbffffff", f"takes the address {A + 2:#x} inside the displaced code"),
    ],
)
def test_refusals(code: str, reason: str) -> None:
    (insn,) = decode(code)
    assert can_relocate(insn) == reason
    expected = rf"^cannot relocate '.*' at {A:#x}: {re.escape(reason)}$"
    with pytest.raises(RelocationError, match=expected):
        relocate([insn], A + 0x1000)


@pytest.mark.parametrize(
    "text",
    ["lea rax, [rip - 7]", "nop", "f30f1efa", "ret", "jmp qword ptr [rip + 0x10]",
     "call qword ptr [rsp + 8]", "vmovdqu ymm1, ymmword ptr [rip + 0x10]"],
)  # fmt: skip
def test_accepted(text: str) -> None:
    """Including `lea` of the probe site itself: its first byte is a valid entry point."""
    (insn,) = decode(text)
    assert can_relocate(insn) is None


def test_branches_inside_the_displaced_code() -> None:
    """To a later instruction: its relocated copy.  Back to the first: the probe site, which the
    original code re-enters (so a loop through the probe counts every pass)."""
    insns = decode(f"nop; jne {A + 5:#x}; jne {A:#x}; nop; nop")
    moved = list(decoder().disasm(relocate(insns, A + 0x1000), A + 0x1000))
    assert [(i.mnemonic, i.operands[0].imm if i.operands else None) for i in moved] == [
        ("nop", None), ("jne", A + 0x1000 + 13), ("jne", A), ("nop", None), ("nop", None),
    ]  # fmt: skip


def test_api_basics() -> None:
    assert decoder() is decoder() and decoder().detail
    assert relocate([], A) == b""
    with pytest.raises(ValueError, match="not consecutive"):
        relocate(decode("nop") + decode("nop", A + 2), A + 0x1000)


def test_instructions_that_move_alone_may_not_move_together():
    """`lea rdi, [rip - 7]` after a 1-byte nop takes the lea's own address:
    alone it moves (the address is outside it), with the nop it would point into the copy."""
    from jprobe.trampolines.relocate import can_relocate, can_relocate_together
    from jprobe.trampolines.x86_64 import decode
    nop, lea = decode(b"\x90\x48\x8d\x3d\xf9\xff\xff\xff", 0x1000)
    assert (lea.mnemonic, lea.address + lea.size - 7) == ("lea", 0x1001)
    assert can_relocate(nop) is None and can_relocate(lea) is None
    assert can_relocate_together([nop]) is None
    assert "inside the displaced code" in can_relocate_together([nop, lea])
