"""The x86-64 back end: decoding, instruction facts, and trampoline templates.

What knows the instruction set lives here, in relocate.py (moving instructions),
asm.py (the code buffer) and tactics.py (jumps shorter than a jump); the rest of
jprobe asks through jprobe/arch.py, which lists what a back end provides.

Trampoline shapes (all emitted at link-time addresses, sizes independent of
where they land):

count                 skip red zone; inc the thread's own counter (found
                      through the TLS offset the runtime fills in; with live
                      flags through lea, which leaves them alone); a thread
                      without a block: lock inc [hits], with live flags kept
                      by lahf/seto ... add al,0x7f; sahf; <displaced>; jmp back
callback              skip red zone; push a struct jprobe_ctx; call the
                      module's shared stub, which counts, keeps a thread
                      already in a callback out (guard), saves vector state
                      (by the runtime's vec_mode), aligns the stack, clears
                      DF and calls the C function; pop the (maybe edited)
                      registers; <displaced>; jmp back
call retarget         the probed `call` stays in place but calls the
                      trampoline, which does the work above and jumps on to
                      the callee: the return address and the return
                      prediction stay exactly as they were.
"""
from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import capstone
from capstone import CsInsn
from capstone import x86_const as X

from .. import layout
from ..errors import RelocationError
from .asm import Address, CodeBuffer
from .relocate import decoder, relocate_with_copies
from .returns import POOL_HEADER, POOL_NEXT, POOL_SIZE

JUMP_SIZE = 5
JUMP_OPCODE = 0xE9                  # jmp rel32
REACH = 0x7F00_0000                 # how far a rel32 reaches, less a margin
FILL = {X.X86_INS_NOP, X.X86_INS_INT3}         # what compilers put between functions
RED_ZONE = 128
INT3 = 0xCC
FILL_BYTE = bytes([INT3])        # what pads unused trampoline room

_cs = decoder()
_lite = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)   # no details: 4x faster, 10x less memory

_STATUS = ("CF", "PF", "AF", "ZF", "SF", "OF")
_WRITE_KINDS = ("MODIFY", "RESET", "SET", "UNDEFINED")
_FLAGS_READ = 0
_FLAGS_WRITTEN = {}
for _f in _STATUS:
    _FLAGS_READ |= getattr(X, f"X86_EFLAGS_TEST_{_f}")
    _FLAGS_WRITTEN[_f] = 0
    for _k in _WRITE_KINDS:
        _FLAGS_WRITTEN[_f] |= getattr(X, f"X86_EFLAGS_{_k}_{_f}", 0)
# Instructions that read flags capstone does not say they read (none for pushfq and lahf, no
# TEST_OF for adox, no TEST_CF for rcl/rcr/cmc): taken as reading every flag.
_READS_ALL_FLAGS = {"pushfq", "pushf", "lahf", "syscall", "int", "int3", "into", "int1", "ud2", "hlt",
                    "adox", "adcx", "rcl", "rcr", "cmc"}
# A shift or rotate by cl leaves every flag as it was when cl & 63 is 0: it may write none.
_SHIFTS = {"shl", "sal", "shr", "sar", "rol", "ror", "rcl", "rcr", "shld", "shrd"}

_CTX = {name: layout.offsetof("jprobe_ctx", name) for name in ("probe_id", "address")}
_REG = {name: layout.offsetof("jprobe_regs", name) for name in ("rsp", "rip", "rflags")}
_CTX_SIZE = layout.sizeof("jprobe_ctx")
_PROBE_HITS = layout.offsetof("jp_probe", "hits")
_PROBE_CALLBACK = layout.offsetof("jp_probe", "callback")
_PROBE_FLAGS = layout.offsetof("jp_probe", "flags")
_PROBE_ID = layout.offsetof("jp_probe", "id")
_PROBE_MISSED = layout.offsetof("jp_probe", "missed")
_PROBE_SKIPPED = layout.offsetof("jp_probe", "skipped")
_NOVEC = layout.CONST["JP_PROBE_NOVEC"]
# Push order building struct jprobe_ctx from its top (address) down to rax.
_PUSHED_GPRS_HIGH = ("r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8")
_PUSHED_GPRS_LOW = ("rbp", "rdi", "rsi", "rdx", "rcx", "rbx", "rax")


def decode(code: bytes, address: int) -> list[CsInsn]:
    """Instructions from the start of `code` until it ends or stops decoding."""
    return list(_cs.disasm(code, address))


def decode_one(code: bytes, address: int) -> CsInsn | None:
    return next(_cs.disasm(code, address, 1), None)


def decode_lazily(code: bytes, address: int, count: int) -> Iterator[CsInsn]:
    """The first `count` instructions `decode` would give, each built only when it is reached
    (a CsInsn with its details costs ~15 us; a scan often stops after a few)."""
    return _cs.disasm(code, address, count)


@dataclass
class Sweep:
    """What a linear sweep over some code found, as `decode` followed by the predicates below
    would find it: where each instruction starts, its direct branches, its first indirect jump
    and whether it uses x87."""

    starts: list[int]
    end: int                                   # past the last instruction decoded
    branches: list[tuple[int, bool]]           # (branch_target, is_call) of each direct branch
    indirect_jump: int | None                  # the first is_indirect_jump
    x87: bool                                  # any uses_x87


