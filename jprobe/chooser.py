"""Which mechanism a probe site gets: every tactic, one function each, tried in one written order.

The order (WHOLE, then SHORT, below; the first that fits decides):
1. `call_retarget`: a 5-byte `call rel32` or 6-byte `call [rip+x]` keeps its place and
   return address and calls the trampoline instead (B1, `jump`).
2. `whole_instructions`: whole instructions are displaced from the site until they cover 5
   bytes, when nothing can jump into their middle (sites.SiteAnalyzer.displace says when);
   B1, `jump`.
3. A jump that needs no more room than the instructions that may move together: punned
   (`pun`: B2, T1), evicting the next instruction (`evict`: T2) or a nearby longer one (T3),
   or a chain of evictions (T2); see trampolines/tactics.py for why they are safe without
   knowing the control flow. Their targets are islands outside the image (trampolines/islands.py).
4. `reaim`: a punned jump over the next probe's own jump, both re-aimed through islands
   chosen together (T2).
5. Otherwise the `trap` fallback: int3 on the first byte and an out-of-line copy of the
   instruction to resume at.

Rules 1-2 read only the code. Rules 3-4 read the bytes the other probes leave (a punned
rel32 runs into them) and take islands, so a plan decides them highest address first
(planner.py), each site first on island pages already in use (each page is one more mapping
at run time), then on any. A decision is a frozen `Site`: one that changes another probe's
jump (`reaim`) carries that jump's new bytes (`Reaimed`), for the planner to record with it.
A new tactic is one function here and one line in WHOLE or SHORT.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Protocol

from capstone import CsInsn

from . import arch, layout
from .arch import can_relocate_together, tactics
from .elf import Symbol
from .functions import FunctionFacts
from .mechanisms import Mechanism, Tactic
from .overlay import Overlay

MAX_PATCH = layout.CONST["JP_PATCH_MAX"]     # the most bytes a plan file can patch at one site
_CHAIN_LONGEST = 5       # instructions one T2 chain may move


@dataclass(frozen=True)
class Reaimed:
    """Another probe's jump as a `reaim` chose it: new bytes over the same instructions, to
    the same trampoline through an island."""

    address: int
    patched: bytes
    island: int
    depends: int | None                # the probe whose patched bytes its rel32 reads


@dataclass(frozen=True)
class Site:
    """The decision for one probe address."""

    address: int
    mechanism: Mechanism
    reason: str
    displaced: tuple[CsInsn, ...] = ()
    call_retarget: bool = False
    flags_live: bool = True
    x87: bool = True
    function: Symbol | None = None

    padding: int = 0                   # fill bytes after the function the patch spills into
    jump: tactics.Jump | None = None    # pun / evict: the bytes and islands
    # trap: the instructions from the site on that may move together (fewer than 5 bytes),
    # which a pun or an eviction covers in place of the first one alone
    run: tuple[CsInsn, ...] = ()
    reaimed: Reaimed | None = None     # the next probe's jump, chosen together with this one

    @property
    def tactic(self) -> Tactic | None:
        """E9Patch's name for how the jump fits: B1 (whole instructions), B2, T1, T2, T3."""
        if self.jump is not None:
            return self.jump.tactic
        return Tactic.B1 if self.mechanism is Mechanism.JUMP else None

    @property
    def length(self) -> int:
        """Bytes the patch covers."""
        if self.jump is not None:
            return len(self.jump.patched)
        return sum(i.size for i in self.displaced) + self.padding


class Code(Protocol):
    """What the tactics ask of a module's code (sites.SiteAnalyzer answers)."""

    def function_at(self, address: int) -> Symbol | None: ...

    def displace(self, first: CsInsn, facts: FunctionFacts | None) -> tuple[list[CsInsn], str | None]: ...

    def flags_live(self, address: int, function: Symbol | None, facts: FunctionFacts | None,
                   displaced: list[CsInsn]) -> bool: ...

    def evictable(self, first: CsInsn, function: Symbol | None, overlay: Overlay) -> tuple[CsInsn | None, str]: ...

    def neighbour(self, first: CsInsn, successor: CsInsn, overlay: Overlay) -> tuple[CsInsn, bytes] | None: ...


@dataclass(frozen=True)
class Policy:
    """What the applier allows a plan."""

    islands: bool = True     # it maps islands before the code runs (not `jprobe patch` on a library)
    movable: bool = False    # `jprobe run`: it may place the trampolines elsewhere than planned
    strict: bool = False     # a site that would trap is refused
    return_pool: int | None = None   # `jprobe attach`: threads take return stacks from this pool (returns.Pool)
    ring_pool: arch.RingPool | None = None   # `jprobe attach`: and trace rings from this one
    trace_ids_from: int = 0          # `jprobe attach`: a batch's first probe id in its records (ids of one module differ)


