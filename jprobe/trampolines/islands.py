"""Islands: the few bytes of code a punned jump lands on, placed in the address windows its
fixed bytes allow.

A punned jump's rel32 overlaps bytes it may not change, so its target can only lie in
certain windows (a `Family`). The island there is a hop (a `jmp rel32`) to the probe's trampoline. Islands
live outside the module's image, in two zones: after the room kept for the added text and
data, and (for code that can sit anywhere) below the image. Both are chosen so that every
island also reaches the trampolines with a rel32. Islands are packed into as few pages as
the windows allow: each page is one more mapping at run time.
"""
from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass
from typing import Iterator

from .x86_64 import JUMP_SIZE as HOP, REACH

PAGE = 0x1000
MIB = 1 << 20
LOWEST = 0x10_0000                 # below this, a fixed-address program's islands are not placed
_MRU = 16                          # recently used pages tried first
_WALK = 32                         # windows tried from each zone edge


@dataclass(frozen=True)
class Family:
    """The targets a jump at `origin - 5` can have: rel32 values c + s*stride + t for
    s in [0, count) and t in [0, wsize), each read as a signed int32."""

    origin: int
    c: int
    stride: int
    wsize: int
    count: int = 1

    def member(self, s: int) -> tuple[int, int]:
        """Absolute [lo, hi] of window s."""
        rel = self.c + s * self.stride
        rel -= (1 << 32) if rel >= 1 << 31 else 0
        return self.origin + rel, self.origin + rel + self.wsize - 1

    def windows_in(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """The parts of windows inside [lo, hi] (a range on one side of the origin)."""
        r0, r1 = lo - self.origin, hi - self.origin
        if r0 < 0 <= r1 or r0 < -(1 << 31) or r1 >= 1 << 31:
            return
        u0 = r0 % (1 << 32)
        u1 = u0 + (r1 - r0)
        first = max(0, -(-(u0 - self.c - self.wsize + 1) // self.stride))
        last = min(self.count - 1, (u1 - self.c) // self.stride)
        for s in range(first, last + 1):
            w0, w1 = self.member(s)
            if max(w0, lo) <= min(w1, hi):
                yield max(w0, lo), min(w1, hi)

    def nearest(self, edge: int, downward: bool) -> Iterator[tuple[int, int]]:
        """Windows from `edge` outward (away from the image), up to _WALK of them."""
        rel = edge - self.origin
        if not -(1 << 31) <= rel < 1 << 31:
            return
        u = rel % (1 << 32)
        s = (u - self.c) // self.stride if downward else -(-(u - self.c - self.wsize + 1) // self.stride)
        s = min(max(s, 0), self.count - 1)
        for k in range(_WALK):
            t = s - k if downward else s + k
            if not 0 <= t < self.count:
                return
            yield self.member(t)


def text_room(nprobes: int) -> int:
    """Room kept after the image for the added trampolines (first half) and probe data:
    generous, since no island may land there."""
    return -(-(MIB + 1024 * nprobes) // MIB) * MIB


class Islands:
    """Zones and the bytes taken in them, for one module."""

    def __init__(self, image_lo: int, image_hi: int, fixed_address: bool, room: int):
        text_end = -(-image_hi // PAGE) * PAGE + room
        floor = LOWEST if fixed_address else -(1 << 62)
        self.after = (text_end, image_hi + REACH)
        self.below = (max(floor, text_end - REACH), image_lo)
        self.pages: dict[int, bytearray] = {}
        self._sorted: list[int] = []
        self._mru: list[int] = []
        self.new_pages = True              # False: only pages already in use are offered

    def on_pages_in_use(self) -> Islands:
        """The same islands (what one takes, the other has taken), offering only pages already
        in use: each new page is one more mapping at run time."""
        view = copy.copy(self)
        view.new_pages = False
        return view

    def zones(self) -> list[tuple[int, int]]:
        return [z for z in (self.after, self.below) if z[0] < z[1]]

    def is_free(self, at: int, size: int = HOP) -> bool:
        if at // PAGE != (at + size - 1) // PAGE:
            return False
        if not any(lo <= at and at + size <= hi for lo, hi in self.zones()):
            return False
        page = self.pages.get(at // PAGE * PAGE)
        return page is None or not any(page[at % PAGE: at % PAGE + size])

    def take(self, at: int, size: int = HOP) -> None:
        base = at // PAGE * PAGE
        page = self.pages.get(base)
        if page is None:
            page = self.pages[base] = bytearray(PAGE)
            bisect.insort(self._sorted, base)
        page[at - base: at - base + size] = b"\1" * size
        if base in self._mru:
            self._mru.remove(base)
        self._mru.append(base)                 # in place: on_pages_in_use() shares it
        del self._mru[:-_MRU]

    def release(self, at: int, size: int = HOP) -> None:
        base = at // PAGE * PAGE
        self.pages[base][at - base: at - base + size] = bytes(size)

    def _first_free(self, lo: int, hi: int) -> int | None:
        """The lowest free slot starting in [lo, hi] (one page's part of a window)."""
        page = self.pages.get(lo // PAGE * PAGE)
        if page is None:
            return lo if self.is_free(lo) else None
        base = lo // PAGE * PAGE
        at = page.find(bytes(HOP), lo - base, min(hi - base, PAGE - HOP) + HOP)
        while at >= 0 and not self.is_free(base + at):
            at = page.find(bytes(HOP), at + 1, min(hi - base, PAGE - HOP) + HOP)
        return base + at if at >= 0 else None

    def _in_page_windows(self, family: Family, page: int) -> Iterator[int]:
        for lo, hi in family.windows_in(page, page + PAGE - 1):
            at = self._first_free(lo, min(hi, page + PAGE - HOP))
            if at is not None:
                yield at

    def slots(self, family: Family) -> Iterator[int]:
        """Free island addresses the family allows, best first: on pages already in use,
        then as near the image as the zones allow."""
        tried: set[int] = set()
        mru = reversed(self._mru)
        if family.count == 1:
            # One window: nothing outside the zones, no page outside the window.
            w0, w1 = family.member(0)
            if not any(max(w0, lo) <= min(w1, hi - HOP) for lo, hi in self.zones()):
                return
            mru = [page for page in mru if page <= w1 and page + PAGE > w0]
        for page in mru:
            tried.add(page)
            yield from self._in_page_windows(family, page)
        if family.count == 1:
            # One window (a plain punned jump): every used page inside it.
            w0, w1 = family.member(0)
            i = bisect.bisect_left(self._sorted, w0 - PAGE + 1)
            end = min(len(self._sorted), i + _WALK)
            while i < end and self._sorted[i] <= w1:
                page = self._sorted[i]
                i += 1
                if page not in tried:
                    tried.add(page)
                    yield from self._in_page_windows(family, page)
        for (zlo, zhi), downward in ((self.after, False), (self.below, True)):
            if zlo >= zhi:
                continue
            for w0, w1 in family.nearest(zhi - 1 if downward else zlo, downward):
                lo, hi = max(w0, zlo), min(w1, zhi - HOP)
                if lo > hi:
                    continue
                # The page nearest the image first, then the next one out.
                pages = range(hi // PAGE * PAGE, lo // PAGE * PAGE - 1, -PAGE) if downward \
                    else range(lo // PAGE * PAGE, hi // PAGE * PAGE + 1, PAGE)
                for n, page in enumerate(pages):
                    if n >= 2:
                        break
                    if page not in tried and (self.new_pages or page in self.pages):
                        tried.add(page)
                        yield from self._in_page_windows(family, page)
