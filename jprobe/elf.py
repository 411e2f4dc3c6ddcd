"""The ELF model: what the planner needs to know about a module, read with LIEF."""
from __future__ import annotations

import bisect
import difflib
import os
import re
from dataclasses import dataclass
from functools import cached_property

import lief

from .errors import ElfError, SymbolError

lief.logging.disable()

_COLD_SUFFIX = re.compile(r"\.cold(?:\.\d+)?$")
# The runtime's file name (runtime.py): a DT_NEEDED on it marks what `jprobe patch` wrote.
RUNTIME_STEM = "libjprobe_rt"
STATIC_REASON = ("statically linked (no dynamic loader), so the jprobe runtime cannot be loaded into it "
                 "and its probes would never fire")


def function_owner(name: str) -> str:
    """The function a symbol is a piece of: `foo` for `foo.cold` (and for `foo`)."""
    return _COLD_SUFFIX.sub("", name)


def _is_hidden_version(sym: lief.ELF.Symbol) -> bool:
    """A non-default version (`name@V`, not `name@@V`): the linker binds no new reference to it."""
    return bool(sym.has_version and sym.symbol_version and sym.symbol_version.value & 0x8000)


@dataclass(frozen=True)
class Symbol:
    """A defined function symbol: its name, link-time address and size in bytes."""

    name: str
    address: int
    size: int
    demangled: str

    @property
    def end(self) -> int:
        return self.address + self.size


