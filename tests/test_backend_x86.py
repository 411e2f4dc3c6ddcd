"""The x86-64 back end's byte-level contracts, checked by decoding with capstone and by running
under unicorn: patch encodings (jump, call, trap), instruction facts on hand-picked encodings
(each true and false case), the hand-encoded slots and vector moves, and the stack the count
and callback trampolines may touch.
"""
from __future__ import annotations

import random
import struct

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

unicorn = pytest.importorskip("unicorn")
from unicorn import UC_HOOK_CODE, UC_HOOK_MEM_WRITE  # noqa: E402
from unicorn import x86_const as U  # noqa: E402

from jprobe import layout  # noqa: E402
from jprobe.errors import RelocationError  # noqa: E402
from jprobe.trampolines import x86_64 as arch  # noqa: E402
from jprobe.trampolines.asm import CodeBuffer, assemble  # noqa: E402
from support.machine import CODE, DATA, END, STACK, STACK_TOP, machine, state  # noqa: E402

_cs = Cs(CS_ARCH_X86, CS_MODE_64)
_cs.detail = True


def insns(code: bytes, address: int) -> list:
    return list(_cs.disasm(code, address))


def one(hexcode: str, address: int = 0x1000):
    return arch.decode_one(bytes.fromhex(hexcode), address)


def asm1(text: str, address: int = 0x1000):
    return arch.decode_one(assemble(text), address)


# ---------------------------------------------------------------------------------------------
# Patch encodings


@pytest.mark.parametrize("source, target", [(0x401000, 0x401234), (0x401234, 0x401000),
                                            (0x7F00_0000, 0x10), (0x10, 0x7F00_0010), (0x5000, 0x5000)])
@pytest.mark.parametrize("length", [5, 6, 8, 13])
def test_jump_bytes_decode_to_one_jump_then_int3_padding(source, target, length):
    code = arch.jump_bytes(source, target, length)
    assert len(code) == length
    first, *rest = insns(code, source)
    assert (first.mnemonic, first.size, first.operands[0].imm) == ("jmp", 5, target)
    assert code[arch.JUMP_SIZE:] == b"\xcc" * (length - 5)
    assert [i.mnemonic for i in rest] == ["int3"] * (length - 5)
    assert code[arch.JUMP_FIXUP:arch.JUMP_FIXUP + 4] == struct.pack("<i", target - source - 5)
    # jump_target reads back where it goes, wherever the jump sits in a bigger buffer
    assert arch.jump_target(code, 0, source) == target
    assert arch.jump_target(b"\x90" * 3 + code, 3, source) == target


def test_jump_target_finds_no_jump_where_there_is_none():
    code = arch.jump_bytes(0x1000, 0x2000, 5)
    assert arch.jump_target(code[:4], 0, 0x1000) is None              # cut short
    assert arch.jump_target(code + b"\x90", 1, 0x1001) is None         # not at a jump
    assert arch.jump_target(b"\xe8" + code[1:], 0, 0x1000) is None      # a call, not a jump
    assert arch.jump_target(b"\x90" + code[:4], 1, 0x1001) is None     # runs past the end
    assert arch.jump_target(b"\x90" + code, 1, 0x1000) == 0x2000        # `address` is the jump's own
    assert arch.jump_target(bytearray(code), 0, 0x1000) == 0x2000


@pytest.mark.parametrize("source, target", [(0x401000, 0x402000), (0x402000, 0x401000), (0x10, 0x7F00_0000)])
@pytest.mark.parametrize("length", [5, 6, 7])
def test_call_bytes_return_where_the_original_call_did(source, target, length):
    code = arch.call_bytes(source, target, length)
    assert len(code) == length
    decoded = insns(code, source)
    assert [i.mnemonic for i in decoded] == ["nop"] * (length - 5) + ["call"]
    call = decoded[-1]
    assert call.operands[0].imm == target
    assert call.address + call.size == source + length               # the return address
    fixup = arch.call_fixup(length)
    assert code[fixup:fixup + 4] == struct.pack("<i", target - (source + length))
    assert code[fixup - 1] == 0xE8


@pytest.mark.parametrize("length", [1, 2, 5, 7])
def test_trap_bytes_put_int3_over_the_first_byte_only(length):
    original = bytes(range(0x40, 0x50))
    code = arch.trap_bytes(length, original)
    assert code == b"\xcc" + original[1:length]