# Mnemonics (their last word: capstone writes prefixes into it, `notrack jmp`) of every
# instruction capstone may put in the FPU or BRANCH_RELATIVE group or give the JMP id (`ljmp`):
# x87 ones start with `f`, but `wait`. Only these need operand details.
_FLOW_WORDS = ("j", "f", "wait", "call", "lcall", "ljmp", "loop", "xbegin")
# Those always relative, or relative exactly when their one operand is a number (`jmp 0x1234`,
# not `jmp rax`), which capstone prints from the same value it gives as the operand's `imm`.
_RELATIVE = frozenset({"jmp", "call", "ja", "jae", "jb", "jbe", "je", "jne", "jg", "jge", "jl", "jle", "jo",
                       "jno", "jp", "jnp", "js", "jns", "jcxz", "jecxz", "jrcxz", "loop", "loope", "loopne",
                       "xbegin"})
_NUMBER = re.compile(r"(?:0x[0-9a-f]+|[0-9]+)\Z")


def sweep(code: bytes, address: int) -> Sweep:
    """`decode(code, address)` summed up for the site analysis, several times faster and without
    keeping a CsInsn (with its operand details, ~2 KiB) for each instruction.

    Capstone's light mode gives each instruction's address, size, mnemonic and operand text;
    the few whose mnemonic could make a predicate true and whose text does not settle it are
    decoded again with details (tests/test_sweep.py checks the summary against `decode`).
    """
    found = Sweep([], address, [], None, False)
    for at, size, mnemonic, op_str in _lite.disasm_lite(code, address):
        found.starts.append(at)
        found.end = at + size
        word = mnemonic.rpartition(" ")[2]
        if not word.startswith(_FLOW_WORDS):
            continue
        plain = word == mnemonic and word in _RELATIVE
        if plain and _NUMBER.match(op_str) and int(op_str, 0) < 1 << 63:
            found.branches.append((int(op_str, 0), word == "call"))
        elif plain and word in ("call", "jmp") and op_str[:1].isalpha():     # a register or memory
            if word == "jmp" and found.indirect_jump is None and "[rip" not in op_str:
                found.indirect_jump = at
        else:
            _note(found, decode_one(code[at - address:at - address + size], at))
    return found


def _note(found: Sweep, insn: CsInsn) -> None:
    """Add what the predicates say of one fully decoded instruction."""
    target = branch_target(insn)
    if target is not None:
        found.branches.append((target, is_call(insn)))
    elif found.indirect_jump is None and is_indirect_jump(insn):
        found.indirect_jump = insn.address
    found.x87 = found.x87 or uses_x87(insn)


def branch_target(insn: CsInsn) -> int | None:
    """Target of a direct jmp/jcc/call/loop, else None."""
    if insn.group(X.X86_GRP_BRANCH_RELATIVE) and insn.operands and insn.operands[0].type == X.X86_OP_IMM:
        return insn.operands[0].imm
    return None


def is_call(insn: CsInsn) -> bool:
    return insn.group(X.X86_GRP_CALL)


def ends_flow(insn: CsInsn) -> bool:
    """No fall-through: the next instruction is reached only by a jump."""
    return (insn.group(X.X86_GRP_RET) or insn.group(X.X86_GRP_IRET) or insn.id in (X.X86_INS_JMP, X.X86_INS_UD2,
            X.X86_INS_HLT) or (insn.id == X.X86_INS_INT3))


def is_transfer(insn: CsInsn) -> bool:
    """Any jump or call, direct or not (`loop` and its kin too: capstone puts them in no jump group)."""
    return insn.group(X.X86_GRP_JUMP) or insn.group(X.X86_GRP_CALL) or insn.group(capstone.CS_GRP_BRANCH_RELATIVE)


def is_indirect_jump(insn: CsInsn) -> bool:
    """A `jmp reg/mem` that may land anywhere in the function (switch tables, computed goto).

    `jmp [rip+x]` is a tail call through the GOT or a PLT slot, not an intra-function jump.
    """
    if insn.id != X.X86_INS_JMP or branch_target(insn) is not None:
        return False
    op = insn.operands[0]
    return not (op.type == X.X86_OP_MEM and op.mem.base == X.X86_REG_RIP)


def uses_x87(insn: CsInsn) -> bool:
    return insn.group(X.X86_GRP_FPU)


def is_rel32_call(insn: CsInsn) -> bool:
    return insn.id == X.X86_INS_CALL and insn.size == 5 and insn.bytes[0] == 0xE8


def is_rip_indirect_call(insn: CsInsn) -> bool:
    """`call qword ptr [rip + x]` (6 bytes): a call through the GOT (-fno-plt)."""
    return (insn.id == X.X86_INS_CALL and insn.size == 6 and insn.bytes[0] == 0xFF and
            insn.operands[0].type == X.X86_OP_MEM and insn.operands[0].mem.base == X.X86_REG_RIP)


def flags_dead_after(insns: Iterable[CsInsn]) -> bool:
    """True when no status flag is read before being written, along `insns` from the first.

    The scan follows straight-line code only. A `call` or `ret` ends it with the flags
    dead: the SysV ABI neither passes status flags into a function nor preserves them
    across a call, so no conforming code reads them there. Any other branch ends it
    with the flags (conservatively) live.
    """
    pending = set(_STATUS)
    for insn in insns:
        if insn.mnemonic in _READS_ALL_FLAGS or insn.eflags & _FLAGS_READ and any(
                insn.eflags & getattr(X, f"X86_EFLAGS_TEST_{f}") for f in pending):
            return False
        if is_call(insn) or insn.group(X.X86_GRP_RET):
            return True
        if not (insn.mnemonic in _SHIFTS and insn.operands and insn.operands[-1].type == X.X86_OP_REG):
            pending -= {f for f in _STATUS if insn.eflags & _FLAGS_WRITTEN[f]}
        if not pending:
            return True
        if insn.group(X.X86_GRP_JUMP) or ends_flow(insn):
            return False
    return False


