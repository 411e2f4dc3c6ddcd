"""The file applier: writes a plan into a copy of an ELF file with LIEF.

Two PT_LOAD segments are added after the image (trampolines R+X, probe table
R+W), and for a program with islands a one-page fence that keeps its heap past
them; the probe sites are overwritten, and the runtime library is added as the
first DT_NEEDED; a program's DT_PREINIT_ARRAY starts with the runtime's set-up.
Every original section keeps its address, but for the dynamic linking tables
these additions make grow: LIEF writes those anew in a segment of its own.
"""
from __future__ import annotations

import os
from dataclasses import replace

import lief

from .. import arch, layout, packing
from ..chooser import Policy
from ..elf import ElfModule
from ..errors import JprobeError, OutputError, SiteError
from ..loader import find_library
from ..mechanisms import Mechanism
from ..output import replacing
from ..plan import ModulePlan
from ..planner import cycles_uncollected, resolve_probes
from ..probetable import TABLE_SIZE
from ..room import Room, plan_in_room
from ..runtime import runtime_library
from ..spec import ProbeSpec

PAGE = 0x1000
POINTER = 8
# Dynamic-linking tables LIEF rebuilds to add DT_NEEDED, and the symbol and relocation of the
# preinit entry; all other sections keep their place.
_REBUILT = {".dynamic", ".dynstr", ".dynsym", ".gnu.hash", ".hash", ".gnu.version", ".gnu.version_r",
            ".gnu.version_d", ".rela.dyn"}
# The runtime's set-up before any library initialiser (runtime_c/startup.c).
PREINIT = "jprobe_rt_preinit"
TAG = lief.ELF.DynamicEntry.TAG


def _segment(size: int, flags: lief.ELF.Segment.FLAGS) -> lief.ELF.Segment:
    seg = lief.ELF.Segment()
    seg.type = lief.ELF.Segment.TYPE.LOAD
    seg.flags = flags
    seg.alignment = PAGE
    seg.content = list(bytes(size))
    return seg


def _make_room_for_segments(binary: lief.ELF.Binary, path: str) -> None:
    """Move the program header table where it can grow without shifting any section.

    LIEF's default for PIE files shifts the whole image by a page; the gap after a
    segment, or the end of .bss, keeps every original address.
    """
    for how in (lief.ELF.Binary.PHDR_RELOC.SEGMENT_GAP, lief.ELF.Binary.PHDR_RELOC.BSS_END):
        if binary.relocate_phdr_table(how):
            return
    raise JprobeError(f"{path}: no room for new program headers without moving code; cannot patch it")


def _room(size: int) -> int:
    """Bytes to set aside for a region the draft sized: where the trampolines land decides
    some jumps' bytes and so which short sites get a pun, which changes sizes a little."""
    return size + size // 8 + PAGE