class ElfModule:
    """An x86-64 ELF executable or shared library, parsed once."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise ElfError(f"{path}: no such file; give the path of an ELF executable or shared library")
        if os.path.isdir(path):
            raise ElfError(f"{path}: is a directory; give the path of an ELF executable or shared library")
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ElfError(f"{path}: cannot read ({e.strerror}); check its permissions") from None
        if magic != b"\x7fELF":
            raise ElfError(f"{path}: not an ELF file; give an ELF executable or shared library")
        binary = lief.ELF.parse(path)
        if binary is None:
            raise ElfError(f"{path}: not a valid ELF file (LIEF cannot parse it)")
        header = binary.header
        if header.machine_type != lief.ELF.ARCH.X86_64:
            arch = str(header.machine_type).split(".")[-1]
            raise ElfError(f"{path}: architecture {arch} is not supported; jprobe patches x86-64 ELF files")
        if (header.identity_class != lief.ELF.Header.CLASS.ELF64
                or header.identity_data != lief.ELF.Header.ELF_DATA.LSB):
            # x32 (ELFCLASS32 with EM_X86_64) cannot load the 64-bit runtime
            raise ElfError(f"{path}: not a 64-bit little-endian ELF file (x32?); jprobe patches x86-64 ELF files")
        if header.file_type not in (lief.ELF.Header.FILE_TYPE.EXEC, lief.ELF.Header.FILE_TYPE.DYN):
            raise ElfError(f"{path}: not an executable or shared library (an object file?); link it first")
        size = os.path.getsize(path)
        tables_end = max(header.program_header_offset + header.numberof_segments * header.program_header_size,
                         header.section_header_offset + header.numberof_sections * header.section_header_size)
        if tables_end > size or any(seg.type == lief.ELF.Segment.TYPE.LOAD
                                    and seg.file_offset + seg.physical_size > size for seg in binary.segments):
            raise ElfError(f"{path}: truncated (its headers or segments end past its {size} bytes); "
                           f"give the whole file")
        self.binary = binary

    @cached_property
    def build_id(self) -> str | None:
        for note in self.binary.notes:
            if note.type == lief.ELF.Note.TYPE.GNU_BUILD_ID:
                return bytes(note.description).hex()
        return None

    @cached_property
    def functions(self) -> list[Symbol]:
        """Defined function symbols of .symtab and .dynsym, by address (aliases merged)."""
        seen: dict[int, Symbol] = {}
        for sym in self.binary.symbols:
            if not sym.is_function or sym.value == 0 or sym.shndx == 0:
                continue
            old = seen.get(sym.value)
            if old is None or (old.size == 0 and sym.size > 0):
                seen[sym.value] = Symbol(sym.name, sym.value, sym.size, sym.demangled_name or sym.name)
        return sorted(seen.values(), key=lambda s: s.address)

    @cached_property
    def _names(self) -> dict[str, Symbol | None]:
        """Every name of a function; None for an IFUNC's (its code is chosen at load time)."""
        by_addr = {s.address: s for s in self.functions}
        names: dict[str, Symbol | None] = {}
        # A bare name binds to the default version (memcpy -> memcpy@@GLIBC_2.14), as for the
        # linker, not to an older compat one (memcpy@GLIBC_2.2.5): defaults go first.
        for sym in sorted(self.binary.symbols, key=_is_hidden_version):
            ifunc = sym.type == lief.ELF.Symbol.TYPE.GNU_IFUNC and sym.shndx != 0
            if not ifunc and not (sym.is_function and sym.value in by_addr):
                continue
            target = None if ifunc else by_addr[sym.value]
            keys = [sym.name] + ([sym.demangled_name] if sym.demangled_name else [])
            if sym.has_version and sym.symbol_version and sym.symbol_version.has_auxiliary_version:
                version = sym.symbol_version.symbol_version_auxiliary.name
                keys.append(f"{sym.name}@{version}")        # as nm -D prints it
                if not _is_hidden_version(sym):
                    keys.append(f"{sym.name}@@{version}")   # the default, as in the linker's maps
            for key in keys:
                names.setdefault(key, target)
        return names

    @cached_property
    def _starts(self) -> list[int]:
        return [s.address for s in self.functions]

    def resolve(self, name: str) -> Symbol:
        """The function called `name` (mangled or demangled), or an error naming close matches."""
        if name in self._names:
            sym = self._names[name]
            if sym is None:
                raise SymbolError(f"{self.path}: '{name}' is an IFUNC (the implementation is chosen at load "
                                  f"time), which jprobe cannot probe yet; probe the implementation by its "
                                  f"symbol or address")
            return sym
        close = difflib.get_close_matches(name, self._names.keys(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with `nm -D` or `nm`"
        raise SymbolError(f"{self.path}: no function symbol '{name}'{hint}")

    def variable(self, name: str) -> int | None:
        """The link-time address of the data symbol `name`, if the file defines one."""
        sym = next((s for s in self.binary.symbols if s.name == name and s.is_variable and s.shndx != 0), None)
        return None if sym is None else sym.value

    def function_at(self, address: int) -> Symbol | None:
        """The function whose [start, end) holds `address`, if any."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0:
            sym = self.functions[i]
            if sym.address <= address < sym.end:
                return sym
        return None

    @cached_property
    def _by_stem(self) -> dict[str, list[Symbol]]:
        stems: dict[str, list[Symbol]] = {}
        for s in self.functions:
            stems.setdefault(s.name.split(".", 1)[0], []).append(s)
        return stems

    def related_functions(self, sym: Symbol) -> list[Symbol]:
        """The other pieces of `sym`'s function and its clones: GCC's `foo.cold` jumps back
        into the middle of `foo` and `foo` into the middle of `foo.cold`, so a branch target
        of either may be in the other (`foo.part.0`, `foo.constprop.0` come along too)."""
        owner = function_owner(sym.name)
        return [s for s in self._by_stem.get(sym.name.split(".", 1)[0], [])
                if s != sym and (s.name == owner or s.name.startswith((owner + ".", sym.name + ".")))]

    @cached_property
    def _exec_ranges(self) -> list[tuple[int, int]]:
        return [(lo, hi) for _, lo, hi in self.code_sections()]

    def is_code(self, address: int, size: int = 1) -> bool:
        """True when [address, address+size) lies in one executable section."""
        return any(lo <= address and address + size <= hi for lo, hi in self._exec_ranges)

    def code_sections(self) -> list[tuple[str, int, int]]:
        """(name, start, end) of each executable section, by address."""
        return sorted(((s.name, s.virtual_address, s.virtual_address + s.size) for s in self.binary.sections
                       if s.has(lief.ELF.Section.FLAGS.EXECINSTR) and s.virtual_address and s.size),
                      key=lambda section: section[1])

    def read(self, address: int, size: int) -> bytes:
        """`size` bytes of the file's content at link-time address `address`."""
        return bytes(self.binary.get_content_from_virtual_address(address, size))

    def start_of_image(self) -> int:
        """The lowest address of any loaded segment."""
        return min(s.virtual_address for s in self.binary.segments if s.type == lief.ELF.Segment.TYPE.LOAD)

    @property
    def fixed_address(self) -> bool:
        """Linked to run at its link-time addresses (not PIE, not a shared library)."""
        return self.binary.header.file_type == lief.ELF.Header.FILE_TYPE.EXEC

    @property
    def is_library(self) -> bool:
        """A shared library, as opposed to an executable, as the loader tells them apart: a
        PIE executable carries DF_1_PIE (glibc refuses to dlopen() it). A PT_INTERP alone
        does not make a program: Debian's libc.so.6 and ld.so have one to run on their own."""
        if self.binary.header.file_type != lief.ELF.Header.FILE_TYPE.DYN:
            return False
        flags_1 = self.binary.get(lief.ELF.DynamicEntry.TAG.FLAGS_1)
        return flags_1 is None or not flags_1.has(lief.ELF.DynamicEntryFlags.FLAG.PIE)

    @property
    def soname(self) -> str | None:
        """DT_SONAME: the name other modules' DT_NEEDED give this library."""
        entry = self.binary.get(lief.ELF.DynamicEntry.TAG.SONAME)
        return entry.name if entry is not None else None

    @property
    def rewritten(self) -> bool:
        """Written by `jprobe patch`: it loads the jprobe runtime itself (a DT_NEEDED on it)."""
        return any(os.path.basename(lib).startswith(RUNTIME_STEM) for lib in self.binary.libraries)

    @property
    def is_static(self) -> bool:
        """A program without a dynamic loader (`gcc -static`, `-static-pie`)."""
        return not self.is_library and not self.binary.has_interpreter

    @property
    def is_go(self) -> bool:
        """Built by the Go toolchain: goroutine stacks move when they grow (a return address
        kept aside would point into a stack that is gone) and are too small for callbacks."""
        return any(s.name in (".go.buildinfo", ".note.go.buildid", ".gopclntab") for s in self.binary.sections)

    def check_runtime_loads(self) -> None:
        """Refuse a program nothing can load the jprobe runtime into: patched or run, its probes
        would never fire and no report would say so."""
        if self.is_static:
            raise ElfError(f"{self.path}: {STATIC_REASON}; probe a dynamically linked build of it")

    def end_of_image(self) -> int:
        """The first address past every loaded segment."""
        return max(s.virtual_address + s.virtual_size for s in self.binary.segments
                   if s.type == lief.ELF.Segment.TYPE.LOAD)
