"""From probe specs to a patch plan for one module: resolve, analyse, emit."""
from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from . import arch, layout, probetable
from .arch import CodeBuffer, Later, can_relocate, can_relocate_together, tactics
from .elf import ElfModule
from .callbacks import Callback, resolve_callback
from .chooser import Choice, Policy, Site, choose_short
from .errors import SiteError, SpecError, SymbolError
from .mechanisms import Mechanism, Tactic
from .plan import ModulePlan, ProbePlan
from .overlay import Overlay
from .probetable import PROBE_SIZE, TABLE_SIZE, TableProbe
from .sites import SiteAnalyzer, is_entry
from .spec import DURATION, ProbeSpec


@dataclass
class ResolvedProbe:
    spec: ProbeSpec
    address: int
    site: Site                         # as analysed alone, before any pun or eviction
    analyzer: SiteAnalyzer
    callback: Callback | None = None
    aliases: list[ProbeSpec] = field(default_factory=list)   # other names of this site (same handler)
    # The %return probe of the same function when this is its entry probe: one site, one
    # trampoline, which does this probe's work and then follows the return for that one.
    follower: "ResolvedProbe | None" = None
    rider: bool = False                # a %return probe whose site its entry probe patches

    def names(self) -> str:
        """Every name of the site, as the table and the report give them: one per line (a
        spec cannot hold a newline)."""
        return "\n".join(s.target() for s in [self.spec, *self.aliases])


@contextmanager
def cycles_uncollected() -> Iterator[None]:
    """Planning without the cyclic garbage collector.

    A full collection walks every object alive, ~100,000 after jprobe's imports (LIEF,
    capstone, cffi): 60 ms here. Planning keeps a few dozen objects a probe until the plan
    is done, which is what makes Python run full collections (two for 1,000 probes, a fifth
    of the time), and they free nothing: planning makes no garbage cycles worth the walk.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def resolve_address(module: ElfModule, spec: ProbeSpec) -> int:
    """Link-time address of a spec's LOCATION, checked to be an instruction of the module."""
    if spec.address is not None:
        if not module.is_code(spec.address):
            raise SymbolError(f"'{spec.text}': {spec.address:#x} is not in an executable section of "
                              f"{module.path}; give an address that `objdump -d` prints")
        return spec.address
    sym = module.resolve(spec.symbol)
    if spec.offset and spec.offset >= max(sym.size, 1):
        raise SymbolError(f"'{spec.text}': offset {spec.offset:#x} is outside {sym.name} "
                          f"({sym.size} bytes); give an offset below {sym.size:#x}")
    return sym.address + spec.offset


def resolve_probes(module: ElfModule, specs: list[ProbeSpec], strict: bool) -> list[ResolvedProbe]:
    """Addresses and site decisions for every spec, conflicts refused."""
    analyzer = SiteAnalyzer(module)
    first: dict[tuple[int, bool], ProbeSpec] = {}
    aliases: dict[tuple[int, bool], list[ProbeSpec]] = {}
    for spec in specs:
        address = resolve_address(module, spec)
        analyzer.instruction_at(address)          # boundary check with a clear error
        if spec.on_return:
            _check_function_entry(module, spec, address)
            if module.is_go:
                raise SpecError(f"'{spec.text}': {module.path} is a Go program, whose goroutine stacks move "
                                f"as they grow, so a return cannot be followed; probe the function's entry, "
                                f"or its `ret` instructions by address")
        key = (address, spec.on_return)
        if key not in first:
            first[key] = spec
            aliases[key] = []
        elif spec.handler != first[key].handler:
            raise SiteError(f"'{spec.text}': at the same address {address:#x} as '{first[key].text}' "
                            f"(aliases, as `nm -D` lists them), with another handler; give both one handler")
        else:
            aliases[key].append(spec)             # one site, reported under each name
    analyzer.reserved = {address for address, _ in first}
    resolved: dict[tuple[int, bool], ResolvedProbe] = {}
    for (address, on_return), spec in first.items():
        site = analyzer.analyse(address, tactics=False)
        if strict and site.mechanism is Mechanism.TRAP:
            _refuse_trap(spec, choose_short(site, analyzer.alone()))
        if on_return:
            _check_return_site(spec, site)
        resolved[address, on_return] = ResolvedProbe(spec, address, site, analyzer, resolve_callback(spec),
                                                     aliases[address, on_return])
    for (address, on_return), probe in resolved.items():
        if on_return and (address, False) in resolved:
            resolved[address, False].follower = probe
            probe.rider = True
    # Outside any function symbol nothing says where instructions start, so one probe's
    # bytes may cover another's address: both patches would corrupt each other.
    by_address = sorted((p for p in resolved.values() if not p.rider), key=lambda p: p.address)
    for before, after in zip(by_address, by_address[1:]):
        if before.address + before.site.length > after.address:
            raise SiteError(f"'{after.spec.text}': {after.address:#x} is inside the instruction(s) that "
                            f"'{before.spec.text}' patches ({before.address:#x}, {before.site.length} bytes); "
                            f"give addresses that `objdump -d` prints as instruction starts")
    return list(resolved.values())


