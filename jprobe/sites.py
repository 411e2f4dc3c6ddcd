"""What the code allows at a probe site: which instructions may move from it, which one
follows them, and whether the flags are live there (chooser.py decides the mechanism).

Whole instructions are displaced from the site until they cover 5 bytes. An instruction
other than the first may be displaced only when nothing can jump to it: it is not the
direct target of any branch in the function or in its other pieces (`foo` and `foo.cold`
branch into each other; clones such as `foo.part.0` count too), no other probe is there,
neither the function nor its `.cold` piece has an indirect jump (a switch table or computed
goto could land anywhere), all of it decoded, and it lies inside the function's symbol
bounds; the patch stays within JP_PATCH_MAX bytes (what a plan file holds). Where no symbol
describes the code, the unwind table's function ranges do (frames.py), with branch targets
taken from the whole module. Branches from unrelated functions into the middle of this one
(hand-written assembly does that) are not seen.
"""
from __future__ import annotations

from functools import lru_cache

from capstone import CsInsn

from . import arch
from .arch import can_relocate, can_relocate_together
from .chooser import MAX_PATCH, Choice, Site, Spot, choose_short, choose_whole, insn_text
from .elf import ElfModule, Symbol, function_owner
from .errors import SiteError
from .frames import PREFIX, Frames
from .functions import FunctionFacts
from .mechanisms import Mechanism
from .overlay import Overlay

MAX_INSN = 15
FLAGS_SCAN = 64          # instructions followed when proving the flags dead