_VECTOR_GROUPS = {getattr(X, f"X86_GRP_{g}") for g in (
    "FPU", "MMX", "3DNOW", "SSE1", "SSE2", "SSE3", "SSSE3", "SSE41", "SSE42", "SSE4A", "AVX", "AVX2",
    "AVX512", "FMA", "FMA4", "F16C", "XOP", "AES", "PCLMUL", "SHA", "CDI", "ERI", "PFI", "VLX", "BWI",
    "DQI")}
_VECTOR_REG_PREFIXES = ("xmm", "ymm", "zmm", "k", "st", "mm", "fp", "mxcsr")
_VECTOR_MNEMONIC_PREFIXES = ("xsave", "xrstor", "fxsave", "fxrstor", "vzero", "emms", "ldmxcsr", "stmxcsr")


def vector_state_use(insn: CsInsn) -> bool:
    """True when `insn` may read or write vector, mask, x87 or MXCSR state."""
    if any(insn.group(g) for g in _VECTOR_GROUPS) or insn.mnemonic.startswith(_VECTOR_MNEMONIC_PREFIXES):
        return True
    read, written = insn.regs_access()
    return any((insn.reg_name(r) or "").startswith(_VECTOR_REG_PREFIXES) for r in (*read, *written))


def references(code: bytes, address: int) -> list[tuple[int, int]]:
    """(offset, target) of every rel32/disp32 field of `code`: what an applier that moves the
    code may have to adjust."""
    found = []
    insns, decoded = [], 0
    for at, size, mnemonic, op_str in _lite.disasm_lite(code, address):
        decoded += size
        # Only a relative branch or a rip-relative operand has such a field (sweep says why
        # the mnemonic tells the former); only those need their details.
        if "rip" in op_str or mnemonic.rpartition(" ")[2].startswith(_FLOW_WORDS):
            insns.append(decode_one(code[at - address:at - address + size], at))
    if decoded != len(code):
        # a field missed here would point elsewhere once an applier moves the text
        raise RelocationError(f"internal error: the code at {address:#x} does not decode whole")
    for insn in insns:
        if insn.group(X.X86_GRP_BRANCH_RELATIVE) and insn.imm_size == 4:
            field, target = insn.imm_offset, branch_target(insn)
        elif insn.disp_offset and any(op.type == X.X86_OP_MEM and op.mem.base == X.X86_REG_RIP
                                      for op in insn.operands):
            field, target = insn.disp_offset, insn.address + insn.size + insn.disp
        else:
            continue
        found.append((insn.address - address + field, target))
    return found


JUMP_FIXUP = 1                      # where jump_bytes puts its rel32


def call_fixup(length: int) -> int:
    """Where call_bytes puts its rel32."""
    return length - 4


def jump_bytes(source: int, target: int, length: int) -> bytes:
    """`jmp rel32` at `source`, padded with int3 up to `length` bytes."""
    return b"\xe9" + struct.pack("<i", target - (source + JUMP_SIZE)) + bytes([INT3]) * (length - JUMP_SIZE)


def jump_target(code: bytes | bytearray, at: int, address: int) -> int | None:
    """Where the jump that jump_bytes wrote at `code[at:]` (run-time `address`) goes; None: no such jump."""
    if at + JUMP_SIZE > len(code) or code[at] != JUMP_OPCODE:
        return None
    return address + JUMP_SIZE + int.from_bytes(code[at + 1:at + JUMP_SIZE], "little", signed=True)


def call_bytes(source: int, target: int, length: int) -> bytes:
    """A call to `target` that returns to `source + length`, as the original call did.

    A 6-byte `call [rip+x]` becomes `nop; call rel32`: the return address is unchanged.
    """
    pad = length - JUMP_SIZE
    return b"\x90" * pad + b"\xe8" + struct.pack("<i", target - (source + length))


def trap_bytes(length: int, original: bytes) -> bytes:
    """int3 over the first byte; the rest of the instruction is never executed."""
    return bytes([INT3]) + original[1:length]


# The block a loader thread reads and writes (emit_loader), one 8-byte slot each.
LOADER_SLOTS = ("dlopen", "dlerror", "pthread_self", "pthread_detach", "path", "handle", "error", "done")
RTLD_NOW = 2


def emit_loader(buf: CodeBuffer) -> None:
    """A thread's start routine (rdi: a block of LOADER_SLOTS) that detaches itself, dlopen()s
    the block's path, leaves the handle in the block (or, when it fails, copies dlerror()'s
    message to `error`, 255 bytes at most: the message dies with the thread), sets `done` and
    returns. It runs in a thread of its own, so that no lock the program's threads hold can
    be taken twice by one thread."""
    slot = {name: 8 * i for i, name in enumerate(LOADER_SLOTS)}
    buf.emit("push rbx; mov rbx, rdi")                           # the stack is 16-byte aligned now
    buf.emit(f"call qword ptr [rbx + {slot['pthread_self']}]; mov rdi, rax")
    buf.emit(f"call qword ptr [rbx + {slot['pthread_detach']}]")
    buf.emit(f"mov rdi, qword ptr [rbx + {slot['path']}]; mov esi, {RTLD_NOW}")
    buf.emit(f"call qword ptr [rbx + {slot['dlopen']}]; mov qword ptr [rbx + {slot['handle']}], rax")
    buf.emit("test rax, rax")
    buf.jcc(0x5, "loaded")                                       # jnz
    buf.emit(f"call qword ptr [rbx + {slot['dlerror']}]; mov rsi, rax; mov rdi, qword ptr [rbx + {slot['error']}]")
    buf.emit("mov ecx, 255; test rsi, rsi")
    buf.jcc(0x4, "loaded")                                       # jz: no message
    buf.label("copy")
    buf.emit("mov al, byte ptr [rsi]; mov byte ptr [rdi], al; inc rsi; inc rdi; test al, al")
    buf.jcc(0x4, "loaded")                                       # jz: its NUL copied
    buf.emit("dec ecx")
    buf.jcc(0x5, "copy")                                         # jnz
    buf.label("loaded")
    buf.emit(f"mov qword ptr [rbx + {slot['done']}], 1; pop rbx; xor eax, eax; ret")