def _check_function_entry(module: ElfModule, spec: ProbeSpec, address: int) -> None:
    """A %return probe sits where the return address is the top of the stack: a function's entry."""
    if spec.symbol is None or spec.offset or not is_entry(module.function_at(address), address):
        raise SpecError(f"'{spec.text}': %return needs a function's entry (a function symbol, no offset "
                        f"or address); write FUNCTION%return")


def _check_return_site(spec: ProbeSpec, site: Site) -> None:
    """A return is followed from a plain jump's trampoline only: a trap, pun or eviction there
    would need the hijack in the trap handler or an island, which jprobe does not build."""
    if site.mechanism is not Mechanism.JUMP or site.jump is not None or site.call_retarget:
        raise SiteError(f"'{spec.text}': the function's entry takes no 5-byte jump ({site.reason}), which "
                        f"following its return needs; probe the callers' instructions after the call instead")


def _refuse_trap(spec: ProbeSpec, site: Site) -> None:
    if site.mechanism is Mechanism.TRAP:
        raise SiteError(f"'{spec.text}': needs a trap at {site.address:#x} ({site.reason}); "
                        f"drop --strict to accept the int3 fallback, or probe another instruction")


def _choose_short_sites(module: ElfModule, probes: list[ResolvedProbe], plans: dict[int, ProbePlan],
                        policy: Policy, room: int | None) -> tuple[dict[int, Site], list[tuple[int, int, int]]]:
    """Short jumps for the sites that would trap, highest address first.

    A punned rel32 reads the bytes after its instruction as they will be, so every
    patch above it must be decided before it: the jumps' (`plans`), then each pun's. A
    `reaim` changes the next probe's jump together with this one's: recorded here, as
    that probe's plan or decided site. Returns the decisions and the islands of re-aimed
    jumps.

    `policy.movable` (`jprobe run`): the applier may place the trampolines elsewhere, which
    changes the rel32 of every jump that reaches them, and a pun that read such a jump's
    bytes falls back to a trap. Under `policy.strict` no pun may read them: the jump is
    re-aimed through an island, or the probe refused here, before the program starts.
    """
    analyzer = probes[0].analyzer
    overlay = Overlay(module)
    for plan in plans.values():
        overlay.put(plan.address, plan.address, plan.patched, unstable_first=plan.mechanism is Mechanism.TRAP,
                    unstable=policy.strict and policy.movable and plan.patch_fixup is not None)
    # A jump whose trampoline follows a return keeps its bytes: a %return probe riding on it
    # has the same ones.
    followed = {p.address for p in probes if p.follower is not None}
    reaimable = {plan.address: len(plan.patched) for plan in plans.values()
                 if _reaimable_plan(plan) and plan.address not in followed}
    choice = Choice(analyzer, overlay, analyzer.islands(len(probes), room), policy, reaimable)
    at_address = {p.address: i for i, p in enumerate(probes) if not p.rider}
    decided: dict[int, Site] = {}
    rejumped: dict[int, tuple[int, int, int]] = {}     # probe id -> its island record
    for i in sorted((i for i, p in enumerate(probes) if p.site.mechanism is Mechanism.TRAP),
                    key=lambda i: -probes[i].address):
        probe = probes[i]
        site = choose_short(probe.site, choice)
        if site.reaimed is not None:
            j = at_address[site.reaimed.address]
            _record_reaimed(j, site, plans, decided, choice, rejumped)
            if j in decided and not _reaimable(decided[j]):
                del reaimable[site.reaimed.address]
        if policy.strict:
            _refuse_trap(probe.spec, site)
        if site.jump is not None:
            overlay.put(probe.address, probe.address, site.jump.patched)
            if _reaimable(site):
                reaimable[probe.address] = len(site.jump.patched)
        else:
            overlay.put(probe.address, probe.address, arch.trap_bytes(site.length, module.read(probe.address, site.length)),
                        unstable_first=True)
        decided[i] = site
    return decided, list(rejumped.values())


