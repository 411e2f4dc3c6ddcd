"""`jprobe.attach(pid)`: probes in a running process (SPEC §5), taken out when the block ends."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from . import layout
from .errors import AttachError, HandlerError, ProcessGone
from .patcher.live import PYTHON, Batch, LiveSession
from .spec import Handler, ProbeSpec, parse_probes

# cffi callbacks given to trampolines: kept for the process's life, since a thread may be
# inside one (or about to return into its caller) after its probe is removed.
_CALLABLES: list[Any] = []
COUNTERS = ("hits", "missed", "skipped")            # struct jp_probe's


class Probe:
    """One probe site in the process; `hits` is read live from memory the target shares."""

    def __init__(self, batch: Batch, index: int, name: str):
        self._batch, self._index = batch, index
        plan = batch.plan.probes[index]
        self.spec = name
        self.module = batch.module.path
        self.address = plan.address
        self.mechanism = str(plan.mechanism)
        self.handler = plan.handler
        self._final: dict[str, int] | None = None

    @property
    def hits(self) -> int:
        return self._count("hits")

    @property
    def missed(self) -> int:
        """Hits whose handler did not run: the thread was in a handler already."""
        return self._count("missed")

    @property
    def removed(self) -> bool:
        return self._final is not None

    def _count(self, name: str) -> int:
        return self._final[name] if self._final is not None else self._batch.counter(self._index, name)

    def _settle(self) -> None:
        if self._final is None:
            self._final = {name: self._batch.counter(self._index, name) for name in COUNTERS}

    def entry(self) -> dict:
        """Its line in the report (SPEC §3)."""
        e = {"probe": self.spec, "module": self.module, "address": f"{self.address:#x}",
             "mechanism": self.mechanism, "handler": self.handler, "hits": self.hits, "lost": 0}
        if self.handler != "count":
            e["missed"], e["callback_skipped"] = self.missed, self._count("skipped")
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
        self.exited = ""                 # why the session ended early, if it did
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
        """Several probes placed in one stop of the world, in the order given."""
        if self.detached:
            raise AttachError(f"process {self.pid}: detached already; attach again")
        parsed = parse_probes(list(specs))
        if handler is not None:
            parsed = [_with_callable(spec, handler, self.pid) for spec in parsed]
        batches = self._session.plan(parsed)
        if handler is not None:
            address = _callable_address(handler)
            for batch in batches:
                batch.callbacks.update({i: address for i in range(len(batch.plan.probes))})
        self._session.apply(batches)
        made = {}
        for batch in batches:
            for i, plan in enumerate(batch.plan.probes):
                for name in plan.target.split("\n"):
                    made[name] = Probe(batch, i, name)
        out = [made[spec.target()] for spec in parsed]
        self._probes.extend(made.values())
        return out

    def remove(self, probe: Probe) -> None:
        """Take `probe` out (every name of its site); it keeps its final `hits`."""
        if probe.removed:
            return
        self._session.remove(probe._batch, [probe._index])
        for p in self._probes:
            if p._batch is probe._batch and p._index == probe._index:
                p._settle()

    def detach(self) -> None:
        """Every probe out, the process left running and untraced. A process that has exited
        meanwhile ends the session too, its counts final."""
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
            self._session.release()

    def ended(self) -> str | None:
        """Why the session cannot go on (the process exited or exec'd), or None."""
        try:
            if self._session.exec_happened():
                return f"process {self.pid} exec'd: its probes went with its old image"
        except ProcessGone:
            return f"process {self.pid} exited"
        return None

    def report(self) -> dict:
        """The SPEC §3 report of this session so far."""
        errors = [self.exited] if self.exited else []
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