@dataclass(frozen=True)
class Choice:
    """What a site's short jump is chosen among: the bytes the probes decided so far leave, the
    islands, and the other probes' jumps that may be re-aimed (address -> their length: an
    `E9 rel32` over their own instructions, through one island at most). The plan fills them
    as it goes, highest address first."""

    code: Code
    overlay: Overlay
    islands: arch.Islands
    policy: Policy = Policy()
    reaimable: Mapping[int, int] = field(default_factory=dict)
    # Deciding one site as if no other were planned (`jprobe sites`, --strict's first look): a
    # trap then says why no short jump fits. A plan's trap keeps the whole-instruction reason.
    alone: bool = False

    @cached_property
    def passes(self) -> tuple[Choice, Choice]:
        """This choice held to island pages already in use (each new one is one more mapping
        at run time), then as it is."""
        return replace(self, islands=self.islands.on_pages_in_use()), self


class Spot:
    """A probe address as the whole-instruction tactics see it, read from the code as asked."""

    def __init__(self, code: Code, first: CsInsn, function: Symbol | None, facts: FunctionFacts | None):
        self.code, self.first, self.function, self.facts = code, first, function, facts
        self.x87 = facts.x87 if facts is not None and facts.starts else True

    @cached_property
    def displacement(self) -> tuple[list[CsInsn], str | None]:
        """The instructions that may move from the site on, and why they are fewer than a
        jump needs (None: they are enough)."""
        return self.code.displace(self.first, self.facts)

    @cached_property
    def flags_live(self) -> bool:
        return self.code.flags_live(self.first.address, self.function, self.facts, self.displacement[0])


class Short:
    """A site that would trap, as the short tactics see it: the instructions that may move
    together from it, and the one after them. Valid while the overlay stays as it is."""

    def __init__(self, site: Site, code: Code, overlay: Overlay):
        self.site, self.code, self.overlay = site, code, overlay
        self.run = site.run or site.displaced[:1]
        self.address = self.run[0].address
        self.size = sum(i.size for i in self.run)

    @cached_property
    def open(self) -> bool:
        """Its bytes are fewer than a jump and no other probe's: a short jump may go there."""
        return self.size < arch.JUMP_SIZE and not self.overlay.patched(self.address, self.size)

    @cached_property
    def successor(self) -> tuple[CsInsn | None, str]:
        """The instruction after the run when it may be evicted, else None and why not."""
        successor, why = self.code.evictable(self.run[-1], self.site.function, self.overlay)
        if successor is not None and self.size + successor.size > MAX_PATCH:
            return None, "and the next instruction is too long to move too"
        return successor, why

    @cached_property
    def evicted(self) -> CsInsn | None:
        """The successor, when a short jump may go here and evict it."""
        return self.successor[0] if self.open else None


def call_retarget(spot: Spot) -> Site | None:
    first = spot.first
    if not (arch.is_rel32_call(first) or arch.is_rip_indirect_call(first)):
        return None
    return Site(first.address, Mechanism.JUMP, "call retargeted to the trampoline (return address kept)",
                (first,), call_retarget=True, flags_live=False, x87=spot.x87, function=spot.function)


def whole_instructions(spot: Spot) -> Site | None:
    displaced, blocker = spot.displacement
    if blocker is not None:
        return None
    n, size = len(displaced), sum(i.size for i in displaced)
    what = "1 instruction" if n == 1 else f"{n} instructions"
    padding = max(0, arch.JUMP_SIZE - size)
    spill = f" and {padding} byte(s) of the padding after {spot.function.name}" if padding else ""
    return Site(spot.first.address, Mechanism.JUMP, f"displaces {what} ({size} bytes){spill}", tuple(displaced),
                flags_live=spot.flags_live, x87=spot.x87, function=spot.function, padding=padding)


def pun(short: Short, choice: Choice) -> Site | None:
    if not short.open:
        return None
    return _jumped(short, tactics.pun(short.address, short.size, choice.overlay.read, choice.islands))


def evict(short: Short, choice: Choice) -> Site | None:
    if short.evicted is None:
        return None
    return _jumped(short, tactics.evict(short.address, short.size, short.evicted, choice.overlay.read,
                                        choice.islands))


def neighbour(short: Short, choice: Choice) -> Site | None:
    """T3 through the first instruction of 6 bytes or more after a one-instruction site."""
    if short.evicted is None or len(short.run) != 1:
        return None
    found = short.code.neighbour(short.run[0], short.evicted, choice.overlay)
    if found is None:
        return None
    n, gap = found
    return _jumped(short, tactics.neighbour(short.address, short.size, n, gap, choice.overlay.read, choice.islands))


