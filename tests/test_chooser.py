"""The tactic order of chooser.py on code of exact shapes, fed as raw bytes to the real
SiteAnalyzer: which mechanism each site gets, why (the reason `jprobe sites` prints), what
moves, and the bytes written, decoded back to jumps whose targets are computed here."""
from dataclasses import replace

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from jprobe import arch
from jprobe.chooser import Choice, Policy, Short, Site, Spot, choose_short, reaim
from jprobe.elf import Symbol
from jprobe.mechanisms import Mechanism, Tactic
from jprobe.overlay import Overlay
from jprobe.planner import build_plan, resolve_probes
from jprobe.sites import SiteAnalyzer
from jprobe.spec import parse_probes
from jprobe.trampolines.islands import HOP, Islands

CS = Cs(CS_ARCH_X86, CS_MODE_64)
BASE = 0x40_1000                     # a fixed-address program's code
MOV_NEG = "898290909090"             # mov [rdx-0x6f6f6f70], eax: its disp32 bytes are >= 0x80
JMP_RAX = "ffe0"                     # an indirect jump: only whole >= 5-byte instructions may move

# name: (offset, code bytes, symbol size or None for no symbol). Functions lie 0x20 apart, int3 between.
SHAPES = {
    "evict": (0x00, "31c0" + MOV_NEG + JMP_RAX),                 # xor eax,eax; mov; jmp rax
    "pun": (0x20, "31c0" "b800010000" + JMP_RAX),                # xor; mov eax,0x100
    "t1": (0x40, "31c0" "b800800100" + JMP_RAX),                 # xor; mov eax,0x18000
    "t3": (0x60, "31c0" "90" + MOV_NEG + "0500001000" + JMP_RAX),  # xor; nop; mov; add eax,0x100000
    "prefixed": (0x80, "31c0" "83c090" "898010000000" + JMP_RAX),  # xor; add eax,-0x70; mov [rax+0x10],eax
    "chain": (0xa0, "31c0" "90" "b880808010" + JMP_RAX),         # xor; nop; mov eax,0x10808080
    "calls": (0xc0, "e8" + "00000000" + "ff1500100000" + "c3"),  # call rel32 (patched below); call [rip+x]; ret
    "whole": (0xe0, "31c0" "89c8" "48b88877665544332211" "c3"),  # xor; mov eax,ecx; movabs; ret
    "padded": (0x100, "8d4701" "c3"),                            # lea eax,[rdi+1]; ret; then nop fill
    "early": (0x120, "5b" "c3"),                                 # pop rbx; ret; `late` follows at once
    "late": (0x122, MOV_NEG + JMP_RAX),
    "callreg": (0x140, "ffd0" + MOV_NEG + JMP_RAX),              # call rax; mov; jmp rax
    # push rbx; push rbp; then a branch target: a 2-instruction run whose chain needs both of
    # the 4- (3-)byte add and the 11-byte mov (`mov dword [rsp-0x6f6f6f70], 0`) to find windows
    "limit17": (0x160, "5355" "4883c090" "c784a49090909000000000" "75ef" "5d5bc3"),
    "limit16": (0x180, "5355" "83c090" "c784a49090909000000000" "75f0" "5d5bc3"),
    "jmpchain": (0x1a0, "31c0" "eb06" + MOV_NEG + JMP_RAX),       # xor; jmp over the mov; mov; jmp rax
    # xor; 3 or 4 `not eax` (their bytes >= 0x80: no window alone); mov eax,0x80808080; jmp rax
    "not3": (0x1c0, "31c0" + "f7d0" * 3 + "b880808080" + JMP_RAX),
    "not4": (0x1e0, "31c0" + "f7d0" * 4 + "b880808080" + JMP_RAX),
    "nosym": (0x200, "31c0" "48b88877665544332211" "31c0"),      # no symbol; the code ends after it
}
NOSYM = {"nosym"}


