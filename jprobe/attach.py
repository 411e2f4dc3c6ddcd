"""`jprobe.attach(pid)`: probes in a running process (SPEC §5), taken out when the block ends."""
from __future__ import annotations

from collections.abc import Iterable

from .patcher.live import Batch, LiveSession
from .patcher.target import AttachError, ProcessGone
from .spec import parse_probes

__all__ = ["attach", "Process", "Probe", "AttachError", "ProcessGone"]


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
        self._final: int | None = None

    @property
    def hits(self) -> int:
        return self._final if self._final is not None else self._batch.hits(self._index)

    @property
    def removed(self) -> bool:
        return self._final is not None

    def _settle(self) -> None:
        if self._final is None:
            self._final = self._batch.hits(self._index)

    def entry(self) -> dict:
        """Its line in the report (SPEC §3)."""
        return {"probe": self.spec, "module": self.module, "address": f"{self.address:#x}",
                "mechanism": self.mechanism, "handler": self.handler, "hits": self.hits, "lost": 0}

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

    def probe(self, spec: str) -> Probe:
        """One probe (SPEC §1 spec), live when this returns."""
        return self.probes([spec])[0]

    def probes(self, specs: Iterable[str]) -> list[Probe]:
        """Several probes placed in one stop of the world, in the order given."""
        if self.detached:
            raise AttachError(f"process {self.pid}: detached already; attach again")
        parsed = parse_probes(list(specs))
        batches = self._session.plan(parsed)
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


def attach(pid: int, strict: bool = False) -> Process:
    """Attach to process `pid`; use as a context manager (SPEC §5)."""
    return Process(pid, strict)
