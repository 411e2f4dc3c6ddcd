"""Island placement (trampolines/islands.py) against brute-force references: a family's windows
enumerated one by one, the zones from their definition, and the bytes taken kept as a plain set.

The references are built from those primitives only; where the search order matters (slots), the
reference follows the documented order: pages in use (most recently used first; for a single
window every used page inside it), then from each zone's image-side edge outward, window by
window, at most two pages per window (the nearest the image first)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jprobe.trampolines.islands import HOP, LOWEST, MIB, PAGE, Family, Islands, text_room
from jprobe.trampolines.x86_64 import REACH
from support.properties import examples, reached, reaching

B31, B32 = 1 << 31, 1 << 32
MRU, WALK = 16, 32                   # documented: recently used pages tried first; windows per zone edge


# --- families -------------------------------------------------------------------------------

def signed32(u: int) -> int:
    u %= B32
    return u - B32 if u >= B31 else u


def ref_windows(f: Family) -> list[tuple[int, int]]:
    """Window s for s in [0, count): the rel32 values c + s*stride + t, t < wsize, as addresses."""
    return [(f.origin + signed32(f.c + s * f.stride), f.origin + signed32(f.c + s * f.stride) + f.wsize - 1)
            for s in range(f.count)]


def targets(f: Family, a: int) -> bool:
    """Whether a jump whose rel32 is from `f` can land on `a` (one address, brute force)."""
    rel = a - f.origin
    if not -B31 <= rel < B31:
        return False
    d = rel % B32 - f.c
    return d >= 0 and d // f.stride < f.count and d % f.stride < f.wsize


@st.composite
def families(draw, origin=None, near=None, max_count=64, max_wbits=6):
    """Families whose windows do not cross a sign boundary of the rel32 (as the tactics' do:
    power-of-two sizes, aligned), starting near `near` (an absolute address)."""
    wbits = draw(st.integers(0, min(max_wbits, 6)) | st.integers(min(max_wbits, 12), max_wbits))
    wsize = 1 << wbits
    stride = wsize << draw(st.integers(0, 8))
    count = draw(st.integers(1, max_count))
    if origin is None:
        origin = draw(st.integers(0x1000, 1 << 40))
    if near is None:
        rel = draw(st.one_of(st.integers(-4 * PAGE, 4 * PAGE), st.integers(-B31, -B31 + 4 * PAGE),
                             st.integers(B31 - 4 * PAGE - count * stride, B31 - 1), st.integers(-B31, B31 - 1)))
    else:
        rel = near - origin + draw(st.integers(-2 * stride * count - 2 * PAGE, 2 * PAGE))
    c = rel % B32 // wsize * wsize
    c = min(c, B32 - (count - 1) * stride - wsize)            # all of it within the rel32
    if c < B31 < c + (count - 1) * stride + wsize:             # no window across the sign flip
        c = B31 if draw(st.booleans()) else B31 - (count - 1) * stride - wsize
    c = max(0, c) // wsize * wsize
    return Family(origin, c, stride, wsize, count)


@settings(max_examples=examples(300), deadline=None)
@given(f=families(), s=st.integers(0, 63))
def test_member_is_window_s_read_as_signed_rel32(f, s):
    s %= f.count
    lo, hi = f.member(s)
    assert (lo, hi) == ref_windows(f)[s]
    assert all(targets(f, a) for a in (lo, hi, (lo + hi) // 2))


def test_member_at_the_sign_flip():
    # rel32 0x80000000 is -2**31: the window lies below the origin
    assert Family(1 << 40, B31, B32, B31).member(0) == ((1 << 40) - B31, (1 << 40) - 1)
    assert Family(1 << 40, 0, B32, B31).member(0) == (1 << 40, (1 << 40) + B31 - 1)
    assert Family(1 << 40, B31 - 256, 256, 256, 2).member(1) == ((1 << 40) - B31, (1 << 40) - B31 + 255)


@reaching(0.5)
@settings(max_examples=examples(300), deadline=None)
@given(f=families(), data=st.data())
def test_windows_in_is_the_brute_force_set_in_range(f, data):
    ws = ref_windows(f)
    anchor = data.draw(st.sampled_from([w[0] for w in ws] + [w[1] for w in ws]
                                       + [f.origin, f.origin - 1, f.origin - B31, f.origin + B31 - 1]))
    lo = anchor + data.draw(st.integers(-300, 300))
    hi = lo + data.draw(st.integers(0, 600))
    got = list(f.windows_in(lo, hi))
    covered = [a for w0, w1 in got for a in range(w0, w1 + 1)]
    assert all(lo <= a <= hi for a in covered)
    assert len(covered) == len(set(covered))                  # no address twice
    expected = {a for a in range(lo, hi + 1) if targets(f, a)}
    # each part is one window's, in window order
    parts = [(max(w0, lo), min(w1, hi)) for w0, w1 in ws if max(w0, lo) <= min(w1, hi)]
    if lo < f.origin <= hi or lo - f.origin < -B31 or hi - f.origin >= B31:
        # Not a range on one side of the origin within rel32 reach: whatever it yields lands.
        assert set(covered) <= expected
        return
    reached()
    assert set(covered) == expected
    assert got == parts


def test_windows_in_at_the_origin_and_at_the_reach_limit():
    f = Family(0x10_0000, 0, 16, 4, 4)
    assert list(f.windows_in(0x10_0000, 0x10_0021)) == [(0x10_0000, 0x10_0003), (0x10_0010, 0x10_0013), (0x10_0020, 0x10_0021)]
    g = Family(1 << 40, B31, 16, 4, 2)                         # rel32 -2**31 on: just reachable
    assert list(g.windows_in((1 << 40) - B31, (1 << 40) - B31 + 31)) == [
        ((1 << 40) - B31, (1 << 40) - B31 + 3), ((1 << 40) - B31 + 16, (1 << 40) - B31 + 19)]


def ref_nearest(f: Family, edge: int, downward: bool) -> list[tuple[int, int]]:
    """The windows met walking from `edge` away from the image (down or up, in rel32 order), at
    most WALK of them; when none lies that way, the walk starts at the nearest window."""
    rel = edge - f.origin
    if not -B31 <= rel < B31:
        return []
    u = rel % B32
    ws = ref_windows(f)
    if downward:
        order = [s for s in reversed(range(f.count)) if f.c + s * f.stride <= u] or [0]
    else:
        order = [s for s in range(f.count) if f.c + s * f.stride + f.wsize - 1 >= u] or [f.count - 1]
    return [ws[s] for s in order[:WALK]]


@settings(max_examples=examples(300), deadline=None)
@given(f=families(), data=st.data(), downward=st.booleans())
def test_nearest_walks_outward_from_the_edge(f, data, downward):
    ws = ref_windows(f)
    anchor = data.draw(st.sampled_from([w[0] for w in ws] + [w[1] for w in ws]))
    edge = anchor + data.draw(st.integers(-70, 70))
    got = list(f.nearest(edge, downward))
    assert got == ref_nearest(f, edge, downward)


def test_nearest_from_an_edge_out_of_reach_finds_nothing_outward():
    f = Family(1 << 40, 0x100, 0x1000, 0x10, 8)                # windows just above the origin
    assert list(f.nearest((1 << 40) - B31 - 1, True)) == []     # below every rel32: none further down
    assert list(f.nearest((1 << 40) - B32 + 0x100, True)) == []
    g = Family(1 << 40, B32 - 0x8000, 0x1000, 0x10, 8)         # windows just below the origin
    assert list(g.nearest((1 << 40) + B31, False)) == []        # above every rel32: none further up
    assert list(g.nearest((1 << 40) + B31 + 0x100, False)) == []
    h = Family(1 << 40, B31, 0x1000, 0x10, 8)                   # windows from -2**31 up
    assert list(h.nearest((1 << 40) - B31, True)) == [h.member(0)]
    assert list(h.nearest((1 << 40) - B31, False)) == [h.member(s) for s in range(8)]


# --- text room and zones --------------------------------------------------------------------

@given(n=st.integers(0, 1 << 14))
def test_text_room_is_the_least_whole_mib_over_a_mib_plus_1k_per_probe(n):
    room = text_room(n)
    assert room % MIB == 0 and room >= MIB + 1024 * n > room - MIB


def test_text_room_examples():
    assert [text_room(n) for n in (0, 1, 1024, 1025, 2048)] == [MIB, 2 * MIB, 2 * MIB, 3 * MIB, 3 * MIB]


def ref_zones(image_lo, image_hi, fixed, room):
    text_end = (image_hi + PAGE - 1) // PAGE * PAGE + room
    floor = LOWEST if fixed else -(1 << 62)
    return (text_end, image_hi + REACH), (max(floor, text_end - REACH), image_lo)


@given(image_lo=st.integers(0, 1 << 46), size=st.integers(1, 1 << 24), fixed=st.booleans(),
       room=st.integers(0, 1 << 22))
def test_zones_are_after_the_room_and_below_the_image_within_reach(image_lo, size, fixed, room):
    image_hi = image_lo + size
    isl = Islands(image_lo, image_hi, fixed, room)
    after, below = ref_zones(image_lo, image_hi, fixed, room)
    assert (isl.after, isl.below) == (after, below)
    assert isl.zones() == [z for z in (after, below) if z[0] < z[1]]


def test_an_empty_zone_is_no_zone():
    isl = Islands(LOWEST, LOWEST + PAGE, True, MIB)
    assert isl.below == (LOWEST, LOWEST) and isl.zones() == [isl.after]


# --- bytes taken ----------------------------------------------------------------------------

class Model:
    """What Islands keeps, kept the obvious way."""

    def __init__(self, isl: Islands, image_lo, image_hi, fixed, room):
        self.zones = [z for z in ref_zones(image_lo, image_hi, fixed, room) if z[0] < z[1]]
        self.taken: set[int] = set()
        self.used: set[int] = set()
        self.mru: list[int] = []

    def free(self, at: int, size: int = HOP) -> bool:
        return (at // PAGE == (at + size - 1) // PAGE
                and any(lo <= at and at + size <= hi for lo, hi in self.zones)
                and not any(a in self.taken for a in range(at, at + size)))

    def take(self, at, size=HOP):
        self.taken |= set(range(at, at + size))
        base = at // PAGE * PAGE
        self.used.add(base)
        if base in self.mru:
            self.mru.remove(base)
        self.mru = (self.mru + [base])[-MRU:]

    def release(self, at, size=HOP):
        self.taken -= set(range(at, at + size))

    def lowest_free(self, lo, hi):
        return next((a for a in range(lo, hi + 1) if self.free(a)), None)


IMAGE_LO = 0x4000_0000


@st.composite
def layouts(draw, aligned_room=True):
    """(image_lo, image_hi, fixed, room): an image, possibly right on the fixed-address floor."""
    fixed = draw(st.booleans())
    image_lo = draw(st.sampled_from([IMAGE_LO, LOWEST, LOWEST + 3 * PAGE + 0x123, IMAGE_LO + 0x7ff]))
    image_hi = image_lo + draw(st.integers(1, 8 * PAGE))
    room = draw(st.integers(0, 4)) * PAGE + (0 if aligned_room else draw(st.integers(0, PAGE - 1)))
    return image_lo, image_hi, fixed, room


def edges(layout):
    """Addresses where zones start or end: where the interesting bytes are."""
    after, below = ref_zones(*layout)
    return [after[0], below[1], below[0], after[1]]


@st.composite
def histories(draw, layout, model, isl, n=12, windows=()):
    """Takes (of free spans, as the tactics do) and releases of earlier takes, applied to both;
    near the zones' edges, or in (or near) the given windows."""
    spans = []
    around = edges(layout)
    for _ in range(draw(st.integers(0, n))):
        if windows and draw(st.booleans()):
            w0, w1 = draw(st.sampled_from(windows))
            at = draw(st.integers(w0 - 2 * HOP, min(w1, w0 + 3 * PAGE)))
            if model.free(at):
                isl.take(at)
                model.take(at)
                spans.append((at, HOP))
            continue
        if spans and draw(st.integers(0, 3)) == 0:
            at, size = spans.pop(draw(st.integers(0, len(spans) - 1)))
            isl.release(at, size)
            model.release(at, size)
            continue
        at = draw(st.sampled_from(around)) + draw(st.integers(-3 * PAGE, 3 * PAGE))
        size = draw(st.sampled_from([HOP, HOP, 1, 2, 8]))
        if model.free(at, size):
            isl.take(at, size)
            model.take(at, size)
            spans.append((at, size))
    return spans


