"""Punned and evicting jumps (trampolines/tactics.py) and island placement (islands.py):
the bytes they write decode as jumps to their islands, and change nothing they must not."""
import struct

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from hypothesis import given, settings
from hypothesis import strategies as st

from jprobe.trampolines.islands import HOP, PAGE, Family, Islands
from jprobe.trampolines import tactics
from support.properties import examples, reached, reaching

CS = Cs(CS_ARCH_X86, CS_MODE_64)
SITE = 0x40_1000                      # a fixed-address program's code
IMAGE = (0x40_0000, 0x50_0000)


def islands(fixed_address: bool = True) -> Islands:
    return Islands(IMAGE[0], IMAGE[1], fixed_address=fixed_address, room=0x10_0000)


def reader(memory: dict[int, int]):
    def read(address, n):
        return bytes(memory[address + i] for i in range(n)), None
    return read


def jump_target(code: bytes, address: int) -> tuple[int, int]:
    """(target, size) of the jmp that `code` starts with."""
    insn = next(CS.disasm(code, address % (1 << 64)))
    assert insn.mnemonic == "jmp", (insn.mnemonic, insn.op_str, code.hex())
    target = int(insn.op_str, 16)
    return target - (1 << 64) if target >= 1 << 63 else target, insn.size


def in_zone(isl: Islands, at: int) -> bool:
    return any(lo <= at and at + HOP <= hi for lo, hi in isl.zones())


@reaching(0.5)                        # ~75%: a 1-byte site's rel32 is all fixed bytes
@settings(max_examples=examples(400), deadline=None)
@given(length=st.integers(1, 4), after=st.binary(min_size=8, max_size=8))
def test_punned_jump_lands_on_its_island_and_keeps_the_following_bytes(length, after):
    memory = {SITE + length + i: b for i, b in enumerate(after)}
    isl = islands()
    jump = tactics.pun(SITE, length, reader(memory), isl)
    if jump is None:
        # No window: then no prefix count had one inside the zones.
        return
    reached()
    assert len(jump.patched) == length and jump.tactic in ("B2", "T1")
    code = jump.patched + after
    target, size = jump_target(code, SITE)
    assert target == jump.island and in_zone(isl, target)
    assert size == HOP + jump.prefixes and jump.prefixes < length
    assert code[length:] == after                       # what follows is untouched


@reaching(0.5)                        # ~70%: below 5 bytes, J's rel32 leaves few choices
@settings(max_examples=examples(400), deadline=None)
@given(length=st.integers(1, 4), successor=st.integers(1, 11), after=st.binary(min_size=8, max_size=8),
       fixed=st.booleans())
def test_evicting_jump_and_the_evicted_instructions_jump_both_land(length, successor, after, fixed):
    nop = {1: b"\x90", 2: b"\x66\x90", 3: b"\x0f\x1f\x00", 4: b"\x0f\x1f\x40\x00"}
    code = b"\x0f\x1f\x44\x00\x00" * 3
    j_bytes = nop.get(successor) or (b"\x66" * (successor - 5) + b"\x0f\x1f\x44\x00\x00")
    j = next(CS.disasm(j_bytes, SITE + length))
    assert j.size == successor
    memory = {SITE + length + successor + i: b for i, b in enumerate(after)}
    isl = islands(fixed)
    jump = tactics.evict(SITE, length, j, reader(memory), isl)
    if jump is None:
        # With 5 bytes or more to evict, the evicted jump's high bytes are free: only a 4-byte
        # site's window E9xxxxxx (368 MiB below it) can be out of bounds.
        assert successor < 5 or (length == 4 and fixed)
        return
    reached()
    assert len(jump.patched) == length + successor and jump.evicted is j
    code = jump.patched + after
    assert jump_target(code, SITE)[0] == jump.island
    assert jump_target(code[length:], SITE + length)[0] == jump.evicted_island
    assert code[length + successor:] == after
    assert in_zone(isl, jump.island) and in_zone(isl, jump.evicted_island)
    assert abs(jump.island - jump.evicted_island) >= HOP


def test_islands_never_overlap_and_share_pages():
    isl = islands()
    taken = []
    for k in range(2000):
        # 4-byte instructions before a 0x01: every window is [site+16 MiB, site+32 MiB)
        after = struct.pack("<I", 0x0000_0001 + (k % 7 << 8))
        jump = tactics.pun(SITE + 16 * k, 4, reader({SITE + 16 * k + 4 + i: b for i, b in enumerate(after)}), isl)
        assert jump is not None and jump.tactic == "B2"
        taken.append(jump.island)
    spans = sorted(taken)
    assert all(b - a >= HOP for a, b in zip(spans, spans[1:]))
    assert len(isl.pages) <= 2000 * HOP // PAGE + 8          # packed, not a page each


def test_a_window_inside_the_image_or_the_trampoline_room_is_refused():
    isl = islands()
    # rel32 = ?? 00 00 00 from a 2-byte instruction: a 256-byte window right after the site
    memory = {SITE + 2 + i: 0 for i in range(8)}
    jump = tactics.pun(SITE, 2, reader(memory), isl)
    assert jump is None or jump.tactic == "T1"           # never B2: its window is in the image


def test_family_windows_wrap_to_negative_offsets():
    fam = Family(origin=0x1000, c=0xFFFF_0000, stride=1 << 32, wsize=0x100)
    lo, hi = fam.member(0)
    assert (lo, hi) == (0x1000 - 0x10000, 0x1000 - 0x10000 + 0xFF)
    assert list(fam.windows_in(lo - 0x10, lo + 0x10)) == [(lo, lo + 0x10)]


