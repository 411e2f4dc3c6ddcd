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
from functools import cached_property

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.dwarf.callframe import FDE
from elftools.elf.elffile import ELFFile

from .elf import ElfModule, Symbol
from .trampolines import x86_64 as arch

PREFIX = "frame@"           # the name of a range's pseudo-symbol: frame@0x401000


def frame_ranges(module: ElfModule) -> list[tuple[int, int]]:
    """[start, end) of every FDE in executable code, sorted; none when .eh_frame is unreadable."""
    try:
        with open(module.path, "rb") as f:
            elf = ELFFile(f)
            if not elf.has_dwarf_info() and elf.get_section_by_name(".eh_frame") is None:
                return []
            entries = elf.get_dwarf_info().EH_CFI_entries()
            ranges = {(e.header["initial_location"], e.header["initial_location"] + e.header["address_range"])
                      for e in entries if isinstance(e, FDE) and e.header["address_range"] > 0}
    except (_PyElfError, KeyError, ValueError, AttributeError, OSError):
        return []
    return sorted((lo, hi) for lo, hi in ranges if module.is_code(lo, hi - lo))


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
