"""Packed tables: a rewritten file that carries its trampolines and probe table in ~12 bytes
a probe instead of ~200 (the format is in runtime_c/jprobe_table.h, "A packed table").

The packer decodes no instruction: it encodes the bytes the planner laid out, asking the back
end (arch.py) only for its jump encoding and `count` template, and `unpack`
(the reference for the C runtime's unpacker) must give them back exactly, which `pack`
checks before the file is written. What makes it small: every `count` trampoline starts
with the same code but for three fields (a template with holes), relocated instructions
are mostly copies of the site's original bytes, and jumps back are short deltas.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import arch, layout
from .plan import ModulePlan

OP = {name: layout.CONST[f"JP_OP_{name}"] for name in ("LIT", "COUNT", "COPY", "JMP", "PROBE", "COPYJMP", "RESUME",
                                                        "COPY0")}
HOLE = {name: layout.CONST[f"JP_HOLE_{name}"] for name in ("HITS", "TLS", "SLOT")}
MAGIC = layout.STRING["JP_PACKED_MAGIC"]
_PROBE_SIZE = layout.sizeof("jp_probe")
_HITS = layout.offsetof("jp_probe", "hits")
_TLS = layout.offsetof("jp_table", "tls_off")
_NOVEC = layout.CONST["JP_PROBE_NOVEC"]
_MAX_HOLES = 6
_MAX_CODE = 128
# A probe record's kind byte and its extension (jprobe_table.h).
_FLAG_BITS = layout.CONST["JP_PROBE_X87"] | _NOVEC
_KIND_NEXT = layout.CONST["JP_KIND_NEXT"]
_KIND_LEN = layout.CONST["JP_KIND_LEN_SHIFT"]
_KIND_EXT = layout.CONST["JP_KIND_EXT"]
_EXT_STRINGS = layout.CONST["JP_EXT_STRINGS"]
_EXT_DEPENDS = layout.CONST["JP_EXT_DEPENDS"]
_COUNT_RESUMES = layout.CONST["JP_COUNT_RESUMES"]
_ARG = layout.CONST["JP_OP_ARG"]          # an operation's argument inline below this, else a LEB128 after


@dataclass(frozen=True)
class Template:
    """Code that is the same for every probe but for 32-bit fields (holes)."""

    code: bytes                              # holes zeroed
    holes: tuple[tuple[int, int, int], ...]  # (at, end, kind)

    def fill(self, pos: int, probe_id: int, hits: int, tls: int) -> bytes:
        """The code at link-time address `pos` for probe `probe_id`."""
        out = bytearray(self.code)
        for at, end, kind in self.holes:
            value = {HOLE["HITS"]: hits - (pos + end), HOLE["TLS"]: tls - (pos + end),
                     HOLE["SLOT"]: 8 * probe_id}[kind]
            out[at:at + 4] = (value % (1 << 32)).to_bytes(4, "little")
        return bytes(out)


def _count_code(pos: int, hits: int, probe_id: int, tls: int, flags_live: bool, red_zone: bool) -> bytes:
    buf = arch.CodeBuffer(pos)
    arch.emit_count(buf, hits, probe_id, tls, flags_live, red_zone)
    return buf.finish()


def count_templates() -> list[Template]:
    """The `count` code of every shape, its holes found by moving one input at a time.

    Probe ids from 16 up make the slot a disp32 (below, a disp8: such probes' code is
    packed as it is)."""
    pos, hits, tls, pid = 0x10_0000, 0x1234_5678, 0x2345_6789, 0x1_1111
    found = []
    for flags_live in (False, True):
        for red_zone in (False, True):
            base = _count_code(pos, hits, pid, tls, flags_live, red_zone)
            holes = []
            for kind, moved in ((HOLE["HITS"], (pos, hits + 0x1111_1111, pid, tls)),
                                (HOLE["TLS"], (pos, hits, pid, tls + 0x1111_1111)),
                                (HOLE["SLOT"], (pos, hits, pid + 0x111_1111, tls))):
                other = _count_code(*moved, flags_live, red_zone)
                assert len(other) == len(base)
                diff = [i for i in range(len(base)) if base[i] != other[i]]
                for at in diff[::4]:
                    assert diff[diff.index(at):diff.index(at) + 4] == list(range(at, at + 4))
                    value = int.from_bytes(base[at:at + 4], "little", signed=True)
                    if kind == HOLE["SLOT"]:
                        assert value == 8 * pid
                        end = at + 4                 # a disp32: no instruction end needed
                    else:
                        end = (hits if kind == HOLE["HITS"] else tls) - pos - value
                    holes.append((at, end, kind))
            code = bytearray(base)
            for at, _, _ in holes:
                code[at:at + 4] = bytes(4)
            assert len(holes) <= _MAX_HOLES and len(code) <= _MAX_CODE
            found.append(Template(bytes(code), tuple(sorted(holes))))
    return found


def _u(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _zigzag(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


def _unzigzag(value: int) -> int:
    return value >> 1 if not value & 1 else -(value >> 1) - 1


def _s(value: int) -> bytes:
    return _u(_zigzag(value))


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def u(self) -> int:
        value = shift = 0
        while True:
            byte = self.data[self.at]
            self.at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def s(self) -> int:
        return _unzigzag(self.u())

    def take(self, n: int) -> bytes:
        out = self.data[self.at:self.at + n]
        if len(out) != n:
            raise IndexError("stream ends early")
        self.at += n
        return out


@dataclass
class _Table:
    """The parts of a plan's data that the runtime fills from the streams."""

    probes_at: int            # offsets in plan.data
    islands_at: int
    strings_at: int
    nprobes: int
    nislands: int