# ---------------------------------------------------------------------------------------------
# Decoding and instruction facts


def test_decode_one_and_decode_lazily():
    code = assemble("nop; push rax; pop rax; ret")
    assert arch.decode_one(code, 0x1000).mnemonic == "nop"
    assert arch.decode_one(b"\x06", 0x1000) is None                  # invalid in 64-bit mode
    assert arch.decode_one(b"", 0x1000) is None
    lazy = list(arch.decode_lazily(code, 0x1000, 2))
    assert [(i.address, i.mnemonic) for i in lazy] == [(0x1000, "nop"), (0x1001, "push")]
    assert lazy[1].operands                                           # with details


@pytest.mark.parametrize("opcode", [b"\xe9", b"\xe8"])
def test_sweep_agrees_with_decode_past_the_sign_bit(opcode):
    """A target at 2**63 comes out as capstone's signed number, as decode gives it."""
    address = 2**63 - 5
    code = opcode + b"\0\0\0\0"
    expected = [(arch.branch_target(i), arch.is_call(i)) for i in arch.decode(code, address)]
    assert arch.sweep(code, address).branches == expected


def test_sweep_short_branch_at_the_sign_bit():
    code = b"\x75\x00"                                                # jne to 2**63
    found = arch.sweep(code, 2**63 - 2)
    assert found.branches == [(arch.branch_target(i), False) for i in arch.decode(code, 2**63 - 2)]


def test_references_reports_an_undecodable_tail():
    with pytest.raises(RelocationError, match="0x1000"):
        arch.references(assemble("nop") + b"\x06", 0x1000)


@pytest.mark.parametrize("text, ends", [
    ("ret", True), ("ret 8", True), ("iretq", True), ("jmp 0x2000", True), ("jmp rax", True),
    ("ud2", True), ("hlt", True), ("int3", True),
    ("call 0x2000", False), ("je 0x2000", False), ("nop", False), ("int 0x80", False), ("syscall", False),
])
def test_ends_flow(text, ends):
    assert bool(arch.ends_flow(asm1(text))) is ends


@pytest.mark.parametrize("text, transfer", [
    ("jmp 0x2000", True), ("jmp rax", True), ("je 0x2000", True), ("call 0x2000", True),
    ("call qword ptr [rax]", True), ("ja 0x1010", True),
    ("nop", False), ("mov rax, rbx", False), ("push rax", False),
])
def test_is_transfer(text, transfer):
    assert bool(arch.is_transfer(asm1(text))) is transfer
    assert arch.is_transfer(one("e30e"))                                        # jrcxz
    assert arch.is_transfer(one("e2fe")) and arch.is_transfer(one("e0fe"))      # loop, loopne


@pytest.mark.parametrize("hexcode, rel32", [
    ("e800000000", True),
    ("3eff542408", False),          # notrack call [rsp+8]: a 5-byte call, not rel32
    ("ffd0", False),                # call rax
    ("e900000000", False),          # jmp rel32
    ("ff1510000000", False),
])
def test_is_rel32_call(hexcode, rel32):
    assert bool(arch.is_rel32_call(one(hexcode))) is rel32


@pytest.mark.parametrize("hexcode, rip_call", [
    ("ff1510000000", True),         # call [rip+0x10]
    ("ff15f0ffffff", True),
    ("3eff1510000000", False),      # notrack call [rip+0x10]: 7 bytes
    ("ff9010000000", False),        # call [rax+0x10]: 6 bytes, not rip
    ("ff2510000000", False),        # jmp [rip+0x10]
    ("ff0510000000", False),        # inc dword ptr [rip+0x10]
    ("ffd0", False), ("ff10", False), ("41ffd0", False), ("e800000000", False),
])
def test_is_rip_indirect_call(hexcode, rip_call):
    assert bool(arch.is_rip_indirect_call(one(hexcode))) is rip_call


@pytest.mark.parametrize("code, dead", [
    ("inc eax; sete al; add eax, ebx", True),      # sete reads ZF, written by inc: only CF pending, add writes it
    ("inc eax; adc eax, ebx", False),              # adc reads CF, which inc leaves
    ("shld eax, ebx, 4; ja 0x40", True),           # an immediate count writes the flags
    ("shld eax, ebx, cl; ja 0x40", False),         # a count in cl may write none
    ("inc eax; jrcxz 0x40; add eax, ebx", False),  # another branch: conservatively live
    ("inc eax; jmp 0x40", False),
    ("inc eax", False),                            # the code ends with CF pending
    ("nop", False),
    ("ret", True),
    ("inc eax; ret", True),
    ("xor eax, eax", True),
])
def test_flags_dead_after(code, dead):
    assert arch.flags_dead_after(arch.decode(assemble(code), 0)) is dead


