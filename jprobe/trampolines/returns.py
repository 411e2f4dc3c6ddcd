"""x86-64 code that follows a function's return: the hijack at its entry, the return trampoline.

The entry keeps {slot, return address} in the thread's return stack (struct jp_rstack,
jprobe_ring.h) and writes the return trampoline's address into the slot; the function's
`ret` then lands in the trampoline, which finds its frame by the slot, puts the real return
address back where it was, runs the probe's work as if at that `ret`, and returns for real.

Frames are found by their slot, never by position alone: a `longjmp`, a C++ exception or a
signal handler that never returns leaves frames behind, and a return finds its own below
them (dropping them). The entry drops the top frames that are provably dead, those below
its own slot on the same stack (a live frame's slot lies above every deeper call's) and one
at its slot that no longer holds that frame's trampoline. A frame at the same slot that does
is a tail call's (`jmp` from a followed function to another): both stay, and the returns
unwind them in turn. "Same stack" means within STACK_NEAR bytes; a frame farther below
belongs to another stack (a signal stack that is interrupted, or one we interrupted) and is
kept.

Registers: the entry leaves all of them and live flags as they were. After a `ret` the flags
are dead (every call clobbers them), the other registers are not (`-fipa-ra` callers keep
values in caller-saved registers across calls they know), so the trampoline keeps them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from .. import layout
from .asm import Address, CodeBuffer

DEPTH = layout.CONST["JP_RSTACK_DEPTH"]
STACK_NEAR = 0x40000                      # frames this close below a slot are on its stack
_FRAME = layout.sizeof("jp_rframe")
_FRAMES = layout.offsetof("jp_rstack", "frames")
_SLOT = layout.offsetof("jp_rframe", "slot")
_RET = layout.offsetof("jp_rframe", "ret")
_TSC = layout.offsetof("jp_rframe", "tsc")
_ARGS = layout.offsetof("jp_rframe", "args")
_HIJACK = layout.offsetof("jp_rframe", "hijack")
_SHIFT = _FRAME.bit_length() - 1
assert _FRAME == 1 << _SHIFT and _FRAMES == _FRAME and _SLOT == 0, "frames[d] is at stack + (d + 1) << _SHIFT"
_JZ, _JNZ, _JA, _JB, _JAE, _JS = 0x4, 0x5, 0x7, 0x2, 0x3, 0x8
_ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
_PAD = layout.offsetof("jp_rframe", "pad")
_RSTACK = layout.sizeof("jp_rstack")
_LOST = b"jprobe: a followed return lost its frame; aborting\n"
_NR_WRITE = 1


class Pool(NamedTuple):
    """Return stacks taken by the hijack itself, for a process without the runtime
    (`jprobe attach`): a thread whose %fs:rstack_off word is 0 takes the next stack of the
    pool at run-time address `base` (a header of POOL_HEADER bytes: the next stack's index,
    taken with `lock xadd`, and how many there are; then the stacks)."""
    base: int


POOL_HEADER = 0x1000
POOL_NEXT, POOL_SIZE = 0, 8                     # the header's words
FRAME_MISSED = _PAD                             # pool frames: where their probe counts a return not followed


def emit_hijack(buf: CodeBuffer, return_trampoline: str | Address, rstack_off: Address, missed: Address,
                flags_live: bool, save_args: bool = False, save_time: bool = False, pool: Pool | None = None) -> None:
    """At a function's entry ([rsp]: the return address, the red zone dead): follow the return.

    Without a return stack (a thread the runtime did not start; with a `pool`, the pool
    used up) or room in it, the call is counted in `missed` and its return is not followed.
    `save_args` keeps arg1..arg6 and `save_time` a time stamp in the frame, for a return
    handler that reports them. A `pool` frame keeps the address of `missed` too: whoever
    puts its return address back for good (an unwinder's walk) counts the return there.
    """
    missed_l, gc, below, dead, push, out = (buf.fresh(n) for n in ("ret_missed", "ret_gc", "ret_below", "ret_dead",
                                                                   "ret_push", "ret_out"))
    saved = ["rax", "rcx", "rdx", "rsi"]
    buf.emit("push rax")
    if flags_live:
        buf.emit("lahf; seto al; push rax")
        saved.insert(1, "flags")
    buf.emit("push rcx; push rdx; push rsi")
    above = 8 * len(saved)                              # from rsp to the slot
    buf.rip("mov rcx, qword ptr [rip]", rstack_off)
    buf.emit("test rcx, rcx")
    buf.jcc(_JZ, missed_l)
    if pool is None:
        buf.emit("mov rcx, qword ptr fs:[rcx]; test rcx, rcx")
        buf.jcc(_JZ, missed_l)
    else:
        _emit_take_stack(buf, pool, missed_l)
    buf.emit(f"lea rsi, [rsp + {above}]; mov rax, qword ptr [rcx]")
    buf.label(gc)                                        # rax: depth, frames below it kept
    buf.emit("test rax, rax")
    buf.jcc(_JZ, push)
    buf.emit(f"mov rdx, rax; shl rdx, {_SHIFT}; add rdx, rcx; cmp qword ptr [rdx], rsi")   # the top frame's slot
    buf.jcc(_JA, push)                                   # above this call's: alive
    buf.jcc(_JB, below)
    buf.emit(f"mov rdx, qword ptr [rdx + {_HIJACK}]; cmp rdx, qword ptr [rsi]")
    buf.jcc(_JZ, push)                                   # this very slot, still its return: a tail call
    buf.jmp(dead)
    buf.label(below)
    buf.emit(f"mov rdx, qword ptr [rdx]; add rdx, {STACK_NEAR}; cmp rdx, rsi")
    buf.jcc(_JB, push)                                   # far below: another stack's, kept
    buf.label(dead)
    buf.emit("dec rax")                                  # below this call's slot, or over: dead
    buf.jmp(gc)
    buf.label(push)
    buf.emit(f"cmp rax, {DEPTH}")
    buf.jcc(_JAE, missed_l)
    # Slot, then the frame counted, then the slot again: a signal handler's probed call
    # between the first two used this frame and gave it back (its depth balanced).
    buf.emit(f"mov rdx, rax; shl rdx, {_SHIFT}; lea rdx, [rcx + rdx + {_FRAMES}]; mov qword ptr [rdx], rsi; "
             f"inc rax; mov qword ptr [rcx], rax; mov qword ptr [rdx], rsi")
    buf.emit(f"mov rax, qword ptr [rsi]; mov qword ptr [rdx + {_RET}], rax")
    if save_args:
        for i, reg in enumerate(_ARG_REGS):
            if reg in saved:                                 # clobbered here: its pushed value
                buf.emit(f"mov rax, qword ptr [rsp + {8 * (len(saved) - 1 - saved.index(reg))}]")
                reg = "rax"
            buf.emit(f"mov qword ptr [rdx + {_ARGS + 8 * i}], {reg}")
    if pool is not None:
        buf.rip("lea rax, [rip]", missed)
        buf.emit(f"mov qword ptr [rdx + {FRAME_MISSED}], rax")
    buf.rip("lea rax, [rip]", return_trampoline)
    buf.emit(f"mov qword ptr [rdx + {_HIJACK}], rax")
    if save_time:
        buf.emit(f"mov rcx, rdx; rdtsc; shl rdx, 32; or rax, rdx; mov qword ptr [rcx + {_TSC}], rax; "
                 f"mov rax, qword ptr [rcx + {_HIJACK}]")
    buf.emit("mov qword ptr [rsi], rax")                 # the return comes to the trampoline
    buf.jmp(out)
    buf.label(missed_l)
    buf.rip("lock inc qword ptr [rip]", missed)
    buf.label(out)
    buf.emit("pop rsi; pop rdx; pop rcx")
    if flags_live:
        buf.emit("pop rax; add al, 0x7f; sahf")
    buf.emit("pop rax")


def _emit_take_stack(buf: CodeBuffer, pool: Pool, missed: str) -> None:
    """rcx: the offset of the thread's stack word from %fs; leaves the stack in rcx, taking
    one from the pool when the word is 0. A signal handler that takes one between the load
    and the store only costs the pool a stack (its frames are balanced by the time it returns)."""
    have = buf.fresh("ret_have")
    buf.emit("mov rdx, qword ptr fs:[rcx]; test rdx, rdx")
    buf.jcc(_JNZ, have)
    buf.emit(f"movabs rsi, {pool.base}; mov eax, 1; lock xadd qword ptr [rsi + {POOL_NEXT}], rax; "
             f"cmp rax, qword ptr [rsi + {POOL_SIZE}]")
    buf.jcc(_JAE, missed)
    buf.emit(f"imul rax, rax, {_RSTACK}; lea rdx, [rsi + rax + {POOL_HEADER}]; mov qword ptr fs:[rcx], rdx")
    buf.label(have)
    buf.emit("mov rcx, rdx")


FRAME_ARGS, FRAME_TSC = _ARGS, _TSC


STASH_MAX = 7


def stashed_at(k: int) -> int:
    """Where emit_return_head puts the k-th stashed word, as a displacement from the caller's
    rsp after the return: in the returning function's dead red zone, below the slot and the
    four registers the head saves there, within the 128 bytes a trace steps over."""
    assert k < STASH_MAX
    return -8 - 40 - 8 * k


def emit_return_head(buf: CodeBuffer, rstack_off: Address, lost: str, stash: Sequence[int] = ()) -> None:
    """Reached by the function's `ret`: find its frame, put the return address back in the slot,
    and leave the stack as it was at that `ret` ([rsp]: the return address, registers intact).

    Frames above it are dropped (left by a `longjmp` or an exception), and the frame itself
    too: the work that follows (which may call probed functions, or meet a signal) pushes
    where it was. No frame for the slot: `lost` (emit_lost). `stash`: offsets of frame
    fields copied below the slot before the frame goes (see stashed_at), for work that
    reads them (a trace of the entry's arguments or of the call's duration).
    """
    search = buf.fresh("ret_search")
    buf.emit("lea rsp, [rsp - 8]; push rax; push rcx; push rdx; push rsi")
    buf.rip("mov rcx, qword ptr [rip]", rstack_off)
    buf.emit("mov rcx, qword ptr fs:[rcx]; lea rdx, [rsp + 32]; mov rax, qword ptr [rcx]")
    buf.label(search)
    buf.emit("dec rax")
    buf.jcc(_JS, lost)
    buf.emit(f"mov rsi, rax; shl rsi, {_SHIFT}; lea rsi, [rcx + rsi + {_FRAMES}]; cmp qword ptr [rsi], rdx")
    buf.jcc(_JNZ, search)
    if not stash:
        buf.emit(f"mov qword ptr [rcx], rax; mov rax, qword ptr [rsi + {_RET}]; mov qword ptr [rdx], rax")
    else:                                   # the frame stays counted while it is read
        buf.emit("inc rax; mov qword ptr [rcx], rax")
        for k, field in enumerate(stash):
            buf.emit(f"mov rax, qword ptr [rsi + {field}]; mov qword ptr [rdx + {stashed_at(k) + 8}], rax")
        buf.emit(f"mov rax, qword ptr [rsi + {_RET}]; mov qword ptr [rdx], rax; dec qword ptr [rcx]")
    buf.emit("pop rsi; pop rdx; pop rcx; pop rax")


def emit_return_tail(buf: CodeBuffer) -> None:
    """After the return's work: the function returns for real.

    By an indirect `jmp`, not a `ret`: the function's `ret` already took the caller's entry
    off the processor's return stack buffer, so another `ret` would be predicted from the
    entry below (mispredicted, and every return of the caller after it). The address read
    just below rsp is safe there: signal frames are built below the red zone.
    """
    buf.emit("lea rsp, [rsp + 8]; jmp qword ptr [rsp - 8]")


def emit_lost(buf: CodeBuffer, label: str) -> None:
    """A return with no frame (nothing should ever get here): say so on stderr, then fault,
    rather than jump anywhere."""
    message = buf.fresh("ret_lost_text")
    buf.label(label)
    buf.emit(f"mov edi, 2; mov edx, {len(_LOST)}; mov eax, {_NR_WRITE}")
    buf.rip("lea rsi, [rip]", message)
    buf.emit("syscall; ud2")
    buf.label(message)
    buf.raw(_LOST)