@reaching(0.4)                        # ~70%: see the comment on None below
@settings(max_examples=examples(300), deadline=None)
@given(length=st.integers(2, 4), gap=st.integers(0, 3), size=st.integers(6, 9),
       after=st.binary(min_size=8, max_size=8), fixed=st.booleans())
def test_neighbour_eviction_short_jumps_into_the_evicted_instruction(length, gap, size, after, fixed):
    """T3: `jmp rel8` to N+5, where the site's long jump follows N's own jump; the bytes
    between the site and N, and after N, are kept."""
    n_bytes = b"\x66" * (size - 5) + b"\x0f\x1f\x44\x00\x00"          # a `size`-byte nop
    n_at = SITE + length + gap
    n = next(CS.disasm(n_bytes, n_at))
    gap_bytes = b"\x90" * gap
    memory = {n_at + size + i: b for i, b in enumerate(after)}
    isl = islands(fixed)
    jump = tactics.neighbour(SITE, length, n, gap_bytes, reader(memory), isl)
    if jump is None:
        # With 9 bytes, the long jump's rel32 has 3 free bytes: a 16 MiB window that reaches
        # past the image when the fixed top byte is positive; fewer depend on what follows N.
        assert size < 9 or after[0] >= 0x80
        return
    reached()
    code = jump.patched + after
    assert jump.tactic == "T3" and len(jump.patched) == length + gap + size
    short = next(CS.disasm(code, SITE))
    assert (short.mnemonic, short.size, int(short.op_str, 16)) == ("jmp", 2, n_at + HOP)
    assert code[length:length + gap] == gap_bytes and code[length + gap + size:] == after
    assert jump_target(code[length + gap:], n_at)[0] == jump.evicted_island
    assert jump_target(code[length + gap + HOP:], n_at + HOP)[0] == jump.island
    assert in_zone(isl, jump.island) and in_zone(isl, jump.evicted_island)


@reaching(0.6)                        # ~85%
@settings(max_examples=examples(300), deadline=None)
@given(length=st.integers(1, 3), middle=st.integers(1, 3), last=st.integers(3, 7),
       after=st.binary(min_size=8, max_size=8), fixed=st.booleans())
def test_a_chain_of_evictions_gives_every_jump_its_island(length, middle, last, after, fixed):
    """T2 twice: the site, the next instruction and the one after it each start with a jump
    to an island of its own; every rel32 runs into the jumps after it; what follows is kept."""
    nop = {1: b"\x90", 2: b"\x66\x90", 3: b"\x0f\x1f\x00", 4: b"\x0f\x1f\x40\x00", 5: b"\x0f\x1f\x44\x00\x00",
           6: b"\x66\x0f\x1f\x44\x00\x00", 7: b"\x0f\x1f\x80\x00\x00\x00\x00"}
    at = SITE
    insns = []
    for size in (length, middle, last):
        insns.append(next(CS.disasm(nop[size], at)))
        at += size
    memory = {at + i: b for i, b in enumerate(after)}
    isl = islands(fixed)
    jump = tactics.chain(SITE, length, insns[1:], reader(memory), isl)
    if jump is None:
        return           # windows are not guaranteed; what is found must be right
    reached()
    code = jump.patched + after
    assert len(jump.patched) == length + middle + last and code[len(jump.patched):] == after
    targets = [jump.island, jump.evicted_island] + [i for _, i in jump.more]
    for insn, target in zip(insns, targets):
        off = insn.address - SITE
        assert jump_target(code[off:], insn.address)[0] == target
        assert in_zone(isl, target)
    assert len(set(targets)) == 3


def test_a_chain_finds_a_window_where_one_eviction_does_not():
    """A 1-byte site before a 1-byte instruction: one eviction leaves every rel32 byte fixed
    (an exact target, inside the image here); a chain frees the third instruction's bytes."""
    insns = [next(CS.disasm(b"\x90", SITE)), next(CS.disasm(b"\x90", SITE + 1)),
             next(CS.disasm(b"\x0f\x1f\x80\x00\x00\x00\x00", SITE + 2))]
    memory = {SITE + 9 + i: 0 for i in range(8)}
    assert tactics.evict(SITE, 1, insns[1], reader({SITE + 2 + i: 0 for i in range(8)}), islands()) is None
    jump = tactics.chain(SITE, 1, insns[1:], reader(memory), islands())
    assert jump is not None and len(jump.more) == 1


def test_a_chain_ends_an_earlier_rel32_on_a_prefix_where_an_e9_would_reach_below_zero():
    """A 1-byte site, a 3-byte and a 5-byte instruction: without prefixes the site's rel32
    ends on the E9 of the third one's jump (a target 370 MiB below a program linked at
    4 MiB); prefixes in the moved instructions' jumps shift it onto a prefix byte."""
    insns, at = [], SITE
    for code in (b"\x90", b"\x0f\x1f\x00", b"\x0f\x1f\x44\x00\x00"):
        insns.append(next(CS.disasm(code, at)))
        at += len(code)
    memory = {at + i: 0x10 for i in range(8)}
    isl = islands()
    jump = tactics.chain(SITE, 1, insns[1:], reader(memory), isl)
    assert jump is not None
    code = jump.patched + bytes([0x10] * 8)
    assert code[4] in tactics.PADDINGS[2]               # the site's rel32 ends on a prefix
    targets = [jump.island, jump.evicted_island] + [i for _, i in jump.more]
    for insn, target in zip(insns, targets):
        assert jump_target(code[insn.address - SITE:], insn.address)[0] == target and in_zone(isl, target)