@pytest.mark.parametrize("text, vector", [
    ("fincstp", True),              # x87 group, no register capstone names
    ("xsave [rax]", True),      # no group: known by its mnemonic
    ("fnstsw ax", True),            # no group: known by the x87 status word it reads
    ("emms", True), ("addps xmm0, xmm1", True), ("movd eax, mm0", True), ("ldmxcsr dword ptr [rax]", True),
    ("add rax, rbx", False), ("mov qword ptr [rsp], rax", False), ("ret", False), ("nop", False),
])
def test_vector_state_use(text, vector):
    assert arch.vector_state_use(asm1(text)) is vector


# ---------------------------------------------------------------------------------------------
# Hand encodings


@pytest.mark.parametrize("disp", [0, 1, -1, 127, 128, -128, -129, 0x7FF8, -0x8000, 2**31 - 8, -2**31])
@pytest.mark.parametrize("opcode, text", [(arch._INC, "inc qword ptr [rcx{}]"),
                                          (arch._MOV_LOAD, "mov rax, qword ptr [rcx{}]"),
                                          (arch._MOV_STORE, "mov qword ptr [rcx{}], rax")])
def test_rcx_qword_is_keystones_encoding(disp, opcode, text):
    operand = f" + {disp}" if disp > 0 else f" - {-disp}" if disp < 0 else ""
    assert arch._rcx_qword(opcode, disp) == assemble(text.format(operand))


def _mem(insn):
    op = next(o for o in insn.operands if o.type == 3)
    return insn.reg_name(op.mem.base), op.mem.index, op.mem.disp


@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("disp", [0, 64, 2048, 2104, -64, 0x12345])
def test_vector_and_mask_moves_decode_to_what_they_say(store, disp):
    for reg in (0, 5, 7, 8, 15, 16, 31):
        insn = insns(arch._zmov(store, reg, disp), 0)[0]
        assert insn.size == 11 and insn.mnemonic == "vmovdqu64"
        regs = [insn.reg_name(o.reg) for o in insn.operands if o.type == 1]
        assert regs == [f"zmm{reg}"] and _mem(insn) == ("rsp", 0, disp)
        assert (insn.operands[0].type == 3) is store
    for k in range(8):
        code = arch._kmov(store, k, disp)
        insn = insns(code, 0)[0]
        assert insn.size == len(code) == 10 and insn.mnemonic == "kmovq"
        regs = [insn.reg_name(o.reg) for o in insn.operands if o.type == 1]
        assert regs == [f"k{k}"] and _mem(insn) == ("rsp", 0, disp)
        assert (insn.operands[0].type == 3) is store


# ---------------------------------------------------------------------------------------------
# The stack the count and callback trampolines touch

FS_BASE, TLS_OFF, BLOCK = DATA + 0x8000, -0x40, DATA + 0x2000


def _machine(code: bytes, rsp: int, seed: int):
    """support.machine's machine, with a thread pointer and its stores recorded."""
    uc = machine(code, rsp, seed)
    uc.reg_write(U.UC_X86_REG_FS_BASE, FS_BASE)
    writes = []
    uc.hook_add(UC_HOOK_MEM_WRITE, lambda uc, access, address, size, value, data: writes.append((address, size)))
    return uc, writes


def _stack_writes(writes):
    return [(a, s) for a, s in writes if STACK <= a < STACK_TOP]


