"""A module's region: memory the process shares with jprobe (trampolines, then probe tables),
where it goes (free, within a rel32 of the module, out of the heap's way) and its name, by
which a later attach finds it."""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from ..errors import AttachError
from .target import Mapping

PAGE = 0x1000
HALF = 32 << 20                    # a region's trampolines, and its tables: virtual, filled as used
SPAN = (2 << 30) - (64 << 20)      # module and region together, within a rel32's reach
HEAP_ROOM = 512 << 20              # left for the heap to grow, where it does


@dataclass
class LoadedModule:
    path: str                      # as the target names it
    file: str                      # where jprobe reads it
    bias: int
    lo: int                        # run-time extent of its image
    hi: int


@dataclass
class Region:
    """A module's shared memory: trampolines at `base`, tables at `base + HALF`."""
    base: int
    fd: int                        # ours
    view: mmap.mmap
    text_used: int = 0
    data_used: int = 0
    mapped: bool = True            # False until the target has mapped it (a stop of the world)

    def close(self) -> None:
        self.view.close()
        os.close(self.fd)


def region_name(loaded: LoadedModule) -> str:
    return f"jprobe:{os.path.basename(loaded.path)[:64]}@{loaded.bias:x}"


def page_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def free_room(loaded: LoadedModule, mapped: list[Mapping], executable_path: str) -> int:
    """Where a region of 2 * HALF bytes can go: free, within a rel32 of every byte of the
    module, nearest to it; never where the heap grows (the gap after [heap], or after the
    program when it has no heap yet)."""
    size = 2 * HALF
    spans = sorted((m.start, m.end) for m in mapped)
    heap = [m for m in mapped if m.path == "[heap]"]
    grows = max(m.end for m in heap) if heap else max(m.end for m in mapped if m.path == executable_path)
    best = None
    lo_limit = max(loaded.hi - SPAN, PAGE << 4)
    hi_limit = loaded.lo + SPAN
    gaps = [(a_end + PAGE, b_start - PAGE) for (_, a_end), (b_start, _) in zip(spans, spans[1:])]
    growth = next((a for a, _ in gaps if a - PAGE >= grows), None)
    for a, b in gaps:
        lo, hi = max(a, lo_limit), min(b, hi_limit)
        if a == growth:
            lo = max(lo, a + HEAP_ROOM)
        top = (hi - size) & ~(PAGE - 1)
        at = top if hi <= loaded.lo or a == growth else -(-lo // PAGE) * PAGE
        if at < lo or at + size > hi:
            continue
        distance = loaded.lo - (at + size) if at + size <= loaded.lo else at - loaded.hi
        if best is None or distance < best[0]:
            best = (distance, at)
    if best is None:
        raise AttachError(f"{loaded.path}: no free room within 2 GiB of it for jprobe's trampolines")
    return best[1]