@settings(max_examples=examples(150), deadline=None)
@given(data=st.data(), layout=layouts(aligned_room=False))
def test_is_free_take_release_match_a_set_of_taken_bytes(data, layout):
    isl = Islands(*layout)
    model = Model(isl, *layout)
    view = isl.on_pages_in_use()
    data.draw(histories(layout, model, data.draw(st.sampled_from([isl, view]))))
    for edge in edges(layout):
        probe = edge + data.draw(st.integers(-3 * PAGE, 3 * PAGE))
        for at in range(probe - 12, probe + 12):
            for size in (HOP, 1, 3):
                assert isl.is_free(at, size) == model.free(at, size), (hex(at), size)
                assert view.is_free(at, size) == model.free(at, size)
    for page in isl.pages.values():
        assert len(page) == PAGE


def test_take_and_release_round_trip_at_page_ends():
    isl = Islands(IMAGE_LO, IMAGE_LO + PAGE, False, 0)
    p = isl.after[0] + 4 * PAGE
    assert isl.is_free(p) and isl.is_free(p + PAGE - HOP) and not isl.is_free(p + PAGE - HOP + 1)
    isl.take(p + 7)
    isl.take(p + 100)                                         # same page: the first stays taken
    assert not isl.is_free(p + 7) and not isl.is_free(p + 3) and not isl.is_free(p + 11)
    assert isl.is_free(p + 2) and isl.is_free(p + 12) and not isl.is_free(p + 100)
    isl.release(p + 7)
    assert isl.is_free(p + 7) and not isl.is_free(p + 100)
    isl.take(p + PAGE - HOP)
    assert not isl.is_free(p + PAGE - HOP) and isl.is_free(p + PAGE - 2 * HOP)
    assert isl.is_free(p + PAGE)
    below_end = isl.below[1]
    assert isl.is_free(below_end - HOP) and below_end % PAGE == 0
    assert not isl.is_free(below_end - HOP + 1) and not isl.is_free(isl.after[0] - 1)
    assert isl.is_free(isl.after[0]) and not isl.is_free(isl.after[1] - HOP + 1)