@pytest.mark.parametrize("flags_live", [False, True])
@pytest.mark.parametrize("path", ["no runtime", "no block", "thread block"])
@pytest.mark.parametrize("red_zone", [False, True])
def test_count_stack_use(flags_live, path, red_zone):
    """With a red zone, nothing in the 128 bytes below rsp is touched; without one (a function
    entry, a retargeted call) the count keeps to the two words it pushes right below rsp."""
    hits, tls_off = DATA + 0x100, DATA + 0x108
    buf = CodeBuffer(CODE)
    arch.emit_count(buf, hits, 9, tls_off, flags_live, red_zone=red_zone)
    arch.emit_count(buf, hits, 9, tls_off, flags_live, red_zone=red_zone)     # twice: labels are its own
    buf.jmp(END)
    rsp = STACK_TOP - 0x1000
    uc, writes = _machine(buf.finish(), rsp, 5)
    if path != "no runtime":
        uc.mem_write(tls_off, struct.pack("<q", TLS_OFF))
        uc.mem_write(FS_BASE + TLS_OFF, struct.pack("<Q", BLOCK if path == "thread block" else 0))
    before = state(uc)
    uc.emu_start(CODE, END, count=1000)
    after = state(uc)
    if not flags_live:
        before.pop("FLAGS"), after.pop("FLAGS")
    assert after == before
    counts = (struct.unpack("<Q", uc.mem_read(hits, 8))[0], struct.unpack("<Q", uc.mem_read(BLOCK + 72, 8))[0])
    assert counts == ((0, 2) if path == "thread block" else (2, 0))
    low, high = (rsp - 128 - 16, rsp - 128) if red_zone else (rsp - 16, rsp)
    for address, size in _stack_writes(writes):
        assert low <= address and address + size <= high, (hex(rsp - address), size)


def _recording_stub(buf: CodeBuffer, dump: int) -> int:
    """A stand-in for the module stub: stores rdi (the ctx) at `dump`, changes rdi's slot."""
    start = buf.here
    buf.rip("mov qword ptr [rip], rdi", dump)
    buf.emit(f"mov qword ptr [rdi + {layout.offsetof('jprobe_regs', 'rdi')}], 0x1234; ret")
    return start


@pytest.mark.parametrize("kwargs", [{}, {"red_zone": True}, {"red_zone": False},
                                    {"red_zone": False, "return_pushed": True},
                                    {"red_zone": True, "return_pushed": False}])
def test_callback_ctx_place_and_defaults(kwargs):
    """The ctx is pushed right below the red zone (or right below rsp without one); ctx->regs.rsp
    is the program's rsp (8 higher when the probed call pushed its return address); two
    callback trampolines share one buffer. The defaults: a red zone, nothing pushed."""
    red_zone = kwargs.get("red_zone", True)
    pushed = kwargs.get("return_pushed", False)
    dump, desc = DATA + 0x1000, DATA + 0x100
    buf = CodeBuffer(CODE)
    buf.jmp("body")
    stub = _recording_stub(buf, dump)
    buf.label("body")
    arch.emit_callback(buf, stub, desc, 3, 0x4242, **kwargs)
    arch.emit_callback(buf, stub, desc, 3, 0x4242, **kwargs)
    buf.jmp(END)
    rsp = STACK_TOP - 0x1000
    uc, writes = _machine(buf.finish(), rsp, 11)
    before = state(uc)
    uc.emu_start(CODE, END, count=2000)
    assert state(uc) == dict(before, RDI=0x1234)
    size = layout.sizeof("jprobe_ctx")
    ctx = struct.unpack("<Q", uc.mem_read(dump, 8))[0]
    assert ctx + size == rsp - (128 if red_zone else 0)
    regs = bytes(uc.mem_read(ctx, size))
    assert struct.unpack_from("<Q", regs, layout.offsetof("jprobe_regs", "rsp"))[0] == rsp + (8 if pushed else 0)
    if red_zone:
        assert not [w for w in _stack_writes(writes) if w[0] + w[1] > rsp - 128]


# ---------------------------------------------------------------------------------------------
# Displaced instructions and call continuations

SITE = 0x401000


@pytest.mark.parametrize("tail, falls_through", [("add rax, 1", True), ("ret", False), ("jmp rbx", False),
                                                 ("push rbx", True)])
def test_displaced_copy_refers_to_the_same_addresses_and_returns(tail, falls_through):
    original = assemble("mov rax, qword ptr [rip + 0x100]") + assemble(tail)
    moved = arch.decode(original, SITE)
    where = 0x500000
    buf = CodeBuffer(where)
    buf.emit("nop")                                        # not at the buffer's start
    copies = arch.emit_displaced(buf, moved)
    code = buf.finish()
    out = insns(code[1:], where + 1)
    assert [(a, c) for a, c in copies] == [(moved[0].address, where + 1), (moved[1].address, out[1].address)]
    load = out[0]
    assert load.mnemonic == "mov" and load.address + load.size + load.disp == SITE + 7 + 0x100
    assert (load.address - where + load.disp_offset, SITE + 7 + 0x100) in buf.references
    assert (out[1].mnemonic, out[1].op_str) == (moved[1].mnemonic, moved[1].op_str)
    if falls_through:
        assert len(out) == 3 and out[2].mnemonic == "jmp" and out[2].operands[0].imm == SITE + len(original)
        assert (out[2].address + 1 - where, SITE + len(original)) in buf.references
    else:
        assert len(out) == 2 and out[1].address + out[1].size == where + len(code)


