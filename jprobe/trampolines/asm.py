"""A small code buffer over keystone that knows absolute targets.

Keystone reads `[rip + N]` as a raw displacement, and picks short branch forms
by itself.  Trampolines need references to absolute link-time addresses with a
size that does not depend on where the code lands (so a layout can be computed
once), so RIP-relative operands and branches get their displacement patched
here after keystone has encoded the instruction with a placeholder.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import keystone

from .relocate import decoder

_ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)


@lru_cache(maxsize=None)
def assemble(text: str) -> bytes:
    """Position-independent instructions (no branches to absolute addresses)."""
    encoding, _ = _ks.asm(text, 0)
    return bytes(encoding or b"")


@lru_cache(maxsize=None)
def _rip_template(text: str) -> tuple[bytes, int]:
    """Encoding of one instruction with `[rip]` and the offset of its disp32."""
    code = assemble(text.replace("[rip]", "[rip + 0x7fffffff]"))
    insn = next(decoder().disasm(code, 0))
    if insn.size != len(code) or insn.disp_size != 4:
        raise ValueError(f"not one RIP-relative instruction with a disp32: {text}")
    return code, insn.disp_offset


@dataclass(frozen=True)
class Later:
    """An address in a region placed only once the code is laid out: `jprobe run` puts the
    probe table right past the trampolines, which refer to it, so its address waits for
    their size (`CodeBuffer.finish`). `Later("table") + 8` is 8 bytes into it."""

    region: str
    offset: int = 0

    def __add__(self, offset: int) -> "Later":
        return Later(self.region, self.offset + offset)


Address = int | Later                      # an address known now, or one placed later
Target = Address | str                     # or a label of the buffer


class CodeBuffer:
    """Machine code being laid out at a known link-time address."""

    def __init__(self, address: int):
        self.address = address
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self._fixups: list[tuple[int, int, str | Later, int]] = []   # (disp offset, end of insn, target, size)
        self._fresh = 0
        # (offset, target) of each rel32/disp32 field aimed at an address given as a number
        # (not at a label or a `Later` address: the regions added next to the module)
        self.references: list[tuple[int, int]] = []

    @property
    def here(self) -> int:
        return self.address + len(self.code)

    def emit(self, text: str) -> None:
        """Instructions with no absolute reference."""
        self.code += assemble(text)

    def raw(self, data: bytes, references: list[tuple[int, int]] = ()) -> None:
        """Bytes laid out elsewhere; `references`: their (offset, target) fields."""
        self.references += [(len(self.code) + off, target) for off, target in references]
        self.code += data

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = self.here

    def fresh(self, name: str) -> str:
        """A label name not used yet in this buffer."""
        self._fresh += 1
        return f"{name}.{self._fresh}"

    def rip(self, text: str, target: Target) -> None:
        """One instruction whose `[rip]` operand must address `target` (an address or a label)."""
        code, disp_at = _rip_template(text)
        start = len(self.code)
        self.code += code
        self._refer(start + disp_at, start + len(code), target)

    def jmp(self, target: Target) -> None:
        self._branch(b"\xe9", target)

    def call(self, target: Target) -> None:
        self._branch(b"\xe8", target)

    def jcc(self, cc: int, target: Target) -> None:
        """`j<cc> rel32` where cc is the low nibble of the 0F 8x opcode."""
        self._branch(bytes([0x0F, 0x80 | cc]), target)

    def jrcxz(self, label: str) -> None:
        """`jrcxz rel8` to a nearby label: a test and branch that leaves the flags alone."""
        self.code += b"\xe3\0"
        self._refer(len(self.code) - 1, len(self.code), label, 1)

    def _branch(self, opcode: bytes, target: Target) -> None:
        self.code += opcode + b"\0\0\0\0"
        self._refer(len(self.code) - 4, len(self.code), target)

    def _refer(self, disp_at: int, end: int, target: Target, size: int = 4) -> None:
        if not isinstance(target, int):
            self._fixups.append((disp_at, end, target, size))
        else:
            self._put(disp_at, end, target, size)
            if size == 4:
                self.references.append((disp_at, target))

    def _put(self, disp_at: int, end: int, target: int, size: int = 4) -> None:
        disp = target - (self.address + end)
        bits = 8 * size - 1
        if not -2**bits <= disp < 2**bits:
            raise ValueError(f"target {target:#x} is out of rel{8 * size} reach from {self.address + end:#x}")
        self.code[disp_at:disp_at + size] = disp.to_bytes(size, "little", signed=True)

    def finish(self, regions: dict[str, int] | None = None) -> bytes:
        """The code with every reference to a label, or to a `Later` address in one of
        `regions` (name: where it starts), resolved."""
        for disp_at, end, target, size in self._fixups:
            address = (regions[target.region] + target.offset if isinstance(target, Later)
                       else self.labels[target])
            self._put(disp_at, end, address, size)
        self._fixups.clear()
        return bytes(self.code)