class RawModule:
    """ElfModule's reading side over raw bytes: one executable range, fixed-address."""

    path = "raw"
    build_id = None
    fixed_address = True

    class binary:                    # no .eh_frame: no unwind ranges
        @staticmethod
        def get_section(name):
            return None

    def __init__(self):
        code = bytearray(b"\xcc" * 0x20e)
        code[0x104:0x110] = b"\x90" * 12                          # padded's alignment fill
        functions = []
        for name, (off, hexcode) in SHAPES.items():
            raw = bytes.fromhex(hexcode)
            code[off:off + len(raw)] = raw
            if name not in NOSYM:
                functions.append(Symbol(name, BASE + off, len(raw), name))
        # calls: `call evict` (rel32 from the end of the call)
        code[0xc1:0xc5] = ((BASE - (BASE + 0xc5)) % (1 << 32)).to_bytes(4, "little")
        self.code = bytes(code)
        self.functions = sorted(functions, key=lambda s: s.address)

    def is_code(self, address, size=1):
        return BASE <= address and address + size <= BASE + len(self.code)

    def read(self, address, size):
        if address < BASE:
            return b""
        return self.code[address - BASE:address - BASE + size]

    def function_at(self, address):
        return next((s for s in self.functions if s.address <= address < s.end), None)

    def related_functions(self, sym):
        return []

    def start_of_image(self):
        return BASE & ~0xfff

    def end_of_image(self):
        return BASE + len(self.code)


@pytest.fixture
def module():
    return RawModule()


@pytest.fixture
def analyzer(module):
    return SiteAnalyzer(module)


def at(name, offset=0):
    return BASE + SHAPES[name][0] + offset


def insn(module, address):
    return arch.decode_one(module.read(address, 15), address)


def where(insns):
    """Instructions compared by address and bytes (capstone's compare by identity)."""
    return [(i.address, bytes(i.bytes)) for i in insns]


def text(i):
    return f"{i.mnemonic} {i.op_str}".strip()


def jump_target(code: bytes, address: int) -> tuple[int, int]:
    """(target, size) of the jmp that `code` starts with, decoded."""
    i = next(CS.disasm(code, address))
    assert i.mnemonic == "jmp", (i.mnemonic, i.op_str, code.hex())
    return int(i.op_str, 16), i.size


