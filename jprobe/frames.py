"""Function bounds for code no symbol describes, from the unwind tables (.eh_frame).

A stripped binary keeps .eh_frame: one FDE per function (and one per `.cold` piece).
Inside such a range, a short instruction may be displaced together with the ones after it
when none of them can be jumped to, as inside a function symbol. What can be jumped to is
found over the whole module: every direct branch target of every FDE range. A hot and a
cold piece jump into each other, and a switch table of one may land in the other, so FDEs
joined by direct jumps form one group (a tail call, a jump to the start of a range that some
`call` targets, joins nothing: a function's switch never lands inside another function); an indirect jump anywhere in a group (a switch
table, a computed goto) makes every instruction of the group a possible target.
"""
from __future__ import annotations

import bisect
import struct
from functools import cached_property

from .elf import ElfModule, Symbol
from . import arch

PREFIX = "frame@"           # the name of a range's pseudo-symbol: frame@0x401000

# DW_EH_PE_* pointer formats (the low nibble of an encoding): struct format, or None for LEB128.
_FORMATS = {0x00: "<Q", 0x01: None, 0x02: "<H", 0x03: "<I", 0x04: "<Q", 0x09: None, 0x0a: "<h", 0x0b: "<i",
            0x0c: "<q"}
_PCREL = 0x10               # the one application besides absolute that x86-64 toolchains emit


def frame_ranges(module: ElfModule) -> list[tuple[int, int]]:
    """[start, end) of every FDE in executable code, sorted; none when .eh_frame is unreadable."""
    section = module.binary.get_section(".eh_frame")
    if section is None:
        return []
    try:
        ranges = _fde_ranges(bytes(section.content), section.virtual_address)
    except (struct.error, IndexError, KeyError, ValueError):
        return []
    return sorted((lo, hi) for lo, hi in ranges if module.is_code(lo, hi - lo))


def _fde_ranges(data: bytes, address: int) -> set[tuple[int, int]]:
    """(initial location, end) of each FDE with a non-empty range in an .eh_frame at `address`.

    Only the headers are read (a general CFI parser also decodes every entry's instructions,
    which costs seconds on a large program): entries are length-prefixed, and an FDE points
    back at the CIE whose augmentation gives the encoding of its two address fields.
    """
    ranges: set[tuple[int, int]] = set()
    encodings: dict[int, int] = {}
    at = 0
    while at < len(data):
        length, = struct.unpack_from("<I", data, at)
        field, id_format = at + 4, "<I"
        if length == 0xFFFFFFFF:                   # 64-bit DWARF
            length, = struct.unpack_from("<Q", data, field)
            field, id_format = field + 8, "<Q"
        if length == 0:                            # a terminator
            at = field
            continue
        cie_pointer, = struct.unpack_from(id_format, data, field)
        if cie_pointer:                            # an FDE (a CIE has 0 there)
            cie = field - cie_pointer
            if cie not in encodings:
                encodings[cie] = _fde_encoding(data, cie)
            encoding = encodings[cie]
            where = field + struct.calcsize(id_format)
            start, where_size = _pointer(data, where, encoding)
            size, _ = _pointer(data, where_size, encoding)
            if encoding & 0xF0 == _PCREL:
                start += address + where
            elif encoding & 0xF0:
                raise ValueError(f"pointer encoding {encoding:#x}")
            if size > 0:
                ranges.add((start, start + size))
        at = field + length
    return ranges


def _fde_encoding(data: bytes, at: int) -> int:
    """The FDE pointer encoding of the CIE at `at` (its augmentation's `R`; absolute by default)."""
    length, = struct.unpack_from("<I", data, at)
    field = at + 4 + (8 if length == 0xFFFFFFFF else 0)
    where = field + (8 if length == 0xFFFFFFFF else 4) + 1         # past the CIE id and version
    version = data[where - 1]
    augmentation = data[where:data.index(b"\0", where)]
    where += len(augmentation) + 1
    if b"eh" in augmentation:
        where += 8                                                  # the old EH data pointer
    _, where = _leb128(data, where)                                 # code alignment
    _, where = _leb128(data, where)                                 # data alignment
    where = where + 1 if version == 1 else _leb128(data, where)[1]  # return address register
    if not augmentation.startswith(b"z"):
        return 0
    _, where = _leb128(data, where)                                 # augmentation data length
    for letter in augmentation[1:].decode("latin-1"):
        if letter == "R":
            return data[where]
        if letter == "L":
            where += 1
        elif letter == "P":
            _, where = _pointer(data, where + 1, data[where])
        elif letter not in "SB":
            break                                                   # unknown: the rest cannot be read
    return 0


def _pointer(data: bytes, at: int, encoding: int) -> tuple[int, int]:
    """(value, offset past it) of a pointer in `encoding`'s format, before its application."""
    fmt = _FORMATS[encoding & 0x0F]
    if fmt is None:
        return _leb128(data, at, signed=encoding & 0x0F == 0x09)
    return struct.unpack_from(fmt, data, at)[0], at + struct.calcsize(fmt)


def _leb128(data: bytes, at: int, signed: bool = False) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    if signed and byte & 0x40:
        value -= 1 << shift
    return value, at


class Frames:
    """Branch targets and groups of a module's FDE ranges, computed on first use."""

    def __init__(self, module: ElfModule):
        self.module = module

    @cached_property
    def ranges(self) -> list[tuple[int, int]]:
        return frame_ranges(self.module)

    @cached_property
    def _starts(self) -> list[int]:
        return [lo for lo, _ in self.ranges]

    def range_at(self, address: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and self.ranges[i][0] <= address < self.ranges[i][1]:
            return self.ranges[i]
        return None

    def symbol_at(self, address: int) -> Symbol | None:
        """A pseudo-symbol for the FDE range that holds `address`."""
        found = self.range_at(address)
        if found is None:
            return None
        name = f"{PREFIX}{found[0]:#x}"
        return Symbol(name, found[0], found[1] - found[0], name)

    @cached_property
    def _flow(self) -> tuple[set[int], dict[int, int | None]]:
        """(every direct branch target, {range start: an indirect jump of its group, if any})."""
        parent = {lo: lo for lo, _ in self.ranges}

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        targets: set[int] = set()
        called: set[int] = set()
        jumps: list[tuple[int, int]] = []
        indirect: dict[int, int] = {}
        for lo, hi in self.ranges:
            swept = arch.sweep(self.module.read(lo, hi - lo), lo)
            if swept.end != hi:
                indirect[lo] = swept.end                            # what follows is unknown
            elif swept.indirect_jump is not None:
                indirect[lo] = swept.indirect_jump
            for target, call in swept.branches:
                targets.add(target)
                if call:
                    called.add(target)
                elif not lo <= target < hi:
                    jumps.append((lo, target))
        for lo, target in jumps:
            there = self.range_at(target)
            # A tail call (a jump to the start of a function something calls) joins nothing.
            if there is not None and not (target == there[0] and target in called):
                parent[find(lo)] = find(there[0])
        by_group = {find(lo): at for lo, at in indirect.items()}
        return targets, {lo: by_group.get(find(lo)) for lo, _ in self.ranges}

    @property
    def targets(self) -> set[int]:
        return self._flow[0]

    def indirect_jump(self, sym: Symbol) -> int | None:
        """An indirect jump of the range's group (or where its decoding stopped), if any."""
        return self._flow[1][sym.address]
