"""`jprobe.attach(pid)`: probes in a running process (SPEC §5), taken out when the block ends."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

from . import layout
from .errors import AttachError, HandlerError, JprobeError, ProcessGone
from .events import TraceProbe, record_key, trace_args
from .live_events import Event, LiveEvents
from .patcher.live import PYTHON, Batch, LiveSession
from .patcher import unwinder
from .patcher.loads import LoadWatcher
from .spec import Handler, ProbeSpec, parse_probes

# cffi callbacks given to trampolines: kept for the process's life, since a thread may be
# inside one (or about to return into its caller) after its probe is removed.
_CALLABLES: list[Any] = []
COUNTERS = ("hits", "missed", "skipped", "ret_missed", "lost")            # struct jp_probe's


class Probe:
    """One probe site in the process; `hits` is read live from memory the target shares. A
    probe on a library the process has not loaded yet waits (`pending`) until it does."""

    def __init__(self, name: str, module: str, handler: str):
        self.spec, self.module, self.handler = name, module, handler
        self.address = 0
        self.mechanism = "pending"
        self._batch: Batch | None = None
        self._index = 0
        self._final: dict[str, int] | None = None
        self._events: LiveEvents | None = None       # a trace probe's session events, once placed
        self._trace: TraceProbe | None = None

    @classmethod
    def placed(cls, batch: Batch, index: int, name: str) -> "Probe":
        probe = cls(name, batch.module.path, batch.plan.probes[index].handler)
        probe._place(batch, index)
        return probe

    def _place(self, batch: Batch, index: int) -> None:
        plan = batch.plan.probes[index]
        self._batch, self._index = batch, index
        self.module, self.address, self.mechanism = batch.module.path, plan.address, str(plan.mechanism)

    @property
    def pending(self) -> bool:
        return self._batch is None and self._final is None

    @property
    def hits(self) -> int:
        return self._count("hits")

    @property
    def missed(self) -> int:
        """Hits whose handler did not run: the thread was in a handler already."""
        return self._count("missed")

    @property
    def returns_missed(self) -> int:
        """%return: calls whose return was not followed (64 followed calls deep already, the
        return stacks used up, or given up to a backtrace's walk)."""
        return self._count("ret_missed")

    @property
    def lost(self) -> int:
        """trace: records dropped (a ring full or none for the thread, or a stream full: see events())."""
        return self._count("lost") + (self._events.dropped(self._trace.name) if self._trace is not None else 0)

    def events(self) -> Iterator[Event]:
        """A trace probe's events as they happen (Event: t_ns, tid, pid, probe, args); blocks for
        the next; ends when the probe is taken out, the session ends or the process exits.
        Events wait for the iterator in a buffer of STREAM_MAX (a full one counts in `lost`)."""
        if self._trace is None or self._events is None:
            raise HandlerError(f"'{self.spec}': events() is a trace probe's (its handler is {self.handler})")
        if not self._events.to_python:
            raise HandlerError(f"'{self.spec}': this session writes its events to a file descriptor, "
                               f"not to events()")
        return iter(self._events.streams[self._trace.name])

    @property
    def on_return(self) -> bool:
        return self.spec.split("=", 1)[0].endswith("%return")

    @property
    def removed(self) -> bool:
        return self._final is not None

    def _count(self, name: str) -> int:
        if self._final is not None:
            return self._final[name]
        return 0 if self._batch is None else self._batch.counter(self._index, name)

    def _settle(self) -> None:
        if self._final is None:
            self._final = {name: self._count(name) for name in COUNTERS}

    def entry(self) -> dict:
        """Its line in the report (SPEC §3)."""
        e = {"probe": self.spec, "module": self.module, "address": f"{self.address:#x}",
             "mechanism": self.mechanism, "handler": self.handler, "hits": self.hits, "lost": self.lost}
        if self._trace is not None and self._events is not None:
            e["events_count"] = self._events.events_of(self._trace)
            e.update(self._events.destination)
        if self.handler != "count":
            e["missed"], e["callback_skipped"] = self.missed, self._count("skipped")
        if self.on_return:
            e["returns_missed"] = self.returns_missed
        if self.mechanism == "pending":
            e["loaded"] = False
        return e

    def __repr__(self) -> str:
        return f"<Probe {self.spec} {self.mechanism} hits={self.hits}>"


class Process:
    """A process jprobe has attached to. Leaving the `with` block (or `detach()`) takes every
    probe out; the process keeps running, untraced."""

    def __init__(self, pid: int, strict: bool = False):
        self.pid = pid
        self._session = LiveSession(pid, strict)
        self.executable = self._session.executable
        self._probes: list[Probe] = []
        self._pending: list[tuple[ProbeSpec, Probe]] = []
        self._internal: list[Probe] | None = None     # jprobe's own on the unwinder, once %return needs them
        self._errors: list[str] = []
        self._watcher: LoadWatcher | None = None
        # Held while jprobe changes the process (and its threads may be stopped): the load
        # watcher's thread changes probes too.
        self.stopping = threading.RLock()
        self.exited = ""                 # why the session ended early, if it did
        self._events: LiveEvents | None = None       # trace events, drained from the first trace probe on
        self._events_to: tuple[int, bool, dict[str, str]] | None = None    # send_events()
        self.detached = False

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def probe(self, spec: str, handler: Callable[[Any], None] | None = None) -> Probe:
        """One probe (SPEC §1 spec), live when this returns. `handler`: a Python callable
        run at each hit with the probe's context (`ctx.regs.rdi`, writable), in jprobe's own
        process only (README: when it can deadlock)."""
        return self.probes([spec], handler)[0]

    def probes(self, specs: Iterable[str], handler: Callable[[Any], None] | None = None) -> list[Probe]:
        """Several probes placed in one stop of the world, in the order given; those on a
        library the process has not loaded yet are placed when it loads it, before its code
        runs."""
        with self.stopping:
            if self.detached:
                raise AttachError(f"process {self.pid}: detached already; attach again")
            parsed = parse_probes(list(specs))
            if handler is not None:
                parsed = [_with_callable(spec, handler, self.pid) for spec in parsed]
            if self._internal is None and any(spec.on_return for spec in parsed):
                self._keep_unwinder_off(next(spec for spec in parsed if spec.on_return))
            absent = {name for name in {spec.module for spec in parsed} - {None} if self._session.loaded(name) is None}
            waiting = [spec for spec in parsed if spec.module in absent]
            made = self._place([spec for spec in parsed if spec not in waiting], handler)
            for spec in waiting:
                if spec.handler.kind != "count":
                    raise HandlerError(f"'{spec.text}': {spec.module} is not loaded yet, and a probe waiting "
                                       f"for a library takes `count` only in this release")
                made[spec.target()] = Probe(spec.target(), spec.module, str(spec.handler))
                self._pending.append((spec, made[spec.target()]))
            if waiting and self._watcher is None:
                self._watcher = LoadWatcher(self._session, self._loaded_something)
            out = [made[spec.target()] for spec in parsed]
            self._probes.extend(p for p in made.values() if p not in self._probes)
            return out

    def _keep_unwinder_off(self, first: ProbeSpec) -> None:
        """Before the first %return probe: jprobe's probes on the unwinder's entry points
        (patcher/unwinder.py), those of libraries not loaded yet waiting for them. Where they
        cannot go, %return is refused: an exception through a followed frame would end the
        program in std::terminate."""
        present, waiting = unwinder.probes(self._session)
        try:
            placed = self._place(present, None)
        except JprobeError as err:
            raise type(err)(f"'{first.text}': jprobe cannot keep the unwinder off followed returns in process "
                            f"{self.pid} ({err}); %return refused") from None
        self._internal = list(placed.values())
        for spec in waiting:
            probe = Probe(spec.target(), spec.module, str(spec.handler))
            self._pending.append((spec, probe))
            self._internal.append(probe)
        if waiting and self._watcher is None:
            self._watcher = LoadWatcher(self._session, self._loaded_something)

    def _place(self, parsed: list[ProbeSpec], handler: Callable[[Any], None] | None) -> dict[str, Probe]:
        if not parsed:
            return {}
        batches = self._session.plan(parsed)
        if handler is not None:
            address = _callable_address(handler)
            for batch in batches:
                batch.callbacks.update({i: address for i in range(len(batch.plan.probes))})
        traced = self._traced(batches)          # known to the reader before their first record
        self._session.apply(batches)
        placed = {name: Probe.placed(batch, i, name) for batch in batches
                  for i, plan in enumerate(batch.plan.probes) for name in plan.target.split("\n")}
        for probe in placed.values():
            probe._trace = traced.get((id(probe._batch), probe._index))
            probe._events = self._events
        return placed

    def send_events(self, fd: int, as_json: bool, path: str | None = None) -> None:
        """Trace events written to `fd` as `jprobe run` writes them (text, or JSON lines), rather
        than to each probe's events(); `path`: the file `fd` is, for the report. Before any
        trace probe is placed."""
        if self._events is not None:
            raise AttachError("send_events: trace probes are placed already")
        where = ({"events_file": os.path.abspath(path)} if path else
                 {"events_to": "stderr" if fd == 2 else f"file descriptor {fd}"})
        self._events_to = (fd, as_json, where)

    def _traced(self, batches: list[Batch]) -> dict[tuple[int, int], TraceProbe]:
        """The trace probes of `batches`, by (batch, index), their records read from now on (the
        session's drainer starts with the first)."""
        found = {}
        for batch in batches:
            for i, plan in enumerate(batch.plan.probes):
                args = trace_args(plan.handler)
                if args is None:
                    continue
                if self._events is None:
                    fd, as_json, where = self._events_to or (None, False, {"events_to": "events()"})
                    self._events = LiveEvents(self._session.rings, self.pid, fd, as_json, where)
                found[id(batch), i] = TraceProbe(record_key(batch.plan.module, batch.trace_ids_from + i),
                                                 plan.target.split("\n")[0], args)
                self._events.add(found[id(batch), i])
        return found

    def _loaded_something(self) -> None:
        """The process has loaded a library (the load watcher's thread): the probes waiting for
        it are placed now, before its code runs."""
        with self.stopping:
            if self.detached:
                return
            ready = [(spec, probe) for spec, probe in self._pending if self._session.loaded(spec.module)]
            if not ready:
                return
            self._pending = [pair for pair in self._pending if pair not in ready]
            internal = {id(p) for p in self._internal or []}
            ready = [(unwinder.settled(self._session, spec) if id(probe) in internal else spec, probe)
                     for spec, probe in ready]
            try:
                placed = self._place([spec for spec, _ in ready], None)
            except JprobeError as err:
                self._errors.append(str(err))
                return
            for spec, probe in ready:
                new = placed[spec.target()]
                probe._place(new._batch, new._index)

    def remove(self, probe: Probe) -> None:
        """Take `probe` out (every name of its site; an entry and a return probe on one function
        share their site, and go out together); it keeps its final `hits`."""
        with self.stopping:
            if probe.removed:
                return
            if probe.pending:
                self._pending = [(s, p) for s, p in self._pending if p is not probe]
                taken = []
            else:
                taken = self._session.remove(probe._batch, [probe._index])
            for p in self._probes:
                if p is probe or p._batch is not None and p._batch is probe._batch and p._index in taken:
                    p._settle()
                    if p._trace is not None and p._events is not None:
                        p._events.end_probe(p._trace.name)

    def detach(self) -> None:
        """Every probe out, the process left running and untraced. A process that has exited
        meanwhile ends the session too, its counts final."""
        with self.stopping:
            if self.detached:
                return
            self.detached = True
            try:
                self._session.remove_all()
            except ProcessGone as err:
                self.exited = str(err)
            finally:
                for p in self._probes:
                    p._settle()
        try:
            if self._watcher is not None:
                self._watcher.stop()
        finally:
            try:
                if self._events is not None:
                    self._events.close()
            finally:
                self._session.release()

    def ended(self) -> str | None:
        """Why the session cannot go on (the process exited or exec'd), or None."""
        try:
            self._session.check_image()
        except ProcessGone as err:
            return str(err)
        return None

    def report(self) -> dict:
        """The SPEC §3 report of this session so far."""
        errors = self._errors + ([self.exited] if self.exited else [])
        if self._events is not None:
            errors += self._events.problems()
        return {"pid": self.pid, "executable": self.executable, "probes": [p.entry() for p in self._probes],
                "errors": errors}



def _with_callable(spec: ProbeSpec, handler: Callable[[Any], None], pid: int) -> ProbeSpec:
    if pid != os.getpid():
        raise HandlerError(f"'{spec.text}': a Python callable handler runs only in jprobe's own process "
                           f"(jprobe.attach(os.getpid())); for process {pid} give a count handler")
    if "=" in spec.text:
        raise HandlerError(f"'{spec.text}': a handler in the spec and handler= too; give one of them")
    name = getattr(handler, "__qualname__", type(handler).__name__)
    return replace(spec, handler=Handler("callback", library=PYTHON, function=name))


def _callable_address(handler: Callable[[Any], None]) -> int:
    """A C function pointer that calls `handler` with a `struct jprobe_ctx *` (cffi takes
    the GIL around the call)."""
    callback = layout.ffi.callback("void(struct jprobe_ctx *)", handler)
    _CALLABLES.append(callback)
    return int(layout.ffi.cast("uintptr_t", callback))