# A borrowed thread's save block (emit_resume): offsets of the call's result, its general
# registers (in the order of `struct user_regs_struct`), a stack of its own and its xsave area.
RESUME_RESULT, RESUME_GPRS, RESUME_STACK, RESUME_XSAVE = 0, 64, 512, 576
_RESTORED = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def emit_resume(buf: CodeBuffer, save: int, gprs: Sequence[str]) -> None:
    """Where a borrowed thread's call returns: it leaves the call's result (rax) in its save
    block at `save`, then takes back, from the block, everything it was stopped with: the
    xsave area (x87, SSE, AVX and the rest, through xrstor), rflags (popfq on the block's own
    stack: the red zone below the thread's rsp may hold live data), the general registers,
    rsp, and jumps to its rip. So it resumes by itself, traced or not."""
    slot = {name: save + RESUME_GPRS + 8 * i for i, name in enumerate(gprs)}
    buf.rip("mov qword ptr [rip], rax", save + RESUME_RESULT)
    buf.emit("mov eax, -1; mov edx, -1")
    buf.rip("xrstor64 [rip]", save + RESUME_XSAVE)
    buf.rip("lea rsp, [rip]", save + RESUME_STACK)
    buf.rip("push qword ptr [rip]", slot["eflags"])
    buf.emit("popfq")
    for reg in _RESTORED:
        buf.rip(f"mov {reg}, qword ptr [rip]", slot[reg])
    buf.rip("mov rsp, qword ptr [rip]", slot["rsp"])
    buf.rip("jmp qword ptr [rip]", slot["rip"])


NR_GETPID, NR_FUTEX, FUTEX_WAIT, FUTEX_WAKE, ETIMEDOUT = 39, 202, 0, 1, 110
RT_CONSISTENT = 0                  # enum r_state (link.h)
HOOK_WAIT_NS = 2_000_000_000       # a load waits this long, at most, for jprobe's answer


def emit_load_hook(buf: CodeBuffer, r_state: int, request: int, answer: int, pid: int) -> None:
    """A C-ABI function for a callback probe on the dynamic loader's `_dl_debug_state`: when
    the loader says the link map is consistent (a library mapped and relocated, its
    initialisers not run yet), it takes a ticket (request: a shared uint32 jprobe watches)
    and wakes jprobe's watcher, then waits on a futex until jprobe's answer (a shared uint32)
    reaches it, so that
    jprobe patches the new library before any of its code runs; at most HOOK_WAIT_NS at a
    time, and not at all once the answer has caught up; a process forked from process `pid`
    (which inherited the hook) does not wait. Clobbers only what the ABI lets it."""
    buf.emit(f"movabs rax, {r_state}; cmp dword ptr [rax], {RT_CONSISTENT}")
    buf.jcc(0x5, "hook_out")                                     # jne: a load half done
    buf.emit(f"mov eax, {NR_GETPID}; syscall; cmp eax, {pid}")
    buf.jcc(0x5, "hook_out")                                     # jne: a forked child
    buf.emit(f"movabs rdi, {request}; mov r8d, 1; lock xadd dword ptr [rdi], r8d; inc r8d")
    buf.emit(f"push r8; mov esi, {FUTEX_WAKE}; mov edx, 1; mov eax, {NR_FUTEX}; syscall; pop r8")   # jprobe's watcher
    buf.emit(f"movabs rdi, {answer}")
    buf.label("hook_wait")
    buf.emit("mov edx, dword ptr [rdi]; mov eax, r8d; sub eax, edx")
    buf.jcc(0xe, "hook_out")                                     # jle: answered
    buf.emit(f"push rdi; mov rax, {HOOK_WAIT_NS // 1_000_000_000}; push {HOOK_WAIT_NS % 1_000_000_000}; "
             f"push rax; mov r10, rsp; mov esi, {FUTEX_WAIT}; mov eax, {NR_FUTEX}; syscall")
    buf.emit("add rsp, 16; pop rdi")
    buf.emit(f"cmp rax, -{ETIMEDOUT}")
    buf.jcc(0x5, "hook_wait")                                    # jne: woken (or EINTR): look again
    buf.label("hook_out")
    buf.emit("ret")


