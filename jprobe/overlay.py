"""The module's bytes as the probes decided so far leave them, and whose patch each is."""
from __future__ import annotations

from .elf import ElfModule


class Overlay:
    """What a punned rel32 reads: the bytes after its instruction as they will be.

    A trap site's first byte is unstable (under a debugger it becomes another trap
    instruction), so no punned rel32 may rely on it. So may a whole patch be: a plain jump's
    rel32 changes when `jprobe run` places the trampolines elsewhere than planned.
    """

    def __init__(self, module: ElfModule):
        self.module = module
        self.bytes: dict[int, tuple[int | None, int]] = {}     # address -> (byte or None, owner)

    def put(self, owner: int, address: int, data: bytes, unstable_first: bool = False,
            unstable: bool = False) -> None:
        for i, b in enumerate(data):
            self.bytes[address + i] = (None if unstable or (unstable_first and i == 0) else b, owner)

    def patched(self, address: int, size: int) -> bool:
        return any(address + i in self.bytes for i in range(size))

    def read(self, address: int, size: int) -> tuple[bytes, int | None] | None:
        """The bytes and the one probe they belong to (None: original), or None when they
        are unstable or belong to two probes."""
        original = self.module.read(address, size)
        if len(original) != size:
            return None
        out, owners = bytearray(), set()
        for i in range(size):
            b, owner = self.bytes.get(address + i, (original[i], None))
            if b is None:
                return None
            out.append(b)
            if owner is not None:
                owners.add(owner)
        if len(owners) > 1:
            return None
        return bytes(out), next(iter(owners), None)
