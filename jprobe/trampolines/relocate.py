"""Re-encode x86-64 instructions so that they run at another address with the same effect.

A jump probe overwrites the instructions at a site with `jmp rel32`; the trampoline runs those
displaced instructions from a new address.  Only a few things in an x86-64 instruction depend on
where it sits, and each is handled here:

* a rip-relative memory operand: its disp32 is rewritten to reach the same absolute address;
* a relative branch (`jmp`, `jcc`, `loop`-like, `call`): re-encoded to reach the same target;
* `call` pushes its own next address: it is emulated so that the callee still sees the
  ORIGINAL return address (unwinders and C++ exceptions look it up in the original code).

Everything else is copied byte for byte.  What cannot be moved with a proof of equal effect is
refused with `RelocationError`, so that the caller falls back to another mechanism (a trap).

Every output size depends only on the instruction, never on `dest` or on the targets, so a
trampoline's layout is known before it is placed, and the output is deterministic.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

import capstone
from capstone import CS_GRP_BRANCH_RELATIVE, CS_GRP_INT, CS_GRP_IRET, CsInsn, x86

from jprobe.errors import RelocationError

__all__ = ["decoder", "relocate", "relocate_with_copies", "can_relocate"]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

# Legacy prefixes; a REX byte (0x40-0x4f) may follow them, right before the opcode.
_LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})
# Prefixes with no effect on a near relative branch in 64-bit mode: segment overrides (also the
# 2E/3E branch hints) and F2 (MPX `bnd`, a no-op since Linux dropped MPX).  Re-encoding drops
# them.  0x66 is refused: AMD CPUs truncate the target to 16 bits, Intel ones ignore it.
_INERT_BRANCH_PREFIXES = frozenset({0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0xF2})
_OPSIZE, _ADDRSIZE, _BND, _NOTRACK = 0x66, 0x67, 0xF2, 0x3E

_LOOP_LIKE = frozenset(
    {x86.X86_INS_LOOP, x86.X86_INS_LOOPE, x86.X86_INS_LOOPNE, x86.X86_INS_JRCXZ, x86.X86_INS_JECXZ}
)
_KERNEL_ENTRIES = frozenset(
    {x86.X86_INS_SYSCALL, x86.X86_INS_SYSENTER, x86.X86_INS_SYSEXIT, x86.X86_INS_SYSRET}
)

# Call emulation.  Both sequences leave exactly what `call` leaves: rsp - 8 holding the original
# return address, every register and flag untouched (lea/push/pop/mov/jmp change no flag).  Like
# a real call, they clobber stack below the pushed return address, which belongs to the callee.
#
# Direct call: reserve the slot, then fill it through rax (saved and restored around it).
_DIRECT_CALL_HEAD = bytes.fromhex("488d6424f8" "50")  # lea rsp,[rsp-8]; push rax
_LEA_RAX_RIP = bytes.fromhex("488d05")  # lea rax,[rip+disp32]
_CALL_TAIL = bytes.fromhex("4889442408" "58")  # mov [rsp+8],rax; pop rax
# Indirect call: `call r/m` reads its target BEFORE pushing, so `push r/m` (same ModRM, same rsp)
# reads it first too, even if r/m aliases the slot.  The target is then parked 24 bytes below the
# original rsp (in the red zone of the final rsp, so a signal cannot clobber it) and the slot
# gets the return address.
_INDIRECT_CALL_PARK = bytes.fromhex(
    "50" "488b442408" "48894424f8"
)  # push rax; mov rax,[rsp+8]; mov [rsp-8],rax
_JMP_PARKED = bytes.fromhex("ff6424f0")  # jmp qword ptr [rsp-16]
_DIRECT_CALL_SIZE = len(_DIRECT_CALL_HEAD) + len(_LEA_RAX_RIP) + 4 + len(_CALL_TAIL) + 5


class _Refused(Exception):
    """A reason why one instruction cannot move; `relocate` adds which instruction it was."""


def _refuse(reason: str) -> NoReturn:
    """Stop relocating with a one-line reason (raised deep, reported with the instruction)."""
    raise _Refused(reason)


@functools.cache
def decoder() -> capstone.Cs:
    """The shared x86-64 decoder with operand details, which relocation needs."""
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    cs.detail = True
    return cs


# ---------------------------------------------------------------------------------------------
# Encoding helpers


def _rel32(source_end: int, target: int, what: str) -> bytes:
    """disp32 from `source_end` to `target`; refused when the target is beyond int32 reach."""
    delta = target - source_end
    if not _INT32_MIN <= delta <= _INT32_MAX:
        _refuse(f"{what} {target:#x} out of ±2 GiB reach from {source_end:#x}")
    return struct.pack("<i", delta)


def _jmp_rel32(at: int, target: int) -> bytes:
    """`jmp rel32` placed at `at`: the one branch form that reaches any target within 2 GiB."""
    return b"\xe9" + _rel32(at + 5, target, "branch target")


def _split_prefixes(code: bytes) -> tuple[bytes, bytes, int]:
    """(legacy prefixes, REX byte or b"", opcode index) of a non-VEX instruction."""
    i = 0
    while i < len(code) and code[i] in _LEGACY_PREFIXES:
        i += 1
    rex = code[i : i + 1] if i < len(code) and 0x40 <= code[i] <= 0x4F else b""
    return code[:i], rex, i + len(rex)


def _rip_operand(insn: CsInsn) -> capstone.x86.X86Op | None:
    """The memory operand addressed relative to rip (at most one: it lives in the ModRM)."""
    for op in insn.operands:
        if op.type == x86.X86_OP_MEM and op.mem.base in (x86.X86_REG_RIP, x86.X86_REG_EIP):
            if op.mem.base == x86.X86_REG_EIP:
                _refuse("addr32 truncates its rip-relative address")
            return op
    return None


def _rip_disp_offset(insn: CsInsn, op: capstone.x86.X86Op) -> int:
    """Offset of the disp32 of a rip-relative operand.  The encoding is always ModRM mod=00
    rm=101 followed by a disp32 (capstone's `disp_size` wrongly says 2 under a 0x66 prefix),
    so the offset is cross-checked against the ModRM byte and the decoded displacement."""
    code = bytes(insn.bytes)
    at = insn.modrm_offset + 1
    if (
        insn.disp_offset != at
        or code[insn.modrm_offset] & 0xC7 != 0x05
        or at + 4 > len(code)
        or struct.unpack_from("<i", code, at)[0] != op.mem.disp
    ):
        _refuse("its rip-relative displacement could not be located")
    return at


def _retarget_rip(code: bytes, disp_offset: int, at: int, absolute: int) -> bytes:
    """`code` (one instruction) with its rip-relative disp32 rewritten to reach `absolute`
    when placed at `at`.  rip is the END of the instruction, whatever follows the disp."""
    disp = _rel32(at + len(code), absolute, "rip-relative target")
    fixed = code[:disp_offset] + disp + code[disp_offset + 4 :]
    _check_rip_target(fixed, at, absolute)
    return fixed


def _check_rip_target(code: bytes, at: int, absolute: int) -> None:
    """Re-decode a rewritten instruction: guards against a wrong displacement offset."""
    (insn,) = decoder().disasm(code, at)
    op = _rip_operand(insn)
    if insn.size != len(code) or op is None or at + len(code) + op.mem.disp != absolute:
        _refuse("its rip-relative displacement could not be located")


# ---------------------------------------------------------------------------------------------
# One plan per instruction: a fixed output size, then the bytes once the address is known.

Place = Callable[[int], int]
"""Maps an original branch target to where the relocated code must go (`place` in `relocate`)."""


@dataclass(frozen=True)
class _Copy:
    """Byte-for-byte copy; a rip-relative disp32 (if any) is retargeted to the same address."""

    code: bytes
    disp_offset: int | None = None
    absolute: int = 0

    @property
    def size(self) -> int:
        return len(self.code)

    def encode(self, at: int, place: Place) -> bytes:
        if self.disp_offset is None:
            return self.code
        return _retarget_rip(self.code, self.disp_offset, at, self.absolute)


@dataclass(frozen=True)
class _Jump:
    """`jmp rel8/rel32` becomes `jmp rel32` so that a far placement still reaches the target."""

    target: int
    size: int = 5

    def encode(self, at: int, place: Place) -> bytes:
        return _jmp_rel32(at, place(self.target))


@dataclass(frozen=True)
class _CondJump:
    """`jcc rel8/rel32` becomes `jcc rel32` (0F 80+cc) with the same condition code."""

    cc: int
    target: int
    size: int = 6

    def encode(self, at: int, place: Place) -> bytes:
        return bytes((0x0F, 0x80 | self.cc)) + _rel32(at + 6, place(self.target), "branch target")


@dataclass(frozen=True)
class _LoopLike:
    """loop/loope/loopne/jrcxz/jecxz only have rel8: keep the instruction (so rcx/ecx and ZF
    are used exactly as before) and let it branch to a local `jmp rel32` stub:
    `loop L1; jmp L2; L1: jmp rel32 target; L2:`."""

    head: bytes  # the instruction without its rel8
    target: int

    @property
    def size(self) -> int:
        return len(self.head) + 1 + 2 + 5

    def encode(self, at: int, place: Place) -> bytes:
        stub = at + len(self.head) + 1 + 2
        return self.head + b"\x02" + b"\xeb\x05" + _jmp_rel32(stub, place(self.target))


def _return_address_fill(at: int, return_address: int) -> bytes:
    """`lea rax,[rip+ret]; mov [rsp+8],rax; pop rax` placed at `at`: the slot above the saved
    rax receives the original return address, computed position-independently."""
    disp = _rel32(at + len(_LEA_RAX_RIP) + 4, return_address, "return address")
    return _LEA_RAX_RIP + disp + _CALL_TAIL


@dataclass(frozen=True)
class _DirectCall:
    """`call rel32` emulated: push the original return address, then `jmp rel32` the callee."""

    return_address: int
    target: int
    size: int = _DIRECT_CALL_SIZE

    def encode(self, at: int, place: Place) -> bytes:
        fill = _return_address_fill(at + len(_DIRECT_CALL_HEAD), self.return_address)
        code = _DIRECT_CALL_HEAD + fill
        return code + _jmp_rel32(at + len(code), place(self.target))


@dataclass(frozen=True)
class _IndirectCall:
    """`call r/m64` emulated: `push r/m64` fetches the target exactly as the call would, then the
    slot receives the original return address and `jmp [rsp-16]` goes to the parked target."""

    push: bytes  # `push r/m64` with the call's own ModRM/SIB/disp and prefixes
    disp_offset: int | None  # of a rip-relative disp32 inside `push`
    absolute: int  # what that disp32 addresses
    return_address: int
    notrack: bool  # keep CET `notrack` on the jump that replaces the indirect call

    @property
    def size(self) -> int:
        fill = len(_LEA_RAX_RIP) + 4 + len(_CALL_TAIL)
        return len(self.push) + len(_INDIRECT_CALL_PARK) + fill + self.notrack + len(_JMP_PARKED)

    def encode(self, at: int, place: Place) -> bytes:
        push = self.push
        if self.disp_offset is not None:
            push = _retarget_rip(push, self.disp_offset, at, self.absolute)
        code = push + _INDIRECT_CALL_PARK
        code += _return_address_fill(at + len(code), self.return_address)
        return code + (b"\x3e" if self.notrack else b"") + _JMP_PARKED


_Plan = _Copy | _Jump | _CondJump | _LoopLike | _DirectCall | _IndirectCall


# ---------------------------------------------------------------------------------------------
# Planning: decide, per instruction, how it moves (or refuse).


@dataclass(frozen=True)
class _Span:
    """The displaced range [start, end) and where each instruction in it starts."""

    start: int
    end: int
    starts: frozenset[int]

    def check_branch(self, target: int) -> None:
        """A target strictly inside the range must be an instruction start (its relocated copy);
        anything else would land in the middle of the probe's own jmp."""
        if self.start < target < self.end and target not in self.starts:
            _refuse(f"branches into the middle of a displaced instruction ({target:#x})")

    def check_data(self, insn: CsInsn, op: capstone.x86.X86Op, absolute: int) -> None:
        """Data at the displaced range is overwritten by the probe: refuse reading or writing it,
        and taking the address of anything but the probe site itself (a valid entry point)."""
        if insn.id == x86.X86_INS_LEA:
            if self.start < absolute < self.end:
                _refuse(f"takes the address {absolute:#x} inside the displaced code")
        elif absolute < self.end and absolute + max(op.size, 1) > self.start:
            _refuse(f"accesses {absolute:#x}, inside the displaced code")


def _branch_target(insn: CsInsn, span: _Span) -> int:
    """Absolute target of a relative branch, checked against the displaced range."""
    target = insn.operands[0].imm
    span.check_branch(target)
    return target


def _plan_relative_branch(insn: CsInsn, span: _Span, prefixes: bytes, opcode: bytes) -> _Plan:
    """jmp/jcc/call rel8/rel32 are re-encoded from scratch, so their prefixes must be inert."""
    if not set(prefixes) <= _INERT_BRANCH_PREFIXES:
        _refuse(f"prefix {prefixes.hex()} may change a relative branch")
    target = _branch_target(insn, span)
    if insn.id == x86.X86_INS_CALL:
        return _DirectCall(insn.address + insn.size, target)
    if insn.id == x86.X86_INS_JMP:
        return _Jump(target)
    cc = opcode[0] - 0x70 if 0x70 <= opcode[0] <= 0x7F else opcode[1] - 0x80
    return _CondJump(cc, target)


def _plan_loop_like(insn: CsInsn, span: _Span, prefixes: bytes) -> _Plan:
    """loop-like instructions are kept whole (prefixes included) except for their rel8."""
    if _OPSIZE in prefixes:
        _refuse("prefix 66 may change a relative branch")
    if insn.imm_size != 1 or insn.imm_offset != insn.size - 1:
        _refuse("unexpected encoding of a rel8 branch")
    return _LoopLike(bytes(insn.bytes[:-1]), _branch_target(insn, span))


def _plan_indirect_call(insn: CsInsn, span: _Span, prefixes: bytes, rex: bytes, at: int) -> _Plan:
    """`call r/m64` (FF /2) becomes `push r/m64` (FF /6): same ModRM/SIB/disp, so the same
    target is read from the same registers and rsp."""
    code = bytes(insn.bytes)
    if code[at] != 0xFF or code[at + 1] >> 3 & 7 != 2:
        _refuse("a far call pushes cs:rip")  # FF /3, which capstone also names `call`
    if not set(prefixes) <= _INERT_BRANCH_PREFIXES | {_ADDRSIZE}:
        _refuse(f"prefix {prefixes.hex()} may change an indirect call")
    kept = bytes(p for p in prefixes if p != _BND)  # bnd means nothing to push
    push = kept + rex + b"\xff" + bytes((code[at + 1] | 0x20,)) + code[at + 2 :]
    op = _rip_operand(insn)
    disp_offset, absolute = None, 0
    if op is not None:
        disp_offset = _rip_disp_offset(insn, op) - (len(prefixes) - len(kept))
        absolute = insn.address + insn.size + op.mem.disp
        span.check_data(insn, op, absolute)
    return_address = insn.address + insn.size
    return _IndirectCall(push, disp_offset, absolute, return_address, _NOTRACK in prefixes)


def _plan_copy(insn: CsInsn, span: _Span) -> _Plan:
    """Anything position-independent is copied; a rip-relative disp32 is marked for rewriting."""
    code = bytes(insn.bytes)
    op = _rip_operand(insn)
    if op is None:
        return _Copy(code)
    absolute = insn.address + insn.size + op.mem.disp
    span.check_data(insn, op, absolute)
    return _Copy(code, _rip_disp_offset(insn, op), absolute)


def _plan(insn: CsInsn, span: _Span, is_last: bool) -> _Plan:
    """How `insn` moves, or `_Refused` with the reason it cannot."""
    if insn.id == x86.X86_INS_INVALID:
        _refuse("capstone marks it invalid")
    groups = insn.groups                   # built anew at each `insn.group()`
    if insn.id in _KERNEL_ENTRIES or CS_GRP_INT in groups or CS_GRP_IRET in groups:
        _refuse(f"{insn.mnemonic} hands its own rip to the kernel")
    if insn.id == x86.X86_INS_LCALL:
        _refuse("a far call pushes cs:rip")  # capstone's name for some encodings
    if insn.id == x86.X86_INS_CALL and not is_last:
        _refuse("a call returns to the original code, so it must be the last displaced instruction")
    prefixes, rex, at = _split_prefixes(bytes(insn.bytes))
    opcode = bytes(insn.bytes[at:])
    if insn.id in _LOOP_LIKE:
        return _plan_loop_like(insn, span, prefixes)
    if CS_GRP_BRANCH_RELATIVE in groups:
        if insn.id in (x86.X86_INS_JMP, x86.X86_INS_CALL) or _is_jcc(opcode):
            return _plan_relative_branch(insn, span, prefixes, opcode)
        _refuse(f"{insn.mnemonic} cannot move: its relative target has no re-encoding")
    if insn.id == x86.X86_INS_CALL:
        return _plan_indirect_call(insn, span, prefixes, rex, at)
    return _plan_copy(insn, span)


def _is_jcc(opcode: bytes) -> bool:
    """Jcc rel8 (70-7F) or rel32 (0F 80-8F): the condition code is the low nibble."""
    return 0x70 <= opcode[0] <= 0x7F or (opcode[0] == 0x0F and 0x80 <= opcode[1] <= 0x8F)


def _describe(insn: CsInsn) -> str:
    """`mnemonic operands at 0xaddress`, as error messages name an instruction."""
    return f"'{f'{insn.mnemonic} {insn.op_str}'.strip()}' at {insn.address:#x}"


# ---------------------------------------------------------------------------------------------
# Public interface


def can_relocate(insn: CsInsn) -> str | None:
    """None if `insn` alone can move (wherever a 2 GiB reach allows), else a one-line reason."""
    span = _Span(insn.address, insn.address + insn.size, frozenset({insn.address}))
    try:
        _plan(insn, span, is_last=True)
    except _Refused as refusal:
        return str(refusal)
    return None


def can_relocate_together(insns: Sequence[CsInsn]) -> str | None:
    """None if consecutive `insns` can move as one block, else a one-line reason: each may
    move alone, yet one may take or branch to an address inside the others."""
    span = _Span(insns[0].address, insns[-1].address + insns[-1].size, frozenset(i.address for i in insns))
    try:
        for insn in insns:
            _plan(insn, span, insn is insns[-1])
    except _Refused as refusal:
        return f"`{insn.mnemonic} {insn.op_str}`".replace(" `", "`") + f" at {insn.address:#x}: {refusal}"
    return None


def relocate(insns: Sequence[CsInsn], dest: int) -> bytes:
    """Machine code that, placed at `dest`, has the same effect as `insns` at their original
    addresses.  It falls through at dest+len(result); the caller appends the `jmp` back to the
    end of `insns`.  A branch to an instruction inside `insns` goes to its relocated copy, except
    one to the first instruction: that is the probe site, which the original code re-enters."""
    return relocate_with_copies(insns, dest)[0]


def relocate_with_copies(insns: Sequence[CsInsn], dest: int) -> tuple[bytes, list[int]]:
    """`relocate`, and the offset in its result where each instruction's copy starts.

    Running the result from the copy of instruction k is running the originals from k on:
    the copies lie in order, each falls through into the next, and a branch back inside
    the range reaches a copy.  So a thread stopped before an original instruction may go
    on from its copy, and one stopped at a copy may go back to the original.
    """
    if not insns:
        return b"", []
    for before, after in zip(insns, insns[1:]):
        if before.address + before.size != after.address:
            raise ValueError(f"instructions are not consecutive at {after.address:#x}")
    end = insns[-1].address + insns[-1].size
    span = _Span(insns[0].address, end, frozenset(i.address for i in insns))
    plans = [_planned(insn, span, insn is insns[-1]) for insn in insns]
    offsets, offset = {}, 0
    for insn, plan in zip(insns, plans):
        offsets[insn.address] = offset
        offset += plan.size

    def place(target: int) -> int:
        """Inside the displaced range (but not its first instruction): the relocated copy."""
        if target != span.start and target in offsets:
            return dest + offsets[target]
        return target

    code = bytearray()
    for insn, plan in zip(insns, plans):
        try:
            code += plan.encode(dest + len(code), place)
        except _Refused as refusal:
            raise RelocationError(f"cannot relocate {_describe(insn)}: {refusal}") from None
    return bytes(code), [offsets[insn.address] for insn in insns]


def _planned(insn: CsInsn, span: _Span, is_last: bool) -> _Plan:
    """`_plan` with its refusal turned into the user-facing `RelocationError`."""
    try:
        return _plan(insn, span, is_last)
    except _Refused as refusal:
        raise RelocationError(f"cannot relocate {_describe(insn)}: {refusal}") from None
