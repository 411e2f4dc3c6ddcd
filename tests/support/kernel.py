"""The kernel's own uprobes (tracefs) as the reference for jprobe's counts: SPEC section 3
says hits equal what a kernel uprobe counts on the same probe and workload.

Where tracefs is not usable (no root, no CONFIG_UPROBE_EVENTS) a comparison cannot be made;
`require_tracefs` then skips the test with the reason, so the missing check shows in the
summary instead of passing unseen.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from .elf import vaddr_to_offset
from .run import run_prog

TRACEFS = Path("/sys/kernel/tracing")

_counter = itertools.count()


def tracefs_status() -> str | None:
    """None when kernel uprobes are usable, else the reason they are not."""
    events = TRACEFS / "uprobe_events"
    if not events.exists():
        if os.geteuid() != 0:
            return "tracefs uprobes need root (no /sys/kernel/tracing/uprobe_events)"
        TRACEFS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
        if not events.exists():
            return "tracefs with uprobe_events is not available (mount -t tracefs failed or no CONFIG_UPROBE_EVENTS)"
    if not os.access(events, os.W_OK):
        return "no write access to /sys/kernel/tracing/uprobe_events (need root)"
    return None


def require_tracefs(unchecked: str) -> None:
    """Skip the test unless kernel uprobes are usable; `unchecked` names what then goes
    without a kernel cross-check (everything the test asserted before has passed)."""
    reason = tracefs_status()
    if reason:
        pytest.skip(f"{unchecked}: not compared with kernel uprobes ({reason})")


def append_event(path: Path, line: str) -> None:
    """Append to a tracefs file: truncating uprobe_events would remove other workers' probes.
    (os.open, not open(path, "a"): Python's append mode seeks, which tracefs refuses.)"""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_whole(path) -> str:
    """A tracefs file with large read() calls (one, mostly): see _read_profile."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 22)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _read_profile(names) -> dict:
    """Hit counts of the named events from uprobe_profile.

    Lines can go missing from a read that spans several read() calls while other
    processes add or remove uprobes (the list changes between the calls); so read
    with one large read() and, for names still missing, read again.  The counts of
    our events no longer change (the workload has exited)."""
    want, counts = set(names), {}
    for _ in range(20):
        for line in read_whole(TRACEFS / "uprobe_profile").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[-2] in want:
                counts[parts[-2]] = int(parts[-1])
        if want <= counts.keys():
            return counts
    raise AssertionError(f"uprobe_profile never listed {sorted(want - counts.keys())[:5]}")


def kernel_uprobe_counts(binary, file_offsets, argv, env=None, private_copy=True, timeout=300):
    """Put one kernel uprobe on each file offset of `binary`, run argv, return the hit counts.

    A uprobe counts every process that maps the file's inode; to keep other
    tests (xdist workers) from adding to the count, the probes go on a
    private copy of `binary` by default: argv items equal to `binary` are
    replaced by the copy, and "{COPYDIR}" in argv items and env values by its
    directory (for LD_LIBRARY_PATH).  Returns (counts, completed_process).
    """
    binary = Path(binary)
    target = binary
    if private_copy:
        d = Path(os.environ.get("TMPDIR", "/tmp")) / f"jpt-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        target = d / binary.name
        shutil.copy2(binary, target)
        argv = [str(target) if str(a) == str(binary) else str(a).replace("{COPYDIR}", str(d)) for a in argv]
        env = {k: v.replace("{COPYDIR}", str(d)) for k, v in (env or {}).items()}
    events = TRACEFS / "uprobe_events"
    # one group per call (enabled and disabled with one write each); event names unique
    # across processes too, since uprobe_profile prints only the event name
    tag = f"{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    group = f"jpt_{tag}"
    names = [f"e{tag}_{k}" for k in range(len(file_offsets))]
    added = enabled = False
    try:
        if names:
            append_event(events, "\n".join(f"p:{group}/{n} {target}:{off:#x}"
                                           for n, off in zip(names, file_offsets)))
            added = True
            (TRACEFS / "events" / group / "enable").write_text("1\n")
            enabled = True
        proc = run_prog(argv, env=env, timeout=timeout)
        counts = _read_profile(names)
        return [counts[n] for n in names], proc
    finally:
        # Synchronously: a test that writes new files while the kernel is still tearing
        # down uprobes of a deleted copy has seen an int3 of its own vanish.
        if enabled:
            (TRACEFS / "events" / group / "enable").write_text("0\n")
        if added:
            append_event(events, "\n".join(f"-:{group}/{n}" for n in names))
        if private_copy:
            shutil.rmtree(target.parent, ignore_errors=True)


def kernel_uprobe_count(binary, address_file_offset: int, argv, env=None) -> int:
    counts, proc = kernel_uprobe_counts(binary, [address_file_offset], argv, env=env)
    return counts[0]


def check_kernel_counts(binary, vaddrs, argv, jprobe_hits, env=None) -> None:
    """A kernel uprobe on each vaddr of the ORIGINAL binary, on the same workload, must count
    exactly what jprobe counted; without tracefs the test is skipped, visibly."""
    require_tracefs(f"jprobe's counts at {', '.join(hex(v) for v in vaddrs)}")
    offsets = [vaddr_to_offset(binary, v) for v in vaddrs]
    counts, _ = kernel_uprobe_counts(binary, offsets, argv, env=env)
    for v, kc in zip(vaddrs, counts):
        assert jprobe_hits[v] == kc, (
            f"probe at {v:#x}: jprobe counted {jprobe_hits[v]}, a kernel uprobe counted {kc}")


def kernel_return_counts(binary, functions: dict[str, int], argv, buffer_kb: int = 16384) -> dict[str, int]:
    """How many times kernel uretprobes see each function return: `functions` maps a name to
    its file offset in `binary`. uprobe_profile counts a uretprobe's entries, not its
    returns, so the returns are counted as events in a trace instance of our own (no other
    test's events mixed in, a buffer that holds them all: an overrun fails the test).
    The probes go on a private copy of `binary`, as in kernel_uprobe_counts."""
    binary = Path(binary)
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"jpt-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    target = d / binary.name
    shutil.copy2(binary, target)
    argv = [str(target) if str(a) == str(binary) else str(a) for a in argv]
    tag = f"{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    group, instance = f"jpr_{tag}", TRACEFS / "instances" / f"jpr_{tag}"
    names = {f"r{tag}_{k}": name for k, name in enumerate(functions)}
    events = TRACEFS / "uprobe_events"
    added = False
    try:
        instance.mkdir()
        (instance / "buffer_size_kb").write_text(f"{buffer_kb}\n")
        append_event(events, "\n".join(f"r:{group}/{n} {target}:{functions[f]:#x}" for n, f in names.items()))
        added = True
        (instance / "events" / group / "enable").write_text("1\n")
        run_prog(argv)
        (instance / "events" / group / "enable").write_text("0\n")
        for stats in (instance / "per_cpu").glob("cpu*/stats"):
            overrun = [line for line in stats.read_text().splitlines() if line.startswith("overrun:")]
            assert overrun == ["overrun: 0"], f"trace buffer overrun ({stats}): {overrun}"
        counts = dict.fromkeys(functions, 0)
        for line in read_whole(instance / "trace").splitlines():
            if not line.startswith("#"):
                for n, f in names.items():
                    if f" {n}:" in line:
                        counts[f] += 1
        return counts
    finally:
        if instance.exists():
            instance.rmdir()
        if added:
            append_event(events, "\n".join(f"-:{group}/{n}" for n in names))
        shutil.rmtree(d, ignore_errors=True)
