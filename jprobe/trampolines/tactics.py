"""x86-64 jumps for instructions shorter than a jump, after E9Patch's tactics.

A `jmp rel32` needs 5 bytes. At an instruction of L < 5 bytes:

- B2, punned jump (`pun`): `E9` over the instruction's first byte; the rel32's first L-1
  bytes are ours, the rest are the bytes that follow, which keep their values. The
  target can only be in the window those fixed bytes allow; an island there hops on.
- T1, padded punned jump (`pun`): the same after 1 or 2 redundant prefixes, which shift
  the overlap and so give other windows.
- T2, successor eviction (`evict`): the next instruction J is moved out too and replaced
  by a jump of its own (to a copy of J that jumps back). The first jump's rel32 now
  overlaps J's new bytes, whose free part both jumps choose together.
- T3, neighbour eviction (`evict`): a 2-byte `jmp rel8` to a nearby instruction N of 6
  bytes or more, which is moved out; N's bytes become N's own jump, then the site's long
  jump. N must lie within the bytes one patch may cover (JP_PATCH_MAX) after the site.

Why these rewrites are safe without knowing the control flow: B2 and T1 change only the
bytes of the probed instruction itself; nothing can jump into the middle of it, and the
bytes after it are left exactly as they were, so any jump to them runs the original code.
T2 and T3 also rewrite J or N, but it then starts with a complete jump at its own address:
a jump to it still runs it (through its copy), and the rest of its bytes were never an
instruction start. The instructions between the site and N are left as they were. This
needs J or N to really start at that address, so the caller only evicts an instruction
that the probed one falls through to, or one known to start an instruction.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product
from random import Random
from typing import Callable, Iterator, NamedTuple

from capstone import CsInsn

from ..mechanisms import Mechanism, Tactic
from .islands import HOP, PAGE, Family, Islands
from .x86_64 import INT3, JUMP_OPCODE as JMP

JMP8 = 0xEB                        # jmp rel8
# Prefixes a near jmp ignores in 64-bit mode: REX.W (operand size is 64 already) and ES.
# 0x66 is not one of them (AMD honours it: a 16-bit jump).
PADDINGS = (b"", b"\x48", b"\x26\x48")
_T2_TRIES = 8


@dataclass(frozen=True)
class Jump:
    """A short-instruction jump: bytes to write from the site on, and its islands."""

    tactic: Tactic                      # B2, T1, T2 or T3
    patched: bytes                      # over the probed instruction (and J for T2)
    island: int                         # the probe's hop
    evicted: CsInsn | None = None
    evicted_island: int | None = None
    depends: int | None = None          # the probe whose patched bytes its rel32 reads
    prefixes: int = 0
    more: tuple[tuple[CsInsn, int], ...] = ()   # T2 chains: further (evicted, island)

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism.EVICT if self.evicted is not None else Mechanism.PUN


class Span(NamedTuple):
    """Bytes a chain moves out that are not one instruction: another probe's patch."""

    address: int
    size: int


def _le(value: int) -> bytes:
    return (value % (1 << 32)).to_bytes(4, "little")


# following(address, n): the n bytes there as the other probes leave them, and the probe
# whose patch they belong to (None: original bytes); None when they may change.
Reader = Callable[[int, int], "tuple[bytes, int | None] | None"]


def pun(address: int, length: int, following: Reader, islands: Islands) -> Jump | None:
    """B2, then T1: a jump whose rel32 runs on into the bytes after the instruction."""
    for p, padding in enumerate(PADDINGS):
        if p >= length:
            break
        free = length - 1 - p
        after = following(address + length, 4 - free)
        if after is None:
            continue
        fixed, owner = after
        origin = address + p + HOP
        family = Family(origin, int.from_bytes(bytes(free) + fixed, "little"), 1 << 32, 256 ** free)
        for at in islands.slots(family):
            rel = _le(at - origin)
            assert rel[free:] == fixed
            islands.take(at)
            return Jump(Tactic.B2 if p == 0 else Tactic.T1, padding + bytes([JMP]) + rel[:free], at,
                        depends=owner, prefixes=p)
    return None


def evict(address: int, length: int, successor: CsInsn, following: Reader, islands: Islands) -> Jump | None:
    """T2: jump at `address` over a jump that replaces `successor` (J). Both islands are
    taken on success."""
    jump = joint(address, length, successor.size, following, islands)
    return replace(jump, evicted=successor) if jump is not None else None


