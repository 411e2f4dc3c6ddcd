"""The counters file of `jprobe run` (jprobe_shm.h): created before the program, read after."""
from __future__ import annotations

import mmap
import struct
from collections import defaultdict
from dataclasses import dataclass, field

from . import layout
from .mechanisms import Mechanism
from .planfile import PlannedModule
from .report import merge_reports
from .runtime import UNWINDING

PAGE = mmap.PAGESIZE


def create(path: str, nmodules: int) -> None:
    """An empty counters file: a header whose bump pointer starts at the first page boundary."""
    header = layout.ffi.new("struct jp_shm_header *")
    header.magic = layout.STRING["JP_SHM_MAGIC"]
    header.version = layout.CONST["JP_SHM_VERSION"]
    header.nmodules = nmodules
    header.next = PAGE
    with open(path, "wb") as f:
        f.write(bytes(layout.ffi.buffer(header)))
        f.truncate(PAGE)


def _records(data: bytes):
    ffi = layout.ffi
    header = ffi.from_buffer("struct jp_shm_header *", data)
    at, end, size = PAGE, min(header.next, len(data)), layout.sizeof("jp_shm_record")
    while at + size <= end:
        record = ffi.from_buffer("struct jp_shm_record *", data[at:at + size])
        if record.payload < at + size or record.payload + record.size > len(data):
            break                              # its process died before describing it
        if record.kind:                        # else died while filling it in
            yield record.kind, record.module, record.pid, data[record.payload:record.payload + record.size]
        at = record.payload + record.size
        at += -at % 8


def _per_pid() -> defaultdict:
    return defaultdict(lambda: defaultdict(int))


@dataclass
class Tally:
    """What the processes of a run left in the counters file, by (module index, probe index)."""

    hits: defaultdict = field(default_factory=_per_pid)       # {key: {pid: n}}
    missed: defaultdict = field(default_factory=_per_pid)     # callback not run: already in one
    skipped: defaultdict = field(default_factory=_per_pid)    # callback not run: not resolved yet
    ret_missed: defaultdict = field(default_factory=_per_pid)  # %return: calls whose return went unseen
    lost: defaultdict = field(default_factory=_per_pid)       # trace records dropped: buffer full or none
    errors: list[str] = field(default_factory=list)           # the messages the processes left
    settled: dict = field(default_factory=dict)               # {key: TRAP}: fell back at run time
    unpatched: set = field(default_factory=set)               # keys whose site a process left alone
    placed: set[int] = field(default_factory=set)             # modules some process placed (TABLE)


def _table_probes(payload: bytes, n: int):
    """The struct jp_probe records of a TABLE record's table."""
    at = layout.sizeof("jp_table")
    return layout.ffi.from_buffer("struct jp_probe[]", payload[at:at + n * layout.sizeof("jp_probe")])


def tally(path: str, modules: list[PlannedModule]) -> Tally:
    """Everything the counters file says: hits per pid (TABLE and BLOCK records), why
    callbacks did not run (TABLE records: missed, skipped and lost are counted only there), which
    probes the runtime settled otherwise than planned, and the errors."""
    with open(path, "rb") as f:
        data = f.read()
    out = Tally()
    trap, unpatched = layout.MECHANISMS[Mechanism.TRAP], layout.CONST["JP_PROBE_UNPATCHED"]
    for kind, module, pid, payload in _records(data):
        if kind == layout.CONST["JP_SHM_ERROR"]:
            out.errors.append(payload.split(b"\0", 1)[0].decode(errors="replace"))
            continue
        if module >= len(modules):
            continue
        n = len(modules[module].plan.probes)
        if kind == layout.CONST["JP_SHM_TABLE"]:
            out.placed.add(module)
            for i, probe in enumerate(_table_probes(payload, n)):
                key = (module, i)
                out.hits[key][pid] += probe.hits
                out.missed[key][pid] += probe.missed
                out.skipped[key][pid] += probe.skipped
                out.ret_missed[key][pid] += probe.ret_missed
                out.lost[key][pid] += probe.lost
                if probe.mechanism == trap:
                    out.settled[key] = Mechanism.TRAP
                if probe.flags & unpatched:
                    out.unpatched.add(key)
        elif kind == layout.CONST["JP_SHM_BLOCK"]:
            for i, c in enumerate(struct.unpack_from(f"<{n}Q", payload)):
                out.hits[(module, i)][pid] += c
    return out


