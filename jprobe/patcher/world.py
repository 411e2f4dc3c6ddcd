"""Every thread of a process stopped, for as long as a `with` block writes its code.

jprobe is the tracer only inside the block: it seizes every thread (PTRACE_SEIZE, and
threads they create meanwhile are traced from their start), until the set is stable; stops
them with PTRACE_INTERRUPT, which sends no signal the program could see; and detaches them
all when the block ends, whatever ended it. Between blocks the process is not traced:
signals are not held up, and a debugger may attach.

A thread blocked in a system call when it is stopped comes out of the call. Most calls are
restarted by the kernel when the thread resumes; those that return EINTR instead
(epoll_wait, poll with a signal mask, semop, sigtimedwait... see signal(7)) would make the
program see an error it never had. Such a thread is rewound to its `syscall` instruction with
the call's number back in rax, so it issues the call again when it resumes (a relative
timeout grows by the time it was stopped) -- unless a signal is pending for it, which is then
the call's real interruption.

Ctrl-C and the termination signals are held back while threads are stopped, so that jprobe
never leaves a thread stopped or moved halfway; they take effect when the block ends.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import ptrace
from .ptrace import Regs
from .target import AttachError, ProcessGone, check_process, pending_signals, permission_hint, threads, tracer_of

EINTR = (1 << 64) - errno.EINTR
NO_SYSCALL = (1 << 64) - 1
SYSCALL = b"\x0f\x05"
RED_ZONE = 128
DF = 0x400                            # rflags' direction flag: clear at a call (SysV ABI)
HELD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
# How many instructions a thread may take to leave a trampoline when it is stepped out.
MAX_STEPS = 100_000
# Waiting for a thread to stop: polls from 20 us, doubling up to 1 ms; past 0.3 ms the other
# threads are polled too.
POLL_FIRST, POLL_OTHERS, POLL_MAX = 20e-6, 0.3e-3, 1e-3
REAP_S = 5.0                       # how long killed threads may take to exit
STOLEN_AFTER = 0.05                # a stop's status not come by then may have been taken
STOPPED = ptrace.EVENT_STOP << 16 | signal.SIGTRAP << 8 | 0x7f     # a wait status: an interrupt stop


@dataclass
class Thread:
    tid: int
    regs: Regs                       # as the thread will resume
    signal: int = 0                  # a signal it was stopped with, delivered when it resumes


@dataclass
class StoppedWorld:
    pid: int
    threads: dict[int, Thread] = field(default_factory=dict)
    rewound: int = 0                 # system calls rewound so that they see no EINTR

    def __enter__(self) -> "StoppedWorld":
        self._held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
        self._traced: set[int] = set()
        self._statuses: dict[int, list[int]] = {}
        self._mem = None
        try:
            self._stop_all()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    # -- memory ---------------------------------------------------------------------------
    def read(self, address: int, size: int) -> bytes:
        try:
            data = os.pread(self._memory(), size, address)
        except OSError:
            data = b""
        if len(data) != size:
            raise self._unreachable("read", size, address)
        return data

    def write(self, address: int, data: bytes) -> None:
        """Write to any page, read-only code included (the kernel makes it a private copy)."""
        try:
            written = os.pwrite(self._memory(), data, address)
        except OSError:
            written = 0
        if written != len(data):
            raise self._unreachable("write", len(data), address)

    def _unreachable(self, what: str, size: int, address: int) -> AttachError:
        try:
            check_process(self.pid)
        except ProcessGone:
            return ProcessGone(f"process {self.pid} exited")
        except AttachError:
            pass
        return AttachError(f"process {self.pid}: cannot {what} {size} bytes at {address:#x} (not mapped)")

    def _memory(self) -> int:
        if self._mem is None:
            try:
                self._mem = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            except (FileNotFoundError, ProcessLookupError):
                raise ProcessGone(f"process {self.pid} exited") from None
        return self._mem

    # -- registers ------------------------------------------------------------------------
    def set_regs(self, thread: Thread, regs: Regs) -> None:
        """`thread` resumes with `regs`: written at once, so that the thread is consistent
        whenever it resumes (if jprobe is killed, the kernel lets it run as it is)."""
        ptrace.set_regs(thread.tid, regs)
        thread.regs = regs

    # -- calling --------------------------------------------------------------------------
    def prepare_call(self, thread: Thread, function: int, args: tuple[int, ...], return_to: int) -> None:
        """`thread` resumes, when the world is released, by calling `function(*args)`, which
        returns to `return_to` (code that puts the thread back by itself: arch.emit_resume)."""
        sp = ((thread.regs.rsp - RED_ZONE - 256) & ~15) - 8      # as a `call` leaves it
        self.write(sp, return_to.to_bytes(8, "little"))
        regs = thread.regs.copy()
        regs.rsp, regs.rip, regs.orig_rax, regs.rax = sp, function, NO_SYSCALL, 0
        regs.eflags &= ~DF
        for name, value in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), args):
            setattr(regs, name, value)
        self.set_regs(thread, regs)

    # -- stepping -------------------------------------------------------------------------
    def step_while(self, thread: Thread, inside) -> None:
        """Single-step `thread` until inside(rip) is false (it has left code about to go)."""
        for _ in range(MAX_STEPS):
            if not inside(thread.regs.rip):
                return
            ptrace.singlestep(thread.tid)
            self._wait_stop(thread.tid, stepping=thread)
            thread.regs = ptrace.get_regs(thread.tid)
        raise AttachError(f"thread {thread.tid} did not leave jprobe's trampolines in {MAX_STEPS} steps")

    # -- waiting --------------------------------------------------------------------------
    def _status(self, tid: int) -> int:
        """The next wait status of traced thread `tid`. Polled: the exit of a process's
        leader is reported only once its other threads are reaped, so while it waits, the
        statuses of the other traced threads are collected too, and kept until asked for."""
        if self._statuses.get(tid):
            return self._statuses[tid].pop(0)
        delay, waited = POLL_FIRST, 0.0
        while True:
            status = _poll(tid)
            if status is not None:
                return status
            if delay >= POLL_OTHERS:
                for other in self._traced - {tid}:
                    found = _poll(other)
                    if found is not None:
                        self._statuses.setdefault(other, []).append(found)
            if waited > STOLEN_AFTER:
                # The process is jprobe's child too, and another thread of jprobe's waited
                # for it (Popen.poll()): that took the stop's status. /proc still tells.
                state = _state(self.pid, tid)
                if state in ("", "X", "Z"):
                    return 0                        # gone: as an exit
                if state == "t":
                    return STOPPED
            time.sleep(delay)
            waited += delay
            delay = min(2 * delay, POLL_MAX)

    def _reap(self, dying: list[int]) -> None:
        """Wait for the exits of traced threads that were killed: until the tracer has reaped
        them, the process cannot be reaped by its parent. Its leader's exit comes only after
        the others': it goes last."""
        deadline = time.monotonic() + REAP_S
        for tid in sorted(dying, key=lambda t: t == self.pid):
            while time.monotonic() < deadline:
                kept = self._statuses.get(tid)
                status = kept.pop(0) if kept else _poll(tid)
                if status is not None and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                    break
                time.sleep(POLL_MAX)
            self._traced.discard(tid)

    # -- stopping and releasing -----------------------------------------------------------
    def _stop_all(self) -> None:
        check_process(self.pid)
        while True:
            fresh = threads(self.pid) - self._traced
            if not fresh:
                break
            seized = []
            for tid in sorted(fresh):
                try:
                    ptrace.seize(tid)
                except OSError as err:
                    if ptrace.gone(err):
                        continue
                    if err.errno != errno.EPERM:
                        raise
                    if tracer_of(self.pid, tid) != os.getpid():
                        raise AttachError(permission_hint(self.pid)) from None
                    # Born of a thread seized a moment ago, and traced from its start: its
                    # first stop comes by itself (its creator's clone event may come later).
                self._traced.add(tid)
                seized.append(tid)
            for tid in seized:
                try:
                    ptrace.interrupt(tid)
                except OSError as err:
                    if not ptrace.gone(err):
                        raise
            for tid in seized:
                if tid not in self.threads:                 # not noted as a creator's child
                    self._wait_stop(tid)
        if not self.threads:
            raise ProcessGone(f"process {self.pid} exited")

    def _wait_stop(self, tid: int, stepping: Thread | None = None) -> None:
        """Wait until `tid` is in a ptrace stop (with `stepping`: until its single step is
        done) and note it, with threads it created meanwhile."""
        while True:
            status = self._status(tid)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._traced.discard(tid)
                self.threads.pop(tid, None)
                if stepping is not None or tid == self.pid:
                    raise ProcessGone(f"process {self.pid} exited")
                return
            if not os.WIFSTOPPED(status):
                continue
            sig, event = os.WSTOPSIG(status), status >> 16
            if event == ptrace.EVENT_CLONE:
                child = ptrace.event_message(tid)
                if child not in self.threads:             # not seen stopped yet
                    self._traced.add(child)
                    self._wait_stop(child)
                sig = 0
            elif event != 0:
                sig = 0                             # an interrupt (or group) stop
            if stepping is None:
                if tid not in self.threads:
                    self._note(tid, sig)
                return
            if event == 0 and sig == signal.SIGTRAP:
                return                              # the step is done
            if sig:
                stepping.signal = sig               # delivered when the thread resumes
            ptrace.singlestep(tid)

    def _note(self, tid: int, sig: int) -> None:
        try:
            regs = ptrace.get_regs(tid)
        except OSError as err:
            if not ptrace.gone(err):
                raise
            return                                  # it is dying: nothing of it to keep
        thread = Thread(tid, regs, sig)
        self.threads[tid] = thread
        if regs.orig_rax != NO_SYSCALL and regs.rax == EINTR and not pending_signals(self.pid, tid):
            if self.read(regs.rip - 2, 2) == SYSCALL:
                rewound = regs.copy()
                rewound.rip -= 2
                rewound.rax = rewound.orig_rax
                self.set_regs(thread, rewound)
                self.rewound += 1

    def _release(self) -> None:
        """Every traced thread untraced and running, with the registers set_regs gave it."""
        try:
            dying = []
            for tid in sorted(self._traced):
                thread = self.threads.get(tid)
                try:
                    if thread is None:              # seized, never seen stopped
                        ptrace.interrupt(tid)
                        self._wait_stop(tid)
                        thread = self.threads.get(tid)
                    if tid in self._traced:
                        ptrace.detach(tid, thread.signal if thread is not None else 0)
                except (OSError, ProcessGone):
                    dying.append(tid)               # killed meanwhile: its exit is ours to reap
            self._reap(dying)
            self._traced.clear()
            self.threads.clear()
        finally:
            if self._mem is not None:
                os.close(self._mem)
                self._mem = None
            signal.pthread_sigmask(signal.SIG_SETMASK, self._held)


