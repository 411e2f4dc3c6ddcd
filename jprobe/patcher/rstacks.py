"""Return stacks in a process without jprobe's runtime (`%return` under `jprobe attach`).

Where a thread's stack is: the word at %fs:RSTACK_OFF, a slot of glibc's thread control block
next to the callback guard (live.TCB_GUARD, %fs:0x80). Both lie in `__glibc_unused2`
(tcbhead_t, 0x80..0x480), which glibc has left unused since 2.26 and keeps only for the size
of tcbhead_t that other programs rely on; a new thread's TCB starts zeroed, or, on a stack
glibc recycles, holds what its last thread left there (a stack of the pool that thread no
longer uses: the new thread carries on with it).

Stacks come from a pool the hijack takes from itself (returns.Pool: `lock xadd` on the
pool's next index), so threads started after attach are followed too. The pool is a
MAP_PRIVATE mapping: a forked child gets its own copy, as it must (parent and child pushing
on one stack would lose each other's frames). It is a private mapping of a memfd rather than
an anonymous one so that it has a name in /proc/PID/maps (this kernel has no names for
anonymous memory): a later session finds it and goes on with it, since TCBs keep pointing
into it, and it is never unmapped.

Taking a %return probe out, every hijacked slot of its gets its real return address back
(`restore`), with the world stopped: after that no thread can return into its trampoline,
which a later batch may overwrite.
"""
from __future__ import annotations

import os
import struct

from .. import layout
from ..errors import AttachError, ProcessGone
from ..trampolines.returns import POOL_HEADER, POOL_NEXT, POOL_SIZE
from . import ptrace, remote
from .target import maps
from .world import StoppedWorld

RSTACK_OFF = layout.CONST["JP_LIVE_RSTACK_OFF"]
STACKS = 1024                             # threads followed at once; later ones count returns missed
NAME = "jprobe:rstacks"
LABEL = f"/memfd:{NAME} (deleted)"
_STACK = layout.sizeof("jp_rstack")
_FRAMES = layout.offsetof("jp_rstack", "frames")
_FRAME = layout.sizeof("jp_rframe")
_SLOT, _RET = layout.offsetof("jp_rframe", "slot"), layout.offsetof("jp_rframe", "ret")
_HIJACK = layout.offsetof("jp_rframe", "hijack")
DEPTH = layout.CONST["JP_RSTACK_DEPTH"]
SIZE = POOL_HEADER + STACKS * _STACK
NR_FTRUNCATE = 77
MAP_PRIVATE = 0x02


def find_pool(pid: int) -> int | None:
    """The pool an earlier session mapped in process `pid`, if any."""
    return next((m.start for m in maps(pid) if m.path == LABEL and m.offset == 0), None)


def _header() -> bytes:
    head = bytearray(16)
    struct.pack_into("<QQ", head, 0, 0, STACKS)
    assert (POOL_NEXT, POOL_SIZE) == (0, 8)
    return bytes(head)


def create_pool(world: StoppedWorld) -> int:
    """A new pool in the stopped process: a memfd, its header written, mapped private."""
    call = remote.Caller(world)
    fd = call.check("memfd_create", call(remote.NR_MEMFD_CREATE, call.scratch(NAME.encode() + b"\0"),
                                         remote.MFD_CLOEXEC))
    try:
        ours = ptrace.pidfd_getfd(world.pid, fd)
        try:
            os.ftruncate(ours, SIZE)
            os.pwrite(ours, _header(), 0)
        finally:
            os.close(ours)
        at = call.check("mmap", call(remote.NR_MMAP, 0, SIZE, remote.PROT_READ | remote.PROT_WRITE,
                                     MAP_PRIVATE, fd, 0))
    finally:
        call(remote.NR_CLOSE, fd)
    return at


def create_pool_here() -> int:
    """create_pool() for jprobe's own process."""
    fd = os.memfd_create(NAME, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, SIZE)
        os.pwrite(fd, _header(), 0)
        at = ptrace.mmap(0, SIZE, remote.PROT_READ | remote.PROT_WRITE, MAP_PRIVATE, fd, 0)
    finally:
        os.close(fd)
    if at < 0:
        raise OSError(-at, f"cannot map jprobe's return stacks: {os.strerror(-at)}")
    return at


def restore(world: StoppedWorld, spans: list[tuple[int, int]] | None) -> int:
    """Real return addresses back in every thread's slots that hold a return trampoline in
    `spans` (None: any); how many. Threads must have been stepped out of the trampolines
    first (one may have been about to push a frame). From the top: a tail call's frame
    holds, as its return address, the trampoline of the frame below it at the same slot.
    The frames stay: a return that finds one no more, or a call over it, drops it."""
    restored = 0
    for thread in list(world.threads.values()):
        fs = thread.regs.fs_base
        if not fs:
            continue
        stack = struct.unpack("<Q", world.read(fs + RSTACK_OFF, 8))[0]
        if not stack:
            continue
        data = world.read(stack, _STACK)
        depth = min(struct.unpack_from("<Q", data, 0)[0], DEPTH)
        for d in reversed(range(depth)):
            at = _FRAMES + d * _FRAME
            slot, ret = struct.unpack_from("<QQ", data, at + _SLOT)
            hijack = struct.unpack_from("<Q", data, at + _HIJACK)[0]
            if spans is not None and not any(lo <= hijack < hi for lo, hi in spans):
                continue
            try:
                if struct.unpack("<Q", world.read(slot, 8))[0] != hijack:
                    continue                # returned, or left by a longjmp: the slot is another's now
                world.write(slot, ret.to_bytes(8, "little"))
            except ProcessGone:
                raise
            except AttachError:             # a stack unmapped since (a signal stack freed)
                continue
            restored += 1
    return restored
