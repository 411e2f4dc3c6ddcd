"""The few ptrace(2) requests (and other system calls) `jprobe attach` makes, through libc (no module on PyPI keeps
PTRACE_SEIZE/PTRACE_INTERRUPT, which let a tracer stop a thread without a signal the program
could see), and the x86-64 register file they read and write."""
from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]

SINGLESTEP, GETREGS, SETREGS, DETACH = 9, 12, 13, 17
GETEVENTMSG, GETREGSET, SEIZE, INTERRUPT = 0x4201, 0x4204, 0x4206, 0x4207
NT_X86_XSTATE = 0x202
XSTATE_MAX = 1 << 14              # room for any xsave area the kernel gives
O_TRACECLONE = 0x8
EVENT_CLONE, EVENT_STOP = 3, 128
WALL = 0x40000000                 # __WALL: wait for threads as well as processes
NR_FUTEX, NR_PIDFD_OPEN, NR_PIDFD_GETFD = 202, 434, 438
PR_SET_PTRACER = 0x59616d61


class Regs(ctypes.Structure):
    """struct user_regs_struct (sys/user.h), in its order."""
    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
        "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base",
        "ds", "es", "fs", "gs")]

    def copy(self) -> "Regs":
        return Regs.from_buffer_copy(self)


def _call(request: int, tid: int, addr: int = 0, data: int | ctypes.c_void_p | None = 0) -> int:
    ctypes.set_errno(0)
    result = _libc.ptrace(request, tid, addr, data)
    err = ctypes.get_errno()
    if result == -1 and err:
        raise OSError(err, f"ptrace({request:#x}) on {tid}: {os.strerror(err)}")
    return result


def seize(tid: int) -> None:
    """Trace `tid` without stopping it; threads it creates are traced from their start."""
    _call(SEIZE, tid, 0, O_TRACECLONE)


def interrupt(tid: int) -> None:
    _call(INTERRUPT, tid)


def detach(tid: int, signal: int = 0) -> None:
    """Let `tid` run untraced, delivering `signal` (one it was stopped with) or none."""
    _call(DETACH, tid, 0, signal)


def singlestep(tid: int, signal: int = 0) -> None:
    _call(SINGLESTEP, tid, 0, signal)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def get_vector_state(tid: int) -> bytes:
    """The thread's whole xsave area (x87, SSE, AVX, AVX-512: what GETREGS leaves out)."""
    buf = ctypes.create_string_buffer(XSTATE_MAX)
    iov = _Iovec(ctypes.addressof(buf), XSTATE_MAX)
    _call(GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))
    return buf.raw[:iov.len]


def get_regs(tid: int) -> Regs:
    regs = Regs()
    _call(GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def set_regs(tid: int, regs: Regs) -> None:
    _call(SETREGS, tid, 0, ctypes.addressof(regs))


def event_message(tid: int) -> int:
    value = ctypes.c_ulong()
    _call(GETEVENTMSG, tid, 0, ctypes.addressof(value))
    return value.value


def pidfd_getfd(pid: int, fd: int) -> int:
    """A descriptor of ours for descriptor `fd` of process `pid` (Linux 5.6)."""
    pidfd = _libc.syscall(NR_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    try:
        ours = _libc.syscall(NR_PIDFD_GETFD, pidfd, fd, 0)
        if ours < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return ours
    finally:
        os.close(pidfd)


def gone(err: OSError) -> bool:
    """The thread a request named has exited (or is exiting)."""
    return err.errno == errno.ESRCH


def mmap(at: int, size: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """mmap(2) in this process, at an address of jprobe's choosing (Python's mmap cannot);
    the address, or -1."""
    result = _libc.mmap(at, size, prot, flags, fd, offset)
    return -1 if result is None or result == ctypes.c_void_p(-1).value else result


def munmap(at: int, size: int) -> None:
    _libc.munmap(ctypes.c_void_p(at), ctypes.c_size_t(size))


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


def futex(address: int, op: int, value: int, timeout: float | None = None) -> None:
    """futex(2) on a word of memory shared with another process (not FUTEX_PRIVATE)."""
    spec = None if timeout is None else _Timespec(int(timeout), int(timeout % 1 * 1e9))
    _libc.syscall(NR_FUTEX, ctypes.c_void_p(address), op, value,
                  None if spec is None else ctypes.byref(spec), None, 0)


def allow_tracer(pid: int) -> None:
    """Under Yama's ptrace_scope 1 only an ancestor may trace: let `pid` trace this process."""
    _libc.prctl(PR_SET_PTRACER, pid, 0, 0, 0)