def _state(pid: int, tid: int) -> str:
    """The state letter /proc gives thread `tid` ("" when it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rpartition(") ")[2][:1]
    except OSError:
        return ""


def _poll(tid: int) -> int | None:
    """`tid`'s wait status if it has one now (an exit when it is no tracee of ours any more)."""
    try:
        got, status = os.waitpid(tid, os.WNOHANG | ptrace.WALL)
    except ChildProcessError:
        return 0                                    # gone and reaped: as an exit
    return status if got == tid else None


def stopped(pid: int, work: Callable[[StoppedWorld], None]) -> int:
    """Run `work` with every thread of process `pid` stopped; how many system calls were
    rewound. A process cannot trace its own threads: for the process itself (`jprobe.attach(
    os.getpid())`), a forked child stops them and runs `work` (on its copy of jprobe's state:
    what `work` writes to memory shared with the process, and the process's memory through
    /proc, is all that counts)."""
    try:
        if pid != os.getpid():
            with StoppedWorld(pid) as world:
                work(world)
                return world.rewound
        return _from_child(pid, work)
    except OSError as err:
        if not ptrace.gone(err):
            raise
        try:
            check_process(pid)
        except ProcessGone:
            raise ProcessGone(f"process {pid} exited") from None
        raise AttachError(f"process {pid}: a thread exited while jprobe was writing; try again") from None


