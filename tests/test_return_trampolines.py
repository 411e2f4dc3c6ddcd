"""The code that follows a return (trampolines/returns.py), run under unicorn from random
machine states and random return stacks.

A caller calls a function whose entry runs emit_hijack; the function's body records the
flags it starts with and returns a value in rax; its `ret` lands in the return trampoline
(head, a count, tail), which must get back to the caller with every register the caller
can see as it was (rax aside), the stack above rsp untouched, one hit counted, and the
return stack as the rules say: the top frames of this stack at or below the call's slot
dropped (left by a longjmp), from the first frame above it or far below it (another
stack's) down, all kept.
"""
import struct

import pytest
from hypothesis import given, settings, strategies as st

unicorn = pytest.importorskip("unicorn")
from unicorn import x86_const as U  # noqa: E402

from jprobe import layout  # noqa: E402
from jprobe.trampolines import returns, x86_64 as arch  # noqa: E402
from jprobe.trampolines.asm import CodeBuffer  # noqa: E402
from support.machine import CODE, DATA, END, STACK, STACK_TOP, STATUS_MASK, machine, state  # noqa: E402
from support.properties import examples  # noqa: E402

FS_BASE, RSTACK_OFF, TLS_OFF = DATA + 0x8000, -0x48, -0x40
HITS, MISSED, RSTACK_OFF_AT, TLS_OFF_AT, FLAGS_SEEN = (DATA + 0x100, DATA + 0x108, DATA + 0x110, DATA + 0x118,
                                                        DATA + 0x120)
RSTACK = DATA + 0x1000              # struct jp_rstack: 128 + 64 * 128 bytes, within DATA's 64 KiB
FRAME, FRAMES = layout.sizeof("jp_rframe"), layout.offsetof("jp_rstack", "frames")
HIJACK = layout.offsetof("jp_rframe", "hijack")
RETURNED = 0x1234_5678_9abc_def0


POOL = DATA + 0x9000                # jprobe attach's pool: a header page, then POOL_STACKS stacks
POOL_STACKS = 2
RSTACK_SIZE = layout.sizeof("jp_rstack")


def program(flags_live: bool, pool: returns.Pool | None = None) -> bytes:
    buf = CodeBuffer(CODE)
    buf.call("function")
    buf.jmp(END)
    buf.label("function")
    returns.emit_hijack(buf, "return", RSTACK_OFF_AT, MISSED, flags_live, pool=pool)
    buf.emit("pushfq")
    buf.rip("pop qword ptr [rip]", FLAGS_SEEN)
    buf.emit(f"movabs rax, {RETURNED}; ret")
    buf.label("return")
    returns.emit_return_head(buf, RSTACK_OFF_AT, "lost")
    arch.emit_count(buf, HITS, 0, TLS_OFF_AT, flags_live=False, red_zone=False)
    returns.emit_return_tail(buf)
    returns.emit_lost(buf, "lost")
    return buf.finish()


@settings(max_examples=examples(300), deadline=None)
@given(seed=st.integers(0, 2**32), flags_live=st.booleans(), misalign=st.integers(0, 15),
       stale=st.lists(st.sampled_from(["above", "below", "same", "far"]), max_size=8),
       path=st.sampled_from(["followed", "no runtime", "no stack", "full"]))
