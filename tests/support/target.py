"""A running tests/fixtures/attach_target.c, and what the attach tests read of it from /proc
(threads' tracer and state, mapping count, the code bytes at a symbol), with a time limit on
everything that could wait forever: a broken attach must fail a test, not hang the run."""
from __future__ import annotations

import ctypes
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from .elf import read_vaddr, symbol

T = TypeVar("T")

ANSWER_S = 30          # one command of the target, or one call of jprobe's API
SEM_KEY_BASE = 0x6A000000   # attach_target.c's SysV semaphore key, | pid


def bounded(seconds: float, fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on a thread of its own: its result or its exception, or a test
    failure when it has not returned after `seconds` (the thread is left behind, a daemon)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:      # handed to the caller as is
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name=f"bounded {getattr(fn, '__name__', fn)}")
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise AssertionError(f"{getattr(fn, '__qualname__', fn)} hung: no return after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _drain(stream, sink) -> None:
    for line in stream:
        sink(line)


class Seen:
    """A process of the fixture's program as /proc shows it."""

    def __init__(self, pid: int, binary: Path):
        self.pid, self.binary = pid, Path(binary)

    def threads(self) -> dict[int, tuple[str, int, int]]:
        """{tid: (state letter, tracer pid, pending signal mask)} of every thread."""
        out = {}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                status = Path(f"/proc/{self.pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            state = re.search(r"^State:\s+(\S)", status, re.M)[1]
            tracer = int(re.search(r"^TracerPid:\s+(\d+)", status, re.M)[1])
            pending = int(re.search(r"^SigPnd:\s+(\w+)", status, re.M)[1], 16)
            out[int(tid)] = (state, tracer, pending)
        return out

    def assert_free(self, grace: float = 1.0) -> None:
        """No thread traced, stopped or with a signal pending (within `grace` seconds, for a
        detach just made); the process-wide pending set is empty too."""
        deadline = time.monotonic() + grace
        while True:
            held = {tid: st for tid, st in self.threads().items() if st[1] or st[2] or st[0] in "tT"}
            shared = int(re.search(r"^ShdPnd:\s+(\w+)", Path(f"/proc/{self.pid}/status").read_text(), re.M)[1], 16)
            if shared:
                held[0] = ("shared pending", 0, shared)
            if not held or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert not held, f"threads held {{tid: (state, tracer, pending)}}: {held}"

    def maps_lines(self) -> int:
        return len(Path(f"/proc/{self.pid}/maps").read_text().splitlines())

    def runtime_address(self, name: str) -> int:
        """Where the executable's symbol `name` is in the running process."""
        return self.module_address(self.binary, symbol(self.binary, name)[0])

    def module_address(self, module: Path | str, vaddr: int) -> int:
        """Where the link-time address `vaddr` of the mapped file `module` is in the process."""
        from elftools.elf.elffile import ELFFile
        path = str(Path(module).resolve())
        with open(path, "rb") as f:
            first = min(s["p_vaddr"] for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD")
        for line in Path(f"/proc/{self.pid}/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and str(Path(fields[5]).resolve()) == path and int(fields[2], 16) == 0:
                return vaddr + int(fields[0].split("-")[0], 16) - (first & ~0xFFF)
        raise AssertionError(f"{path} is not mapped in {self.pid}")

    def memory(self, address: int, size: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as mem:
            mem.seek(address)
            return mem.read(size)

    def code(self, name: str, size: int = 5) -> bytes:
        """The first bytes of the executable's function `name` as the process has them now."""
        return self.memory(self.runtime_address(name), size)

    def alive(self) -> bool:
        """Running, not a zombie nor gone."""
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().split(") ")[1][0] not in "ZX"
        except OSError:
            return False

    def original_code(self, name: str, size: int = 5) -> bytes:
        return read_vaddr(self.binary, symbol(self.binary, name)[0], size)

    def wait_patched(self, name: str, still_running: Callable[[], bool], timeout: float = ANSWER_S) -> None:
        """Until a jump (e9) is written at `name`: how a test outside jprobe knows the probe is live."""
        deadline = time.monotonic() + timeout
        while self.code(name, 1) != b"\xe9":
            assert still_running(), "jprobe ended before the probe was in place"
            assert time.monotonic() < deadline, f"no jump at {name} after {timeout} s"
            time.sleep(0.01)


class Target(Seen):
    """The fixture program started, and its stdin/stdout protocol."""

    def __init__(self, binary: Path, pause_us: int = 200, spawners: int = 0, preexec_fn=None):
        self.proc = subprocess.Popen([str(binary), str(pause_us), str(spawners)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=preexec_fn)
        super().__init__(self.proc.pid, binary)
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: list[str] = []
        for stream, sink in ((self.proc.stdout, self.lines.put), (self.proc.stderr, self.errors.append)):
            threading.Thread(target=_drain, args=(stream, sink), daemon=True).start()
        try:
            self.expect("ready")
        except BaseException:
            self.kill()
            raise

    # ---- the protocol ------------------------------------------------------------------

    def expect(self, prefix: str, timeout: float = ANSWER_S) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the target said nothing for {timeout} s (wanted {prefix!r}); "
                                 f"{self.describe()}") from None
        assert line.startswith(prefix), f"the target said {line!r}, not {prefix!r}...; {self.describe()}"
        return line.strip()

    def send(self, command: str, answer: str, timeout: float = ANSWER_S) -> str:
        assert self.proc.poll() is None, f"the target is gone before {command!r}; {self.describe()}"
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.expect(answer, timeout)

    def count(self, n: int) -> None:
        """`counted` called exactly n times, over 4 threads, before this returns."""
        self.send(f"count {n}", f"done {n}")

    def progress(self) -> int:
        return int(self.send("progress", "progress").split()[1])

    def quit(self) -> str:
        """The final line, "ok eintr=E bad=B", once the program has exited 0."""
        line = self.send("quit", "ok")
        assert self.proc.wait(ANSWER_S) == 0, self.describe()
        return line

    def describe(self) -> str:
        status = self.proc.poll()
        state = "running" if status is None else f"exited {status}"
        return f"target pid {self.pid} {state}, stderr: {''.join(self.errors[-20:])!r}"

    def fork(self) -> Seen:
        """The child of the fixture's "fork" command: it calls `counted` every millisecond, and
        dies with its parent."""
        return Seen(int(self.send("fork", "child").split()[1]), self.binary)

    # ---- the end -----------------------------------------------------------------------

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        try:
            self.proc.wait(ANSWER_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the target cannot be reaped {ANSWER_S} s after SIGKILL (a tracer that "
                                 f"does not let its threads go?) {{tid: (state, tracer, pending)}}: "
                                 f"{self.threads()}") from None
        finally:
            remove_semaphore(self.pid)


def remove_semaphore(pid: int) -> None:
    """The fixture's SysV semaphore outlives a program killed before "quit"."""
    libc = ctypes.CDLL(None, use_errno=True)
    semid = libc.semget(SEM_KEY_BASE | pid, 0, 0)
    if semid >= 0:
        libc.semctl(semid, 0, 0)        # IPC_RMID


@contextmanager
def running_target(binary: Path, pause_us: int = 200, spawners: int = 0, preexec_fn=None) -> Iterator[Target]:
    """The fixture, ready; killed at the end whatever the test did."""
    target = Target(binary, pause_us, spawners, preexec_fn)
    try:
        yield target
    finally:
        target.kill()
