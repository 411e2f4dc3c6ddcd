"""C callback libraries loaded into a running process, by a thread of the process's own.

Loading a library takes the dynamic loader's lock and malloc's; a thread borrowed in the
middle of whatever it was doing may hold either, and would then wait for itself forever
(kubo/injector's warning). So the borrowed thread only calls `pthread_create`, and a new
thread, the process's own, calls `dlopen` (arch.emit_loader) while every other thread runs:
it waits, if it must, for a lock until its holder releases it.

`pthread_create` itself takes the thread-stack cache's lock and calls `calloc`. A thread can
hold those locks only while it runs code of libc or of the dynamic loader (nothing there calls
back into the program with them held), or in a signal handler that interrupted such code. So
the borrowed thread is one stopped in the program's own code, or blocked in a system call
that waits for the outside world (`epoll_wait`, `read`, `nanosleep`...: libc makes none of
them with those locks held), and with no signal frame on its stack (no return address to
glibc's `__restore_rt`, which every handler returns through). (The loader's own locks are
recursive: a thread that holds one takes it again.) It is not traced while it calls: it
returns to code of jprobe's that puts back everything it was stopped with (arch.emit_resume).

The library's bytes go into a sealed memfd the process creates (`/proc/self/fd/N` is what it
opens): so the process reads exactly the file jprobe analysed, whatever its mount namespace,
and no one can change it afterwards. The memfd is named after the file's digest, and a
library already loaded by an earlier attach is found by that name and not loaded again.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import struct
import time
from dataclasses import dataclass

from .. import arch
from ..errors import AttachError, HandlerError, SymbolError
from ..loader import find_library
from . import ptrace, remote
from .target import Mapping, maps
from .world import NO_SYSCALL, SYSCALL, StoppedWorld, Thread

MFD_ALLOW_SEALING = 2
F_ADD_SEALS, SEALS = 1033, 1 | 2 | 4 | 8         # seal, shrink, grow, write
# Calls that wait for the outside world; libc makes none while it holds a lock.
WAITING = {0, 7, 17, 19, 23, 34, 35, 43, 45, 47, 61, 65, 70, 128, 130, 208, 220, 230, 232, 247,
           270, 271, 281, 288, 299, 441}
INTERRUPTED = {-errno.EINTR, -512, -513, -514, -516}     # -EINTR, -ERESTART*
RESTORE_RT = bytes.fromhex("48c7c00f0000000f05")          # mov rax, 15 (rt_sigreturn); syscall
STACK_SCAN = 64 << 10
LOAD_TIMEOUT = 10.0
TRIES, TRY_AGAIN_S = 50, 0.002                   # looks for a thread to borrow, and the pause between
SLOT = {name: 8 * i for i, name in enumerate(arch.LOADER_SLOTS)}
BLOCK = 8 * len(arch.LOADER_SLOTS) + 8           # the slots, then the new thread's pthread_t
PAGE, REQUEST = 0x1000, 0x400                  # room of the loader's request block
MESSAGE = REQUEST - 0x100                       # where in it the loader copies dlerror()'s message
SAVE_PAGES = 4                                  # the borrowed thread's save block, then the request
REQUEST_AT = SAVE_PAGES * PAGE - REQUEST
PENDING = (1 << 64) - 1                         # the call's result, until it has returned
RESTART_SAME, RESTART_BLOCK, NR_RESTART_SYSCALL = {-512, -513, -514}, -516, 219
NEEDED = ("dlopen", "dlerror", "pthread_self", "pthread_detach", "pthread_create")
SYSTEM = ("libc.so", "ld-linux", "libpthread.so", "libdl.so")


class NoSafeThread(AttachError):
    """No thread may be borrowed now; a moment later one may."""


@dataclass(frozen=True)
class Library:
    path: str                    # as jprobe read it
    label: str                   # its memfd's name in the process's maps
    data: bytes

    @classmethod
    def of(cls, name: str) -> "Library":
        path = name if "/" in name else find_library(name)
        if path is None:
            raise HandlerError(f"{name}: callback library not found; give its path")
        with open(path, "rb") as f:
            data = f.read()
        return cls(path, f"jprobe-lib:{hashlib.sha256(data).hexdigest()[:16]}", data)

    def mapped(self, mapped: list[Mapping], image_start: int) -> int | None:
        """The load bias of this library in the process (whose first segment is at
        `image_start`), if an attach loaded it already."""
        first = [m for m in mapped if m.path == f"/memfd:{self.label} (deleted)" and m.offset == 0]
        if not first:
            return None
        return min(m.start for m in first) - (image_start & ~(PAGE - 1))


class Loader:
    """Loads one library into a process, with room of a region the process shares with jprobe
    (`view`, at run-time address `base`): a page of its trampoline half at offset `text`, and
    SAVE_PAGES pages of its table half at `data`.

    start() runs with the threads stopped: it borrows a thread and leaves it about to call
    `pthread_create`, returning to code (arch.emit_resume) that puts back, by itself, every
    register it was stopped with; the world is then released, and no thread is traced while
    the call runs (a jprobe killed meanwhile leaves the process whole). finish() waits for the
    call's result and for the new thread's `dlopen`."""

    def __init__(self, pid: int, view, base: int, text: int, data: int):
        self.region, self.pid = view, pid
        self.text_off, self.data_off = text, data
        self.text, self.data = base + text, base + data
        self.request = data + REQUEST_AT

    def start(self, world: StoppedWorld, lib: Library, functions: dict[str, int]) -> None:
        thread = borrowable(world)                  # first: NoSafeThread leaves nothing behind
        call = remote.Caller(world)
        fd = call.check("memfd_create", call(remote.NR_MEMFD_CREATE, call.scratch(lib.label.encode() + b"\0"),
                                             remote.MFD_CLOEXEC | MFD_ALLOW_SEALING))
        ours = ptrace.pidfd_getfd(self.pid, fd)
        try:
            os.write(ours, lib.data)
            fcntl.fcntl(ours, F_ADD_SEALS, SEALS)
        finally:
            os.close(ours)
        path = f"/proc/self/fd/{fd}".encode() + b"\0"
        block = self._address(self.request)
        slots = [functions["dlopen"], functions["dlerror"], functions["pthread_self"],
                 functions["pthread_detach"], block + BLOCK, 0, block + MESSAGE, 0, 0]
        self.region[self.request:self.request + REQUEST] = bytes(REQUEST)
        self.region[self.request:self.request + BLOCK + len(path)] = struct.pack(f"<{len(slots)}Q", *slots) + path
        pad = self._save(thread)
        world.prepare_call(thread, functions["pthread_create"], (block + BLOCK - 8, 0, self.text, block), pad)

    def _save(self, thread: Thread) -> int:
        """The loader routine and the resume pad in the text page, the thread's state in the
        save block; where the pad is."""
        resume = restarted(thread.regs)
        xstate = ptrace.get_vector_state(thread.tid)
        if arch.RESUME_XSAVE + len(xstate) > REQUEST_AT:
            raise AttachError(f"process {self.pid}: thread {thread.tid}'s vector state is larger than "
                              f"jprobe keeps room for ({len(xstate)} bytes)")
        buf = arch.CodeBuffer(self.text)
        arch.emit_loader(buf)
        pad = buf.here
        arch.emit_resume(buf, self.data, [name for name, _ in ptrace.Regs._fields_])
        code = buf.finish()
        self.region[self.text_off:self.text_off + len(code)] = code
        save = self.data_off
        struct.pack_into("<Q", self.region, save + arch.RESUME_RESULT, PENDING)
        self.region[save + arch.RESUME_GPRS:save + arch.RESUME_GPRS + ctypes.sizeof(resume)] = bytes(resume)
        self.region[save + arch.RESUME_XSAVE:save + arch.RESUME_XSAVE + len(xstate)] = xstate
        return pad

    def finish(self, lib: Library) -> None:
        """Once the world runs again: the call's result, then the new thread's dlopen()."""
        deadline = time.monotonic() + LOAD_TIMEOUT
        while (result := struct.unpack_from("<Q", self.region, self.data_off + arch.RESUME_RESULT)[0]) == PENDING:
            self._before(deadline, lib)
        if result & 0xffffffff:
            raise AttachError(f"process {self.pid}: pthread_create failed ({os.strerror(result & 0xffffffff)}) "
                              f"starting jprobe's loader thread")
        while not struct.unpack_from("<Q", self.region, self.request + SLOT["done"])[0]:
            self._before(deadline, lib)
        if not struct.unpack_from("<Q", self.region, self.request + SLOT["handle"])[0]:
            at = self.request + MESSAGE
            why = bytes(self.region[at:self.request + REQUEST]).split(b"\0")[0].decode(errors="replace")
            raise HandlerError(f"{lib.path}: process {self.pid} cannot load it: {why or 'dlopen() failed'}")

    def _before(self, deadline: float, lib: Library) -> None:
        if time.monotonic() > deadline:
            raise AttachError(f"process {self.pid}: loading {lib.path} took over {LOAD_TIMEOUT:g} s "
                              f"(its constructors, or the loader's lock held by the program)")
        time.sleep(0.0005)

    def _address(self, at: int) -> int:
        """The run-time address of offset `at` of the region."""
        return self.data + at - self.data_off


def restarted(regs: ptrace.Regs) -> ptrace.Regs:
    """The registers a thread stopped in an interrupted system call resumes with: the call
    made again, as the kernel would have restarted it (arch/x86 signal code)."""
    out = regs.copy()
    rax = out.rax - (1 << 64) if out.rax >= 1 << 63 else out.rax
    if out.orig_rax != NO_SYSCALL and rax in RESTART_SAME:
        out.rax, out.rip = out.orig_rax, out.rip - 2
    elif out.orig_rax != NO_SYSCALL and rax == RESTART_BLOCK:
        out.rax, out.rip = NR_RESTART_SYSCALL, out.rip - 2
    return out


def functions_of(pid: int, mapped: list[Mapping], module_of) -> dict[str, int]:
    """Run-time addresses of what loading needs (NEEDED), from the system libraries the
    process has mapped (libc 2.34 has them all; before, libdl and libpthread)."""
    found: dict[str, int] = {}
    for path in sorted({m.path for m in mapped if os.path.basename(m.path).startswith(SYSTEM)}):
        module, bias = module_of(path)
        for name in NEEDED:
            if name not in found:
                try:
                    found[name] = bias + module.resolve(name).address
                except SymbolError:
                    continue
    missing = [n for n in NEEDED if n not in found]
    if missing:
        raise AttachError(f"process {pid}: cannot load a callback library: it has no {', '.join(missing)} "
                          f"(glibc 2.34 or later has them in libc; before, libdl and libpthread must be loaded)")
    return found


def borrowable(world: StoppedWorld) -> Thread:
    """A stopped thread that holds none of the locks pthread_create takes (see above)."""
    mapped = maps(world.pid)
    system = [(m.start, m.end) for m in mapped
              if "x" in m.perms and os.path.basename(m.path).startswith(SYSTEM)]
    restorers = _restorers(world, mapped)
    for thread in sorted(world.threads.values(), key=lambda t: t.tid):
        regs = thread.regs
        if thread.signal or restorers is None:
            continue
        in_system = any(lo <= regs.rip < hi for lo, hi in system)
        if in_system and not _waiting(world, thread):
            continue
        if not _signal_frame(world, mapped, regs.rsp, restorers):
            return thread
    raise NoSafeThread(f"process {world.pid}: no thread is at a point where it may safely start jprobe's "
                       f"loader thread (all were inside libc, or in signal handlers, {TRIES} times); try again")


def _waiting(world: StoppedWorld, thread: Thread) -> bool:
    regs = thread.regs
    if regs.orig_rax >= 1 << 63 or regs.orig_rax not in WAITING:
        return False
    rax = regs.rax - (1 << 64) if regs.rax >= 1 << 63 else regs.rax
    rewound = rax == regs.orig_rax and world.read(regs.rip, 2) == SYSCALL
    return rax in INTERRUPTED or rewound


def _restorers(world: StoppedWorld, mapped: list[Mapping]) -> set[int] | None:
    """Where glibc's `__restore_rt` is (a handler's return address), or None if not found."""
    found = set()
    for m in mapped:
        if "x" in m.perms and os.path.basename(m.path).startswith("libc.so"):
            code = world.read(m.start, m.end - m.start)
            at = code.find(RESTORE_RT)
            while at >= 0:
                found.add(m.start + at)
                at = code.find(RESTORE_RT, at + 1)
    return found or None


def _signal_frame(world: StoppedWorld, mapped: list[Mapping], rsp: int, restorers: set[int]) -> bool:
    stack = next((m for m in mapped if m.start <= rsp < m.end), None)
    if stack is None:
        return True
    data = world.read(rsp & ~7, min(STACK_SCAN, stack.end - (rsp & ~7)))
    return any(word in restorers for word in struct.unpack(f"<{len(data) // 8}Q", data[:len(data) // 8 * 8]))
