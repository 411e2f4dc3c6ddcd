"""The ELF model: what the planner needs to know about a module, read with LIEF."""
from __future__ import annotations

import bisect
import difflib
import os
from dataclasses import dataclass
from functools import cached_property

import lief

from .errors import ElfError, SymbolError

lief.logging.disable()


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
        if binary.header.machine_type != lief.ELF.ARCH.X86_64:
            arch = str(binary.header.machine_type).split(".")[-1]
            raise ElfError(f"{path}: architecture {arch} is not supported; jprobe patches x86-64 ELF files")
        if binary.header.file_type not in (lief.ELF.Header.FILE_TYPE.EXEC, lief.ELF.Header.FILE_TYPE.DYN):
            raise ElfError(f"{path}: not an executable or shared library (an object file?); link it first")
        self.binary = binary

    @property
    def is_pie(self) -> bool:
        return self.binary.header.file_type == lief.ELF.Header.FILE_TYPE.DYN and self.binary.has_interpreter

    @property
    def is_shared_library(self) -> bool:
        return self.binary.header.file_type == lief.ELF.Header.FILE_TYPE.DYN and not self.binary.has_interpreter

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
    def _names(self) -> dict[str, Symbol]:
        by_addr = {s.address: s for s in self.functions}
        names: dict[str, Symbol] = {}
        for sym in self.binary.symbols:
            if sym.is_function and sym.value in by_addr:
                target = by_addr[sym.value]
                names.setdefault(sym.name, target)
                if sym.demangled_name:
                    names.setdefault(sym.demangled_name, target)
                # "memcpy@GLIBC_2.14" and "memcpy@@GLIBC_2.14" both name the versioned symbol.
                if sym.has_version and sym.symbol_version and sym.symbol_version.has_auxiliary_version:
                    names.setdefault(f"{sym.name}@{sym.symbol_version.symbol_version_auxiliary.name}", target)
        return names

    @cached_property
    def _starts(self) -> list[int]:
        return [s.address for s in self.functions]

    def resolve(self, name: str) -> Symbol:
        """The function called `name` (mangled or demangled), or an error naming close matches."""
        sym = self._names.get(name)
        if sym is not None:
            return sym
        close = difflib.get_close_matches(name, self._names.keys(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with `nm -D` or `nm`"
        raise SymbolError(f"{self.path}: no function symbol '{name}'{hint}")

    def function_at(self, address: int) -> Symbol | None:
        """The function whose [start, end) holds `address`, if any."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0:
            sym = self.functions[i]
            if sym.address <= address < sym.end:
                return sym
        return None

    def related_functions(self, sym: Symbol) -> list[Symbol]:
        """Split-off parts of `sym` (GCC's `foo.cold`, `foo.part.0`), which may jump back into it."""
        prefix = sym.name + "."
        return [s for s in self.functions if s.name.startswith(prefix)]

    @cached_property
    def _exec_ranges(self) -> list[tuple[int, int]]:
        return sorted((s.virtual_address, s.virtual_address + s.size) for s in self.binary.sections
                      if s.has(lief.ELF.Section.FLAGS.EXECINSTR) and s.virtual_address and s.size)

    def is_code(self, address: int, size: int = 1) -> bool:
        """True when [address, address+size) lies in one executable section."""
        return any(lo <= address and address + size <= hi for lo, hi in self._exec_ranges)

    def code_sections(self) -> list[tuple[str, int, int]]:
        """(name, start, end) of each executable section, by address."""
        return sorted((s.name, s.virtual_address, s.virtual_address + s.size) for s in self.binary.sections
                      if s.has(lief.ELF.Section.FLAGS.EXECINSTR) and s.virtual_address and s.size)

    def read(self, address: int, size: int) -> bytes:
        """`size` bytes of the file's content at link-time address `address`."""
        return bytes(self.binary.get_content_from_virtual_address(address, size))

    def end_of_image(self) -> int:
        """The first address past every loaded segment."""
        return max(s.virtual_address + s.virtual_size for s in self.binary.segments
                   if s.type == lief.ELF.Segment.TYPE.LOAD)