def _reaimable(site: Site) -> bool:
    """A decided jump that is `E9 rel32` over its own instruction, through one island."""
    jump = site.jump
    return (jump.evicted is None and jump.prefixes == 0 and len(jump.patched) == sum(i.size for i in site.displaced)
            and jump.patched[0] == tactics.JMP)


def _reaimable_plan(plan: ProbePlan) -> bool:
    """A planned jump that `reaim` may aim elsewhere: a plain one over one instruction, or
    one re-aimed already (not a retargeted call, nor more than one instruction moved)."""
    plain = plan.mechanism is Mechanism.JUMP and plan.patch_fixup == arch.JUMP_FIXUP
    return (plain or (plan.mechanism is Mechanism.PUN and len(plan.islands) == 1)) and plan.resume is not None


def _record_reaimed(j: int, site: Site, plans: dict[int, ProbePlan], decided: dict[int, Site], choice: Choice,
                    rejumped: dict[int, tuple[int, int, int]]) -> None:
    """Probe j's jump as `site`'s reaim chose it: its old islands freed, its new bytes laid."""
    new = site.reaimed
    if j in plans:
        old = plans[j]
        for at in old.islands:
            choice.islands.release(at)
        plans[j] = replace(old, mechanism=Mechanism.PUN, reason=f"{old.reason}, re-aimed through an island for "
                           f"the probe at {site.address:#x}", patched=new.patched, patch_fixup=None,
                           islands=[new.island], depends=new.depends)
        rejumped[j] = (new.island, old.trampoline, j)
    else:
        old_site = decided[j]
        choice.islands.release(old_site.jump.island)
        decided[j] = replace(old_site, reason=f"{old_site.reason}, re-aimed for the probe at {site.address:#x}",
                             jump=tactics.Jump(Tactic.T2, new.patched, new.island, depends=new.depends,
                                               prefixes=new.patched.index(tactics.JMP)))
    choice.overlay.put(new.address, new.address, new.patched)


def build_plan(module: ElfModule, probes: list[ResolvedProbe], text_vaddr: int,
               data_vaddr: int | Callable[[int], int], policy: Policy = Policy(),
               room: int | None = None) -> ModulePlan:
    """Trampolines at text_vaddr, the probe table at data_vaddr, and the site patches.

    `data_vaddr` may be a function that places the table once the trampolines' size is
    known (`jprobe run` puts it past them): their references to it are resolved last.
    Jumps first (their bytes depend on where their trampolines are), then the sites that
    need a pun or an eviction (their rel32 may read those bytes), as the applier's `policy`
    allows. `room`: how far past the image the added regions may reach (islands stay
    beyond), by default what text_room() keeps for this many probes. `policy.strict` is in
    the table too: the runtime then leaves a probe that would fall back to a trap as it was
    (JP_TABLE_STRICT).
    """
    table = Later("table")
    desc_addr = [table + TABLE_SIZE + i * PROBE_SIZE for i in range(len(probes))]
    buf = CodeBuffer(text_vaddr)
    stubs = None
    if any(p.spec.handler.kind == "callback" for p in probes):
        stubs = arch.ModuleStubs(buf, table)
    index = {id(p): i for i, p in enumerate(probes)}
    emitted: dict[int, ProbePlan] = {}
    for i, probe in enumerate(probes):
        if probe.rider:
            continue
        if probe.site.mechanism is not Mechanism.TRAP or probe.site.length >= arch.JUMP_SIZE:
            follow = probe if probe.spec.on_return else probe.follower
            returns = None if follow is None else _Return(follow, index[id(follow)], desc_addr[index[id(follow)]])
            emitted[i] = _emit_probe(module, buf, probe, probe.site, i, desc_addr[i], table, stubs, returns=returns,
                                     policy=policy)
    short, rejumped = _choose_short_sites(module, probes, emitted, policy, room) if probes else ({}, [])
    islands: list[tuple[int, int, int]] = rejumped      # (island, target, probe id)
    for i in sorted(short, key=lambda i: -probes[i].address):
        emitted[i] = _emit_probe(module, buf, probes[i], short[i], i, desc_addr[i], table, stubs, islands,
                                 policy=policy)
    for i, probe in enumerate(probes):
        if probe.rider:                   # the same bytes as its entry probe's, nothing of its own to undo
            host = next(j for j, p in enumerate(probes) if p.follower is probe)
            emitted[i] = replace(emitted[host], spec=probe.spec.text, handler=str(probe.spec.handler),
                                 resume=None, boundaries=[])
    table_vaddr = data_vaddr if isinstance(data_vaddr, int) else data_vaddr(buf.here - text_vaddr)
    text = buf.finish({table.region: table_vaddr})
    plans = [replace(emitted[i], target=probe.names()) for i, probe in enumerate(probes)]
    rows = [TableProbe(plan, probe.callback, probe.site.x87, probe.spec.on_return)
            for probe, plan in zip(probes, plans)]
    data = probetable.encode(os.path.abspath(module.path), table_vaddr, rows, islands, policy.strict)
    added = [(text_vaddr, text_vaddr + len(text)), (table_vaddr, table_vaddr + len(data))]
    return ModulePlan(module=os.path.abspath(module.path), build_id=module.build_id, text_vaddr=text_vaddr,
                      text=text, data_vaddr=table_vaddr, data=data, probes=plans,
                      text_fixups=sorted(off for off, target in buf.references
                                         if not any(lo <= target < hi for lo, hi in added)))