class SiteAnalyzer:
    """What the code of one module allows at probe sites; caches per-function facts."""

    def __init__(self, module: ElfModule):
        self.module = module
        self.reserved: set[int] = set()       # other probes' sites: never displaced by this one
        self.frames = Frames(module)
        self._facts = lru_cache(maxsize=4096)(self._decode_function)

    def function_at(self, address: int) -> Symbol | None:
        """The function symbol holding `address`, else the unwind table's range around it."""
        return self.module.function_at(address) or self.frames.symbol_at(address)

    def _decode_function(self, sym: Symbol) -> FunctionFacts:
        code, swept, complete = self._sweep_piece(sym)
        if sym.name.startswith(PREFIX):
            return FunctionFacts(sym, code, swept.starts, swept.end, self.frames.targets,
                                 self.frames.indirect_jump(sym), swept.x87 or not complete, complete)
        targets: set[int] = set()
        indirect = None
        x87 = False
        owner = function_owner(sym.name)
        pieces = [(sym, swept)]
        for related in self.module.related_functions(sym):
            _, piece, whole = self._sweep_piece(related)
            pieces.append((related, piece))
            complete = complete and whole
        for piece_sym, piece in pieces:
            # A switch table of `foo` may land in `foo.cold` and the reverse; a clone's
            # (`foo.part.0`) only in the clone itself.
            targets.update(target for target, _ in piece.branches)
            if indirect is None and function_owner(piece_sym.name) == owner:
                indirect = piece.indirect_jump
            x87 = x87 or piece.x87
        # What was not decoded may branch anywhere or use x87: assume the worst.
        return FunctionFacts(sym, code, swept.starts, swept.end, targets, indirect, x87 or not complete, complete)

    def _sweep_piece(self, sym: Symbol) -> tuple[bytes, arch.Sweep, bool]:
        """The bytes of `sym`, a sweep over them, and whether it covers them whole (capstone
        stops at the first byte sequence it cannot decode)."""
        if not sym.size or not self.module.is_code(sym.address, sym.size):
            return b"", arch.Sweep([], sym.address, [], None, False), True
        code = self.module.read(sym.address, sym.size)
        swept = arch.sweep(code, sym.address)
        return code, swept, swept.end == sym.end

    def facts(self, sym: Symbol) -> FunctionFacts:
        return self._facts(sym)

    def instruction_at(self, address: int) -> CsInsn:
        """The instruction starting at `address`, checked against its function's boundaries."""
        sym = self.function_at(address)
        if sym is not None:
            facts = self.facts(sym)
            if facts.starts and not facts.has(address):
                raise SiteError(f"{address:#x} is not on an instruction boundary of {sym.name}; "
                                f"list the boundaries with `jprobe sites {self.module.path} {sym.name}`")
            if facts.starts:
                return facts.instruction(facts.index_of(address))
        if not self.module.is_code(address):
            raise SiteError(f"{address:#x} is not in an executable section of {self.module.path}")
        insn = arch.decode_one(self.module.read(address, MAX_INSN), address)
        if insn is None:
            raise SiteError(f"{address:#x}: no valid instruction there")
        return insn

    def analyse(self, address: int, tactics: bool = True) -> Site:
        """The mechanism a probe at `address` gets, with its one-line reason. Alone, that is:
        without `tactics`, no short jump is tried (a plan tries them once the other probes'
        bytes are known, planner.py)."""
        first = self.instruction_at(address)
        sym = self.function_at(address)
        why_not = can_relocate(first)
        if why_not:
            raise SiteError(f"{address:#x}: cannot probe `{insn_text(first)}`: {why_not}")
        site = choose_whole(Spot(self, first, sym, self.facts(sym) if sym is not None else None))
        if tactics and site.mechanism is Mechanism.TRAP:
            return choose_short(site, self.alone())
        return site

    def alone(self) -> Choice:
        """What a site's short jump is chosen among when no other probe is planned."""
        return Choice(self, Overlay(self.module), self.islands(), alone=True)

    def islands(self, nprobes: int = 1, room: int | None = None) -> arch.Islands:
        """Empty island zones for this module, past `room` (by default what `nprobes` probes'
        trampolines need)."""
        m = self.module
        return arch.Islands(m.start_of_image(), m.end_of_image(), m.fixed_address,
                       arch.text_room(nprobes) if room is None else room)

    def flags_live(self, address: int, sym: Symbol | None, facts: FunctionFacts | None,
                   displaced: list[CsInsn]) -> bool:
        """The flags may be read after the probe (the trampoline then saves them)."""
        return not is_entry(sym, address) and not arch.flags_dead_after(
            facts.instructions_from(facts.index_of(address), FLAGS_SCAN) if facts and facts.starts
            else displaced)

    def neighbour(self, first: CsInsn, successor: CsInsn, overlay: Overlay) -> tuple[CsInsn, bytes] | None:
        """For T3: the first instruction of 6 bytes or more among those that follow `first`
        (straight-line, no probe, nothing patched) within one patch's reach, and the bytes
        between."""
        insn, gap = successor, b""
        while insn.address + insn.size - first.address <= MAX_PATCH:
            if insn.size > arch.JUMP_SIZE and not can_relocate(insn):
                return insn, gap
            if arch.ends_flow(insn) or arch.is_call(insn):
                return None
            gap += insn.bytes
            at = insn.address + insn.size
            if at in self.reserved or overlay.patched(at, 1) or not self.module.is_code(at):
                return None
            insn = arch.decode_one(self.module.read(at, MAX_INSN), at)
            if insn is None or overlay.patched(at, insn.size):
                return None
        return None

    def evictable(self, first: CsInsn, sym: Symbol | None, overlay: Overlay) -> tuple[CsInsn | None, str]:
        """The instruction after `first` when T2 may move it, or why not."""
        at = first.address + first.size
        if not self.module.is_code(at):
            return None, "and code ends after it"
        successor = arch.decode_one(self.module.read(at, MAX_INSN), at)
        if successor is None:
            return None, f"and no instruction decodes at {at:#x}"
        facts = self.facts(sym) if sym is not None else None
        known = (not arch.ends_flow(first) or successor.id in arch.FILL
                 or (facts is not None and facts.has(at))
                 or any(f.address == at for f in [self.function_at(at)] if f is not None))
        if not known:
            return None, f"and after `{first.mnemonic}` nothing says an instruction starts at {at:#x}"
        if at in self.reserved:
            return None, "and the next instruction has a probe of its own"
        if overlay.patched(at, successor.size):
            return None, "and the next instruction is already patched"
        if first.size + successor.size > MAX_PATCH:
            return None, "and the next instruction is too long to move too"
        why_not = can_relocate(successor)
        if why_not:
            return None, f"and `{insn_text(successor)}` cannot be moved: {why_not}"
        return successor, ""

    def displace(self, first: CsInsn, facts: FunctionFacts | None) -> tuple[list[CsInsn], str | None]:
        """Instructions to displace from `first`, and the reason no safe jump fits (None: one does)."""
        displaced = [first]
        size = first.size
        if size >= arch.JUMP_SIZE:
            return displaced, None
        if facts is None or not facts.starts:
            return displaced, f"{size}-byte instruction outside any known function: no room for a jump"
        if facts.indirect_jump is not None:
            return displaced, (f"{size}-byte instruction in a function with an indirect jump at "
                               f"{facts.indirect_jump:#x} (a switch table may land anywhere)")
        if not facts.complete:
            return displaced, (f"{size}-byte instruction in {facts.symbol.name}, which does not decode "
                               f"whole (its branch targets are unknown)")
        i = facts.index_of(first.address)
        while size < arch.JUMP_SIZE:
            prev = displaced[-1]
            if arch.ends_flow(prev) and i == len(facts.starts) - 1 and self._fill_after(facts, arch.JUMP_SIZE - size):
                return displaced, None
            if arch.ends_flow(prev) or arch.is_call(prev):
                return displaced, f"only {size} bytes up to `{prev.mnemonic}`, which ends the straight-line code"
            i += 1
            if i >= len(facts.starts):
                return displaced, f"only {size} bytes before the end of {facts.symbol.name}"
            insn = facts.instruction(i)
            if insn.address in facts.targets:
                return displaced, f"only {size} bytes before a branch target at {insn.address:#x}"
            if insn.address in self.reserved:
                return displaced, f"only {size} bytes before another probe at {insn.address:#x}"
            why_not = can_relocate(insn) or can_relocate_together(displaced + [insn])
            if why_not:
                return displaced, f"cannot move `{insn_text(insn)}` at {insn.address:#x}: {why_not}"
            if size + insn.size > MAX_PATCH:
                return displaced, (f"only {size} bytes before the {insn.size}-byte `{insn.mnemonic}` at "
                                   f"{insn.address:#x}; with it the patch would exceed {MAX_PATCH} bytes")
            displaced.append(insn)
            size += insn.size
        return displaced, None

    def _fill_after(self, facts: FunctionFacts, need: int) -> bool:
        """True when `need` bytes after the function are alignment fill nothing can reach.

        A function that ends in `ret` or `jmp` never runs into the bytes after it; when they
        are the nop/int3 padding before the next function (no symbol, no branch target, no
        other probe), a jump may spill into them. This is how a 1-4 byte function gets a jump.
        """
        end = facts.symbol.end
        if not self.module.is_code(end, need):
            return False
        covered = 0
        for insn in arch.decode(self.module.read(end, need + MAX_INSN), end):
            if covered >= need:
                break
            if (insn.id not in arch.FILL or self.function_at(insn.address) is not None
                    or insn.address in facts.targets or insn.address in self.reserved):
                return False
            covered += insn.size
        return covered >= need


def is_entry(sym: Symbol | None, address: int) -> bool:
    """A function's entry, where the SysV ABI leaves the flags undefined and the caller's
    call wrote over the red zone. Not a `.cold` piece's start (it is jumped to, flags and red
    zone live), nor an unwind range's (it may be one)."""
    return (sym is not None and address == sym.address and not sym.name.startswith(PREFIX)
            and function_owner(sym.name) == sym.name)