class ModuleStubs:
    """Code shared by every callback probe of a module, emitted once at the start of its text."""

    VSAVE = 2048 + 64 + 64       # zmm0-31, k0-7, mxcsr + saved mode (a 64-byte multiple)

    def __init__(self, buf: CodeBuffer, table: Address):
        self.common = buf.here
        self._emit_common(buf, table + layout.offsetof("jp_table", "vec_mode"),
                          table + layout.offsetof("jp_table", "tls_off"),
                          table + layout.offsetof("jp_table", "guard_off"))
        self.common_x87 = buf.here
        self._emit_common_x87(buf)

    @staticmethod
    def _emit_common(buf: CodeBuffer, vec_mode_address: Address, tls_off: Address,
                     guard_off: Address) -> None:
        """rdi = ctx, rsi = &jp_probe: count, then call the callback with all vector state kept.

        A thread already in a callback does not enter another one (its hit is counted as
        missed), nor does a hit before the runtime resolved the callback (skipped): see
        "Callbacks are not re-entered" in jprobe_table.h. The guard is a byte of the thread's
        static TLS, tested and set without a lock: no other thread writes it.
        """
        buf.rip("mov rcx, qword ptr [rip]", tls_off)                  # counted as in emit_count
        buf.jrcxz("common_shared")
        buf.emit("mov rcx, qword ptr fs:[rcx]")
        buf.jrcxz("common_shared")
        buf.emit(f"mov eax, dword ptr [rsi + {_PROBE_ID}]; inc qword ptr [rcx + rax*8]")
        buf.jmp("common_counted")
        buf.label("common_shared")
        buf.emit(f"lock inc qword ptr [rsi + {_PROBE_HITS}]")
        buf.label("common_counted")
        buf.emit(f"mov rax, qword ptr [rsi + {_PROBE_CALLBACK}]; test rax, rax")
        buf.jcc(0x4, "common_skipped")                               # jz: no callback (yet)
        buf.rip("mov rcx, qword ptr [rip]", guard_off)              # set before any callback
        buf.emit("cmp byte ptr fs:[rcx], 0")
        buf.jcc(0x5, "common_missed")                                # jnz: in a callback already
        buf.emit("mov byte ptr fs:[rcx], 1")
        # DF is almost always clear already, and `cld` costs more than this test.
        buf.emit(f"test byte ptr [rdi + {_REG['rflags'] + 1}], 4")
        buf.jcc(0x4, "common_df_clear")
        buf.emit("cld")
        buf.label("common_df_clear")
        buf.emit(f"test dword ptr [rsi + {_PROBE_FLAGS}], {_NOVEC}")
        buf.jcc(0x5, "common_novec")                                 # jnz
        buf.emit(f"push rbp; mov rbp, rsp; and rsp, -64; sub rsp, {ModuleStubs.VSAVE}")
        buf.rip("mov ecx, dword ptr [rip]", vec_mode_address)
        buf.emit("mov dword ptr [rsp + 2120], ecx; stmxcsr dword ptr [rsp + 2112]")
        _vector_switch(buf, "save")
        buf.emit("call rax")
        # ldmxcsr serialises: only when the callback changed MXCSR.
        buf.emit("stmxcsr dword ptr [rsp + 2116]; mov eax, dword ptr [rsp + 2116]; "
                 "cmp eax, dword ptr [rsp + 2112]")
        buf.jcc(0x4, "common_mxcsr_kept")
        buf.emit("ldmxcsr dword ptr [rsp + 2112]")
        buf.label("common_mxcsr_kept")
        buf.emit("mov ecx, dword ptr [rsp + 2120]")
        _vector_switch(buf, "restore")
        buf.emit("mov rsp, rbp; pop rbp")
        _leave_guard(buf, guard_off)
        # The callback provably leaves vector, x87 and MXCSR state alone.
        buf.label("common_novec")
        buf.emit("push rbp; mov rbp, rsp; and rsp, -16; call rax; mov rsp, rbp; pop rbp")
        _leave_guard(buf, guard_off)
        buf.label("common_skipped")
        buf.emit(f"lock inc qword ptr [rsi + {_PROBE_SKIPPED}]; ret")
        buf.label("common_missed")
        buf.emit(f"lock inc qword ptr [rsi + {_PROBE_MISSED}]; ret")

    def _emit_common_x87(self, buf: CodeBuffer) -> None:
        """The same for code that keeps values on the x87 stack: fxsave around the call."""
        buf.emit(f"test dword ptr [rsi + {_PROBE_FLAGS}], {_NOVEC}")
        buf.jcc(0x5, self.common)                                    # jnz: nothing to save
        buf.emit("push rbp; mov rbp, rsp; and rsp, -64; sub rsp, 512; fxsave64 [rsp]")
        buf.call(self.common)
        buf.emit("fxrstor64 [rsp]; mov rsp, rbp; pop rbp; ret")


def _leave_guard(buf: CodeBuffer, guard_off: int) -> None:
    """The callback returned: clear the thread's guard (rcx is free, the callback may have
    changed it) and return."""
    buf.rip("mov rcx, qword ptr [rip]", guard_off)
    buf.emit("mov byte ptr fs:[rcx], 0; ret")


def _zmov(store: bool, zmm: int, disp: int) -> bytes:
    """vmovdqu64 [rsp+disp32], zmm / vmovdqu64 zmm, [rsp+disp32], encoded here.

    keystone gets EVEX's compressed disp8*N wrong (it writes [rsp+64] as [rsp+0x1000]);
    a disp32 is never scaled, so this encoding means what it says.
    """
    p0 = ((~zmm >> 3 & 1) << 7) | (1 << 6) | (1 << 5) | ((~zmm >> 4 & 1) << 4) | 0x1
    modrm = 0x84 | ((zmm & 7) << 3)
    return bytes([0x62, p0, 0xFE, 0x48, 0x7F if store else 0x6F, modrm, 0x24]) + struct.pack("<i", disp)


def _kmov(store: bool, k: int, disp: int) -> bytes:
    """kmovq [rsp+disp32], k / kmovq k, [rsp+disp32] (keystone lacks AVX512BW)."""
    modrm = 0x84 | (k << 3)
    return bytes([0xC4, 0xE1, 0xF8, 0x91 if store else 0x90, modrm, 0x24]) + struct.pack("<i", disp)


