"""Trace events of an attach session, drained in jprobe while the session lasts.

The rings live in a pool the target shares with jprobe (patcher/rings.py); threads take them
as they first trace, so the drainer looks at the pool's counter before each drain and gives
the reader (events.py, libjprobe_events) every ring handed out since. Events go to a file
descriptor as `jprobe run` writes them (the CLI), or to Python: then the reader writes JSON
lines into a memfd, which the drainer parses after each drain and hands to each probe's
stream, a bounded buffer that `Probe.events()` iterates (a full one drops events and counts
them in the probe's `lost`). Parsing in Python bounds what `events()` sustains (~150,000
events a second here), not what the rings take: they are drained at the same rate either way.

The drainer waits on a pidfd between drains, so it sees the process exit and drains it a last
time (jprobe's mapping of the rings outlives the process); so do `end_probe` (a probe taken
out) and `close` (detach).
"""
from __future__ import annotations

import json
import os
import select
import threading
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

from .events import DRAIN_EVERY, EventReader, TraceProbe
from .errors import JprobeError
from .patcher.rings import Rings

STREAM_MAX = 1 << 16                 # events a probe's stream holds for its iterator


class Event(NamedTuple):
    """One trace record: `t_ns` (CLOCK_MONOTONIC), the thread and process, the probe's name
    and its values by the names trace(...) gave them (`duration` in ns). A tuple: made fast."""

    t_ns: int
    tid: int
    pid: int
    probe: str
    args: dict[str, int]


class Stream:
    """One probe's events waiting for Python, at most STREAM_MAX; ended once no more can come."""

    def __init__(self) -> None:
        self.items: deque[Event] = deque()
        self.dropped = 0
        self.ended = False
        self.cond = threading.Condition()

    def put(self, events: list[Event]) -> None:
        with self.cond:
            room = STREAM_MAX - len(self.items)
            self.items.extend(events[:room])
            self.dropped += max(0, len(events) - room)
            self.cond.notify_all()

    def end(self) -> None:
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def __iter__(self) -> Iterator[Event]:
        while True:
            with self.cond:
                while not self.items and not self.ended:
                    self.cond.wait()
                if not self.items:
                    return
                batch = list(self.items)
                self.items.clear()
            yield from batch


class LiveEvents:
    """The rings of process `pid` drained into `fd` (text, or JSON lines with `as_json`), or,
    with `fd` None, into each probe's Stream."""

    def __init__(self, rings: Rings, pid: int, fd: int | None, as_json: bool, destination: dict[str, str]):
        self.rings, self.pid = rings, pid
        self.destination = destination      # as the report says it: {"events_to": "stderr"}, {"events_file": PATH}
        self.to_python = fd is None
        self._out = os.memfd_create("jprobe:events", os.MFD_CLOEXEC) if fd is None else fd
        self.reader = EventReader([], self._out, as_json or self.to_python)
        self.streams: dict[str, Stream] = {}          # by a probe's record name
        self._added = 0
        self._lock = threading.Lock()                # the reader is not thread-safe
        self._stop = threading.Event()
        self.error: JprobeError | None = None
        self._final: dict[str, int] | None = None     # events of each probe, once the reader is closed
        self._corrupt = 0
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = -1
        self._thread = threading.Thread(target=self._run, name="jprobe-events", daemon=True)

    def add(self, probe: TraceProbe) -> Stream:
        """`probe`'s records formatted from now on; its stream (for Python)."""
        with self._lock:
            if probe.name not in self.streams:
                self.reader.add_probe(probe)
                self.streams[probe.name] = Stream()
            if not self._thread.is_alive() and not self._stop.is_set():
                self._thread.start()
            return self.streams[probe.name]

    def events_of(self, probe: TraceProbe) -> int:
        """Events of `probe` delivered: written out, or into its stream (not those it dropped)."""
        with self._lock:
            n = self.reader.events_of(probe) if self._final is None else self._final.get(probe.name, 0)
        stream = self.streams.get(probe.name)
        return n - (stream.dropped if stream is not None and self.to_python else 0)

    def dropped(self, name: str) -> int:
        stream = self.streams.get(name)
        return stream.dropped if stream is not None else 0

    def drain(self) -> None:
        """Every ring handed out so far read to its head, the events delivered."""
        with self._lock:
            if self.rings.fd < 0 or self._final is not None:
                return
            taken = self.rings.taken()
            for i in range(self._added, taken):
                self.reader.add_ring(self.rings.ring(i))
            self._added = taken
            self.reader.poll()
            if self.to_python:
                self._parse()

    def _parse(self) -> None:
        size = os.lseek(self._out, 0, os.SEEK_CUR)
        if not size:
            return
        data = os.pread(self._out, size, 0)
        os.ftruncate(self._out, 0)
        os.lseek(self._out, 0, os.SEEK_SET)
        by_probe: dict[str, list[Event]] = {}
        for e in json.loads(b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]"):    # one call: 1.5x faster
            by_probe.setdefault(e["probe"], []).append(Event(e["t_ns"], e["tid"], e["pid"], e["probe"], e["args"]))
        for name, events in by_probe.items():
            self.streams[name].put(events)

    def end_probe(self, name: str) -> None:
        """`name` taken out: its last events delivered, its stream ended."""
        self.drain()
        stream = self.streams.get(name)
        if stream is not None:
            stream.end()

    def _run(self) -> None:
        poller = select.poll()
        if self._pidfd >= 0:
            poller.register(self._pidfd, select.POLLIN)
        try:
            while not self._stop.is_set():
                gone = bool(poller.poll(DRAIN_EVERY * 1000)) or self._pidfd < 0
                self.drain()
                if gone:                     # exited: drained for the last time
                    self._end_all()
                    return
        except JprobeError as err:
            self.error = err
            self._end_all()
        except Exception as err:            # events() must end, whatever went wrong
            self.error = JprobeError(f"trace events stopped: {err}")
            self._end_all()

    def problems(self) -> list[str]:
        """What the report's errors say of the events: rings that did not parse, a failed write."""
        with self._lock:
            corrupt = self.reader.dropped()[1] if self._final is None else self._corrupt
        found = [f"trace: {corrupt} ring(s) held records that did not parse; the rest of each was skipped"] if corrupt else []
        return found + ([str(self.error)] if self.error is not None else [])

    def _end_all(self) -> None:
        for stream in self.streams.values():
            stream.end()

    def close(self) -> None:
        """The last drain (detach): every stream ended, the reader closed."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
        try:
            self.drain()
        except JprobeError as err:
            self.error = self.error or err
        self._end_all()
        with self._lock:
            if self._final is not None:
                return
            self._final = {p.name: self.reader.events_of(p) for p in self.reader.probes}
            self._corrupt = self.reader.dropped()[1]
            self.reader.close()
            if self.to_python:
                os.close(self._out)
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1

