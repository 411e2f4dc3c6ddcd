"""What /proc says of a process `jprobe attach` works on: is it there, may we trace it, its
threads, its mappings and the files behind them (seen from its own mount namespace)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import AttachError, ProcessGone


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str


def check_process(pid: int) -> None:
    """Refuse, with what to do, a pid that is not there, that another tracer holds, or that
    this user may not trace."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"no process {pid}; give the pid of a running process (`pgrep NAME`)") from None
    if status.get("State", "").startswith("Z"):
        raise ProcessGone(f"process {pid} has exited (a zombie); give the pid of a running process")
    tracer = int(status.get("TracerPid", "0"))
    if tracer and tracer != os.getpid():
        raise AttachError(f"process {pid} is already traced by process {tracer} ({comm(tracer)}); "
                          f"detach that tracer (a debugger, strace) first")
    if int(status.get("Tgid", pid)) != pid:
        raise AttachError(f"{pid} is a thread of process {status['Tgid']}; give the process id")


def permission_hint(pid: int) -> str:
    """Why ptrace said EPERM, and what to do."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read())
    except (OSError, ValueError):
        scope = 0
    if os.geteuid() == 0:
        return (f"permission denied tracing process {pid} even as root (a seccomp filter, a "
                f"security module, or another user namespace); check `dmesg`")
    if scope >= 1:
        return (f"permission denied tracing process {pid}: kernel.yama.ptrace_scope is {scope}; run "
                f"jprobe as root, give it CAP_SYS_PTRACE, or `sysctl kernel.yama.ptrace_scope=0`")
    return (f"permission denied tracing process {pid}: it belongs to another user; run jprobe as "
            f"that user or as root")


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def threads(pid: int) -> set[int]:
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} exited") from None


def descendants(pid: int) -> list[int]:
    """Processes forked from `pid`, and from them, now alive (children before their own)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop(0)
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def maps(pid: int) -> list[Mapping]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} exited") from None
    except PermissionError:
        raise AttachError(permission_hint(pid)) from None
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        out.append(Mapping(lo, hi, fields[1], int(fields[2], 16), int(fields[4]),
                           fields[5] if len(fields) > 5 else ""))
    return out


def executable(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} exited") from None
    except PermissionError:
        raise AttachError(permission_hint(pid)) from None


def auxv(pid: int) -> bytes:
    """The process's auxiliary vector: the kernel gives each image its own (exec)."""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} exited") from None
    except PermissionError:
        raise AttachError(permission_hint(pid)) from None


def file_of(pid: int, mapping: Mapping) -> str:
    """A path to the file behind `mapping` that jprobe can read: its own path when that is
    the same file (same inode), else through the process's root (a container's files)."""
    for path in (mapping.path, f"/proc/{pid}/root{mapping.path}"):
        try:
            if os.stat(path).st_ino == mapping.inode:
                return path
        except OSError:
            continue
    raise AttachError(f"{mapping.path}: the file on disk is not the one process {pid} has mapped "
                      f"(replaced since it was loaded?); restart the process to probe it")


def tracer_of(pid: int, tid: int) -> int:
    """The pid tracing thread `tid` (0: none, or the thread is gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            return int(next((line.split()[1] for line in f if line.startswith("TracerPid:")), "0"))
    except OSError:
        return 0


def pending_signals(pid: int, tid: int) -> int:
    """Signals pending for thread `tid` (its own and its process's) that it does not block."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return 0
    pending = int(status.get("SigPnd", "0"), 16) | int(status.get("ShdPnd", "0"), 16)
    return pending & ~int(status.get("SigBlk", "0"), 16)
