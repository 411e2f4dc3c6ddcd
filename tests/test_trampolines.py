"""The trampoline templates, executed under unicorn from random machine states.

Each case checks the contract of SPEC §4 on the raw code: the counter moves by
exactly one, and every register, flag and byte of the red zone is as it was, or,
for callbacks, the ctx the stub receives mirrors the registers and edits to it
come back.
"""
import struct

import pytest
from hypothesis import given, settings, strategies as st

unicorn = pytest.importorskip("unicorn")
from unicorn import Uc  # noqa: E402
from unicorn import x86_const as U  # noqa: E402

from jprobe import layout  # noqa: E402
from jprobe.trampolines import x86_64 as arch  # noqa: E402
from jprobe.trampolines.asm import CodeBuffer, assemble  # noqa: E402
from support.machine import CODE, DATA, END, GPRS, STACK, STACK_TOP, STATUS_MASK, machine, state  # noqa: E402
from support.properties import examples  # noqa: E402


def run(uc: Uc) -> None:
    uc.emu_start(CODE, END, count=10_000)


FS_BASE, TLS_OFF, BLOCK = DATA + 0x8000, -0x40, DATA + 0x2000


@pytest.mark.parametrize("flags_live", [False, True])
def test_count_slots_are_encoded_as_keystone_assembles_them(flags_live):
    """emit_count encodes each probe's counter slot itself: the bytes are keystone's."""
    for probe_id in [*range(40), 1000, 4095, 70_000, 2**28 - 1]:
        buf = CodeBuffer(CODE)
        arch.emit_count(buf, DATA, probe_id, DATA + 8, flags_live)
        slot = f"qword ptr [rcx + {8 * probe_id}]"
        text = (f"push rax; mov rax, {slot}; lea rax, [rax + 1]; mov {slot}, rax; pop rax" if flags_live
                else f"inc {slot}")
        assert assemble(text) in buf.finish(), probe_id


@settings(max_examples=examples(300), deadline=None)
@given(seed=st.integers(0, 2**32), flags_live=st.booleans(), misalign=st.integers(0, 15),
       path=st.sampled_from(["no runtime", "no block", "thread block"]), probe_id=st.integers(0, 300))
def test_count_moves_one_counter_by_one_and_nothing_else(seed, flags_live, misalign, path, probe_id):
    hits, tls_off = DATA + 0x100, DATA + 0x108
    buf = CodeBuffer(CODE)
    arch.emit_count(buf, hits, probe_id, tls_off, flags_live)
    buf.jmp(END)
    rsp = STACK_TOP - 0x1000 - misalign * 8
    uc = machine(buf.finish(), rsp, seed)
    uc.reg_write(U.UC_X86_REG_FS_BASE, FS_BASE)
    uc.mem_write(hits, struct.pack("<Q", 41))
    if path != "no runtime":
        uc.mem_write(tls_off, struct.pack("<q", TLS_OFF))
        uc.mem_write(FS_BASE + TLS_OFF, struct.pack("<Q", BLOCK if path == "thread block" else 0))
    uc.mem_write(BLOCK + 8 * probe_id, struct.pack("<Q", 6))
    before, stack_before = state(uc), bytes(uc.mem_read(STACK, 0x10000))
    run(uc)
    after = state(uc)
    if not flags_live:
        before.pop("FLAGS"), after.pop("FLAGS")
    assert after == before
    private = struct.unpack("<Q", uc.mem_read(BLOCK + 8 * probe_id, 8))[0]
    shared = struct.unpack("<Q", uc.mem_read(hits, 8))[0]
    assert (shared, private) == ((41, 7) if path == "thread block" else (42, 6))
    red_zone = slice(rsp - STACK - 128, rsp - STACK)
    assert bytes(uc.mem_read(STACK, 0x10000))[red_zone] == stack_before[red_zone]


def _fake_stub(buf: CodeBuffer, dump: int) -> int:
    """A stand-in for the module stub: clears DF, copies the ctx out, then edits rdi and rflags.CF."""
    start = buf.here
    size = layout.sizeof("jprobe_ctx")
    buf.emit("cld; push rcx; push rsi; push rdi")           # as the real stub: DF clear for C
    buf.emit("mov rsi, rdi")
    buf.rip("lea rdi, [rip]", dump)
    buf.emit(f"mov ecx, {size}; rep movsb")
    buf.emit("pop rdi; pop rsi; pop rcx")
    buf.emit(f"mov qword ptr [rdi + {layout.offsetof('jprobe_regs', 'rdi')}], 0x1234")
    buf.emit(f"xor qword ptr [rdi + {layout.offsetof('jprobe_regs', 'rflags')}], 1")
    buf.emit("ret")
    return start


