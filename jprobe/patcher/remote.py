"""System calls made by a stopped thread of the target, for the target.

`jprobe attach` injects nothing that could take a lock the program holds: a borrowed thread
runs one raw `syscall` instruction (one already in the target's code) with jprobe's
arguments, single-stepped, and is put back exactly as it was stopped. That is all the target
must do itself: create a memfd, map it near a module, and keep the descriptor (close-on-exec)
so that a later attach finds it. Everything else (trampolines, probe tables, site bytes)
jprobe writes.
"""
from __future__ import annotations

import os

from . import ptrace
from .target import AttachError, Mapping, ProcessGone, maps
from .world import NO_SYSCALL, RED_ZONE, SYSCALL, StoppedWorld, Thread

NR_CLOSE, NR_MMAP, NR_MEMFD_CREATE = 3, 9, 319
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_FIXED_NOREPLACE = 0x01, 0x100000
MFD_CLOEXEC = 1


def syscall_site(pid: int) -> int:
    """The address of a `syscall` instruction in the target's code (the vDSO's first)."""
    code = [m for m in maps(pid) if "x" in m.perms and m.path != "[vsyscall]"]   # vsyscall: unreadable
    code.sort(key=lambda m: m.path != "[vdso]")
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} exited") from None
    try:
        for m in code:
            try:
                found = os.pread(fd, min(m.end - m.start, 1 << 20), m.start).find(SYSCALL)
            except OSError:
                continue
            if found >= 0:
                return m.start + found
    finally:
        os.close(fd)
    raise AttachError(f"process {pid}: no `syscall` instruction found in its code")


class Caller:
    """One stopped thread of the world, borrowed for system calls."""

    def __init__(self, world: StoppedWorld):
        # Looked for with the threads stopped: a process caught in execve() is stopped only
        # once its new image is complete.
        self.world, self.site = world, syscall_site(world.pid)
        self.thread = self._pick(world)

    @staticmethod
    def _pick(world: StoppedWorld) -> Thread:
        # A thread stopped with no signal on its way: nothing else runs while it is borrowed.
        quiet = [t for t in world.threads.values() if not t.signal]
        if not quiet:
            raise AttachError(f"process {world.pid}: every thread has a signal pending; try again")
        return min(quiet, key=lambda t: t.tid)

    def __call__(self, nr: int, *args: int) -> int:
        thread = self.thread
        resume = thread.regs.copy()
        regs = resume.copy()
        regs.rax, regs.orig_rax, regs.rip = nr, NO_SYSCALL, self.site
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, name, value & ((1 << 64) - 1))
        try:
            self.world.set_regs(thread, regs)
            self.world.step_while(thread, lambda rip: rip == self.site)
            result = thread.regs.rax
        finally:
            self.world.set_regs(thread, resume)
        return result - (1 << 64) if result >= 1 << 63 else result

    def scratch(self, data: bytes) -> int:
        """`data` written on the borrowed thread's stack, below its red zone; its address."""
        rsp = self.thread.regs.rsp
        at = (rsp - RED_ZONE - len(data) - 64) & ~15
        stack = next((m for m in maps(self.world.pid) if m.start <= rsp < m.end), None)
        if stack is None or at < stack.start:
            raise AttachError(f"process {self.world.pid}: thread {self.thread.tid} has no room on its stack")
        self.world.write(at, data)
        return at

    def check(self, what: str, result: int) -> int:
        if result < 0:
            raise AttachError(f"process {self.world.pid}: {what} failed in the target: {os.strerror(-result)}")
        return result


def create_shared(world: StoppedWorld, name: str, base: int, half: int) -> int:
    """A memfd of 2 * `half` bytes in the target, its first half mapped read-execute at `base`,
    its second read-write right after: jprobe's descriptor of it (the process keeps its own
    open, close-on-exec, for a later attach to find)."""
    call = Caller(world)
    fd = call.check("memfd_create", call(NR_MEMFD_CREATE, call.scratch(name.encode() + b"\0"), MFD_CLOEXEC))
    ours = ptrace.pidfd_getfd(world.pid, fd)
    try:
        os.ftruncate(ours, 2 * half)
        for offset, prot in ((0, PROT_READ | PROT_EXEC), (half, PROT_READ | PROT_WRITE)):
            at = call(NR_MMAP, base + offset, half, prot, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, offset)
            if at != base + offset:
                raise AttachError(f"process {world.pid}: cannot map jprobe's code at {base + offset:#x} "
                                  f"({os.strerror(-at) if at < 0 else 'placed elsewhere'})")
    except BaseException:
        os.close(ours)
        raise
    return ours


def find_shared(pid: int, name: str) -> tuple[Mapping, int] | None:
    """The mapping and target descriptor of a memfd an earlier attach left, by its name."""
    label = f"/memfd:{name} (deleted)"
    mapping = next((m for m in maps(pid) if m.path == label and m.offset == 0), None)
    if mapping is None:
        return None
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} exited") from None
    for entry in entries:
        try:
            if os.readlink(f"/proc/{pid}/fd/{entry}") == label:
                return mapping, int(entry)
        except OSError:
            continue
    return None


def create_shared_here(name: str, base: int, half: int) -> int:
    """create_shared() for jprobe's own process (`jprobe.attach(os.getpid())`)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    ours = os.dup(fd)
    os.set_inheritable(ours, False)
    try:
        os.ftruncate(fd, 2 * half)
        for offset, prot in ((0, PROT_READ | PROT_EXEC), (half, PROT_READ | PROT_WRITE)):
            at = ptrace.mmap(base + offset, half, prot, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, offset)
            if at != base + offset:
                raise AttachError(f"cannot map jprobe's code at {base + offset:#x} in this process")
    except BaseException:
        os.close(fd)
        os.close(ours)
        raise
    return ours