def joint(address: int, length: int, m: int, following: Reader, islands: Islands) -> Jump | None:
    """Two jumps chosen together: one at `address` (`length` bytes) whose rel32 runs into a
    second one that replaces the `m` bytes after it. `patched` covers both; the second
    jump's island is `evicted_island`."""
    j = address + length                              # J's address; E9 goes there
    shared = 4 - length                               # rel32 bytes of the first jump inside J's rel32
    j_free = min(m - 1, 4)                            # rel32 bytes of J's jump inside J
    shared_free = min(shared, j_free)
    after = following(j + m, 4 - j_free) if j_free < 4 else (b"", None)
    if after is None:
        return None
    j_fixed, owner = after                            # J's rel32 bytes past J
    s_fixed = j_fixed[:max(0, shared - j_free)]
    # First jump: rel32 = low (length-1 free bytes) | E9 | shared bytes (free ones, then fixed).
    c = (JMP << 8 * (length - 1)) | (int.from_bytes(s_fixed, "little") << 8 * (length + shared_free))
    first = Family(address + HOP, c, 256 ** length, 256 ** (length - 1), 256 ** shared_free)
    tries = 0
    for at in islands.slots(first):
        rel_i = _le(at - (address + HOP))
        assert rel_i[length - 1] == JMP
        islands.take(at)
        low = rel_i[length:]                           # J's rel32 starts with these
        extra_free = j_free - shared_free if j_free > shared else 0
        high_fixed = j_fixed[len(j_fixed) - (4 - shared - extra_free):] if 4 - shared - extra_free else b""
        c_j = int.from_bytes(low, "little") | (int.from_bytes(high_fixed, "little") << 8 * (shared + extra_free))
        second = Family(j + HOP, c_j, 256 ** shared, 1, 256 ** extra_free)
        for at_j in islands.slots(second):
            rel_j = _le(at_j - (j + HOP))
            assert rel_j[:shared] == low and rel_j[j_free:] == j_fixed
            islands.take(at_j)
            patch_j = bytes([JMP]) + rel_j[:j_free] + b"\xcc" * (m - 1 - j_free)
            return Jump(Tactic.T2, bytes([JMP]) + rel_i[:length - 1] + patch_j, at, None, at_j, depends=owner)
        islands.release(at)
        tries += 1
        if tries >= _T2_TRIES:
            break
    return None


def neighbour(address: int, length: int, n: CsInsn, gap: bytes, following: Reader, islands: Islands) -> Jump | None:
    """T3: `jmp rel8` from the site to N + 5, where the site's long jump follows N's own.
    `gap`: the bytes between the site's instruction and N, kept as they are."""
    long_at = n.address + HOP
    rel8 = long_at - (address + 2)
    if length < 2 or n.size < HOP + 1 or not -128 <= rel8 < 128:
        return None
    free = min(n.size - HOP - 1, 4)
    after = following(n.address + n.size, 4 - free) if free < 4 else (b"", None)
    if after is None:
        return None
    fixed, owner = after
    mine = Family(long_at + HOP, int.from_bytes(bytes(free) + fixed, "little"), 1 << 32, 256 ** free)
    for at in islands.slots(mine):
        islands.take(at)
        for half in (0, 1 << 31):                     # N's own rel32 is all free: either direction
            for at_n in islands.slots(Family(n.address + HOP, half, 1 << 32, 1 << 31)):
                islands.take(at_n)
                rel_i, rel_n = _le(at - (long_at + HOP)), _le(at_n - (n.address + HOP))
                assert rel_i[free:] == fixed
                patch_n = bytes([JMP]) + rel_n + bytes([JMP]) + rel_i[:free] + bytes([INT3]) * (n.size - HOP - 1 - free)
                site = bytes([JMP8, rel8 % 256]) + bytes([INT3]) * (length - 2)
                return Jump(Tactic.T3, site + gap + patch_n, at, n, at_n, depends=owner)
        islands.release(at)
        return None
    return None


_CHAIN_TRIES = 16
_CHAIN_BUDGET = 2048                # island slots (and spread windows) one chain may try