@pytest.mark.parametrize("hexcode", ["e8fb0f0000", "ff1500100000"])
def test_call_continuation_goes_on_to_the_callee(hexcode):
    """A retargeted call's trampoline ends jumping where the call went: its rel32 target, or
    the address in its GOT slot."""
    call = one(hexcode, SITE)
    buf = CodeBuffer(0x500000)
    arch.emit_call_continuation(buf, call)
    jump = insns(buf.finish(), 0x500000)
    assert len(jump) == 1 and jump[0].mnemonic == "jmp"
    if call.size == 5:
        assert jump[0].operands[0].imm == SITE + 5 + 0xFFB
    else:
        assert jump[0].operands[0].type == 3 and jump[0].reg_name(jump[0].operands[0].mem.base) == "rip"
        assert jump[0].address + jump[0].size + jump[0].disp == SITE + 6 + 0x1000


# ---------------------------------------------------------------------------------------------
# The module stub, run under unicorn. Unicorn has SSE and x87 but neither AVX nor AVX-512: the
# few VEX/EVEX moves the stub makes are carried out by the hook below on a model of the
# zmm and mask registers (a VEX load zeroes what is above it; vzeroupper the bits above 128 of
# zmm0-15), which also says whether the CPU the mode names would have them at all.

TABLE, PROBE, REC = DATA, DATA + 0x400, DATA + 0x800
GUARD_OFF = -0x48
CALLER, CALLBACK = CODE + 0x4000, CODE + 0x5000
CTX = STACK_TOP - 0x800
MXCSR_PROGRAM, MXCSR_CALLBACK = 0x1FA0, 0x7F80            # the callback changes the rounding mode
VEC = {name: layout.CONST[f"JP_VEC_{name}"] for name in ("NONE", "SSE", "AVX", "AVX512")}
NEEDS = {"vmovdqu": VEC["AVX"], "vzeroupper": VEC["AVX"], "vmovdqu64": VEC["AVX512"], "kmovq": VEC["AVX512"]}


def _probe_field(name):
    return PROBE + layout.offsetof("jp_probe", name)


