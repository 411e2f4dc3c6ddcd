"""The file applier: writes a plan into a copy of an ELF file with LIEF.

Two PT_LOAD segments are added after the image (trampolines R+X, probe table
R+W), and for a program with islands a one-page fence that keeps its heap past
them; the probe sites are overwritten, and the runtime library is added as the
first DT_NEEDED. Every original section keeps its address; only the dynamic
linking tables that DT_NEEDED touches are rebuilt by LIEF.
"""
from __future__ import annotations

import os

import lief

from .. import layout, packing
from ..elf import ElfModule
from ..errors import JprobeError, OutputError, SiteError
from ..islands import REACH, text_room
from ..loader import find_library
from ..output import replacing
from ..plan import ModulePlan
from ..planner import build_plan, resolve_probes
from ..runtime import runtime_library
from ..spec import ProbeSpec, check_supported
from ..trampolines import x86_64 as arch

PAGE = 0x1000
TABLE_SIZE = layout.sizeof("jp_table")
# Dynamic-linking tables LIEF rebuilds to add DT_NEEDED; all other sections keep their place.
_REBUILT = {".dynamic", ".dynstr", ".dynsym", ".gnu.hash", ".hash", ".gnu.version", ".gnu.version_r",
            ".gnu.version_d"}


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
    fence.virtual_address = fence.physical_address = -(-(module.end_of_image() + REACH) // PAGE) * PAGE


def plan_file(module: ElfModule, specs: list[ProbeSpec], strict: bool = False,
              pack: bool = True) -> tuple[ModulePlan, lief.ELF.Binary]:
    """The plan for `module`, and a LIEF binary with room made for it; with its table packed
    when that saves room and `pack` allows."""
    probes = resolve_probes(module, specs, strict)
    # A draft sizes the added segments before LIEF places them, in the room islands avoid.
    room = text_room(len(probes))
    text = -(-module.end_of_image() // PAGE) * PAGE
    # A library dlopen()ed while the runtime is already loaded would run before any islands
    # are mapped: its short sites keep the trap (`jprobe run` gives them puns).
    islands = not module.is_library
    draft = build_plan(module, probes, text, text + room // 2, strict, islands)
    packed = _packed_room(draft, module) if pack else 0
    binary = lief.ELF.parse(module.path)
    _make_room_for_segments(binary, module.path)
    R, W, X = (lief.ELF.Segment.FLAGS.R, lief.ELF.Segment.FLAGS.W, lief.ELF.Segment.FLAGS.X)
    text = _add(binary, _room(len(draft.text)), packed or None, R | X)
    data = _add(binary, _room(len(draft.data)), TABLE_SIZE if packed else None, R | W)
    # LIEF places the segments where it sees fit (for a fixed-address program, megabytes
    # past the image): the islands go beyond wherever that is.
    room = data.virtual_address + data.virtual_size - module.end_of_image() + PAGE
    plan = build_plan(module, probes, text.virtual_address, data.virtual_address, strict, islands, room)
    if len(plan.text) > text.virtual_size or len(plan.data) > data.virtual_size:
        raise JprobeError(f"{module.path}: internal error: the trampolines outgrew the room the draft made")
    if packed:
        blob = packing.pack(plan, module.read)
        if len(blob) > packed:                      # rare: planned again, unpacked
            return plan_file(module, specs, strict, pack=False)
        plan.packed = blob
        for seg, content, file_size in ((text, blob, packed), (data, packing.packed_header(plan), TABLE_SIZE)):
            size = seg.virtual_size
            seg.content = list(content + bytes(file_size - len(content)))
            seg.physical_size, seg.virtual_size = file_size, size      # the rest of the memory is zero
    else:
        text.content = list(plan.text + arch.FILL_BYTE * (text.virtual_size - len(plan.text)))
        data.content = list(plan.data + bytes(data.virtual_size - len(plan.data)))
    if not module.is_library and any(p.islands for p in plan.probes):
        _fence_the_heap(binary, module)
    return plan, binary


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


def apply_plan(plan: ModulePlan, binary: lief.ELF.Binary) -> None:
    """Site patches and the runtime dependency."""
    for probe in plan.probes:
        binary.patch_address(probe.address, list(probe.patched))
    binary.add_library(runtime_library())


def write_atomically(binary: lief.ELF.Binary, plan: ModulePlan, module: ElfModule, output: str) -> None:
    """Write next to `output`, check the result, then rename: never a half-written file."""
    if os.path.abspath(output) == os.path.abspath(module.path):
        raise OutputError(f"{output}: refusing to overwrite the input; choose another -o")
    with replacing(output, "-o") as tmp:
        binary.write(tmp)
        _verify(_restore_nobits_headers(tmp, module.binary), plan, module.binary)
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


def _verify(out: lief.ELF.Binary | None, plan: ModulePlan, original: lief.ELF.Binary) -> None:
    """The written file holds the table and trampolines where the code expects them,
    and every original section is where it was."""
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
    traps = [p for p in plan.probes if p.mechanism == "trap"]
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
        check_supported(spec)
        if spec.module is not None:
            raise JprobeError(f"'{spec.text}': `jprobe patch` rewrites one file; drop the '{spec.module}:' "
                              f"prefix, or use `jprobe run` to probe a loaded library")
    module = ElfModule(input_path)
    module.check_runtime_loads()
    if module.rewritten:
        raise JprobeError(f"{input_path}: already rewritten by `jprobe patch` (it loads the jprobe runtime); "
                          f"patch the original file, with every probe in one `jprobe patch`")
    plan, binary = plan_file(module, specs, strict)
    _refuse_traps_before_the_runtime(module, plan)
    apply_plan(plan, binary)
    write_atomically(binary, plan, module, output)
    return plan
