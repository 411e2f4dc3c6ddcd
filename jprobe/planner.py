"""From probe specs to a patch plan for one module: resolve, analyse, emit."""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import layout
from .elf import ElfModule
from .callbacks import Callback, resolve_callback
from .errors import SiteError, SymbolError
from .plan import ModulePlan, ProbePlan
from .sites import Site, SiteAnalyzer
from .spec import ProbeSpec
from .trampolines import x86_64 as arch
from .trampolines.asm import CodeBuffer

TABLE_SIZE = layout.sizeof("jp_table")
PROBE_SIZE = layout.sizeof("jp_probe")


@dataclass
class ResolvedProbe:
    spec: ProbeSpec
    address: int
    site: Site
    callback: Callback | None = None


def resolve_address(module: ElfModule, spec: ProbeSpec) -> int:
    """Link-time address of a spec's LOCATION, checked to be an instruction of the module."""
    if spec.address is not None:
        if not module.is_code(spec.address):
            raise SymbolError(f"'{spec.text}': {spec.address:#x} is not in an executable section of "
                              f"{module.path}; give an address that `objdump -d` prints")
        return spec.address
    sym = module.resolve(spec.symbol)
    if spec.offset and spec.offset >= max(sym.size, 1):
        raise SymbolError(f"'{spec.text}': offset {spec.offset:#x} is outside {sym.name} "
                          f"({sym.size} bytes); give an offset below {sym.size:#x}")
    return sym.address + spec.offset


def resolve_probes(module: ElfModule, specs: list[ProbeSpec], strict: bool) -> list[ResolvedProbe]:
    """Addresses and site decisions for every spec, conflicts refused."""
    analyzer = SiteAnalyzer(module)
    addresses = [resolve_address(module, s) for s in specs]
    for spec, address in zip(specs, addresses):
        analyzer.instruction_at(address)          # boundary check with a clear error
        if addresses.count(address) > 1:
            raise SiteError(f"'{spec.text}': another probe is at the same address {address:#x}; "
                            f"keep one probe per address")
    analyzer.reserved = set(addresses)
    resolved = []
    for spec, address in zip(specs, addresses):
        site = analyzer.analyse(address)
        if strict and site.mechanism == "trap":
            raise SiteError(f"'{spec.text}': needs a trap at {address:#x} ({site.reason}); "
                            f"drop --strict to accept the int3 fallback, or probe another instruction")
        resolved.append(ResolvedProbe(spec, address, site, resolve_callback(spec)))
    # Outside any function symbol nothing says where instructions start, so one probe's
    # bytes may cover another's address: both patches would corrupt each other.
    by_address = sorted(resolved, key=lambda p: p.address)
    for before, after in zip(by_address, by_address[1:]):
        if before.address + before.site.length > after.address:
            raise SiteError(f"'{after.spec.text}': {after.address:#x} is inside the instruction(s) that "
                            f"'{before.spec.text}' patches ({before.address:#x}, {before.site.length} bytes); "
                            f"give addresses that `objdump -d` prints as instruction starts")
    return resolved


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


def build_plan(module: ElfModule, probes: list[ResolvedProbe], text_vaddr: int, data_vaddr: int) -> ModulePlan:
    """Trampolines at text_vaddr, the probe table at data_vaddr, and the site patches."""
    ffi = layout.ffi
    table_probes = data_vaddr + TABLE_SIZE
    desc_addr = [table_probes + i * PROBE_SIZE for i in range(len(probes))]
    buf = CodeBuffer(text_vaddr)
    stubs = None
    if any(p.spec.handler.kind == "callback" for p in probes):
        stubs = arch.ModuleStubs(buf, data_vaddr)
    plans: list[ProbePlan] = []
    for i, probe in enumerate(probes):
        plans.append(_emit_probe(module, buf, probe, i, desc_addr[i], data_vaddr, stubs))
    text = buf.finish()

    strings = _Strings()
    table = ffi.new("struct jp_table *")
    descs = ffi.new("struct jp_probe[]", max(len(probes), 1))
    for i, (probe, plan) in enumerate(zip(probes, plans)):
        d = descs[i]
        d.address = probe.address
        d.resume = plan.resume or 0
        d.spec = strings.add(probe.spec.target())
        d.handler = layout.HANDLERS["callback" if probe.spec.handler.kind == "callback" else "count"]
        d.mechanism = layout.MECHANISMS[plan.mechanism]
        d.id = i
        d.flags = layout.CONST["JP_PROBE_X87"] if probe.site.x87 else 0
        if probe.callback:
            d.lib = strings.add(probe.callback.library)
            d.func = strings.add(probe.callback.function)
            if probe.callback.novec:
                d.flags |= layout.CONST["JP_PROBE_NOVEC"]
                d.cb_build_id = probe.callback.build_id
    table.magic = layout.MAGIC
    table.version = layout.TABLE_VERSION
    table.nprobes = len(probes)
    table.probes = table_probes
    table.strings = table_probes + len(probes) * PROBE_SIZE
    table.module = strings.add(os.path.abspath(module.path))
    data = bytes(ffi.buffer(table)) + bytes(ffi.buffer(descs))[:len(probes) * PROBE_SIZE] + bytes(strings.data)
    added = [(text_vaddr, text_vaddr + len(text)), (data_vaddr, data_vaddr + len(data))]
    return ModulePlan(os.path.abspath(module.path), module.build_id, text_vaddr, text, data_vaddr, data, plans,
                      arch.outside_references(text, text_vaddr, added))


def _emit_probe(module: ElfModule, buf: CodeBuffer, probe: ResolvedProbe, index: int, desc: int,
                table: int, stubs: arch.ModuleStubs | None) -> ProbePlan:
    site = probe.site
    hits = desc + layout.offsetof("jp_probe", "hits")
    start = buf.here
    callback = probe.spec.handler.kind == "callback"
    # The red zone is dead at a function's entry (the caller's call wrote over it) and
    # inside a retargeted call, so the trampoline need not step over it there.
    red_zone = not (site.call_retarget or (site.function is not None and probe.address == site.function.address))

    def probe_work() -> None:
        if callback:
            stub = stubs.common_x87 if site.x87 else stubs.common
            arch.emit_callback(buf, stub, desc, index, probe.address, red_zone=red_zone,
                               return_pushed=site.call_retarget)
        else:
            arch.emit_count(buf, hits, index, table + layout.offsetof("jp_table", "tls_off"), site.flags_live,
                            red_zone=red_zone)

    original = module.read(probe.address, site.length)
    if site.mechanism == "trap":
        arch.emit_displaced(buf, site.displaced)
        patched = arch.trap_bytes(site.length, original)
        return ProbePlan(probe.spec.text, probe.address, "trap", site.reason, str(probe.spec.handler),
                         original, patched, trampoline=None, resume=start, target=probe.spec.target())
    probe_work()
    if site.call_retarget:
        arch.emit_call_continuation(buf, site.displaced[0])
        patched, fixup = arch.call_bytes(probe.address, start, site.length), arch.call_fixup(site.length)
    else:
        arch.emit_displaced(buf, site.displaced)
        patched, fixup = arch.jump_bytes(probe.address, start, site.length), arch.JUMP_FIXUP
    return ProbePlan(probe.spec.text, probe.address, site.mechanism, site.reason, str(probe.spec.handler),
                     original, patched, trampoline=start, patch_fixup=fixup, target=probe.spec.target())