def _stub_machine(*, vec_mode, novec=False, callback=True, guard=0, block=True, df=False, x87=False, seed=0):
    rnd = random.Random(seed)
    buf = CodeBuffer(CODE)
    stubs = arch.ModuleStubs(buf, TABLE)
    assert stubs.common == CODE and CODE < stubs.common_x87 < CALLER
    buf.raw(b"\xcc" * (CALLER - buf.here))
    buf.rip("ldmxcsr dword ptr [rip]", REC + 56)
    buf.emit("fld1; fldpi")
    buf.call(stubs.common_x87 if x87 else stubs.common)
    buf.rip("stmxcsr dword ptr [rip]", REC + 48)
    buf.jmp(END)
    buf.raw(b"\xcc" * (CALLBACK - buf.here))
    buf.rip("mov qword ptr [rip], rdi", REC)
    buf.rip("mov qword ptr [rip], rsp", REC + 8)
    buf.emit("pushfq; pop rax")
    buf.rip("mov qword ptr [rip], rax", REC + 16)
    buf.rip("mov rcx, qword ptr [rip]", TABLE + layout.offsetof("jp_table", "guard_off"))
    buf.emit("movzx eax, byte ptr fs:[rcx]")
    buf.rip("mov qword ptr [rip], rax", REC + 24)
    buf.rip("inc qword ptr [rip]", REC + 32)
    if not novec:                                       # else it provably leaves them alone
        buf.emit("; ".join(f"pcmpeqd xmm{i}, xmm{i}" for i in range(16)))
        buf.rip("ldmxcsr dword ptr [rip]", REC + 40)
        buf.emit("fninit")
    buf.emit("mov rsi, -1; mov rdi, -1; mov rdx, -1; mov r8, -1; mov r9, -1; mov r10, -1; mov r11, -1; ret")
    uc, _ = _machine(buf.finish(), STACK_TOP - 0x1000, seed)
    uc.mem_write(TABLE + layout.offsetof("jp_table", "vec_mode"), struct.pack("<Q", vec_mode))
    uc.mem_write(TABLE + layout.offsetof("jp_table", "tls_off"), struct.pack("<q", TLS_OFF))
    uc.mem_write(TABLE + layout.offsetof("jp_table", "guard_off"), struct.pack("<q", GUARD_OFF))
    uc.mem_write(FS_BASE + TLS_OFF, struct.pack("<Q", BLOCK if block else 0))
    uc.mem_write(FS_BASE + GUARD_OFF, bytes([guard]))
    uc.mem_write(_probe_field("id"), struct.pack("<I", 5))
    uc.mem_write(_probe_field("hits"), struct.pack("<Q", 40))
    uc.mem_write(_probe_field("callback"), struct.pack("<Q", CALLBACK if callback else 0))
    uc.mem_write(_probe_field("flags"), struct.pack("<I", layout.CONST["JP_PROBE_NOVEC"] if novec else 0))
    uc.mem_write(BLOCK + 8 * 5, struct.pack("<Q", 70))
    uc.mem_write(REC + 40, struct.pack("<I", MXCSR_CALLBACK))
    uc.mem_write(REC + 56, struct.pack("<I", MXCSR_PROGRAM))
    rflags = 0x202 | (0x400 if df else 0)
    uc.reg_write(U.UC_X86_REG_EFLAGS, rflags)
    uc.mem_write(CTX + layout.offsetof("jprobe_regs", "rflags"), struct.pack("<Q", rflags))
    uc.reg_write(U.UC_X86_REG_RDI, CTX)
    uc.reg_write(U.UC_X86_REG_RSI, PROBE)
    for i in range(16):
        uc.reg_write(getattr(U, f"UC_X86_REG_XMM{i}"), rnd.getrandbits(128))
    model = {"zmm": [rnd.randbytes(64) for _ in range(32)], "k": [rnd.randbytes(8) for _ in range(8)]}
    return uc, model


class _Run:
    def __init__(self, uc, model, vec_mode, seed=0):
        self.uc, self.model, self.vec_mode = uc, model, vec_mode
        self.before = {"model": {k: list(v) for k, v in model.items()},
                       "xmm": [uc.reg_read(getattr(U, f"UC_X86_REG_XMM{i}")) for i in range(16)],
                       "regs": state(uc)}
        self.unavailable = []                 # instructions the CPU of vec_mode would not have
        self.entry_upper = None               # bits above 128 of zmm0-15 as the callback starts
        self.rnd = random.Random(seed + 1)
        uc.hook_add(UC_HOOK_CODE, self._hook)
        uc.emu_start(CALLER, END, count=20_000)

    def _hook(self, uc, address, size, _):
        if address == CALLBACK:
            self.entry_upper = [z[16:] for z in self.model["zmm"][:16]]
            self.model["zmm"] = [self.rnd.randbytes(64) for _ in range(32)]      # the callback's doing
            self.model["k"] = [self.rnd.randbytes(8) for _ in range(8)]
            return
        if not CODE <= address < CALLER:
            return
        insn = arch.decode_one(bytes(uc.mem_read(address, 16)), address)
        if insn.mnemonic not in NEEDS:
            return
        if NEEDS[insn.mnemonic] > max(self.vec_mode, VEC["SSE"]):
            self.unavailable.append(insn.mnemonic)
        if insn.mnemonic == "vzeroupper":
            self.model["zmm"][:16] = [z[:16] + bytes(48) for z in self.model["zmm"][:16]]
            return                                                              # unicorn runs it
        store = insn.operands[0].type == 3
        mem = insn.operands[0 if store else 1].mem
        reg = insn.reg_name(insn.operands[1 if store else 0].reg)
        assert insn.reg_name(mem.base) == "rsp" and mem.index == 0
        at = uc.reg_read(U.UC_X86_REG_RSP) + mem.disp
        kind, n = ("k", int(reg[1:])) if reg.startswith("k") else ("zmm", int(reg[3:]))
        width = {"y": 32, "z": 64, "k": 8}[reg[0]]
        if store:
            uc.mem_write(at, self.model[kind][n][:width])
        else:
            full = 64 if kind == "zmm" else 8
            self.model[kind][n] = bytes(uc.mem_read(at, width)) + bytes(full - width)
        uc.reg_write(U.UC_X86_REG_RIP, address + insn.size)

    def q(self, at, fmt="<Q"):
        return struct.unpack(fmt, self.uc.mem_read(at, struct.calcsize(fmt)))[0]

    @property
    def called(self):
        return self.q(REC + 32)