def chain(short: Short, choice: Choice) -> Site | None:
    """T2 with prefixes, or over two or more instructions: each evicted instruction's own
    jump runs into the next one's. A longer chain is tried when a shorter one finds no
    windows (its last rel32 ran into bytes that fix a window out of reach), up to one
    patch's bytes."""
    if short.evicted is None:
        return None
    moved = [short.evicted]
    while True:
        jump = tactics.chain(short.address, short.size, moved, choice.overlay.read, choice.islands)
        if jump is not None or len(moved) + 1 >= _CHAIN_LONGEST:
            return _jumped(short, jump)
        after, _ = short.code.evictable(moved[-1], short.code.function_at(moved[-1].address), choice.overlay)
        if after is None or short.size + sum(i.size for i in moved) + after.size > MAX_PATCH:
            return None
        moved.append(after)


def reaim(short: Short, choice: Choice) -> Site | None:
    """A punned jump over the next probe's jump, both aimed at islands chosen together.

    The next probe keeps its trampoline; only the rel32 of its jump changes (it now hops
    through an island), so that this jump's rel32, which runs into it, lands somewhere
    allowed. Safe for the same reason as an eviction: the next instruction still starts
    with a complete jump to where it went before.
    """
    j = short.address + short.size
    m = choice.reaimable.get(j)
    if m is None:
        return None
    read, islands = choice.overlay.read, choice.islands
    jump = (tactics.joint(short.address, short.size, m, read, islands)
            or tactics.chain(short.address, short.size, [tactics.Span(j, m)], read, islands))
    if jump is None:
        return None
    site = short.site
    return Site(site.address, Mechanism.PUN, f"T2: punned jump over the next probe's jump, both through islands "
                                             f"(island at {jump.island:#x})", tuple(short.run),
                flags_live=site.flags_live, x87=site.x87, function=site.function,
                jump=tactics.Jump(Tactic.T2, jump.patched[:short.size], jump.island, depends=j),
                reaimed=Reaimed(j, jump.patched[short.size:], jump.evicted_island, jump.depends))


# The order tactics are tried in (see the top of this file): one line each.
WHOLE: tuple[Callable[[Spot], Site | None], ...] = (call_retarget, whole_instructions)
SHORT: tuple[Callable[[Short, Choice], Site | None], ...] = (pun, evict, neighbour, chain, reaim)


def choose_whole(spot: Spot) -> Site:
    """The site's jump over whole instructions, else its trap, with the run of instructions
    a short jump may cover in its place."""
    for tactic in WHOLE:
        site = tactic(spot)
        if site is not None:
            return site
    displaced, blocker = spot.displacement
    return Site(spot.first.address, Mechanism.TRAP, blocker, (spot.first,), flags_live=spot.flags_live,
                x87=spot.x87, function=spot.function, run=tuple(displaced))


def choose_short(site: Site, choice: Choice) -> Site:
    """A short jump for a site `choose_whole` left a trap, islands taken; else the trap."""
    if not choice.policy.islands:
        return site
    short = Short(site, choice.code, choice.overlay)
    # With no island page in use yet, the first pass could find nothing.
    for attempt in choice.passes if choice.islands.pages else (choice,):
        for tactic in SHORT:
            decided = tactic(short, attempt)
            if decided is not None:
                return decided
    if not choice.alone or not short.open:
        return site
    successor, why = short.successor
    note = (f"no punned jump fits, {why}" if successor is None
            else "no island window is free for a punned or evicting jump")
    return replace(site, reason=f"{site.reason}; {note}")


def _jumped(short: Short, jump: tactics.Jump | None) -> Site | None:
    """The site a short tactic's jump makes, with its one-line reason."""
    if jump is None:
        return None
    what = {Tactic.B2: "punned jump", Tactic.T1: f"punned jump after {jump.prefixes} prefix byte(s)",
            Tactic.T2: f"jump over an evicted `{insn_text(jump.evicted)}`" if jump.evicted else "",
            Tactic.T3: f"short jump into an evicted `{insn_text(jump.evicted)}` at "
                       f"{jump.evicted.address:#x}" if jump.evicted else ""}[jump.tactic]
    if jump.more:
        what = "jump over evicted " + ", ".join(f"`{insn_text(i)}`" for i in [jump.evicted] + [m for m, _ in jump.more])
    if len(short.run) > 1:
        what += f" from {len(short.run)} instructions moved together ({short.size} bytes)"
    # After the probe work, the trampoline runs the evicted instructions too, saving a
    # jump, up to a call (its return address is the next one's jump) or a ret or jmp.
    displaced = list(short.run)
    if jump.tactic is Tactic.T2:
        for insn in [jump.evicted] + [m for m, _ in jump.more]:
            if (arch.is_call(displaced[-1]) or arch.ends_flow(displaced[-1])
                    or can_relocate_together(displaced + [insn])):
                break
            displaced.append(insn)
    site = short.site
    return Site(short.address, jump.mechanism, f"{jump.tactic}: {what} (island at {jump.island:#x})",
                tuple(displaced), flags_live=site.flags_live, x87=site.x87, function=site.function, jump=jump)


def insn_text(insn: CsInsn) -> str:
    """An instruction as messages quote it (no trailing space after an operand-less mnemonic)."""
    return f"{insn.mnemonic} {insn.op_str}".strip()