class _Return(NamedTuple):
    """The %return probe a trampoline follows the return for: its table row."""
    probe: ResolvedProbe
    index: int
    desc: Later


def _emit_probe(module: ElfModule, buf: CodeBuffer, probe: ResolvedProbe, site: Site, index: int, desc: Later,
                table: Later, stubs: arch.ModuleStubs | None,
                islands: list[tuple[int, int, int]] | None = None, returns: _Return | None = None,
                policy: Policy = Policy()) -> ProbePlan:
    hits = desc + layout.offsetof("jp_probe", "hits")
    start = buf.here
    callback = probe.spec.handler.kind == "callback"
    # The red zone is dead at a function's entry (the caller's call wrote over it) and
    # inside a retargeted call, so the trampoline need not step over it there.
    red_zone = not (site.call_retarget or is_entry(site.function, probe.address))
    return_label = buf.fresh("return")

    def probe_work() -> None:
        if probe.spec.on_return:
            pass                                        # its work is at the return
        elif callback:
            stub = stubs.common_x87 if site.x87 else stubs.common
            arch.emit_callback(buf, stub, desc, index, probe.address, red_zone=red_zone,
                               return_pushed=site.call_retarget)
        else:
            arch.emit_count(buf, hits, index, table + layout.offsetof("jp_table", "tls_off"), site.flags_live,
                            red_zone=red_zone)
            if probe.spec.handler.kind == "trace":
                args = probe.spec.handler.args
                header = arch.trace_header(policy.trace_ids_from + index, layout.module_key(os.path.abspath(module.path)),
                                           len(args))
                arch.emit_trace(buf, table + layout.offsetof("jp_table", "ring_off"),
                                desc + layout.offsetof("jp_probe", "lost"), header, arch.trace_values(args),
                                probe.address, site.flags_live, red_zone=red_zone,
                                rsp_above=8 if site.call_retarget else 0, pool=policy.ring_pool)
        if returns is not None:
            names = returns.probe.spec.handler.args
            arch.emit_hijack(buf, return_label, table + layout.offsetof("jp_table", "rstack_off"),
                             returns.desc + layout.offsetof("jp_probe", "ret_missed"), site.flags_live,
                             save_args=any(n.startswith("arg") for n in names), save_time=DURATION in names,
                             pool=None if policy.return_pool is None else arch.Pool(policy.return_pool))

    original = module.read(probe.address, site.length)
    if site.mechanism is Mechanism.TRAP:
        copies = arch.emit_displaced(buf, site.displaced)
        patched = arch.trap_bytes(site.length, original)
        return ProbePlan(spec=probe.spec.text, address=probe.address, mechanism=Mechanism.TRAP, reason=site.reason,
                         handler=str(probe.spec.handler), original=original, patched=patched, trampoline=None,
                         resume=start, target=probe.spec.target(), boundaries=_boundaries(copies))
    probe_work()
    if site.jump is not None:
        return _emit_short(buf, probe, site, index, start, original, islands)
    if site.call_retarget:
        arch.emit_call_continuation(buf, site.displaced[0])
        patched, fixup = arch.call_bytes(probe.address, start, site.length), arch.call_fixup(site.length)
    else:
        resume = buf.here if len(site.displaced) == 1 and not site.padding else None
        copies = arch.emit_displaced(buf, site.displaced)
        patched, fixup = arch.jump_bytes(probe.address, start, site.length), arch.JUMP_FIXUP
        if returns is not None:
            buf.label(return_label)
            _emit_return_work(buf, returns, table, stubs, layout.module_key(os.path.abspath(module.path)), policy)
        return ProbePlan(spec=probe.spec.text, address=probe.address, mechanism=site.mechanism, reason=site.reason,
                         handler=str(probe.spec.handler), original=original, patched=patched, trampoline=start,
                         patch_fixup=fixup, target=probe.spec.target(), resume=resume,
                         boundaries=_boundaries(copies))
    # A retargeted call has no copy to map (_boundaries says why none is needed).
    return ProbePlan(spec=probe.spec.text, address=probe.address, mechanism=site.mechanism, reason=site.reason,
                     handler=str(probe.spec.handler), original=original, patched=patched, trampoline=start,
                     patch_fixup=fixup, target=probe.spec.target())


