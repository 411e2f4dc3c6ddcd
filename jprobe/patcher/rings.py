"""Trace rings in a process without jprobe's runtime (`trace(...)` under `jprobe attach`).

Where a thread's ring is: the word at %fs:RING_OFF (0x90), next to the callback guard
(%fs:0x80) and the return stack (%fs:0x88, rstacks.py), in `__glibc_unused2` of glibc's
tcbhead_t (0x80..0x180), which glibc has left unused since 2.26 and keeps for the size of
tcbhead_t that other programs rely on. A new thread's word is 0, or on a stack glibc recycles
what its last thread left there (measured on glibc 2.36).

Rings come from a pool the trace trampoline takes from itself (x86_64.RingPool: `lock xadd`
on the pool's next index), so threads started after attach are traced too. Unlike the return
stacks, the pool is MAP_SHARED: jprobe drains the rings through its own mapping of the same
memfd, live, and still after the process has exited. A forked child therefore shares its
parent's rings, and a thread on a recycled stack finds a ring another thread wrote: a ring
records the tid of the thread that took it (glibc's struct pthread `tid`, at %fs:TID_OFF,
checked against a stopped thread at attach), and a thread that is not its owner takes a ring
of its own instead of writing to it. The pool is found again by name by a later session (the
TCBs keep pointing into it) and never unmapped.

Size: RINGS rings of WORDS words (256 KiB): 21,000 records of trace(arg1) a thread, 43 ms of
a thread emitting 500,000 a second while jprobe drains every 5 ms; 64 MiB of address space,
of which only the pages threads have written are memory. RINGS threads over the process's
life (a ring is never given back: no thread can tell that another's owner has ended); later
ones count their records lost.
"""
from __future__ import annotations

import ctypes
import os
import struct
import threading

from .. import layout
from ..errors import AttachError, HandlerError
from ..trampolines.returns import POOL_HEADER, POOL_NEXT, POOL_SIZE
from ..trampolines.x86_64 import RingPool
from . import ptrace, remote
from .world import StoppedWorld, stopped

