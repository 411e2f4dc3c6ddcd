"""What one light sweep over a function says: where its instructions start, where its
branches go, whether it has an indirect jump; the instructions' details only as asked."""
from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from capstone import CsInsn

from . import arch
from .elf import Symbol

WHOLE_AFTER = 8          # reads of a function's instructions after which it is decoded whole


@dataclass
class FunctionFacts:
    """What the analysis needs to know about one function, from one light sweep over it and
    its related pieces. A probe reads the operand details of a handful of its instructions,
    so those are decoded only when asked for (`instruction`, `instructions_from`)."""

    symbol: Symbol
    code: bytes                        # its bytes, from the symbol's start
    starts: list[int]                  # where its instructions start, in order
    end: int                           # past the last instruction decoded
    targets: set[int]
    indirect_jump: int | None
    x87: bool
    complete: bool = True              # every byte of it and of its related pieces decoded
    _decoded: dict[int, CsInsn] = field(default_factory=dict, repr=False)    # by `instruction`
    _reads: int = field(default=0, repr=False)

    def has(self, address: int) -> bool:
        """An instruction of the function starts at `address`."""
        i = bisect.bisect_left(self.starts, address)
        return i < len(self.starts) and self.starts[i] == address

    def index_of(self, address: int) -> int:
        i = bisect.bisect_left(self.starts, address)
        if i == len(self.starts) or self.starts[i] != address:
            raise KeyError(address)
        return i

    def instruction(self, i: int) -> CsInsn:
        """The i-th instruction, with its details (a probe's first is asked for twice)."""
        if i not in self._decoded:
            self._decoded[i] = next(iter(self.instructions_from(i, 1)))
        return self._decoded[i]

    def instructions_from(self, i: int, count: int) -> Iterable[CsInsn]:
        """Up to `count` instructions from the i-th on, with their details, built as they are
        read. A function read more than a few times (`jprobe sites` and dense probing read
        every instruction) is decoded whole once instead."""
        self._reads += 1
        if self._reads > WHOLE_AFTER:
            return self.insns[i:i + count]
        at, base = self.starts[i], self.symbol.address
        return arch.decode_lazily(self.code[at - base:self.end - base], at, count)

    @cached_property
    def insns(self) -> list[CsInsn]:
        """Every instruction, with its details."""
        return arch.decode(self.code[:self.end - self.symbol.address], self.symbol.address)