@pytest.mark.parametrize("vec_mode", sorted(VEC.values()))
@pytest.mark.parametrize("df", [False, True])
@pytest.mark.parametrize("x87", [False, True])
def test_module_stub_calls_the_callback_with_all_vector_state_kept(vec_mode, df, x87):
    uc, model = _stub_machine(vec_mode=vec_mode, df=df, x87=x87, seed=vec_mode)
    run = _Run(uc, model, vec_mode)
    assert run.called == 1
    assert run.q(REC) == CTX                                   # rdi: the ctx
    assert run.q(REC + 8) % 16 == 8                            # the C ABI's alignment at entry
    assert not run.q(REC + 16) & 0x400                         # DF clear in the callback
    assert run.q(REC + 24) == 1                                # the guard is up during it
    assert uc.mem_read(FS_BASE + GUARD_OFF, 1)[0] == 0         # and down after
    assert (run.q(_probe_field("hits")), run.q(BLOCK + 40)) == (40, 71)
    assert run.q(_probe_field("missed")) == run.q(_probe_field("skipped")) == 0
    after = state(uc)
    for reg in ("RSP", "RBX", "RBP", "R12", "R13", "R14", "R15"):
        assert after[reg] == run.before["regs"][reg], reg
    assert run.q(REC + 48, "<I") == MXCSR_PROGRAM               # MXCSR as the program had it
    assert run.unavailable == []
    if vec_mode >= VEC["AVX"]:
        assert run.entry_upper == [bytes(48)] * 16              # vzeroupper before the callback
        if vec_mode == VEC["AVX"]:                                # ymm0-15 are all such a CPU has
            assert [z[:32] for z in run.model["zmm"][:16]] == [z[:32] for z in run.before["model"]["zmm"][:16]]
        else:
            assert run.model == run.before["model"]
    else:
        xmm = [uc.reg_read(getattr(U, f"UC_X86_REG_XMM{i}")) for i in range(16)]
        assert xmm == run.before["xmm"]
    if x87:
        assert uc.reg_read(U.UC_X86_REG_FPSW) & 0x3800 == 6 << 11       # the two values pushed
        assert uc.reg_read(U.UC_X86_REG_FPTAG) != 0xFFFF


@pytest.mark.parametrize("x87", [False, True])
def test_module_stub_novec_callback(x87):
    uc, model = _stub_machine(vec_mode=VEC["AVX512"], novec=True, x87=x87)
    run = _Run(uc, model, VEC["AVX512"])
    assert run.called == 1 and run.q(REC) == CTX and run.q(REC + 8) % 16 == 8
    assert run.q(REC + 24) == 1 and uc.mem_read(FS_BASE + GUARD_OFF, 1)[0] == 0
    assert state(uc)["RSP"] == run.before["regs"]["RSP"]


@pytest.mark.parametrize("block", [False, True])
def test_module_stub_skips_an_unresolved_callback_and_misses_a_nested_one(block):
    hits = (41, 70) if not block else (40, 71)
    uc, model = _stub_machine(vec_mode=VEC["SSE"], callback=False, block=block)
    run = _Run(uc, model, VEC["SSE"])
    assert run.called == 0 and (run.q(_probe_field("hits")), run.q(BLOCK + 40)) == hits
    assert (run.q(_probe_field("skipped")), run.q(_probe_field("missed"))) == (1, 0)
    assert uc.mem_read(FS_BASE + GUARD_OFF, 1)[0] == 0
    uc, model = _stub_machine(vec_mode=VEC["SSE"], guard=1, block=block)
    run = _Run(uc, model, VEC["SSE"])
    assert run.called == 0 and (run.q(_probe_field("hits")), run.q(BLOCK + 40)) == hits
    assert (run.q(_probe_field("skipped")), run.q(_probe_field("missed"))) == (0, 1)
    assert uc.mem_read(FS_BASE + GUARD_OFF, 1)[0] == 1