def _from_child(pid: int, work: Callable[[StoppedWorld], None]) -> int:
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    child = os.fork()
    if child == 0:                                  # pragma: no cover (a forked child)
        os.close(go_w)
        os.close(done_r)
        answer = b"internal error: no answer"
        try:
            os.read(go_r, 1)
            with StoppedWorld(pid) as world:
                work(world)
                answer = f"ok {world.rewound}".encode()
        except BaseException as err:
            kind = "gone" if isinstance(err, ProcessGone) else "attach" if isinstance(err, AttachError) else "bug"
            answer = f"{kind} {type(err).__name__}: {err}".encode()
        finally:
            os.write(done_w, answer)
            os._exit(0)
    os.close(go_r)
    os.close(done_w)
    try:
        ptrace.allow_tracer(child)
        os.write(go_w, b"g")
        answer = b""
        while chunk := os.read(done_r, 4096):
            answer += chunk
    finally:
        os.close(go_w)
        os.close(done_r)
        os.waitpid(child, 0)
    kind, _, text = answer.decode().partition(" ")
    if kind == "ok":
        return int(text)
    message = text.partition(": ")[2] if kind in ("gone", "attach") else text
    if kind == "gone":
        raise ProcessGone(message)
    if kind == "attach":
        raise AttachError(message)
    raise AttachError(f"internal error in the process that stops this one's threads: {text}")