def _vector_switch(buf: CodeBuffer, what: str) -> None:
    """Save or restore every vector register the running CPU has, by vec_mode in ecx.

    After saving, `vzeroupper`: legacy SSE code in the callback would otherwise run
    against dirty upper halves, which costs ~150 ns a hit on this class of CPU.
    """
    avx512 = layout.CONST["JP_VEC_AVX512"]
    avx = layout.CONST["JP_VEC_AVX"]
    done = f"{what}_done"
    buf.emit(f"cmp ecx, {avx512}")
    buf.jcc(0x4, f"{what}_512")
    buf.emit(f"cmp ecx, {avx}")
    buf.jcc(0x4, f"{what}_256")
    for i in range(16):
        buf.emit(f"movups xmmword ptr [rsp + {16 * i}], xmm{i}" if what == "save"
                 else f"movups xmm{i}, xmmword ptr [rsp + {16 * i}]")
    buf.jmp(done)
    buf.label(f"{what}_256")
    for i in range(16):
        buf.emit(f"vmovdqu ymmword ptr [rsp + {32 * i}], ymm{i}" if what == "save"
                 else f"vmovdqu ymm{i}, ymmword ptr [rsp + {32 * i}]")
    if what == "save":
        buf.emit("vzeroupper")
    buf.jmp(done)
    buf.label(f"{what}_512")
    for i in range(32):
        buf.raw(_zmov(what == "save", i, 64 * i))
    for k in range(8):
        buf.raw(_kmov(what == "save", k, 2048 + 8 * k))
    if what == "save":
        buf.emit("vzeroupper")
    buf.label(done)


_INC, _MOV_LOAD, _MOV_STORE = b"\x48\xff", b"\x48\x8b", b"\x48\x89"   # REX.W + opcode; ModRM reg 0: /0, rax


def _rcx_qword(opcode: bytes, disp: int) -> bytes:
    """`opcode` on qword [rcx + disp] (ModRM reg field 0), encoded as keystone encodes it: no
    displacement for 0, else disp8 when it fits, else disp32. Encoded here because each
    probe's slot is its own text, and keystone takes ~0.15 ms to assemble one."""
    if disp == 0:
        return opcode + b"\x01"
    if -128 <= disp < 128:
        return opcode + b"\x41" + disp.to_bytes(1, "little", signed=True)
    return opcode + b"\x81" + disp.to_bytes(4, "little", signed=True)


def emit_count(buf: CodeBuffer, hits: Address, probe_id: int, tls_off: Address, flags_live: bool,
               red_zone: bool = True) -> None:
    """An exact, thread-safe counter that leaves every register (and live flags) as it was.

    The thread's own block takes the hit with a plain increment (no bus lock); with
    no block yet (runtime not started, thread it did not see) a locked increment of
    the shared counter does. `jrcxz` tests without touching the flags; with live
    flags the private increment goes through a register (`lea` keeps the flags).
    """
    skip = RED_ZONE if red_zone else 0
    shared, done = buf.fresh("shared"), buf.fresh("counted")
    slot = 8 * probe_id
    buf.emit(f"lea rsp, [rsp - {skip}]; push rcx")
    buf.rip("mov rcx, qword ptr [rip]", tls_off)
    buf.jrcxz(shared)
    buf.emit("mov rcx, qword ptr fs:[rcx]")
    buf.jrcxz(shared)
    if flags_live:
        buf.emit("push rax")
        buf.raw(_rcx_qword(_MOV_LOAD, slot))              # mov rax, qword ptr [rcx + slot]
        buf.emit("lea rax, [rax + 1]")
        buf.raw(_rcx_qword(_MOV_STORE, slot))             # mov qword ptr [rcx + slot], rax
        buf.emit("pop rax")
    else:
        buf.raw(_rcx_qword(_INC, slot))                   # inc qword ptr [rcx + slot]
    buf.emit(f"pop rcx; lea rsp, [rsp + {skip}]")
    buf.jmp(done)
    buf.label(shared)
    buf.emit("pop rcx")
    if flags_live:
        buf.emit("push rax; lahf; seto al")
        buf.rip("lock inc qword ptr [rip]", hits)
        buf.emit("add al, 0x7f; sahf; pop rax")
    else:
        buf.rip("lock inc qword ptr [rip]", hits)
    buf.emit(f"lea rsp, [rsp + {skip}]")
    buf.label(done)


SYSV_ARGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")           # arg1..arg6
_RING = {name: layout.offsetof("jp_ring", name) for name in ("head", "writing", "tail", "mask", "data")}
_REC_SHIFT = {name: layout.CONST[f"JP_REC_{name}_SHIFT"] for name in ("KEY", "WORDS", "FLAGS")}
# What a trace trampoline pushes, in push order: rdtsc writes rax and rdx, rcx holds the ring,
# rsi the index of the word written, rdi the word.
_TRACE_SAVED = ("rax", "rcx", "rdx", "rsi", "rdi")


_RING_TID, _RING_PID = layout.offsetof("jp_ring", "tid"), layout.offsetof("jp_ring", "pid")
_NR_GETPID = 39


@dataclass(frozen=True)
class RingPool:
    """Rings taken by the trace trampoline itself, for a process without the runtime (`jprobe
    attach`): at run-time address `base`, a header of POOL_HEADER bytes (the next ring's index,
    taken with `lock xadd`, and how many there are: returns.py's pool header), then rings of
    `stride` bytes. A ring's tid says whose it is: a thread reads its own at %fs:`tid_off`
    (glibc's struct pthread)."""

    base: int
    stride: int
    tid_off: int


@dataclass(frozen=True)
class TraceValue:
    """Where one word of a trace record comes from, in the program's state as the trampoline
    starts: register `base` (`rsp` and `rip` as the program sees them), the qword at [base +
    disp] when `disp` is given, and with `since` the time stamp less that (a duration). A
    return trampoline names its saved entry arguments as qwords relative to a register."""

    base: str
    disp: int | None = None
    since: bool = False


def trace_values(names: Sequence[str]) -> list[TraceValue]:
    """The values `trace(names)` records at a probe: argN are the SysV argument registers."""
    return [TraceValue(SYSV_ARGS[int(n[3:]) - 1] if n.startswith("arg") else n) for n in names]