@settings(max_examples=examples(100), deadline=None)
@given(seed=st.integers(0, 2**32), red_zone=st.booleans())
def test_callback_ctx_mirrors_registers_and_edits_come_back(seed, red_zone):
    """red_zone True: a site inside a function; False: a retargeted call (return address pushed)."""
    dump, desc, site = DATA + 0x1000, DATA + 0x100, 0x4242_4242
    buf = CodeBuffer(CODE)
    buf.jmp("body")
    stub = _fake_stub(buf, dump)
    buf.label("body")
    arch.emit_callback(buf, stub, desc, 7, site, red_zone=red_zone, return_pushed=not red_zone)
    buf.jmp(END)
    rsp = STACK_TOP - 0x1000
    uc = machine(buf.finish(), rsp, seed)
    before = state(uc)
    run(uc)
    after = state(uc)
    ctx = uc.mem_read(dump, layout.sizeof("jprobe_ctx"))
    field = lambda name, struct_="jprobe_regs": struct.unpack_from(  # noqa: E731
        "<Q", ctx, layout.offsetof(struct_, name))[0]
    for reg in GPRS:
        assert field(reg.lower()) == before[reg], reg
    assert field("rsp") == rsp + (0 if red_zone else 8)
    assert field("rip") == site and field("address", "jprobe_ctx") == site
    assert field("probe_id", "jprobe_ctx") == 7
    assert field("rflags") & STATUS_MASK == before["FLAGS"]
    expected = dict(before, RDI=0x1234, FLAGS=before["FLAGS"] ^ 1)
    assert after == expected


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2**32))
def test_callback_ctx_rsp_at_a_function_entry(seed):
    """Reached by a jmp at a function entry (no red zone to skip, nothing pushed): ctx->regs.rsp
    is the program's rsp, which points at the caller's return address."""
    dump, desc, site = DATA + 0x1000, DATA + 0x100, 0x4242_4242
    buf = CodeBuffer(CODE)
    buf.jmp("body")
    stub = _fake_stub(buf, dump)
    buf.label("body")
    arch.emit_callback(buf, stub, desc, 7, site, red_zone=False, return_pushed=False)
    buf.jmp(END)
    rsp = STACK_TOP - 0x1000
    uc = machine(buf.finish(), rsp, seed)
    before = state(uc)
    run(uc)
    ctx = uc.mem_read(dump, layout.sizeof("jprobe_ctx"))
    assert struct.unpack_from("<Q", ctx, layout.offsetof("jprobe_regs", "rsp"))[0] == rsp
    assert state(uc) == dict(before, RDI=0x1234, FLAGS=before["FLAGS"] ^ 1)


@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("reg", range(32))
def test_hand_encoded_vector_moves_mean_what_they_say(store, reg):
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    insn = next(Cs(CS_ARCH_X86, CS_MODE_64).disasm(arch._zmov(store, reg, 64 * reg), 0))
    operands = (f"zmmword ptr [rsp + {hex(64 * reg)}], zmm{reg}" if store
                else f"zmm{reg}, zmmword ptr [rsp + {hex(64 * reg)}]")
    assert (insn.mnemonic, insn.op_str.replace("[rsp]", "[rsp + 0x0]")) == ("vmovdqu64", operands)
    k = reg % 8
    insn = next(Cs(CS_ARCH_X86, CS_MODE_64).disasm(arch._kmov(store, k, 2048 + 8 * k), 0))
    assert insn.mnemonic == "kmovq" and f"k{k}" in insn.op_str and hex(2048 + 8 * k) in insn.op_str


@pytest.mark.parametrize("code, dead", [
    ("01d8" "7700", True),                      # add eax, ebx; ja: written before read
    ("7700", False),                            # ja reads them
    ("f3480f38f6c3" "4801c3", False),           # adox reads OF (capstone does not say so)
    ("d3e0" "7700", False),                     # shl eax, cl writes nothing when cl is 0
    ("d1e0" "7700", True),                      # shl eax, 1 always writes them
    ("e800000000", True),                       # a call: the SysV ABI passes no flags
])
def test_flags_dead_after(code, dead):
    assert arch.flags_dead_after(arch.decode(bytes.fromhex(code), 0x1000)) is dead
