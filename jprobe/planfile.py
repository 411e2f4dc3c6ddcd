"""Plan files: the module plans of `jprobe run`, in the binary layout of jprobe_plan.h."""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import layout
from .plan import ModulePlan

NO_FIXUP = layout.CONST["JP_NO_FIXUP"]


@dataclass
class PlannedModule:
    plan: ModulePlan
    name: str                 # as the user named it; "" for the main program
    size: int
    mtime: int


def _pad(blob: bytearray, align: int = 8) -> None:
    blob += bytes(-len(blob) % align)


def encode(modules: list[PlannedModule]) -> bytes:
    """The plan file's bytes."""
    ffi = layout.ffi
    header = ffi.new("struct jp_plan_header *")
    entries = ffi.new("struct jp_plan_module[]", max(len(modules), 1))
    strings = bytearray(b"\0")
    body = bytearray()
    base = layout.sizeof("jp_plan_header") + len(modules) * layout.sizeof("jp_plan_module")

    def put(data: bytes) -> int:
        _pad(body)
        body.extend(data)
        return base + len(body) - len(data)

    def string(text: str) -> int:
        strings.extend(text.encode() + b"\0")
        return len(strings) - len(text.encode()) - 1

    for entry, m in zip(entries, modules):
        plan = m.plan
        entry.path, entry.name = string(plan.module), string(m.name)
        build_id = bytes.fromhex(plan.build_id or "")[:20]
        entry.build_id = build_id + bytes(20 - len(build_id))
        entry.build_id_len = len(build_id)
        entry.size, entry.mtime = m.size, m.mtime
        entry.text_vaddr, entry.text_size, entry.text = plan.text_vaddr, len(plan.text), put(plan.text)
        entry.data_vaddr, entry.data_size, entry.data = plan.data_vaddr, len(plan.data), put(plan.data)
        fixups = b"".join(off.to_bytes(4, "little") for off in plan.text_fixups)
        entry.nfixups, entry.fixups = len(plan.text_fixups), put(fixups)
        patches = ffi.new("struct jp_plan_patch[]", max(len(plan.probes), 1))
        bounds: list[tuple[int, int]] = []
        for patch, probe in zip(patches, plan.probes):
            patch.vaddr, patch.len = probe.address, len(probe.patched)
            patch.patch_fixup = NO_FIXUP if probe.patch_fixup is None else probe.patch_fixup
            patch.original = probe.original + bytes(16 - len(probe.original))
            patch.patched = probe.patched + bytes(16 - len(probe.patched))
            patch.first_bound, patch.nbounds = len(bounds), len(probe.boundaries)
            bounds += [(vaddr, reloc - plan.text_vaddr) for vaddr, reloc in probe.boundaries]
        entry.npatches = len(plan.probes)
        entry.patches = put(bytes(ffi.buffer(patches))[:len(plan.probes) * layout.sizeof("jp_plan_patch")])
        entry.nbounds, entry.bounds = len(bounds), put(_boundaries(bounds))
    header.magic = layout.STRING["JP_PLAN_MAGIC"]
    header.version = layout.CONST["JP_PLAN_VERSION"]
    header.nmodules = len(modules)
    _pad(body)
    header.strings = base + len(body)
    table = bytes(ffi.buffer(entries))[:len(modules) * layout.sizeof("jp_plan_module")]
    return bytes(ffi.buffer(header)) + table + bytes(body) + bytes(strings)


def _boundaries(bounds: list[tuple[int, int]]) -> bytes:
    """struct jp_plan_boundary[]: reloc as an offset in the text, which moves with it."""
    records = layout.ffi.new("struct jp_plan_boundary[]", max(len(bounds), 1))
    for record, (vaddr, reloc) in zip(records, bounds):
        record.vaddr, record.reloc = vaddr, reloc
    return bytes(layout.ffi.buffer(records))[:len(bounds) * layout.sizeof("jp_plan_boundary")]


def identity(path: str) -> tuple[int, int]:
    """(size, mtime) that identify a module without a build-id."""
    st = os.stat(path)
    return st.st_size, int(st.st_mtime)