def chain(address: int, length: int, moved: list[CsInsn | Span], following: Reader, islands: Islands) -> Jump | None:
    """T2 once or more: the `length` probed bytes and each instruction after them (`moved`,
    moved out) get a jump, every rel32 running into the jumps after it.

    Each jump may start with 0-2 prefixes (as in T1): a rel32 whose last byte would be a
    later jump's E9 (a window 370 MiB below, out of reach for code linked low) ends on a
    prefix or a free byte instead. Layouts are tried with the fewest prefixes first; in
    each, jumps are chosen from the last one back, each a punned jump over the bytes the
    later ones settled, retrying the later ones' islands when an earlier one finds no window.
    """
    pieces = [(address, length)] + [(i.address, i.size) for i in moved]
    end = pieces[-1][0] + pieces[-1][1]
    choices = [range(min(len(PADDINGS), size)) for _, size in pieces]
    # Held to pages already in use, most layouts find nothing: a quick look only.
    budget = [_CHAIN_BUDGET if islands.new_pages else _CHAIN_BUDGET // 16]
    for pads in sorted(product(*choices), key=sum):
        if budget[0] <= 0:
            break
        tail = max(0, pieces[-1][0] + pads[-1] + HOP - end)
        after = following(end, tail) if tail else (b"", None)
        if after is None:
            continue
        code, free = _skeleton(address, pieces, pads, after[0])
        if not _signs_reach(code, free, address, pieces, pads, islands):
            continue
        chosen = _chain_layout(code, address, pieces, pads, islands, budget)
        if chosen is not None:
            patched, targets = chosen
            return Jump(Tactic.T2, patched, targets[0], moved[0], targets[1], depends=after[1], prefixes=pads[0],
                        more=tuple(zip(moved[1:], targets[2:])))
    return None


def _skeleton(address: int, pieces: list[tuple[int, int]], pads: tuple[int, ...],
              after: bytes) -> tuple[bytearray, set[int]]:
    """The chain's bytes with every jump's prefixes, E9 and int3 fill in place (the bytes
    after it too), and the offsets of the rel32 bytes still to choose."""
    end = pieces[-1][0] + pieces[-1][1]
    code = bytearray(end - address) + bytearray(after)
    free: set[int] = set()
    for (start, size), pad in zip(pieces, pads):
        at = start - address
        code[at:at + pad] = PADDINGS[pad]
        code[at + pad] = JMP
        free.update(range(at + pad + 1, at + min(size, pad + HOP)))
        code[at + min(pad + HOP, size):at + size] = bytes([INT3]) * max(0, size - pad - HOP)
    return code, free


def _signs_reach(code: bytearray, free: set[int], address: int, pieces: list[tuple[int, int]],
                 pads: tuple[int, ...], islands: Islands) -> bool:
    """False when some jump's rel32 ends on a byte the layout fixes (a prefix, an E9, the
    bytes after the chain) that puts all its targets outside the zones: a cheap test
    that spares most hopeless layouts their island search."""
    zones = islands.zones()
    for (start, _), pad in zip(pieces, pads):
        top = start - address + pad + HOP - 1
        if top not in free:
            lo = start + pad + HOP + ((code[top] ^ 0x80) - 0x80) * (1 << 24)
            if not any(max(lo, zlo) <= min(lo + (1 << 24) - 1, zhi - HOP) for zlo, zhi in zones):
                return False
    return True


def _chain_layout(code: bytearray, address: int, pieces: list[tuple[int, int]], pads: tuple[int, ...],
                  islands: Islands, budget: list[int]) -> tuple[bytes, list[int]] | None:
    """The chain's bytes (from its `_skeleton`) and islands for one padding layout, or None;
    islands taken. `budget`: island slots left to try, shared by all layouts of one chain."""
    end = pieces[-1][0] + pieces[-1][1]
    chosen: list[int] = [0] * len(pieces)
    # Where each earlier jump's rel32 ends: a later jump's free byte there sets its sign.
    tops = {start - address + pad + HOP - 1 for (start, _), pad in zip(pieces, pads)}

    def candidates(t: int, origin: int, at: int, free: int, fixed: bytes) -> Iterator[int]:
        family = Family(origin, int.from_bytes(bytes(free) + fixed, "little"), 1 << 32, 256 ** free)
        yield from islands.slots(family)
        if t == 0 or free < 2:
            return
        # The islands near the zones' edges share their middle rel32 bytes, which earlier
        # jumps read: also try spread values, kept positive where they end an earlier rel32.
        spread = Random(origin)
        for _ in range(_CHAIN_TRIES):
            budget[0] -= 1
            mid = bytes(spread.randrange(0x80 if at + 1 + k in tops else 0x100) for k in range(1, free))
            c = int.from_bytes(b"\0" + mid + fixed, "little")
            yield from islands.slots(Family(origin, c, 1 << 32, 256))

    def solve(t: int) -> bool:
        if t < 0:
            return True
        start, size = pieces[t]
        at = start - address + pads[t]
        origin = start + pads[t] + HOP
        free = min(size - 1 - pads[t], 4)
        fixed = bytes(code[at + 1 + free:at + HOP])
        tries = 0
        seen_pages: dict[int, int] = {}
        for island in candidates(t, origin, at, free, fixed):
            budget[0] -= 1
            if tries >= (1 if t == 0 else _CHAIN_TRIES) or budget[0] < 0:
                break
            page = island // PAGE
            seen_pages[page] = seen_pages.get(page, 0) + 1
            if seen_pages[page] > 2:          # a page gives its rel32s the same middle bytes
                continue
            tries += 1
            code[at + 1:at + 1 + free] = _le(island - origin)[:free]
            islands.take(island)
            chosen[t] = island
            if solve(t - 1):
                return True
            islands.release(island)
        return False

    if not solve(len(pieces) - 1):
        return None
    return bytes(code[:end - address]), chosen