def trace_header(probe_id: int, module_key: int, nvalues: int, flags: int = 0) -> int:
    """Word 0 of a trace record (jprobe_ring.h)."""
    return (probe_id | module_key << _REC_SHIFT["KEY"] | (2 + nvalues) << _REC_SHIFT["WORDS"]
            | flags << _REC_SHIFT["FLAGS"])


def _load_trace_value(buf: CodeBuffer, value: TraceValue, saved: int, program_rsp: int, site: int) -> None:
    """rdi = `value`; the registers of _TRACE_SAVED are in their pushed slots from [rsp +
    saved] up, the program's rsp is rsp + program_rsp, rax holds the time stamp."""
    def slot(reg: str) -> str:
        return f"rsp + {saved + 8 * (len(_TRACE_SAVED) - 1 - _TRACE_SAVED.index(reg))}"

    base = value.base
    if base == "rip":
        buf.rip("lea rdi, [rip]", site)
    elif base == "rsp":
        buf.emit(f"lea rdi, [rsp + {program_rsp}]")
    elif base in _TRACE_SAVED:
        buf.emit(f"mov rdi, qword ptr [{slot(base)}]")
    else:
        buf.emit(f"mov rdi, {base}")
    if value.disp is not None:
        buf.emit(f"mov rdi, qword ptr [rdi + {value.disp}]")
    if value.since:
        buf.emit("neg rdi; add rdi, rax")


def emit_trace(buf: CodeBuffer, ring_off: Address, lost: Address, header: int, values: Sequence[TraceValue],
               site: int, flags_live: bool, red_zone: bool = True, rsp_above: int = 0,
               pool: RingPool | None = None) -> None:
    """Append one record (jprobe_ring.h: `header`, the time stamp, `values`) to the thread's
    ring, or count it in `lost` when the thread has no ring or the ring no room; registers
    and live flags are left as they were. No lock, no system call: a reader frees room.

    `ring_off`: the table's ring_off (the %fs offset of the thread's ring pointer); `site`:
    what `rip` records; `rsp_above`: bytes the program's rsp is above the trampoline's on
    entry (8 in a retargeted call). Flags go through lahf/seto as in emit_count.
    With a `pool`, a thread whose ring word is 0, or names a ring another thread owns, takes
    the pool's next ring (the pool used up: lost).
    """
    skip = RED_ZONE if red_zone else 0
    full, done = buf.fresh("ring_full"), buf.fresh("traced")
    words = 2 + len(values)
    data = _RING["data"]
    buf.emit(f"lea rsp, [rsp - {skip}]")
    for reg in _TRACE_SAVED:
        buf.emit(f"push {reg}")
    frame = 8 * len(_TRACE_SAVED)
    if flags_live:
        buf.emit("lahf; seto al; push rax")
    buf.emit("rdtsc; shl rdx, 32; or rax, rdx")
    buf.rip("mov rcx, qword ptr [rip]", ring_off)          # the flags are saved or dead from here
    buf.emit("test rcx, rcx")
    buf.jcc(0x4, full)                                    # jz
    if pool is None:
        buf.emit("mov rcx, qword ptr fs:[rcx]; test rcx, rcx")
        buf.jcc(0x4, full)
    else:
        _emit_take_ring(buf, pool, full)
    # Not inside a record of this thread's that a signal interrupted (jprobe_ring.h).
    nested = buf.fresh("ring_nested")
    buf.emit(f"inc qword ptr [rcx + {_RING['writing']}]; cmp qword ptr [rcx + {_RING['writing']}], 1")
    buf.jcc(0x5, nested)                                  # jne
    # Room: head - tail + words - 1 <= mask.
    buf.emit(f"mov rdx, qword ptr [rcx + {_RING['head']}]; mov rsi, rdx; sub rsi, qword ptr [rcx + {_RING['tail']}]"
             f"; add rsi, {words - 1}; cmp rsi, qword ptr [rcx + {_RING['mask']}]")
    buf.jcc(0x7, nested)                                  # ja: no room
    store = f"and rsi, qword ptr [rcx + {_RING['mask']}]; mov qword ptr [rcx + rsi*8 + {data}], "
    buf.emit(f"lea rsi, [rdx + 1]; {store}rax")
    buf.emit(f"mov rdi, {header:#x}; mov rsi, rdx; {store}rdi")
    saved = 8 if flags_live else 0                       # the flags word is below the registers
    for i, value in enumerate(values):
        _load_trace_value(buf, value, saved, saved + frame + skip + rsp_above, site)
        buf.emit(f"lea rsi, [rdx + {2 + i}]; {store}rdi")
    buf.emit(f"lea rsi, [rdx + {words}]; mov qword ptr [rcx + {_RING['head']}], rsi; "
             f"dec qword ptr [rcx + {_RING['writing']}]")
    buf.jmp(done)
    buf.label(nested)
    buf.emit(f"dec qword ptr [rcx + {_RING['writing']}]")
    buf.label(full)
    buf.rip("lock inc qword ptr [rip]", lost)
    buf.label(done)
    if flags_live:
        buf.emit("pop rax; add al, 0x7f; sahf")
    for reg in reversed(_TRACE_SAVED):
        buf.emit(f"pop {reg}")
    buf.emit(f"lea rsp, [rsp + {skip}]")


