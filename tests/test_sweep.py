"""The light sweep (x86_64.sweep) finds what a full decode and the predicates find: the site
analysis of a probe reads it for the whole function, so a branch target it missed could let a
jump cover one. Checked on instructions chosen to hit every path of it, and on real code; so
is x86_64.references, which finds the fields of relocated code the same way."""
import pytest
from capstone import x86_const as X

from jprobe.elf import ElfModule
from jprobe.frames import frame_ranges
from jprobe.loader import find_library
from jprobe.trampolines import x86_64 as arch

# (bytes, what capstone calls them): the branch and x87 forms, with the prefixes and operand
# kinds that decide whether the mnemonic and its operand text alone say what the predicates say.
SHAPES = [
    ("ffe0", "jmp rax"), ("3effe0", "notrack jmp rax"), ("f2ffe0", "bnd jmp rax"),
    ("ff2510000000", "jmp [rip+0x10]"), ("3eff24c500100000", "notrack jmp [rax*8+0x1000]"),
    ("3eff2510000000", "notrack jmp [rip+0x10]"), ("64ff2510000000", "jmp fs:[rip+0x10]"),
    ("eb00", "jmp rel8"), ("e9fbffffff", "jmp rel32 back"), ("ebf0", "jmp below 0 at 0"),
    ("e8f0ffffff", "call below 0 at 0"), ("66e90000", "jmp rel16"),
    ("f2e900000000", "bnd jmp rel32"), ("e800000000", "call rel32"), ("ffd0", "call rax"),
    ("ff1510000000", "call [rip+0x10]"), ("f2e800000000", "bnd call"), ("3effd0", "notrack call rax"),
    ("ff28", "ljmp [rax]"), ("48ff28", "rex.w ljmp [rax]"), ("ff18", "lcall [rax]"),
    ("7400", "je rel8"), ("0f8400000000", "je rel32"), ("2e7400", "je, hint"), ("3e7400", "je, hint"),
    ("66e3fe", "jrcxz with 66"), ("e2fe", "loop"), ("e1fe", "loope"), ("e0fe", "loopne"), ("e3fe", "jrcxz"),
    ("67e3fe", "jecxz"), ("c7f800000000", "xbegin"), ("c6f800", "xabort"),
    ("d9c0", "fld st0"), ("d97d00", "fnstcw [rbp]"), ("dfe0", "fnstsw ax"), ("9b", "wait"),
    ("dbe3", "fninit"), ("9bdbe3", "finit"), ("dd4500", "fld qword [rbp]"), ("0fae00", "fxsave [rax]"),
    ("0f0e", "femms"), ("d9d0", "fnop"), ("dfc0", "ffreep"), ("df6d00", "fild qword [rbp]"),
    ("0f77", "emms"), ("f30f1efa", "endbr64"), ("f3aa", "rep stosb"), ("f0ff00", "lock inc [rax]"),
    ("c3", "ret"), ("488d0500000000", "lea rax, [rip]"), ("90", "nop"), ("0f0b", "ud2"),
]


def reference(code: bytes, address: int) -> arch.Sweep:
    """What the sweep stands for: every instruction decoded with its details."""
    insns = arch.decode(code, address)
    return arch.Sweep([i.address for i in insns], address + sum(i.size for i in insns),
                      [(arch.branch_target(i), arch.is_call(i)) for i in insns
                       if arch.branch_target(i) is not None],
                      next((i.address for i in insns if arch.is_indirect_jump(i)), None),
                      any(arch.uses_x87(i) for i in insns))


def reference_fields(code: bytes, address: int) -> list[tuple[int, int]]:
    """What x86_64.references stands for: the rel32 and rip-relative disp32 fields of every
    instruction, each decoded with its details."""
    found = []
    for insn in arch.decode(code, address):
        if insn.group(X.X86_GRP_BRANCH_RELATIVE) and insn.imm_size == 4:
            found.append((insn.address - address + insn.imm_offset, arch.branch_target(insn)))
        elif insn.disp_offset and any(op.type == X.X86_OP_MEM and op.mem.base == X.X86_REG_RIP
                                      for op in insn.operands):
            found.append((insn.address - address + insn.disp_offset, insn.address + insn.size + insn.disp))
    return found


@pytest.mark.parametrize("address", [0, 0x401000, 0x7fffffff0000])
@pytest.mark.parametrize("code,what", SHAPES, ids=[what for _, what in SHAPES])
def test_each_shape_alone(code, what, address):
    code = bytes.fromhex(code)
    assert arch.sweep(code, address) == reference(code, address), what


def test_all_shapes_in_a_row_and_an_undecodable_end():
    code = b"".join(bytes.fromhex(c) for c, _ in SHAPES) + b"\x0f\xff\xff"
    swept = arch.sweep(code, 0x1000)
    assert swept == reference(code, 0x1000)
    assert swept.end < 0x1000 + len(code) and swept.x87 and swept.indirect_jump is not None
    whole = code[:swept.end - 0x1000]
    assert arch.references(whole, 0x1000) == reference_fields(whole, 0x1000) != []


def _code_ranges(module: ElfModule, count: int) -> list[tuple[int, int]]:
    """`count` function ranges spread over the module (symbols, else unwind ranges)."""
    ranges = [(s.address, s.end) for s in module.functions if s.size] or frame_ranges(module)
    step = max(1, len(ranges) // count)
    return ranges[::step]


@pytest.mark.parametrize("name", ["libc.so.6", "libm.so.6", "libstdc++.so.6"])
def test_real_code(name):
    """Functions spread over libraries of the machine (x87 in libm, switch tables in libc)."""
    path = find_library(name)
    if path is None:
        pytest.skip(f"{name} not found")
    module = ElfModule(path)
    for lo, hi in _code_ranges(module, 300):
        if module.is_code(lo, hi - lo):
            code = module.read(lo, hi - lo)
            swept = arch.sweep(code, lo)
            assert swept == reference(code, lo), f"{name} {lo:#x}"
            whole = code[:swept.end - lo]
            assert arch.references(whole, lo) == reference_fields(whole, lo), f"{name} {lo:#x}"