def _emit_return_work(buf: CodeBuffer, returns: _Return, table: Later, stubs: arch.ModuleStubs | None,
                      module_key: int, policy: Policy) -> None:
    """The return trampoline: the %return probe's work as if at the function's `ret`, whose
    red zone is dead and flags too (a call clobbers them). A callback there keeps x87 state
    as well: a `long double` comes back in st(0)."""
    rstack_off = table + layout.offsetof("jp_table", "rstack_off")
    lost = buf.fresh("return_lost")
    probe, index, desc = returns
    names = probe.spec.handler.args
    # What a trace reads of the entry (its arguments, its time stamp) is copied under the
    # stack, into the returning function's dead red zone, which the trace steps over.
    stash = [arch.FRAME_ARGS + 8 * (int(n[3:]) - 1) if n.startswith("arg") else arch.FRAME_TSC
             for n in names if n.startswith("arg") or n == DURATION]
    arch.emit_return_head(buf, rstack_off, lost, stash=stash)
    if probe.spec.handler.kind == "callback":
        arch.emit_callback(buf, stubs.common_x87, desc, index, probe.address, red_zone=False, at_return=True)
    else:
        arch.emit_count(buf, desc + layout.offsetof("jp_probe", "hits"), index,
                        table + layout.offsetof("jp_table", "tls_off"), flags_live=False, red_zone=False)
        if probe.spec.handler.kind == "trace":
            stashed = iter(range(len(stash)))
            # rip: where the caller resumes, the return address back in its slot
            values = [arch.TraceValue("rsp", arch.stashed_at(next(stashed)), since=n == DURATION)
                      if n.startswith("arg") or n == DURATION else
                      arch.TraceValue("rsp", -8) if n == "rip" else arch.TraceValue(n) for n in names]
            header = arch.trace_header(policy.trace_ids_from + index, module_key, len(names),
                                       layout.CONST["JP_REC_RETURN"])
            arch.emit_trace(buf, table + layout.offsetof("jp_table", "ring_off"),
                            desc + layout.offsetof("jp_probe", "lost"), header, values, probe.address,
                            flags_live=False, red_zone=True, rsp_above=8, pool=policy.ring_pool)
    arch.emit_return_tail(buf)
    arch.emit_lost(buf, lost)


def _past_the_pun(probe: ResolvedProbe, site: Site) -> list:
    """The punned instruction(s) and copies of those after them up to the end of the jump.

    Going back into the bytes the jump's rel32 overlaps would make the processor decode
    them as a second instruction stream over the first (~10 ns a hit measured); running
    copies of the next instructions avoids that where they are no probe's site and can
    be moved. The originals stay in place for whatever else jumps to them.
    """
    module, reserved = probe.analyzer.module, probe.analyzer.reserved
    insns = list(site.displaced)
    at, end = insns[-1].address + insns[-1].size, insns[0].address + site.jump.prefixes + arch.JUMP_SIZE
    while at < end and not (arch.ends_flow(insns[-1]) or arch.is_call(insns[-1])):
        if at in reserved or not module.is_code(at):
            break
        insn = arch.decode_one(module.read(at, 15), at)
        if insn is None or can_relocate(insn) or can_relocate_together(insns + [insn]):
            break
        insns.append(insn)
        at += insn.size
    return insns