def _emit_take_ring(buf: CodeBuffer, pool: RingPool, full: str) -> None:
    """rcx: the %fs offset of the thread's ring word; leaves the thread's own ring in rcx. A
    ring is the thread's when its tid is the thread's: a forked child's thread (whose word
    was copied from its parent's thread) or a thread on a stack glibc recycled (whose word
    its last thread left) takes a new one and never writes the other's; the one system call
    of a trace, getpid(), once a thread. rax (the time stamp) is kept; rdx, rsi, rdi are free."""
    take, have = buf.fresh("ring_take"), buf.fresh("ring_have")
    # mov edi, dword ptr fs:[tid_off], absolute (keystone would make it rip-relative)
    tid = b"\x64\x8b\x3c\x25" + struct.pack("<i", pool.tid_off)
    buf.emit("mov rdx, qword ptr fs:[rcx]; test rdx, rdx")
    buf.jcc(0x4, take)                                    # jz
    buf.raw(tid)
    buf.emit(f"cmp edi, dword ptr [rdx + {_RING_TID}]")
    buf.jcc(0x4, have)                                    # je
    buf.label(take)
    buf.emit(f"movabs rsi, {pool.base}; mov edi, 1; lock xadd qword ptr [rsi + {POOL_NEXT}], rdi; "
             f"cmp rdi, qword ptr [rsi + {POOL_SIZE}]")
    buf.jcc(0x3, full)                                    # jae: the pool is used up
    buf.emit(f"imul rdi, rdi, {pool.stride}; lea rdx, [rsi + rdi + {POOL_HEADER}]")
    buf.raw(tid)
    # Its pid too, once a thread: a forked child's may be gone before jprobe could look it up.
    buf.emit(f"mov dword ptr [rdx + {_RING_TID}], edi; push rax; push rcx; push r11; mov eax, {_NR_GETPID}; "
             f"syscall; mov dword ptr [rdx + {_RING_PID}], eax; pop r11; pop rcx; pop rax; "
             f"mov qword ptr fs:[rcx], rdx")
    buf.label(have)
    buf.emit("mov rcx, rdx")


def emit_callback(buf: CodeBuffer, stub: int, probe_desc: Address, probe_id: int, site: int,
                  red_zone: bool = True, return_pushed: bool = False, at_return: bool = False) -> None:
    """Build a struct jprobe_ctx on the stack, call the module stub, take back edited registers.

    `red_zone` False skips no red zone: at a function entry or in a retargeted call the
    caller's red zone died with its call. `return_pushed` (a retargeted call) says the
    probed `call` already pushed its return address, so the program's rsp at the probe
    (before that call) is 8 bytes above the trampoline's; reached by a `jmp` (a function
    entry included) the two are the same. `at_return`: at a followed return, whose `ret` is
    yet to run ([rsp]: the return address): rsp and rip are what the caller resumes with,
    the `address` the function's.
    """
    skip = RED_ZONE if red_zone else 0
    rsp_above = _CTX_SIZE + skip + (8 if return_pushed else 0)
    buf.emit(f"lea rsp, [rsp - {skip}]; push 0; push {probe_id}; pushfq; push 0")
    for reg in _PUSHED_GPRS_HIGH:
        buf.emit(f"push {reg}")
    buf.emit("push 0")
    for reg in _PUSHED_GPRS_LOW:
        buf.emit(f"push {reg}")
    buf.rip("lea rax, [rip]", site)
    buf.emit(f"mov qword ptr [rsp + {_REG['rip']}], rax; mov qword ptr [rsp + {_CTX['address']}], rax")
    if at_return:
        rsp_above = _CTX_SIZE + 8
        buf.emit(f"mov rax, qword ptr [rsp + {_CTX_SIZE}]; mov qword ptr [rsp + {_REG['rip']}], rax")
    buf.emit(f"lea rax, [rsp + {rsp_above}]; mov qword ptr [rsp + {_REG['rsp']}], rax; mov rdi, rsp")
    buf.rip("lea rsi, [rip]", probe_desc)
    buf.call(stub)
    _restore_flags(buf, _REG["rflags"])
    for reg in reversed(_PUSHED_GPRS_LOW):
        buf.emit(f"pop {reg}")
    buf.emit("lea rsp, [rsp + 8]")
    for reg in reversed(_PUSHED_GPRS_HIGH):
        buf.emit(f"pop {reg}")
    buf.emit(f"lea rsp, [rsp + {32 + skip}]")


def _restore_flags(buf: CodeBuffer, at: int) -> None:
    """Status flags and DF from the rflags word at [rsp+at], without `popfq` (~9 ns here).

    OF comes back through an `add` that overflows exactly when it was set, then `sahf`
    restores SF, ZF, AF, PF and CF; rax is free (it is popped next). Other rflags bits
    (TF, AC, ...) are left as they are: a callback cannot change them.
    """
    kept = buf.fresh("df_clear")
    buf.emit(f"mov al, byte ptr [rsp + {at + 1}]; test al, 4")
    buf.jcc(0x4, kept)
    buf.emit("std")
    buf.label(kept)
    buf.emit(f"shl al, 4; and al, 0x80; add al, 0x80; mov ah, byte ptr [rsp + {at}]; sahf")


def emit_displaced(buf: CodeBuffer, insns: Sequence[CsInsn]) -> list[tuple[int, int]]:
    """The displaced instructions, relocated, then a jump back after them when they fall through.

    Returns (original address, address of its copy) for each: running the copy from there
    is running the original from there (relocate_with_copies), which is what lets an applier
    move a thread between the two while it patches or unpatches a site.
    """
    at = buf.here
    code, starts = relocate_with_copies(insns, at)
    buf.raw(code, references(code, at))
    if not ends_flow(insns[-1]):
        last = insns[-1]
        buf.jmp(last.address + last.size)
    return [(insn.address, at + offset) for insn, offset in zip(insns, starts)]


def emit_call_continuation(buf: CodeBuffer, call: CsInsn) -> None:
    """After a retargeted call's probe work: go on to the original callee (stack untouched)."""
    if is_rel32_call(call):
        buf.jmp(call.operands[0].imm)
    else:
        buf.rip("jmp qword ptr [rip]", call.address + call.size + call.disp)