def _table(plan: ModulePlan) -> _Table:
    t = layout.ffi.from_buffer("struct jp_table *", plan.data)
    base = plan.data_vaddr
    return _Table(t.probes - base, t.islands - base, t.strings - base, t.nprobes, t.nislands)


def address_spec(address: int) -> str:
    """A spec that names only its address: packed as nothing, rebuilt by the runtime."""
    return f"{address:#x}"


def packed_header(plan: ModulePlan) -> bytes:
    """The table's header for a file that carries `plan.packed` at the start of its text."""
    header = bytearray(plan.data[:layout.sizeof("jp_table")])
    t = layout.ffi.from_buffer("struct jp_table *", header)
    t.packed, t.packed_size = plan.text_vaddr, len(plan.packed)
    t.text, t.text_size = plan.text_vaddr, len(plan.text)
    return bytes(header)


Reader = Callable[[int, int], bytes]        # the module's original bytes at (address, size)


def _patched_code(plan: ModulePlan, read: Reader) -> Reader:
    """The module's code as the rewritten file has it."""
    patches = {p.address + k: b for p in plan.probes for k, b in enumerate(p.patched)}

    def code(address: int, size: int) -> bytes:
        original = read(address, size)
        return bytes(patches.get(address + k, b) for k, b in enumerate(original))
    return code