def _callback_probes(modules: list[PlannedModule]) -> set[tuple[int, int]]:
    """The probes whose handler is a C callback, as their plans' tables say."""
    callback = layout.HANDLERS["callback"]
    return {(i, j) for i, m in enumerate(modules)
            for j, probe in enumerate(_table_probes(m.plan.data, len(m.plan.probes))) if probe.handler == callback}


def _return_probes(modules: list[PlannedModule]) -> set[tuple[int, int]]:
    """The %return probes, as their plans' tables say."""
    returns = layout.CONST["JP_PROBE_RETURN"]
    return {(i, j) for i, m in enumerate(modules)
            for j, probe in enumerate(_table_probes(m.plan.data, len(m.plan.probes))) if probe.flags & returns}


def build_report(path: str, modules: list[PlannedModule], pid: int, executable: str) -> dict:
    """The SPEC §3 report of a whole `jprobe run` process tree (`by_pid` when several hit).

    A module no process placed and no error names never loaded: its probes say `"loaded":
    false` rather than pass for probes that were never hit. A callback probe says why its
    callback did not run for some hits (`missed`, `callback_skipped`); a probe some process
    left unpatched says `"patched": false`; a %return probe, how many calls it saw whose
    return it did not follow (`returns_missed`: no room in the thread's return stack, or a
    thread the runtime did not start)."""
    t = tally(path, modules)
    callbacks, returns = _callback_probes(modules), _return_probes(modules)
    pids = sorted({p for per_pid in t.hits.values() for p in per_pid} - {pid})
    never = {i for i, m in enumerate(modules)
             if i not in t.placed and not any(m.plan.module in e for e in t.errors)}

    def entry(i: int, j: int, name: str, one_pid: int) -> dict:
        probe, key = modules[i].plan.probes[j], (i, j)
        e = {"probe": name, "module": modules[i].plan.module, "address": f"{probe.address:#x}",
             "mechanism": t.settled.get(key, probe.mechanism), "handler": probe.handler,
             "hits": t.hits[key].get(one_pid, 0), "lost": t.lost[key].get(one_pid, 0)}
        if key in returns:
            e["returns_missed"] = t.ret_missed[key].get(one_pid, 0)
        if key in callbacks:
            e["missed"] = t.missed[key].get(one_pid, 0)
            e["callback_skipped"] = t.skipped[key].get(one_pid, 0)
        if i in never:
            e["loaded"] = False
        elif key in t.unpatched:
            e["patched"] = False
        return e

    def report_of(one_pid: int) -> dict:
        # one entry per name: aliases at one address are one site (planner.ResolvedProbe.names)
        probes = [entry(i, j, name, one_pid) for i, m in enumerate(modules) for j, probe in enumerate(m.plan.probes)
                  for name in probe.target.split("\n") if not probe.handler.endswith(f":{UNWINDING}")]
        return {"pid": one_pid, "executable": executable, "probes": probes, "errors": []}

    merged = merge_reports([report_of(p) for p in [pid, *pids]])
    merged["errors"] = t.errors
    return merged


def unpatched(report: dict) -> list[str]:
    """The probes a report says were left unpatched."""
    return [p["probe"] for p in report["probes"] if p.get("patched") is False]


def never_loaded(report: dict) -> dict[str, list[str]]:
    """{module: its probes} of the modules a report says never loaded."""
    out: dict[str, list[str]] = {}
    for p in report["probes"]:
        if p.get("loaded") is False:
            out.setdefault(p["module"], []).append(p["probe"])
    return out
