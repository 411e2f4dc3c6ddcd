"""The probe table: a module's plan in the binary layout of jprobe_table.h, which the runtime reads.

The planner decides every probe's bytes; this lays out what the runtime needs of them (the
header, one struct jp_probe each, the island records and the string pool) at the table's
link-time address, as planfile.py does for the plan files of `jprobe run`.
"""
from __future__ import annotations

from typing import NamedTuple

from . import arch, layout
from .callbacks import Callback
from .packing import address_spec
from .plan import ProbePlan

TABLE_SIZE = layout.sizeof("jp_table")
PROBE_SIZE = layout.sizeof("jp_probe")
ISLAND_SIZE = layout.sizeof("jp_island")


class TableProbe(NamedTuple):
    """What the table says of one probe beyond its plan."""
    plan: ProbePlan
    callback: Callback | None      # its C callback, for a `=LIB:FUNC` handler
    x87: bool                      # the site, as analysed alone, needs x87 state kept (JP_PROBE_X87)
    on_return: bool = False        # a %return probe (JP_PROBE_RETURN)


class _Strings:
    """The string pool of the probe table; offset 0 is the empty string."""

    def __init__(self):
        self.data = bytearray(b"\0")
        self._index: dict[str, int] = {"": 0}

    def add(self, text: str | None) -> int:
        if not text:
            return 0
        if text not in self._index:
            self._index[text] = len(self.data)
            self.data += text.encode() + b"\0"
        return self._index[text]

    def append(self, text: str) -> int:
        """A string of its own at the end, shared with none (packing.address_spec)."""
        self.data += text.encode() + b"\0"
        return len(self.data) - len(text.encode()) - 1


def encode(module_path: str, data_vaddr: int, probes: list[TableProbe],
           islands: list[tuple[int, int, int]], strict: bool) -> bytes:
    """The table's bytes at `data_vaddr`: the probes in id order, then the `islands`
    (island, target, probe id) and the strings. `strict` is JP_TABLE_STRICT: the runtime then
    leaves a probe that would fall back to a trap as it was."""
    ffi = layout.ffi
    table_probes = data_vaddr + TABLE_SIZE
    by_address: dict[int, int] = {}
    for i, p in enumerate(probes):
        by_address.setdefault(p.plan.address, i)        # a %return probe and its entry probe: one site
    strings = _Strings()
    header = ffi.new("struct jp_table *")
    descs = ffi.new("struct jp_probe[]", max(len(probes), 1))
    for i, (plan, callback, x87, on_return) in enumerate(probes):
        d = descs[i]
        d.address = plan.address
        d.resume = plan.resume or 0
        if plan.target != address_spec(plan.address):
            d.spec = strings.add(plan.target)
        d.handler = layout.HANDLERS["count" if callback is None else "callback"]
        if plan.handler.startswith("trace"):           # "trace" or "trace(arg1,rax)": the names
            d.handler = layout.HANDLERS["trace"]
            d.trace = strings.add(plan.handler[len("trace("):-1])
        d.mechanism = layout.MECHANISMS[plan.mechanism]
        d.id = i
        d.flags = (layout.CONST["JP_PROBE_X87"] if x87 else 0) | (layout.CONST["JP_PROBE_RETURN"] if on_return else 0)
        d.len = len(plan.original)
        d.original = plan.original + bytes(layout.CONST["JP_PATCH_MAX"] - len(plan.original))
        d.depends = 1 + by_address[plan.depends] if plan.depends is not None else 0
        if callback is not None:
            d.lib = strings.add(callback.library)
            d.func = strings.add(callback.function)
            if callback.novec:
                d.flags |= layout.CONST["JP_PROBE_NOVEC"]
                d.cb_build_id = callback.build_id
    header.magic = layout.MAGIC
    header.version = layout.TABLE_VERSION
    header.nprobes = len(probes)
    header.flags = layout.CONST["JP_TABLE_STRICT"] if strict else 0
    header.probes = table_probes
    records = ffi.new("struct jp_island[]", max(len(islands), 1))
    for record, (at, target, owner) in zip(records, islands):
        hop = arch.jump_bytes(at, target, arch.JUMP_SIZE)
        record.at, record.target, record.probe = at, target, owner
        record.len, record.fixup = len(hop), arch.JUMP_FIXUP
        record.code = hop + bytes(8 - len(hop))
    header.islands = table_probes + len(probes) * PROBE_SIZE
    header.nislands = len(islands)
    header.strings = header.islands + len(islands) * ISLAND_SIZE
    header.module = strings.add(module_path)
    # Last, in id order: the specs that name only their address, which a packed table
    # leaves out (the runtime writes them back, in this order).
    for i, (plan, *_) in enumerate(probes):
        if plan.target == address_spec(plan.address):
            descs[i].spec = strings.append(plan.target)
    header.strings_size = len(strings.data)
    return (bytes(ffi.buffer(header)) + bytes(ffi.buffer(descs))[:len(probes) * PROBE_SIZE]
            + bytes(ffi.buffer(records))[:len(islands) * ISLAND_SIZE] + bytes(strings.data))