def pack(plan: ModulePlan, read: Reader, check: bool = True) -> bytes:
    """The packed form of `plan` (its table header stays where it is), for the module whose
    original bytes `read` gives; `check`: that it unpacks to the plan."""
    ffi = layout.ffi
    tab = _table(plan)
    probes = ffi.from_buffer("struct jp_probe[]", plan.data[tab.probes_at:tab.probes_at + tab.nprobes * _PROBE_SIZE])
    islands = ffi.from_buffer("struct jp_island[]", plan.data[tab.islands_at:tab.islands_at
                                                              + tab.nislands * layout.sizeof("jp_island")])
    if any(probes[i].flags & layout.CONST["JP_PROBE_RETURN"] for i in range(tab.nprobes)):
        raise ValueError("a %return probe's sites and fields have no packed form")
    pool = plan.data[tab.strings_at:]
    # Address specs sit at the end of the pool in id order (planner._Strings): cut there.
    cut = len(pool)
    for i in reversed(range(tab.nprobes)):
        text = (address_spec(probes[i].address) + "\0").encode()
        if pool[probes[i].spec:probes[i].spec + len(text)] != text:
            continue
        if probes[i].spec + len(text) != cut:
            break
        cut = probes[i].spec
    by_spec = {i for i in range(tab.nprobes) if probes[i].spec >= cut}

    stream = bytearray()
    previous = 0
    for i in range(tab.nprobes):
        p = probes[i]
        # Trace probes (handler 2) are not packed: their trampolines fit no template, and a
        # program traced is probed at a few sites, where packing gains nothing.
        if p.flags & ~_FLAG_BITS or p.mechanism > 3 or p.handler > 1:
            raise ValueError("a probe the packed format cannot describe")
        strings = i not in by_spec or p.lib or p.func
        follows = i and p.address == previous + probes[i - 1].len
        ext = (p.handler | p.flags << 1 | (_EXT_STRINGS if strings else 0)
               | (_EXT_DEPENDS if p.depends else 0))
        kind = (p.mechanism | (_KIND_NEXT if follows else 0) | (p.len if p.len < 16 else 0) << _KIND_LEN
                | (_KIND_EXT if ext else 0))
        stream += bytes([kind]) + (bytes([ext]) if ext else b"") + (b"" if follows else _s(p.address - previous))
        if strings:
            stream += _u(0 if i in by_spec else p.spec) + _u(p.lib) + _u(p.func)
        if p.depends:
            stream += _s(p.depends - 1 - i)
        stream += (b"" if 0 < p.len < 16 else _u(p.len)) + bytes(p.original)[:p.len]
        if p.flags & _NOVEC:
            stream += p.cb_build_id.to_bytes(8, "little")
        previous = p.address
    probe_stream = bytes(stream)

    # An island is where a jump in its probe's patch lands: the file has the patched
    # code, so the island is the offset of that jump's rel32 from the probe's address.
    code = _patched_code(plan, read)
    stream = bytearray()
    prev_probe = 0
    for isl in islands:
        if bytes(isl.code)[:isl.len] != arch.jump_bytes(isl.at, isl.target, arch.JUMP_SIZE) or isl.fixup != arch.JUMP_FIXUP:
            raise ValueError("an island that is not a jmp rel32")
        site = probes[isl.probe].address
        window = code(site + 1, layout.CONST["JP_PATCH_MAX"] + 3)     # every rel32 that may land
        lands = [k for k in range(1, len(window) - 2)
                 if site + k + 4 + int.from_bytes(window[k - 1:k + 3], "little", signed=True) == isl.at]
        if not lands:
            raise ValueError("an island no jump of its probe's patch lands on")
        # Most islands hop to their probe's trampoline; others (an evicted instruction's
        # own way) to a place a little further in its code.
        entry = plan.probes[isl.probe].trampoline
        if isl.target == entry:
            stream += _s(isl.probe - prev_probe) + _u(lands[0] << 1)
        else:
            stream += _s(isl.probe - prev_probe) + _u(lands[0] << 1 | 1) + _s(isl.target - (entry or 0))
        prev_probe = isl.probe
    island_stream = bytes(stream)

    templates = count_templates()
    text_stream = _pack_text(plan, probes, tab, templates)

    header = ffi.new("struct jp_packed *")
    header.magic = MAGIC
    header.ntemplates = len(templates)
    parts = [b"".join(_template_bytes(t) for t in templates), probe_stream, island_stream, pool[:cut], text_stream]
    offsets, at = [], layout.sizeof("jp_packed")
    for part in parts:
        offsets.append(at)
        at += len(part)
    header.templates = offsets[0]
    header.probes, header.probes_size = offsets[1], len(probe_stream)
    header.islands, header.islands_size = offsets[2], len(island_stream)
    header.strings, header.strings_size = offsets[3], cut
    header.text, header.text_size = offsets[4], len(text_stream)
    blob = bytes(ffi.buffer(header)) + b"".join(parts)
    if not check:
        return blob
    text, data = unpack(blob, plan, read)
    if text != plan.text or data != plan.data[tab.probes_at:]:
        raise AssertionError(f"{plan.module}: internal error: the packed table does not unpack to the plan")
    return blob


def _template_bytes(t: Template) -> bytes:
    rec = layout.ffi.new("struct jp_template *")
    rec.len, rec.nholes = len(t.code), len(t.holes)
    for h, (at, end, kind) in zip(rec.holes, t.holes):
        h.at, h.end, h.kind = at, end, kind
    rec.code = t.code + bytes(_MAX_CODE - len(t.code))
    return bytes(layout.ffi.buffer(rec))


def _op(op: int, arg: int) -> bytes:
    """An operation byte with its argument inline when it is small."""
    return bytes([op << 5 | arg]) if arg < _ARG else bytes([op << 5 | _ARG]) + _u(arg)