RING_OFF = layout.CONST["JP_LIVE_RING_OFF"]
# offsetof(struct pthread, tid) in glibc 2.26 .. 2.40 on x86-64; checked at attach (check_tid).
TID_OFF = 0x2D0
WORDS = 1 << 15
RINGS = 256
NAME = "jprobe:rings"
_HEAD = layout.offsetof("jp_ring", "head")
_DATA = layout.offsetof("jp_ring", "data")
STRIDE = -(-(_DATA + 8 * WORDS) // 0x1000) * 0x1000
SIZE = POOL_HEADER + RINGS * STRIDE
_MASK, _STATE = layout.offsetof("jp_ring", "mask"), layout.offsetof("jp_ring", "state")
_OWNED = layout.CONST["JP_RING_OWNED"]


class Rings:
    """The pool as the target has it (`target`: its address there) and as jprobe does (`here`)."""

    def __init__(self, target: int, fd: int):
        self.target, self.fd = target, fd
        self.here = ptrace.mmap(0, SIZE, remote.PROT_READ | remote.PROT_WRITE, remote.MAP_SHARED, fd, 0)
        if self.here == -1:
            raise AttachError("cannot map jprobe's trace rings in jprobe")
        self._lock = threading.Lock()

    def pool(self) -> RingPool:
        return RingPool(self.target, STRIDE, TID_OFF)

    def taken(self) -> int:
        """Rings handed out so far (the trampolines count past the end once the pool is used up)."""
        return min(ctypes.c_uint64.from_address(self.here + POOL_NEXT).value, RINGS)

    def ring(self, i: int) -> int:
        """Ring `i`'s address in jprobe."""
        return self.here + POOL_HEADER + i * STRIDE

    def close(self) -> None:
        """jprobe's mapping gone (after the last drain); the target keeps its own."""
        with self._lock:
            if self.fd >= 0:
                ptrace.munmap(self.here, SIZE)
                os.close(self.fd)
                self.fd = -1


def _headers(fd: int) -> None:
    """The pool's header and each ring's: its mask, owned by whoever takes it (the trampoline
    writes its tid and pid)."""
    os.ftruncate(fd, SIZE)
    os.pwrite(fd, struct.pack("<QQ", 0, RINGS), 0)
    assert (POOL_NEXT, POOL_SIZE) == (0, 8)
    ring = bytearray(_DATA)
    struct.pack_into("<Q", ring, _MASK, WORDS - 1)
    struct.pack_into("<I", ring, _STATE, _OWNED)
    for i in range(RINGS):
        os.pwrite(fd, ring, POOL_HEADER + i * STRIDE)


def open_rings(pid: int, local: bool, spec: str) -> tuple[Rings, int]:
    """The pool of process `pid`: an earlier session's, found by name, or a new one, once
    glibc's tid is where the trampolines read it (check_tid; `spec` names the first trace probe
    when it is not); and how many times threads were rewound (world.stopped) meanwhile: one
    stop of the world for both."""
    found = remote.find_shared(pid, NAME)
    if local:
        _check_tid_here(spec)
        return (_create_here() if found is None else Rings(found[0].start, ptrace.pidfd_getfd(pid, found[1]))), 0
    made: list[Rings] = []

    def work(world: StoppedWorld) -> None:
        check_tid(world, spec)
        if found is not None:
            made.append(Rings(found[0].start, ptrace.pidfd_getfd(pid, found[1])))
            return
        call = remote.Caller(world)
        fd = call.check("memfd_create", call(remote.NR_MEMFD_CREATE, call.scratch(NAME.encode() + b"\0"),
                                             remote.MFD_CLOEXEC))
        ours = ptrace.pidfd_getfd(world.pid, fd)
        try:
            _headers(ours)
            at = call.check("mmap", call(remote.NR_MMAP, 0, SIZE, remote.PROT_READ | remote.PROT_WRITE,
                                         remote.MAP_SHARED, fd, 0))
        except BaseException:
            os.close(ours)
            raise
        made.append(Rings(at, ours))
    rewound = stopped(pid, work)
    return made[0], rewound


def _create_here() -> Rings:
    """A new pool in jprobe's own process (`jprobe.attach(os.getpid())`)."""
    fd = os.memfd_create(NAME, os.MFD_CLOEXEC)       # kept open, for a later session to find
    _headers(fd)
    at = ptrace.mmap(0, SIZE, remote.PROT_READ | remote.PROT_WRITE, remote.MAP_SHARED, fd, 0)
    if at == -1:
        raise AttachError("cannot map jprobe's trace rings in this process")
    ours = os.dup(fd)
    os.set_inheritable(ours, False)
    return Rings(at, ours)


def check_tid(world: StoppedWorld, spec: str) -> None:
    """glibc keeps each stopped thread's tid at %fs:TID_OFF, where the trampolines read it."""
    seen = [(thread.tid, struct.unpack("<I", world.read(thread.regs.fs_base + TID_OFF, 4))[0])
            for thread in world.threads.values() if thread.regs.fs_base]
    _check_seen(seen, world.pid, spec)


def _check_tid_here(spec: str) -> None:
    fs = ctypes.c_uint64()
    if _arch_prctl(_ARCH_GET_FS, ctypes.addressof(fs)) != 0:
        raise HandlerError(f"'{spec}': cannot read this thread's %fs base")
    _check_seen([(threading.get_native_id(), ctypes.c_uint32.from_address(fs.value + TID_OFF).value)],
                os.getpid(), spec)


def _check_seen(seen: list[tuple[int, int]], pid: int, spec: str) -> None:
    if not seen or any(tid != found for tid, found in seen):
        raise HandlerError(f"'{spec}': process {pid}'s C library does not keep a thread's id where glibc 2.26 .. "
                           f"2.40 do (%fs:{TID_OFF:#x}), which a trace ring's owner check reads; trace refused "
                           f"(count the probe instead)")


_ARCH_GET_FS = 0x1003
_NR_ARCH_PRCTL = 158
_syscall = ctypes.CDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long


def _arch_prctl(code: int, address: int) -> int:
    return _syscall(ctypes.c_long(_NR_ARCH_PRCTL), ctypes.c_long(code), ctypes.c_void_p(address))