@settings(max_examples=examples(150), deadline=None)
@given(data=st.data(), layout=layouts(aligned_room=False))
def test_first_free_is_the_lowest_free_slot_of_a_page_in_use(data, layout):
    isl = Islands(*layout)
    model = Model(isl, *layout)
    data.draw(histories(layout, model, isl, n=20))
    for page in sorted(model.used)[:4]:
        lo = page + data.draw(st.integers(0, PAGE - 1))
        hi = data.draw(st.integers(lo, page + PAGE - 1))
        assert isl._first_free(lo, hi) == model.lowest_free(lo, hi), (hex(lo), hex(hi))


@settings(max_examples=examples(100), deadline=None)
@given(data=st.data(), layout=layouts())
def test_first_free_on_an_unused_page(data, layout):
    isl = Islands(*layout)
    model = Model(isl, *layout)
    page = data.draw(st.sampled_from(edges(layout))) // PAGE * PAGE + PAGE * data.draw(st.integers(-2, 2))
    lo = page + data.draw(st.integers(0, PAGE - 1))
    hi = data.draw(st.integers(lo, page + PAGE - 1))
    assert isl._first_free(lo, hi) == model.lowest_free(lo, hi)


# --- slots ----------------------------------------------------------------------------------

def ref_slots(model: Model, f: Family, new_pages: bool, zones) -> list[int]:
    ws = ref_windows(f)
    after, below = zones

    def in_page(page):
        # a page across the origin or past the rel32 reach is not searched
        if page < f.origin <= page + PAGE - 1 or page - f.origin < -B31 or page + PAGE - 1 - f.origin >= B31:
            return []
        found = []
        for w0, w1 in ws:
            lo, hi = max(w0, page), min(w1, page + PAGE - HOP)
            if lo <= hi and (at := model.lowest_free(lo, hi)) is not None:
                found.append(at)
        return found

    out, tried = [], set()
    mru = list(reversed(model.mru))
    if f.count == 1:
        w0, w1 = ws[0]
        if not any(max(w0, lo) <= min(w1, hi - HOP) for lo, hi in model.zones):
            return []
        mru = [p for p in mru if p <= w1 and p + PAGE > w0]
    for page in mru:
        tried.add(page)
        out += in_page(page)
    if f.count == 1:
        w0, w1 = ws[0]
        for page in [p for p in sorted(model.used) if w0 - PAGE < p][:WALK]:
            if page > w1:
                break
            if page not in tried:
                tried.add(page)
                out += in_page(page)
    for (zlo, zhi), downward in ((after, False), (below, True)):
        if zlo >= zhi:
            continue
        for w0, w1 in ref_nearest(f, zhi - 1 if downward else zlo, downward):
            lo, hi = max(w0, zlo), min(w1, zhi - HOP)
            if lo > hi:
                continue
            first, last = (hi, lo) if downward else (lo, hi)
            pages = [first // PAGE * PAGE]
            if first // PAGE != last // PAGE:
                pages.append(pages[0] + (-PAGE if downward else PAGE))    # the next page out
            for page in pages:
                if page not in tried and (new_pages or page in model.used):
                    tried.add(page)
                    out += in_page(page)
    return out


@st.composite
def slot_cases(draw):
    layout = draw(layouts())
    isl = Islands(*layout)
    model = Model(isl, *layout)
    origin = layout[0] + draw(st.integers(0, layout[1] - layout[0]))
    f = draw(families(origin=origin, near=draw(st.sampled_from(edges(layout))), max_count=24, max_wbits=14))
    draw(histories(layout, model, isl, n=10, windows=ref_windows(f)[:8]))
    return layout, isl, model, f


@reaching(0.3)
@settings(max_examples=examples(200), deadline=None)
@given(case=slot_cases(), view=st.booleans())
def test_slots_follow_the_documented_order_and_land(case, view):
    layout, isl, model, f = case
    search = isl.on_pages_in_use() if view else isl
    got = list(search.slots(f))
    assert len(got) == len(set(got))
    for at in got:
        assert model.free(at) and targets(f, at), hex(at)
        assert not view or at // PAGE * PAGE in model.used
    assert got == ref_slots(model, f, not view, ref_zones(*layout))
    if got:
        reached()


def test_slots_prefer_the_page_used_last():
    isl = Islands(IMAGE_LO, IMAGE_LO + PAGE, False, 0)
    base = isl.after[0]
    f = Family(IMAGE_LO, base - IMAGE_LO, 4 * PAGE, 64, 16)      # 64 bytes at the start of every 4th page
    assert next(isl.slots(f)) == base                             # nothing used: nearest the image
    isl.take(base + 8 * PAGE)
    assert next(isl.slots(f)) == base + 8 * PAGE + HOP           # the page in use
    isl.take(base + 4 * PAGE + 10)
    assert list(isl.slots(f))[:2] == [base + 4 * PAGE, base + 8 * PAGE + HOP]
    view = isl.on_pages_in_use()
    assert list(view.slots(f)) == [base + 4 * PAGE, base + 8 * PAGE + HOP]
    view.take(base + 4 * PAGE)                                    # shared: the islands see it
    assert not isl.is_free(base + 4 * PAGE) and next(isl.slots(f)) == base + 4 * PAGE + HOP
    assert isl.new_pages and not view.new_pages


def test_slots_a_single_window_searches_every_used_page_in_it():
    isl = Islands(IMAGE_LO, IMAGE_LO + PAGE, False, 0)
    base = isl.after[0]
    for k in range(MRU + 4):                                      # more pages than the MRU holds
        isl.take(base + (2 + k) * PAGE)
    f = Family(IMAGE_LO, base - IMAGE_LO, B32, 64 * PAGE)
    got = list(isl.on_pages_in_use().slots(f))
    assert sorted(got) == [base + (2 + k) * PAGE + HOP for k in range(MRU + 4)]
    assert got[:MRU] == [base + (2 + k) * PAGE + HOP for k in reversed(range(4, MRU + 4))]


def fresh(room=0, image=(IMAGE_LO, IMAGE_LO + PAGE)) -> Islands:
    return Islands(image[0], image[1], False, room)


def test_slots_windows_at_page_starts_one_slot_per_page():
    isl = fresh()
    base = isl.after[0]
    f = Family(IMAGE_LO, base - IMAGE_LO, PAGE, 16, 8)           # 16 bytes at the start of each page
    assert list(isl.slots(f)) == [base + k * PAGE for k in range(8)]


def test_slots_multi_page_windows_try_the_two_pages_nearest_the_image():
    isl = fresh()
    base, top = isl.after[0], isl.below[1]
    up = Family(IMAGE_LO, base - IMAGE_LO, 16 * PAGE, 4 * PAGE, 2)   # 4 pages each, after the image
    assert list(isl.slots(up)) == [base, base + PAGE, base + 16 * PAGE, base + 17 * PAGE]
    down = Family(IMAGE_LO, B32 - 4 * PAGE - 16 * PAGE, 16 * PAGE, 4 * PAGE, 2)  # below the image
    assert list(isl.slots(down)) == [top - PAGE, top - 2 * PAGE, top - 17 * PAGE, top - 18 * PAGE]
    # an island may not end past the zone: the image's first page has no room for one
    short = Islands(IMAGE_LO + 3, IMAGE_LO + PAGE, False, 0)
    f = Family(IMAGE_LO, B32 - 3 * PAGE, 16 * PAGE, 4 * PAGE, 1)
    assert list(short.slots(f)) == [IMAGE_LO - PAGE, IMAGE_LO - 2 * PAGE]


def test_slots_after_a_window_outside_the_zone_try_the_next():
    isl = fresh()
    top = isl.below[1]
    # 4-byte windows: the nearest 2 bytes below the image (no room for an island), then lower
    f = Family(IMAGE_LO, B32 - 2 - 3 * (PAGE - 16), PAGE - 16, 4, 4)
    assert f.member(3) == (top - 2, top + 1)
    assert list(isl.slots(f)) == [top - PAGE + 14, top - 2 * PAGE + 30, top - 3 * PAGE + 46]


def test_slots_a_single_window_over_many_used_pages():
    isl = fresh()
    base = isl.after[0]
    w0 = base + 10 * PAGE + 0x800
    f = Family(IMAGE_LO, w0 - IMAGE_LO, 1 << 40, 24 * PAGE - 0x800 + 1)   # ends at a page's first byte
    w1 = f.member(0)[1]
    assert w1 == base + 34 * PAGE
    pages = [w0 - 0x800 + k * PAGE for k in range(25)]          # every page it touches
    for page in pages[-1:] + pages[1:-1] + pages[:1]:            # the last one used first, the first last
        isl.take(page + 0xF00)
    got = list(isl.slots(f))
    recent = [pages[0] + 0x800] + list(reversed(pages[1:-1]))[:MRU - 1]
    assert got[:MRU] == recent
    assert got[MRU:] == [p for p in pages[1:] if p not in recent]    # the rest of the used pages, in order
    assert got[-1] == w1                                          # the window's last byte, a page's first
    isl.take(w1 + 0x10)                                          # now the most recent
    assert next(isl.slots(f)) == w1


def test_slots_of_two_windows_when_the_first_is_in_the_image():
    isl = fresh()
    base = isl.after[0]
    f = Family(IMAGE_LO, 0x100, base + PAGE - IMAGE_LO - 0x100, 16, 2)   # in the image, then after it
    assert f.member(0) == (IMAGE_LO + 0x100, IMAGE_LO + 0x10F) and not isl.is_free(IMAGE_LO + 0x100)
    assert list(isl.slots(f)) == [base + PAGE]
    isl.take(base + PAGE + 3 * PAGE)                              # a page in use elsewhere
    isl.take(base + PAGE)                                         # the second window's page, now in use
    assert list(isl.slots(f)) == [base + PAGE + HOP]