def taken(islands: Islands, island: int) -> bool:
    """The island's bytes are taken (and so no longer offered)."""
    page = islands.pages.get(island // 4096 * 4096)
    return page is not None and all(page[island % 4096: island % 4096 + HOP])


def in_zone(islands: Islands, island: int) -> bool:
    return any(lo <= island and island + HOP <= hi for lo, hi in islands.zones())


def decide(analyzer, address):
    """The decision alone, with the Choice used (its islands show what was taken)."""
    site = analyzer.analyse(address, tactics=False)
    choice = analyzer.alone()
    return site, choose_short(site, choice), choice


def check_jumps(module, site, choice):
    """The patched bytes decode to a jump to the site's island from the site, and for an
    eviction to the evicted instruction's island from its address; every island in a zone and
    taken. The bytes after the patch are left as they were."""
    jump = site.jump
    code = jump.patched + module.read(site.address + len(jump.patched), 8)
    target, size = jump_target(code, site.address)
    assert target == jump.island and size == HOP + jump.prefixes
    assert in_zone(choice.islands, jump.island) and taken(choice.islands, jump.island)
    for evicted, island in ([(jump.evicted, jump.evicted_island)] if jump.evicted is not None else []) + list(jump.more):
        if jump.tactic is Tactic.T3:
            break
        off = evicted.address - site.address
        t, _ = jump_target(code[off:], evicted.address)
        assert t == island and in_zone(choice.islands, island) and taken(choice.islands, island)


# --- Rules 1-2: whole instructions, read from the code alone ---------------------------------

def test_a_call_is_retargeted_not_displaced(module, analyzer):
    for address, size in ((at("calls"), 5), (at("calls", 5), 6)):
        s = analyzer.analyse(address)
        assert s.mechanism is Mechanism.JUMP and s.call_retarget and s.tactic is Tactic.B1
        assert s.reason == "call retargeted to the trampoline (return address kept)"
        assert s.address == address and where(s.displaced) == where([insn(module, address)]) and s.length == size
        assert s.flags_live is False and s.x87 is False                  # no x87 in `calls`
        assert s.function == module.function_at(address) and s.function.name == "calls"


def test_whole_instructions_are_displaced_with_their_count_and_size(module, analyzer):
    s = analyzer.analyse(at("whole"))
    assert (s.mechanism, s.tactic, s.reason) == (Mechanism.JUMP, Tactic.B1, "displaces 3 instructions (14 bytes)")
    assert [text(i) for i in s.displaced] == ["xor eax, eax", "mov eax, ecx", "movabs rax, 0x1122334455667788"]
    assert s.address == at("whole") and s.padding == 0 and s.length == 14 and not s.call_retarget
    assert s.flags_live is False and s.x87 is False and s.function.name == "whole"
    s = analyzer.analyse(at("whole", 4))
    assert s.reason == "displaces 1 instruction (10 bytes)" and s.length == 10 and s.address == at("whole", 4)
    assert s.flags_live is False                       # movabs and ret: nothing reads the flags


def test_a_short_function_spills_into_the_fill_after_it(analyzer):
    s = analyzer.analyse(at("padded"))
    assert s.reason == "displaces 2 instructions (4 bytes) and 1 byte(s) of the padding after padded"
    assert (s.mechanism, s.padding, s.length, s.function.name) == (Mechanism.JUMP, 1, 5, "padded")
    s = analyzer.analyse(at("padded", 3))
    assert s.reason == "displaces 1 instruction (1 bytes) and 4 byte(s) of the padding after padded"
    assert (s.padding, s.length, s.x87) == (4, 5, False)


def test_outside_any_function_x87_state_is_assumed_used(module, analyzer):
    s = analyzer.analyse(at("nosym", 2))                       # movabs: 10 bytes, no symbol
    assert s.reason == "displaces 1 instruction (10 bytes)" and s.function is None and s.x87 is True
    spot = Spot(analyzer, insn(module, at("nosym", 2)), None, None)
    assert spot.x87 is True
    facts = analyzer.facts(module.function_at(at("whole")))
    assert Spot(analyzer, insn(module, at("whole")), facts.symbol, facts).x87 is False


def test_a_trap_keeps_the_first_instruction_and_the_run_that_may_move(module, analyzer):
    s = analyzer.analyse(at("evict"), tactics=False)
    assert s.mechanism is Mechanism.TRAP and s.tactic is None
    assert s.reason == ("2-byte instruction in a function with an indirect jump at 0x401008 "
                        "(a switch table may land anywhere)")
    assert s.address == at("evict") and where(s.displaced) == where([insn(module, at("evict"))]) and where(s.run) == where(s.displaced)
    assert s.flags_live is False and s.x87 is False and s.function.name == "evict"
    s = analyzer.analyse(at("early"), tactics=False)
    assert s.reason == "only 2 bytes up to `ret`, which ends the straight-line code"
    assert [text(i) for i in s.run] == ["pop rbx", "ret"] and [text(i) for i in s.displaced] == ["pop rbx"]
    short = Short(s, analyzer, Overlay(module))
    assert short.run == s.run and (short.address, short.size, short.open) == (at("early"), 2, True)
    # Without a run, the first instruction alone.
    two = tuple(insn(module, a) for a in (at("early"), at("early", 1)))
    short = Short(Site(at("early"), Mechanism.TRAP, "", two), analyzer, Overlay(module))
    assert (short.run, short.size) == (two[:1], 1)
    s = analyzer.analyse(at("nosym"), tactics=False)
    assert s.function is None and s.x87 is True and s.flags_live is False      # xor writes every flag


# --- Rule 3: short jumps, in the order pun, evict, neighbour, chain --------------------------

def test_a_pun_comes_before_an_eviction(module, analyzer):
    trap, s, choice = decide(analyzer, at("pun"))
    assert (s.mechanism, s.tactic) == (Mechanism.PUN, Tactic.B2)        # `mov eax,0x100` could be evicted too
    assert s.reason == f"B2: punned jump (island at {s.jump.island:#x})"
    assert s.address == at("pun") and where(s.displaced) == where(trap.displaced) and s.length == 2
    assert s.flags_live is False and s.x87 is False and s.function.name == "pun"
    check_jumps(module, s, choice)


def test_a_prefix_gives_the_pun_another_window(module, analyzer):
    _, s, choice = decide(analyzer, at("t1"))
    assert (s.mechanism, s.tactic, s.jump.prefixes) == (Mechanism.PUN, Tactic.T1, 1)
    assert s.reason == f"T1: punned jump after 1 prefix byte(s) (island at {s.jump.island:#x})"
    assert s.jump.patched[:2] == b"\x48\xe9" and s.address == at("t1")
    check_jumps(module, s, choice)


def test_an_eviction_when_no_pun_fits(module, analyzer):
    _, s, choice = decide(analyzer, at("evict"))
    mov = insn(module, at("evict", 2))
    assert (s.mechanism, s.tactic) == (Mechanism.EVICT, Tactic.T2)
    assert s.reason == f"T2: jump over an evicted `mov dword ptr [rdx - 0x6f6f6f70], eax` (island at {s.jump.island:#x})"
    # the trampoline runs the evicted `mov` after the `xor` (both move together)
    assert [i.address for i in s.displaced] == [at("evict"), at("evict", 2)] and s.jump.evicted.address == mov.address
    assert s.address == at("evict") and s.length == 8 and s.jump.more == ()
    assert s.flags_live is False and s.x87 is False and s.function.name == "evict"
    check_jumps(module, s, choice)
    assert s.jump.patched[2] == 0xE9 and s.jump.patched[7] == 0xCC    # the mov's own jump, int3 after


def test_an_eviction_after_a_call_or_a_ret_displaces_nothing_past_it(module, analyzer):
    _, s, choice = decide(analyzer, at("callreg"))
    assert (s.mechanism, s.tactic) == (Mechanism.EVICT, Tactic.T2), s.reason
    assert [text(i) for i in s.displaced] == ["call rax"]          # its return address is the mov's jump
    assert s.flags_live is False and s.x87 is False                   # a function entry
    check_jumps(module, s, choice)
    # `pop rbx; ret` (2 bytes, ends the function) evicts the next function's first instruction
    _, s, choice = decide(analyzer, at("early"))
    assert (s.mechanism, s.tactic, s.address) == (Mechanism.EVICT, Tactic.T2, at("early")), s.reason
    assert s.reason == ("T2: jump over an evicted `mov dword ptr [rdx - 0x6f6f6f70], eax` from 2 instructions "
                        f"moved together (2 bytes) (island at {s.jump.island:#x})")
    assert [text(i) for i in s.displaced] == ["pop rbx", "ret"]
    assert s.flags_live is False and s.function.name == "early"
    check_jumps(module, s, choice)


def test_a_neighbour_eviction_before_a_chain(module, analyzer):
    _, s, choice = decide(analyzer, at("t3"))
    n = insn(module, at("t3", 3))
    assert (s.mechanism, s.tactic) == (Mechanism.EVICT, Tactic.T3)
    assert s.reason == (f"T3: short jump into an evicted `mov dword ptr [rdx - 0x6f6f6f70], eax` at {n.address:#x} "
                        f"(island at {s.jump.island:#x})")
    assert s.address == at("t3") and s.length == 2 + 1 + 6 and where(s.displaced) == where([insn(module, at("t3"))])
    code = s.jump.patched
    assert jump_target(code, at("t3")) == (n.address + HOP, 2)                       # jmp rel8 to N + 5
    assert jump_target(code[3:], n.address)[0] == s.jump.evicted_island             # N's own jump
    assert jump_target(code[3 + HOP:] + module.read(n.address + 6, 8), n.address + HOP)[0] == s.jump.island
    assert taken(choice.islands, s.jump.island) and taken(choice.islands, s.jump.evicted_island)


def test_a_chain_with_prefixes_when_one_plain_eviction_finds_no_window(module, analyzer):
    _, s, choice = decide(analyzer, at("prefixed"))
    assert (s.mechanism, s.tactic) == (Mechanism.EVICT, Tactic.T2), s.reason
    assert s.reason == f"T2: jump over an evicted `add eax, -0x70` (island at {s.jump.island:#x})"
    assert [text(i) for i in s.displaced] == ["xor eax, eax", "add eax, -0x70"] and s.jump.more == ()
    check_jumps(module, s, choice)
    assert s.jump.patched[2:4] == b"\x48\xe9"                          # the add's jump after a prefix
    assert jump_target(s.jump.patched[2:] + module.read(at("prefixed", 5), 8), at("prefixed", 2))[0] \
        == s.jump.evicted_island


def test_a_chain_of_two_evictions(module, analyzer):
    _, s, choice = decide(analyzer, at("chain"))
    assert (s.mechanism, s.tactic) == (Mechanism.EVICT, Tactic.T2), s.reason
    assert s.reason == f"T2: jump over evicted `nop`, `mov eax, 0x10808080` (island at {s.jump.island:#x})"
    assert [text(i) for i in s.displaced] == ["xor eax, eax", "nop", "mov eax, 0x10808080"]
    assert [m.address for m, _ in s.jump.more] == [at("chain", 3)] and s.length == 8
    check_jumps(module, s, choice)


# --- When nothing fits: the trap, with why when the site is decided alone -------------------

def test_alone_a_trap_says_why_no_short_jump_fits(module, analyzer):
    site = analyzer.analyse(at("nosym", 12), tactics=False)           # the last bytes of the code
    assert choose_short(site, analyzer.alone()).reason == (
        "2-byte instruction outside any known function: no room for a jump; "
        "no punned jump fits, and code ends after it")
    none = Islands(BASE, BASE + 0x1000, True, 1 << 40)                  # no zone at all
    assert none.zones() == []
    site = analyzer.analyse(at("evict"), tactics=False)
    decided = choose_short(site, Choice(analyzer, Overlay(module), none, alone=True))
    assert decided.mechanism is Mechanism.TRAP and decided.jump is None
    assert decided.reason == site.reason + "; no island window is free for a punned or evicting jump"
    assert replace(decided, reason=site.reason) == site


def test_in_a_plan_a_trap_keeps_its_reason(module, analyzer):
    site = analyzer.analyse(at("evict"), tactics=False)
    none = Islands(BASE, BASE + 0x1000, True, 1 << 40)
    assert choose_short(site, Choice(analyzer, Overlay(module), none)) is site
    # alone, but its bytes are another probe's already: no short jump may go there
    overlay = Overlay(module)
    overlay.put(at("evict"), at("evict"), b"\xcc\xcc")
    assert choose_short(site, Choice(analyzer, overlay, analyzer.islands(), alone=True)) is site
    # no islands mapped (`jprobe patch` on a library): the trap as it was
    assert choose_short(site, Choice(analyzer, Overlay(module), analyzer.islands(), Policy(islands=False))) is site


# --- Rule 4: re-aiming the next probe's jump --------------------------------------------------

def reaim_setup(module, analyzer):
    """Probes at `xor` (2 bytes) and at the `mov` after it, which has a plain jump to its
    trampoline: the xor cannot evict it (a probe of its own)."""
    x, j = at("evict"), at("evict", 2)
    analyzer.reserved = {x, j}
    overlay = Overlay(module)
    trampoline = 0x1000_0000
    overlay.put(j, j, arch.jump_bytes(j, trampoline, 6))
    islands = analyzer.islands(2)
    return x, j, trampoline, Choice(analyzer, overlay, islands, Policy(strict=True, movable=True), {j: 6})


def test_reaim_returns_the_neighbours_new_jump(module, analyzer):
    x, j, trampoline, choice = reaim_setup(module, analyzer)
    site = analyzer.analyse(x, tactics=False)
    short = Short(site, analyzer, choice.overlay)
    assert short.evicted is None and short.successor[1] == "and the next instruction has a probe of its own"
    s = choose_short(site, choice)
    assert (s.mechanism, s.tactic, s.address) == (Mechanism.PUN, Tactic.T2, x)
    assert s.reason == (f"T2: punned jump over the next probe's jump, both through islands "
                        f"(island at {s.jump.island:#x})")
    assert where(s.displaced) == where([insn(module, x)]) and s.length == 2
    assert s.flags_live is False and s.x87 is False and s.function.name == "evict"
    assert s.jump.depends == j and s.jump.evicted is None and len(s.jump.patched) == 2
    new = s.reaimed
    assert new.address == j and len(new.patched) == 6 and new.depends is None     # original bytes after it
    code = s.jump.patched + new.patched + module.read(j + 6, 8)
    assert jump_target(code, x)[0] == s.jump.island
    assert jump_target(code[2:], j)[0] == new.island                  # the mov's jump, through an island
    assert new.island != s.jump.island
    for island in (s.jump.island, new.island):
        assert in_zone(choice.islands, island) and taken(choice.islands, island)
    assert sum(page.count(1) for page in choice.islands.pages.values()) == 2 * HOP     # no other island taken
    assert reaim(Short(site, analyzer, choice.overlay), replace(choice, reaimable={})) is None


def test_the_planner_records_both_jumps_of_a_reaim(module):
    probes = resolve_probes(module, parse_probes([hex(at("evict")), hex(at("evict", 2))]), strict=False)
    plan = build_plan(module, probes, 0x1000_0000, 0x1000_8000, Policy(strict=True, movable=True))
    first, second = plan.probes
    assert (first.address, second.address) == (at("evict"), at("evict", 2))
    assert first.mechanism is Mechanism.PUN and first.reason.startswith("T2: punned jump over the next probe's jump")
    assert first.depends == second.address and len(first.patched) == 2
    assert second.mechanism is Mechanism.PUN and second.patch_fixup is None and second.depends is None
    assert second.reason == f"displaces 1 instruction (6 bytes), re-aimed through an island for the probe at {first.address:#x}"
    code = first.patched + second.patched + module.read(second.address + 6, 8)
    assert jump_target(code, first.address)[0] == first.islands[0]
    assert [jump_target(code[2:], second.address)[0]] == second.islands
    assert second.trampoline is not None and second.islands[0] != first.islands[0]


def test_islands_on_pages_in_use_come_before_a_tactic_earlier_in_the_order(module, analyzer):
    """Each page is one more mapping at run time: with pages in use, every tactic is tried on
    them first. The pun of `xor` at `pun` has one 256-byte window, ~16 MiB past the code, on
    no page in use; its eviction finds islands on the pages in use."""
    islands = analyzer.islands()
    lo = islands.after[0]
    used = range(lo, lo + 0x10_0000, 4096)
    for page in used:
        islands.take(page)
    site = analyzer.analyse(at("pun"), tactics=False)
    s = choose_short(site, Choice(analyzer, Overlay(module), islands))
    assert (s.mechanism, s.tactic) == (Mechanism.EVICT, Tactic.T2), s.reason
    assert {s.jump.island // 4096 * 4096, s.jump.evicted_island // 4096 * 4096} <= set(used)
    assert sorted(islands.pages) == list(used)                       # no new page
    # with none in use, the pun as the order says
    _, s, _ = decide(analyzer, at("pun"))
    assert s.tactic is Tactic.B2


def test_a_chain_stops_at_one_patchs_bytes(module, analyzer):
    """JP_PATCH_MAX (16) bytes at most: 2 + 3 + 11 fit, 2 + 4 + 11 do not (a trap then)."""
    _, s, choice = decide(analyzer, at("limit16"))
    assert (s.mechanism, s.tactic, s.length) == (Mechanism.EVICT, Tactic.T2, 16), s.reason
    assert s.reason == ("T2: jump over evicted `add eax, -0x70`, `mov dword ptr [rsp + riz*4 - 0x6f6f6f70], 0` "
                        f"from 2 instructions moved together (2 bytes) (island at {s.jump.island:#x})")
    assert [text(i) for i in s.displaced] == ["push rbx", "push rbp", "add eax, -0x70",
                                              "mov dword ptr [rsp + riz*4 - 0x6f6f6f70], 0"]
    check_jumps(module, s, choice)
    trap, s, _ = decide(analyzer, at("limit17"))
    assert trap.reason == f"only 2 bytes before a branch target at {at('limit17', 2):#x}"
    assert s.mechanism is Mechanism.TRAP and s.jump is None, s.reason
    assert s.reason == trap.reason + "; no island window is free for a punned or evicting jump"


def test_a_chain_goes_on_past_a_jump_to_an_instruction_its_function_starts(module, analyzer):
    """After `jmp`, only what says an instruction starts there lets the chain evict it: here
    the sweep of `jmpchain` does (no symbol starts at the `mov`)."""
    _, s, choice = decide(analyzer, at("jmpchain"))
    assert (s.mechanism, s.tactic) == (Mechanism.EVICT, Tactic.T2), s.reason
    assert s.reason == ("T2: jump over evicted `jmp 0x4011aa`, `mov dword ptr [rdx - 0x6f6f6f70], eax` "
                        f"(island at {s.jump.island:#x})")
    # the trampoline runs the `jmp` after the xor, and nothing after it
    assert [text(i) for i in s.displaced] == ["xor eax, eax", "jmp 0x4011aa"]
    check_jumps(module, s, choice)


def test_a_chain_moves_at_most_five_instructions(module, analyzer):
    """The site and 4 evicted instructions; a chain that needs a fifth eviction is not tried."""
    _, s, choice = decide(analyzer, at("not3"))
    assert (s.mechanism, s.tactic, s.length) == (Mechanism.EVICT, Tactic.T2, 13), s.reason
    assert s.reason == ("T2: jump over evicted `not eax`, `not eax`, `not eax`, `mov eax, 0x80808080` "
                        f"(island at {s.jump.island:#x})")
    assert len(s.jump.more) == 3
    check_jumps(module, s, choice)
    _, s, _ = decide(analyzer, at("not4"))
    assert s.mechanism is Mechanism.TRAP and s.jump is None, s.reason


def test_strict_refuses_a_site_that_would_trap_and_takes_one_that_gets_a_short_jump(module):
    from jprobe.errors import SiteError
    with pytest.raises(SiteError, match=rf"needs a trap at {at('not4'):#x} \(2-byte instruction in a function "
                                        r"with an indirect jump .*; no island window is free .*\); drop --strict"):
        resolve_probes(module, parse_probes([hex(at("not4"))]), strict=True)
    probes = resolve_probes(module, parse_probes([hex(at("evict"))]), strict=True)
    [probe] = build_plan(module, probes, 0x1000_0000, 0x1000_8000, Policy(strict=True)).probes
    assert probe.mechanism is Mechanism.EVICT and probe.reason.startswith("T2: jump over an evicted `mov")