def _pack_text(plan: ModulePlan, probes, tab: _Table, templates: list[Template]) -> bytes:
    """Operations that lay out plan.text again."""
    text, base = plan.text, plan.text_vaddr
    hits = plan.data_vaddr + tab.probes_at + _HITS
    tls = plan.data_vaddr + _TLS
    # Each probe's code is one run starting at its trampoline, or at its resume copy.
    starts: dict[int, int] = {}
    resumes: dict[int, list[int]] = {}
    for i, p in enumerate(plan.probes):
        start = p.trampoline if p.trampoline is not None else p.resume
        if start is not None:
            starts[start - base] = i
        if p.resume is not None:
            resumes.setdefault(p.resume - base, []).append(i)
    out = bytearray()
    lit = bytearray()

    def flush() -> None:
        if lit:
            out.extend(_op(OP["LIT"], len(lit)) + lit)
            lit.clear()

    def boundary(at: int) -> bool:
        return at in starts or at in resumes

    def whole(at: int) -> bool:
        """Whether a jump at `at` is one piece: no instruction starts or resumes inside it."""
        return not any(boundary(at + k) for k in range(1, arch.JUMP_SIZE))

    owner = -1                          # none yet: the code before any probe's
    original = b""
    pos = 0
    end = len(text)
    entered = -1
    while pos < end:
        if boundary(pos) and entered != pos:
            entered = pos
            flush()
            new = starts.get(pos, owner)
            p = probes[new]
            original = bytes(p.original)[:p.len]
            # A count trampoline's first operation names its probe too.
            k = None
            if (pos in starts and plan.probes[new].trampoline == base + pos and pos not in resumes
                    and p.handler == layout.HANDLERS["count"]):
                k = next((k for k, t in enumerate(templates) if text[pos:pos + len(t.code)]
                          == t.fill(base + pos, new, hits + new * _PROBE_SIZE, tls)), None)
            if k is not None:
                after = pos + len(templates[k].code)
                resumes_after = resumes.get(after) == [new]
                out.extend(_op(OP["COUNT"], k | (_COUNT_RESUMES if resumes_after else 0) | _zigzag(new - owner) << 3))
                owner = new
                pos = after
                entered = pos if resumes_after else entered        # that resume is said
                continue
            if new != owner:
                out.extend(_op(OP["PROBE"], _zigzag(new - owner)))
                owner = new
            for i in resumes.get(pos, ()):
                out.extend(_op(OP["RESUME"], _zigzag(i - owner)))
            continue
        if original:
            # The displaced instruction as it was, and the jump back after it: one byte.
            n = 0
            while n < len(original) and pos + n < end and text[pos + n] == original[n] and not boundary(pos + n + 1):
                n += 1
            back = pos + n
            if n and arch.jump_target(text, back, base + back) == probes[owner].address + n and whole(back):
                flush()
                out.extend(_op(OP["COPYJMP"], n))
                pos = back + arch.JUMP_SIZE
                continue
        target = arch.jump_target(text, pos, base + pos) if owner >= 0 else None
        if target is not None and whole(pos):
            flush()
            out.extend(_op(OP["JMP"], _zigzag(target - probes[owner].address)))
            pos += arch.JUMP_SIZE
            continue
        if original:
            k = original.find(text[pos:pos + 2])
            if k >= 0:
                n = 2
                while (pos + n < end and k + n < len(original) and text[pos + n] == original[k + n]
                       and not boundary(pos + n)):
                    n += 1
                if n >= 3 or (n == 2 and k == 0):
                    flush()
                    out.extend(_op(OP["COPY0"], n) if k == 0 else _op(OP["COPY"], n) + _u(k))
                    pos += n
                    continue
        lit.append(text[pos])
        pos += 1
    flush()
    return bytes(out)


