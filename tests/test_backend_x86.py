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
from unicorn import UC_ARCH_X86, UC_HOOK_MEM_WRITE, UC_MODE_64, Uc  # noqa: E402
from unicorn import x86_const as U  # noqa: E402

from jprobe import layout  # noqa: E402
from jprobe.errors import RelocationError  # noqa: E402
from jprobe.trampolines import x86_64 as arch  # noqa: E402
from jprobe.trampolines.asm import CodeBuffer, assemble  # noqa: E402

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

CODE, DATA, STACK = 0x400000, 0x600000, 0x800000
STACK_TOP = STACK + 0x10000
END = CODE + 0x8000
FS_BASE, TLS_OFF, BLOCK = DATA + 0x8000, -0x40, DATA + 0x2000
GPRS = ["RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"]
STATUS = 0xCD5


def _machine(code: bytes, rsp: int, seed: int):
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    for base in (CODE, DATA, STACK):
        uc.mem_map(base, 0x10000)
    uc.mem_write(CODE, code)
    uc.mem_write(END, b"\xf4")
    rnd = random.Random(seed)
    for reg in GPRS:
        uc.reg_write(getattr(U, f"UC_X86_REG_{reg}"), rnd.getrandbits(64))
    uc.reg_write(U.UC_X86_REG_RSP, rsp)
    uc.reg_write(U.UC_X86_REG_EFLAGS, 0x202 | (rnd.getrandbits(12) & STATUS))
    uc.reg_write(U.UC_X86_REG_FS_BASE, FS_BASE)
    writes = []
    uc.hook_add(UC_HOOK_MEM_WRITE, lambda uc, access, address, size, value, data: writes.append((address, size)))
    return uc, writes


def _regs(uc):
    regs = {r: uc.reg_read(getattr(U, f"UC_X86_REG_{r}")) for r in GPRS + ["RSP"]}
    regs["FLAGS"] = uc.reg_read(U.UC_X86_REG_EFLAGS) & STATUS
    return regs


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
    before = _regs(uc)
    uc.emu_start(CODE, END, count=1000)
    after = _regs(uc)
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
    before = _regs(uc)
    uc.emu_start(CODE, END, count=2000)
    assert _regs(uc) == dict(before, RDI=0x1234)
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
