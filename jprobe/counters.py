"""The counters file of `jprobe run` (jprobe_shm.h): created before the program, read after."""
from __future__ import annotations

import mmap
import struct
from collections import defaultdict

from . import layout
from .planfile import PlannedModule
from .report import merge_reports

PAGE = mmap.PAGESIZE


def create(path: str, nmodules: int) -> None:
    """An empty counters file: a header whose bump pointer starts at the first page boundary."""
    header = layout.ffi.new("struct jp_shm_header *")
    header.magic = b"JPSHM\0\0\1"
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


def hits_by_pid(path: str, modules: list[PlannedModule]) -> tuple[dict, list[str], dict, set[int]]:
    """{(module index, probe index): {pid: hits}}, the error messages the processes left,
    {(module index, probe index): mechanism} as the runtime settled it (a pun whose island
    was taken became a trap), and the modules some process placed (a TABLE record)."""
    with open(path, "rb") as f:
        data = f.read()
    table_size, probe_size = layout.sizeof("jp_table"), layout.sizeof("jp_probe")
    hits: dict = defaultdict(lambda: defaultdict(int))
    errors: list[str] = []
    settled: dict = {}
    placed: set[int] = set()
    names = {v: k for k, v in layout.MECHANISMS.items()}
    mech_at = layout.offsetof("jp_probe", "mechanism")
    for kind, module, pid, payload in _records(data):
        if kind == layout.CONST["JP_SHM_ERROR"]:
            errors.append(payload.split(b"\0", 1)[0].decode(errors="replace"))
            continue
        if module >= len(modules):
            continue
        n = len(modules[module].plan.probes)
        if kind == layout.CONST["JP_SHM_TABLE"]:
            placed.add(module)
            counts = [struct.unpack_from("<Q", payload, table_size + i * probe_size)[0] for i in range(n)]
            for i in range(n):
                (mech,) = struct.unpack_from("<H", payload, table_size + i * probe_size + mech_at)
                if mech in names and names[mech] == "trap":
                    settled[(module, i)] = "trap"
        elif kind == layout.CONST["JP_SHM_BLOCK"]:
            counts = list(struct.unpack_from(f"<{n}Q", payload))
        else:
            continue
        for i, c in enumerate(counts):
            hits[(module, i)][pid] += c
    return hits, errors, settled, placed


def build_report(path: str, modules: list[PlannedModule], pid: int, executable: str) -> dict:
    """The SPEC §3 report of a whole `jprobe run` process tree (`by_pid` when several hit).

    A module no process placed and no error names never loaded: its probes say `"loaded":
    false` rather than pass for probes that were never hit."""
    hits, errors, settled, placed = hits_by_pid(path, modules)
    pids = sorted({p for per_pid in hits.values() for p in per_pid} - {pid})
    never = {i for i, m in enumerate(modules)
             if i not in placed and not any(m.plan.module in e for e in errors)}

    def report_of(one_pid: int) -> dict:
        # one entry per name: aliases at one address are one site (planner.ResolvedProbe.names)
        probes = [{"probe": name, "module": m.plan.module, "address": f"{probe.address:#x}",
                   "mechanism": settled.get((i, j), probe.mechanism), "handler": probe.handler,
                   "hits": hits[(i, j)].get(one_pid, 0), "lost": 0, **({"loaded": False} if i in never else {})}
                  for i, m in enumerate(modules) for j, probe in enumerate(m.plan.probes)
                  for name in probe.target.split("\n")]
        return {"pid": one_pid, "executable": executable, "probes": probes, "errors": []}

    merged = merge_reports([report_of(p) for p in [pid, *pids]])
    merged["errors"] = errors
    return merged


def never_loaded(report: dict) -> dict[str, list[str]]:
    """{module: its probes} of the modules a report says never loaded."""
    out: dict[str, list[str]] = {}
    for p in report["probes"]:
        if p.get("loaded") is False:
            out.setdefault(p["module"], []).append(p["probe"])
    return out