def test_a_followed_return_comes_back_intact(seed, flags_live, misalign, stale, path):
    rsp = STACK_TOP - 0x2000 - misalign * 8
    slot = rsp - 8                               # where the call puts the return address
    uc = machine(program(flags_live), rsp, seed)
    uc.reg_write(U.UC_X86_REG_FS_BASE, FS_BASE)
    if path != "no runtime":
        uc.mem_write(RSTACK_OFF_AT, struct.pack("<q", RSTACK_OFF))
    uc.mem_write(FS_BASE + RSTACK_OFF, struct.pack("<Q", 0 if path == "no stack" else RSTACK))
    frames = [{"above": slot + 0x40 * (k + 1), "below": slot - 0x40 * (k + 1), "same": slot,
               "far": slot - returns.STACK_NEAR - 0x1000}[kind] for k, kind in enumerate(stale)]
    if path == "full":
        frames = [slot + 0x40 * (k + 1) for k in range(returns.DEPTH)]
    frames.sort(reverse=True)                    # pushed from the outermost call down
    for k, at in enumerate(frames):
        uc.mem_write(RSTACK + FRAMES + k * FRAME, struct.pack("<QQ", at, 0xdead))
        uc.mem_write(RSTACK + FRAMES + k * FRAME + HIJACK, struct.pack("<Q", 0xbeef))
    uc.mem_write(RSTACK, struct.pack("<Q", len(frames)))
    before = state(uc)
    stack_before = bytes(uc.mem_read(rsp, STACK + 0x10000 - rsp))
    uc.emu_start(CODE, END, count=20_000)
    after = state(uc)
    assert uc.reg_read(U.UC_X86_REG_RIP) == END
    seen = struct.unpack("<Q", uc.mem_read(FLAGS_SEEN, 8))[0] & STATUS_MASK
    if flags_live:
        assert seen == before["FLAGS"]               # the body starts with the flags it had
    before.pop("FLAGS"), after.pop("FLAGS")          # dead after a call
    assert after.pop("RAX") == RETURNED
    before.pop("RAX")
    assert after == before
    assert bytes(uc.mem_read(rsp, STACK + 0x10000 - rsp)) == stack_before
    hits, missed = struct.unpack("<QQ", uc.mem_read(HITS, 16))
    followed = path == "followed"
    assert (hits, missed) == ((1, 0) if followed else (0, 1))
    depth = struct.unpack("<Q", uc.mem_read(RSTACK, 8))[0]
    # followed: the top frames of this stack at or below the slot are gone (the "same" one
    # holds no trampoline of its own there), down to the first frame above it or far below
    kept = list(frames)
    while followed and kept and slot - returns.STACK_NEAR <= kept[-1] <= slot:
        kept.pop()
    assert depth == len(kept)
    assert [struct.unpack("<Q", uc.mem_read(RSTACK + FRAMES + k * FRAME, 8))[0] for k in range(depth)] == kept


@settings(max_examples=examples(200), deadline=None)
@given(seed=st.integers(0, 2**32), flags_live=st.booleans(), taken=st.integers(0, POOL_STACKS + 1),
       own=st.booleans())
def test_a_thread_without_a_stack_takes_one_from_the_pool(seed, flags_live, taken, own):
    """jprobe attach: a thread whose stack word is 0 takes the pool's next stack (its index
    by `lock xadd`) and keeps it; with the pool used up, the call is counted missed and the
    word stays 0; a thread that has one uses it and takes none. Registers as in the test above."""
    rsp = STACK_TOP - 0x2000
    uc = machine(program(flags_live, returns.Pool(POOL)), rsp, seed)
    uc.reg_write(U.UC_X86_REG_FS_BASE, FS_BASE)
    uc.mem_write(RSTACK_OFF_AT, struct.pack("<q", RSTACK_OFF))
    uc.mem_write(FS_BASE + RSTACK_OFF, struct.pack("<Q", RSTACK if own else 0))
    uc.mem_write(POOL, struct.pack("<QQ", taken, POOL_STACKS))
    uc.mem_write(RSTACK, struct.pack("<Q", 0))
    before = state(uc)
    uc.emu_start(CODE, END, count=20_000)
    after = state(uc)
    assert uc.reg_read(U.UC_X86_REG_RIP) == END
    before.pop("FLAGS"), after.pop("FLAGS"), before.pop("RAX")
    assert after.pop("RAX") == RETURNED
    assert after == before
    word = struct.unpack("<Q", uc.mem_read(FS_BASE + RSTACK_OFF, 8))[0]
    nxt = struct.unpack("<Q", uc.mem_read(POOL, 8))[0]
    hits, missed = struct.unpack("<QQ", uc.mem_read(HITS, 16))
    if own:
        stack, followed = RSTACK, True
        assert (word, nxt) == (RSTACK, taken)
    else:
        followed = taken < POOL_STACKS
        stack = POOL + returns.POOL_HEADER + taken * RSTACK_SIZE
        assert (word, nxt) == (stack if followed else 0, taken + 1)
    assert (hits, missed) == ((1, 0) if followed else (0, 1))
    if followed:
        frame = stack + FRAMES
        assert struct.unpack("<Q", uc.mem_read(stack, 8))[0] == 0          # pushed and popped
        assert struct.unpack("<Q", uc.mem_read(frame + returns.FRAME_MISSED, 8))[0] == MISSED