def _emit_short(buf: CodeBuffer, probe: ResolvedProbe, site: Site, index: int, start: int, original: bytes,
                islands: list[tuple[int, int, int]]) -> ProbePlan:
    """After the probe work: the displaced instruction(s), the copy a trap fallback resumes
    at, and for an eviction the moved instruction's own way back."""
    jump = site.jump
    if jump.evicted is None:
        resume = buf.here                    # the work falls through into its own resume copy
        copies = arch.emit_displaced(buf, _past_the_pun(probe, site))
    else:
        copies = arch.emit_displaced(buf, site.displaced)
        resume = buf.here
        copies += arch.emit_displaced(buf, site.displaced[:1])
        for insn, island in [(jump.evicted, jump.evicted_island), *jump.more]:
            islands.append((island, buf.here, index))
            copies += arch.emit_displaced(buf, [insn])
    islands.append((jump.island, start, index))
    return ProbePlan(probe.spec.text, probe.address, site.mechanism, site.reason, str(probe.spec.handler),
                     original, jump.patched, trampoline=start, resume=resume, target=probe.spec.target(),
                     islands=[jump.island] + ([jump.evicted_island] if jump.evicted is not None else [])
                     + [island for _, island in jump.more],
                     depends=jump.depends, boundaries=_boundaries(copies))


def _boundaries(copies: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A probe's map between original instruction starts and their relocated copies: every
    (original, copy) pair its trampoline's emit_displaced calls laid out, sorted.

    What it is for: patching while other threads run, a thread stopped at an instruction
    start strictly inside the written bytes [site, site + len(patched)) would resume in the
    middle of the new jump, so the applier moves it to a copy; unpatching, a thread stopped
    at a copy goes back to its original. A thread at the site itself needs no move when
    patching (it runs the new jump and is counted); the site's pairs serve the way back.
    Count and callback code has no pair: a thread inside it has pushed onto the stack, and
    is let run out. So is one inside an emulated `call` or `loop` or at a jump back: it
    reaches original code or a copy's start within a few instructions.

    The copies, per mechanism:
    - B1 jump: each displaced instruction's, after the probe work.
    - pun (B2, T1, a punned jump over a re-aimed one): the run's, then those of the
      instructions the jump's rel32 overlaps (_past_the_pun). Those lie past the written
      bytes and run in place; their pairs are for the way back only.
    - a re-aimed jump (chooser.reaim): the copies it had, as only its rel32 changes.
    - evict (T2, chains, T3): the displaced block's (the run, and the evicted instructions
      moved with it), the site's resume copy for the trap fallback, and each evicted
      instruction's own copy, which its new jump reaches through an island. An instruction
      with two copies has two pairs, both equivalent. The resume copy returns into bytes
      the jump covers: it is the original only with the fallback's trap written alone, the
      one state in which a thread can be there (after the trap).
    - trap: the out-of-line copy the SIGTRAP handler resumes at.
    - a retargeted call: none; see below.

    Instruction starts inside the written bytes without a copy, and why none needs one:
    - A retargeted call is the only instruction there, and it runs in place, rewritten as a
      call to the trampoline with the same return address: a thread at it runs the new call.
    - T3: the instructions between the site and the neighbour N keep their bytes (the patch
      writes them as they were) and run in place: a thread at one runs on into N, whose new
      jump reaches N's copy; unpatched, it is in original code again.
    - A B1 jump spilling into the fill after a function (sites._fill_after): nothing executes
      or jumps to those bytes (after a `ret` or `jmp`, no symbol, no branch target, no probe),
      so no thread is ever there.
    Every other instruction start in the written bytes is the run's or an evicted one's, and
    has a copy. Not in this map, as they are no original instruction starts: the starts that
    only patched code has, `call rel32` at site + 1 after the `nop` of a retargeted 6-byte
    call, and T3's long jump at N + 5. A thread stopped at either when unpatching is where
    one at the site is (a `nop` and a `jmp rel8` done, nothing else).
    """
    return sorted(copies)