def _fence_the_heap(binary: lief.ELF.Binary, module: ElfModule) -> None:
    """A one-page segment past every island a program may have.

    The kernel starts a program's heap (brk) at a random place up to 1 GiB past its last
    segment, where islands would otherwise meet it; past this page, they never do.
    """
    fence = binary.add(_segment(PAGE, lief.ELF.Segment.FLAGS.R))
    fence.virtual_address = fence.physical_address = -(-(module.end_of_image() + arch.REACH) // PAGE) * PAGE


def plan_file(module: ElfModule, specs: list[ProbeSpec],
              strict: bool = False) -> tuple[ModulePlan, lief.ELF.Binary]:
    """The plan for `module`, and a LIEF binary with room made for it; with its table packed
    when that saves room."""
    probes = resolve_probes(module, specs, strict)
    segments = _Segments(module, len(probes))
    # A library dlopen()ed while the runtime is already loaded would run before any islands
    # are mapped: its short sites keep the trap (`jprobe run` gives them puns).
    plan = plan_in_room(module, probes, segments.room_for, Policy(islands=not module.is_library, strict=strict))
    segments.fill(plan)
    if not module.is_library and any(p.islands for p in plan.probes):
        _fence_the_heap(segments.binary, module)
    return plan, segments.binary


class _Segments:
    """Where a file has room for a plan: two segments added to a fresh parse of it (trampolines
    R+X, table R+W), sized for a draft plan, packed when that saves room in the file."""

    def __init__(self, module: ElfModule, nprobes: int):
        self.module, self.nprobes = module, nprobes
        self.pack = True                        # until a plan outgrows the packed room
        self.packed = 0                         # bytes the file holds for the packed plan; 0: unpacked
        self.binary = self.text = self.data = None

    def room_for(self, sized_by: ModulePlan | None) -> Room:
        """Room for a plan the size of `sized_by` (room.RoomFor); first, a draft's."""
        module = self.module
        if sized_by is None:
            # A draft sizes the added segments before LIEF places them, in the room islands avoid.
            text = -(-module.end_of_image() // PAGE) * PAGE
            return Room(text, text + arch.text_room(self.nprobes) // 2)
        self.packed = packed = _packed_room(sized_by, module) if self.pack else 0
        binary = self.binary = lief.ELF.parse(module.path)
        _make_room_for_segments(binary, module.path)
        preinit = 0 if module.is_library else _preinit_size(binary)
        R, W, X = (lief.ELF.Segment.FLAGS.R, lief.ELF.Segment.FLAGS.W, lief.ELF.Segment.FLAGS.X)
        text = self.text = _add(binary, _room(len(sized_by.text)), packed or None, R | X)
        data = self.data = _add(binary, _room(len(sized_by.data)) + preinit, TABLE_SIZE if packed else None, R | W)
        data_end = data.virtual_address + data.virtual_size
        # The program's DT_PREINIT_ARRAY follows the table (preinit_array_at). LIEF places the
        # segments where it sees fit (for a fixed-address program, megabytes past the image):
        # the islands go beyond wherever that is.
        return Room(text.virtual_address, data.virtual_address, text.virtual_address + text.virtual_size,
                    data.virtual_address + (data.virtual_size - preinit) // POINTER * POINTER,
                    data_end - module.end_of_image() + PAGE,
                    keep=self._pack if packed else None)

    def _pack(self, plan: ModulePlan) -> ModulePlan | None:
        """The plan with its packed form, or None when that outgrew the room made for it (rare):
        the room is then made again, unpacked."""
        blob = packing.pack(plan, self.module.read)
        if len(blob) > self.packed:
            self.pack = False
            return None
        return replace(plan, packed=blob)

    def fill(self, plan: ModulePlan) -> None:
        """The segments' contents: the plan as it is, or packed."""
        text, data = self.text, self.data
        if plan.packed:
            for seg, content, file_size in ((text, plan.packed, self.packed),
                                            (data, packing.packed_header(plan), TABLE_SIZE)):
                size = seg.virtual_size
                seg.content = list(content + bytes(file_size - len(content)))
                seg.physical_size, seg.virtual_size = file_size, size      # the rest of the memory is zero
        else:
            text.content = list(plan.text + arch.FILL_BYTE * (text.virtual_size - len(plan.text)))
            data.content = list(plan.data + bytes(data.virtual_size - len(plan.data)))


def _packed_room(draft: ModulePlan, module: ElfModule) -> int:
    """Room for the packed table in the file, or 0 to write the plan as it is.

    A program's runtime unpacks its table before any of its code runs; a library's
    trampolines must be there as soon as it is loaded (see islands above). A few probes
    gain nothing from packing.
    """
    if module.is_library:
        return 0
    try:
        size = len(packing.pack(draft, module.read, check=False))
    except ValueError:                              # what the format cannot say stays unpacked
        return 0
    # The final plan packs within a percent of the draft (ls: +0.6%); a tight margin keeps
    # the file small, as the room is in the file.
    room = size + size // 32 + PAGE
    return room if room < _room(len(draft.text)) else 0


def _add(binary: lief.ELF.Binary, size: int, file_size: int | None, flags) -> lief.ELF.Segment:
    """A segment of `size` bytes of memory, of which `file_size` (all by default) are in the file."""
    if file_size is None:
        return binary.add(_segment(size, flags))
    seg = binary.add(_segment(file_size, flags))
    seg.physical_size, seg.virtual_size = file_size, size
    return seg


def apply_plan(plan: ModulePlan, binary: lief.ELF.Binary, program: bool) -> None:
    """Site patches and the runtime dependency; a program also runs the runtime's set-up first."""
    for probe in plan.probes:
        binary.patch_address(probe.address, list(probe.patched))
    binary.add_library(runtime_library())
    if program:
        _run_runtime_first(binary, preinit_array_at(plan))


def _preinit_size(binary: lief.ELF.Binary) -> int:
    """Bytes of the program's DT_PREINIT_ARRAY once the runtime's entry leads it."""
    entry = binary.get(TAG.PREINIT_ARRAY)
    return POINTER * (1 + (len(entry.array) if entry is not None else 0))


def preinit_array_at(plan: ModulePlan) -> int:
    """Where the program's new DT_PREINIT_ARRAY goes: in the table's segment, past the table,
    whose memory is the program's own (the runtime never writes past the table)."""
    return plan.data_vaddr + -(-len(plan.data) // POINTER) * POINTER


def _run_runtime_first(binary: lief.ELF.Binary, at: int) -> None:
    """Make jprobe_rt_preinit the first entry of the program's DT_PREINIT_ARRAY, at `at`.

    A library's initialiser may call into probed code (a function of an -rdynamic program,
    or the free() a program defines) before the runtime's constructor has mapped islands
    or unpacked trampolines; glibc runs a program's DT_PREINIT_ARRAY after relocation and
    before every library's initialiser. Each entry is written by its own dynamic
    relocation, so the array may lie in memory the file does not hold (a packed table's).
    """
    entry = binary.get(TAG.PREINIT_ARRAY)
    relocations = [_runtime_entry(binary)] + (_entries_of(binary, entry) if entry is not None else [])
    _relocation_table(binary)
    for k, relocation in enumerate(relocations):
        relocation.address = at + k * POINTER
        binary.add_dynamic_relocation(relocation)
    if entry is None:
        entry = binary.add(lief.ELF.DynamicEntryArray(TAG.PREINIT_ARRAY, []))
        binary.add(lief.ELF.DynamicEntry(TAG.PREINIT_ARRAYSZ, 0))
    entry.value = at
    entry.array = [0] * len(relocations)        # what LIEF writes where the file holds the array
    binary.get(TAG.PREINIT_ARRAYSZ).value = POINTER * len(relocations)


def _relocation_table(binary: lief.ELF.Binary) -> None:
    """A DT_RELA table for a program that has none (its only relocations are its PLT's):
    LIEF writes dynamic relocations only where the tag is."""
    if binary.get(TAG.RELA) is None:
        for tag, value in ((TAG.RELA, 0), (TAG.RELASZ, 0), (TAG.RELAENT, 24)):
            binary.add(lief.ELF.DynamicEntry(tag, value))


def _runtime_entry(binary: lief.ELF.Binary) -> lief.ELF.Relocation:
    """A pointer to the runtime's jprobe_rt_preinit: an undefined symbol the loader resolves.

    The symbol is the binary's own before a relocation names it: a relocation keeps a
    pointer to its symbol, which must outlive the Python object it was made from.
    """
    symbol = lief.ELF.Symbol()
    symbol.name = PREINIT
    symbol.type = lief.ELF.Symbol.TYPE.FUNC
    symbol.binding = lief.ELF.Symbol.BINDING.GLOBAL
    relocation = lief.ELF.Relocation(0, lief.ELF.Relocation.TYPE.X86_64_64, lief.ELF.Relocation.ENCODING.RELA)
    relocation.symbol = binary.add_dynamic_symbol(symbol)
    return relocation


def _entries_of(binary: lief.ELF.Binary, entry: lief.ELF.DynamicEntryArray) -> list[lief.ELF.Relocation]:
    """The program's own preinit functions, to run after the runtime's: each entry's relocation
    again, or where the file holds the address itself (no PIE, where the load bias is 0) a
    RELATIVE one."""
    by_address = {r.address: r for r in binary.dynamic_relocations}
    out = []
    for k, value in enumerate(entry.array):
        old = by_address.get(entry.value + k * POINTER)
        new = lief.ELF.Relocation(0, old.type if old else lief.ELF.Relocation.TYPE.X86_64_RELATIVE,
                                  lief.ELF.Relocation.ENCODING.RELA)
        new.addend = old.addend if old else value
        if old is not None and old.has_symbol and old.symbol.name:
            new.symbol = old.symbol
        out.append(new)
    return out


def write_atomically(binary: lief.ELF.Binary, plan: ModulePlan, module: ElfModule, output: str) -> None:
    """Write next to `output`, check the result, then rename: never a half-written file."""
    if os.path.abspath(output) == os.path.abspath(module.path):
        raise OutputError(f"{output}: refusing to overwrite the input; choose another -o")
    config = lief.ELF.Builder.config_t()
    config.preinit_array = False        # else LIEF moves a DT_PREINIT_ARRAY that grew elsewhere
    with replacing(output, "-o") as tmp:
        binary.write(tmp, config)
        _verify(_restore_nobits_headers(tmp, module.binary), plan, module)
        os.chmod(tmp, os.stat(module.path).st_mode & 0o777)       # no set-id bits on a rewritten file


def _restore_nobits_headers(path: str, original: lief.ELF.Binary) -> lief.ELF.Binary | None:
    """Put .bss-like section headers back where they were.

    When LIEF lays out the sections it adds, it moves NOBITS section headers after
    them, although their memory (and every reference to it) stays in place.
    Returns the file as written.
    """
    out = lief.ELF.parse(path)
    if out is None:
        return None
    fixed = False
    for old in original.sections:
        if old.type != lief.ELF.Section.TYPE.NOBITS or not old.virtual_address:
            continue
        new = out.get_section(old.name)
        if new is not None and new.virtual_address != old.virtual_address:
            new.virtual_address, new.offset = old.virtual_address, old.offset
            fixed = True
    if fixed:
        out.write(path)
        out = lief.ELF.parse(path)
    return out


def _verify(out: lief.ELF.Binary | None, plan: ModulePlan, module: ElfModule) -> None:
    """The written file holds the table and trampolines where the code expects them,
    every original section is where it was, and a program sets the runtime up first."""
    original = module.binary
    where = {(s.name, s.virtual_address, s.size) for s in original.sections if s.virtual_address}
    moved = where - {(s.name, s.virtual_address, s.size) for s in out.sections} if out is not None else where
    moved = {m for m in moved if m[0] not in _REBUILT}
    if moved:
        raise JprobeError(f"{plan.module}: internal error: LIEF moved section(s) "
                          f"{', '.join(sorted(m[0] for m in moved))}; please report it")
    ok = (out is not None
          and bytes(out.get_content_from_virtual_address(plan.data_vaddr, len(layout.MAGIC))) == layout.MAGIC
          and bytes(out.get_content_from_virtual_address(plan.text_vaddr, len(plan.packed or plan.text)))
          == (plan.packed or plan.text))
    if not ok:
        raise JprobeError(f"{plan.module}: internal error: LIEF moved the added segments; please report it")
    if not module.is_library and not _runs_runtime_first(out, preinit_array_at(plan)):
        raise JprobeError(f"{plan.module}: internal error: LIEF did not write the DT_PREINIT_ARRAY entry "
                          f"that sets the runtime up; please report it")


def _runs_runtime_first(out: lief.ELF.Binary, at: int) -> bool:
    """Whether the written program's DT_PREINIT_ARRAY starts with the runtime's entry."""
    entry = out.get(TAG.PREINIT_ARRAY)
    return (entry is not None and entry.value == at
            and any(r.address == at and r.has_symbol and r.symbol.name == PREINIT
                    for r in out.dynamic_relocations))


def _runtime_needs() -> set[str]:
    """Sonames of the libraries the runtime loads, itself and through them (libc.so.6, ld.so)."""
    needed: set[str] = set()
    todo = [runtime_library()]
    while todo:
        for soname in ElfModule(todo.pop()).binary.libraries:
            if soname not in needed:
                needed.add(soname)
                path = find_library(soname)
                todo += [path] if path else []
    return needed


def _refuse_traps_before_the_runtime(module: ElfModule, plan: ModulePlan) -> None:
    """A library the runtime itself loads (libc.so.6) runs before the runtime's constructor: the
    loader and the runtime's own start-up call its malloc. A trap there would kill the program
    at its first hit; a jump needs nothing from the runtime."""
    traps = [p for p in plan.probes if p.mechanism is Mechanism.TRAP]
    if not traps or not module.is_library or module.soname not in _runtime_needs():
        return
    probe = traps[0]
    raise SiteError(f"'{probe.spec}': needs a trap at {probe.address:#x} ({probe.reason}), and {module.soname} "
                    f"runs before the jprobe runtime can serve traps (the runtime loads it), so its first hit "
                    f"would kill the program; probe an instruction that gets a jump "
                    f"(`jprobe sites {module.path} {probe.target} --for patch`)")


def patch_file(input_path: str, output: str, specs: list[ProbeSpec], strict: bool = False) -> ModulePlan:
    """Rewrite `input_path` into `output` with the probes of `specs`."""
    if not specs:
        raise JprobeError("patch: no probe given; add at least one probe (e.g. -p main)")
    for spec in specs:
        if spec.module is not None:
            raise JprobeError(f"'{spec.text}': `jprobe patch` rewrites one file; drop the '{spec.module}:' "
                              f"prefix, or use `jprobe run` to probe a loaded library")
    module = ElfModule(input_path)
    module.check_runtime_loads()
    if module.rewritten:
        raise JprobeError(f"{input_path}: already rewritten by `jprobe patch` (it loads the jprobe runtime); "
                          f"patch the original file, with every probe in one `jprobe patch`")
    with cycles_uncollected():
        plan, binary = plan_file(module, specs, strict)
    _refuse_traps_before_the_runtime(module, plan)
    apply_plan(plan, binary, not module.is_library)
    write_atomically(binary, plan, module, output)
    return plan
