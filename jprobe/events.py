"""Trace events as they happen: the threads' rings drained into one line per event.

libjprobe_events (runtime_c/events_reader.c, never loaded into a probed program) reads the
rings and formats the lines, text or JSON, since Python could not keep up with a million
events a second; this says which probe a record belongs to, and drains while the program runs.
A reader takes rings from a counters file (`jprobe run`) or one by one (`add_ring`), so any
applier that lays rings out in memory jprobe can read can use it.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import cffi

from . import layout
from .errors import JprobeError
from .layout import RUNTIME_DIR

DRAIN_EVERY = 0.005                 # seconds between drains while the program runs

_ffi = cffi.FFI()
_ffi.cdef("""
    struct jpe;
    struct jpe *jpe_open(const char *counters, int json, int fd);
    int jpe_probe(struct jpe *j, uint64_t key, const char *prefix, const char *const *args, int nargs);
    uint64_t jpe_probe_events(struct jpe *j, uint64_t key);
    int jpe_add_ring(struct jpe *j, void *ring);
    int64_t jpe_poll(struct jpe *j);
    void jpe_stats(struct jpe *j, uint64_t *unknown, uint64_t *corrupt);
    void jpe_close(struct jpe *j);
""")
_lib = None


def _library():
    global _lib
    if _lib is None:
        found = sorted(RUNTIME_DIR.glob("libjprobe_events*.so"))
        if not found:
            raise JprobeError(f"the jprobe trace reader is not built in {RUNTIME_DIR}; reinstall with `pip install .`")
        _lib = _ffi.dlopen(str(found[0]))
    return _lib


@dataclass(frozen=True)
class TraceProbe:
    """A probe whose records the reader formats: its records' key (jprobe_ring.h), its name
    and trace(...)'s argument names."""

    key: int
    name: str
    args: tuple[str, ...]


def record_key(module_path: str, probe_id: int) -> int:
    """Word 0 of a probe's records, but for the words and flags."""
    return probe_id | layout.module_key(module_path) << layout.CONST["JP_REC_KEY_SHIFT"]


def trace_args(handler: str) -> tuple[str, ...] | None:
    """The argument names of a `trace(...)` handler as a plan writes it; None for another."""
    if not handler.startswith("trace"):
        return None
    inner = handler[len("trace("):-1]
    return tuple(inner.split(",")) if inner else ()


def tsc_note() -> str | None:
    """Why time stamps may be off on this machine, if they may: rdtsc is a clock only where the
    CPU says its counter runs at a constant rate and on in every sleep state."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    missing = [f for f in ("constant_tsc", "nonstop_tsc") if f not in flags]
    if not missing:
        return None
    return (f"this CPU lacks {' and '.join(missing)}: trace time stamps (rdtsc) may drift from "
            f"CLOCK_MONOTONIC")


class EventReader:
    """Rings drained into `fd`: `text` lines (time in seconds, tid, probe, NAME=value ...) or
    JSON lines ({"t_ns", "tid", "pid", "probe", "args"})."""

    def __init__(self, probes: list[TraceProbe], fd: int, as_json: bool, counters: str | None = None):
        lib = _library()
        self._j = lib.jpe_open(counters.encode() if counters else _ffi.NULL, int(as_json), fd)
        if self._j == _ffi.NULL:
            raise JprobeError(f"cannot read the trace buffers in {counters}")
        self.probes: list[TraceProbe] = []
        self.as_json = as_json
        for p in probes:
            self.add_probe(p)

    def add_probe(self, p: TraceProbe) -> None:
        """Records of `p` formatted from now on (an attach session adds probes as it places them)."""
        if self.as_json:
            prefix = f', "probe": {json.dumps(p.name)}, "args": {{'
            names = [f'{", " if i else ""}{json.dumps(a)}: ' for i, a in enumerate(p.args)]
        else:
            prefix, names = f" {p.name}", [f" {a}=" for a in p.args]
        keep = [_ffi.new("char[]", n.encode()) for n in names]
        if _library().jpe_probe(self._j, p.key, prefix.encode(), _ffi.new("char *[]", keep), len(keep)):
            raise JprobeError(f"trace({','.join(p.args)}) of {p.name}: too many arguments")
        self.probes.append(p)

    def add_ring(self, address: int) -> None:
        """A ring at `address` in this process (a mapping jprobe shares with the program)."""
        if _library().jpe_add_ring(self._j, _ffi.cast("void *", address)):
            raise MemoryError("trace rings")

    def poll(self) -> int:
        """Drain every ring once; the events written so far."""
        n = _library().jpe_poll(self._j)
        if n < 0:
            raise JprobeError(f"cannot write trace events: error {-n}")
        return n

    def events_of(self, probe: TraceProbe) -> int:
        return _library().jpe_probe_events(self._j, probe.key)

    def dropped(self) -> tuple[int, int]:
        """Records not written: of no probe known here, and in rings whose records did not parse."""
        unknown, corrupt = _ffi.new("uint64_t *"), _ffi.new("uint64_t *")
        _library().jpe_stats(self._j, unknown, corrupt)
        return unknown[0], corrupt[0]

    def close(self) -> None:
        if self._j is not None:
            _library().jpe_close(self._j)
            self._j = None


class Drainer:
    """A thread that drains a reader every DRAIN_EVERY seconds until `stop`, which drains once
    more: what the program's processes wrote before they ended, however they ended."""

    def __init__(self, reader: EventReader):
        self.reader = reader
        self.error: JprobeError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jprobe-events", daemon=True)

    def __enter__(self) -> "Drainer":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.wait(DRAIN_EVERY):
                self.reader.poll()
        except JprobeError as err:
            self.error = err

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is None:
            try:
                self.reader.poll()
            except JprobeError as err:
                self.error = err