def unpack(blob: bytes, plan: ModulePlan, read: Reader) -> tuple[bytes, bytes]:
    """(the trampolines, the table's bytes from its probes on): what the runtime writes,
    reading the rewritten module's code as it does."""
    ffi = layout.ffi
    h = ffi.from_buffer("struct jp_packed *", blob)
    if bytes(ffi.buffer(h.magic)) != MAGIC:
        raise ValueError("not a packed table")
    tab = _table(plan)
    size = layout.sizeof("jp_template")
    templates = []
    for k in range(h.ntemplates):
        rec = ffi.from_buffer("struct jp_template *", blob[h.templates + k * size:h.templates + (k + 1) * size])
        templates.append(Template(bytes(rec.code)[:rec.len],
                                  tuple((x.at, x.end, x.kind) for x in list(rec.holes)[:rec.nholes])))

    probes = ffi.new("struct jp_probe[]", max(tab.nprobes, 1))
    pool = bytearray(blob[h.strings:h.strings + h.strings_size])
    r = _Reader(blob[h.probes:h.probes + h.probes_size])
    address = 0
    for i in range(tab.nprobes):
        p = probes[i]
        kind = r.take(1)[0]
        ext = r.take(1)[0] if kind & _KIND_EXT else 0
        address = address + probes[i - 1].len if kind & _KIND_NEXT else address + r.s()
        p.address, p.mechanism, p.handler, p.flags = address, kind & 3, ext & 1, ext >> 1 & _FLAG_BITS
        spec = 0
        if ext & _EXT_STRINGS:
            spec, p.lib, p.func = r.u(), r.u(), r.u()
        if not spec:
            spec = len(pool)
            pool += (address_spec(address) + "\0").encode()
        p.depends = 1 + i + r.s() if ext & _EXT_DEPENDS else 0
        n = kind >> _KIND_LEN & 15 or r.u()
        p.spec, p.id, p.len = spec, i, n
        p.original = r.take(n) + bytes(16 - n)
        if p.flags & _NOVEC:
            p.cb_build_id = int.from_bytes(r.take(8), "little")

    base = plan.text_vaddr
    hits = plan.data_vaddr + tab.probes_at + _HITS
    tls = plan.data_vaddr + _TLS
    text = bytearray()
    r = _Reader(blob[h.text:h.text + h.text_size])
    owner = -1
    entry: dict[int, int] = {}                     # where each probe's code starts
    while r.at < len(r.data):
        byte = r.take(1)[0]
        op, arg = byte >> 5, byte & 0x1F
        if arg == _ARG:
            arg = r.u()
        if op == OP["LIT"]:
            text += r.take(arg)
        elif op == OP["PROBE"]:
            owner += _unzigzag(arg)
            entry.setdefault(owner, base + len(text))
        elif op == OP["RESUME"]:
            probes[owner + _unzigzag(arg)].resume = base + len(text)
        elif op == OP["COUNT"]:
            owner += _unzigzag(arg >> 3)
            entry.setdefault(owner, base + len(text))
            text += templates[arg & 3].fill(base + len(text), owner, hits + owner * _PROBE_SIZE, tls)
            if arg & _COUNT_RESUMES:
                probes[owner].resume = base + len(text)
        elif op in (OP["COPY"], OP["COPY0"]):
            k = r.u() if op == OP["COPY"] else 0
            text += bytes(probes[owner].original)[k:k + arg]
        elif op == OP["JMP"]:
            text += arch.jump_bytes(base + len(text), probes[owner].address + _unzigzag(arg), arch.JUMP_SIZE)
        elif op == OP["COPYJMP"]:
            text += bytes(probes[owner].original)[:arg]
            text += arch.jump_bytes(base + len(text), probes[owner].address + arg, arch.JUMP_SIZE)
        else:
            raise ValueError(f"unknown operation {op}")

    islands = ffi.new("struct jp_island[]", max(tab.nislands, 1))
    r = _Reader(blob[h.islands:h.islands + h.islands_size])
    probe = 0
    code = _patched_code(plan, read)
    for k in range(tab.nislands):
        isl = islands[k]
        probe += r.s()
        site = probes[probe].address
        off = r.u()
        at = site + (off >> 1) + 4 + int.from_bytes(code(site + (off >> 1), 4), "little", signed=True)
        target = entry.get(probe, 0) + (r.s() if off & 1 else 0)
        isl.at, isl.target, isl.probe = at, target, probe
        isl.len, isl.fixup = arch.JUMP_SIZE, arch.JUMP_FIXUP
        isl.code = arch.jump_bytes(at, target, arch.JUMP_SIZE) + bytes(3)
    data = (bytes(ffi.buffer(probes))[:tab.nprobes * _PROBE_SIZE]
            + bytes(ffi.buffer(islands))[:tab.nislands * layout.sizeof("jp_island")] + bytes(pool))
    return bytes(text), data
