"""An x86-64 machine under unicorn for trampoline code (test_trampolines.py, test_backend_x86.py)."""
from __future__ import annotations

import random

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn import x86_const as U

CODE, DATA, STACK = 0x400000, 0x600000, 0x800000
STACK_TOP = STACK + 0x10000
END = CODE + 0x8000                                   # a `hlt`: where the code under test goes on to
GPRS = ["RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"]
STATUS_MASK = 0xCD5                                   # CF PF AF ZF SF DF OF


def machine(code: bytes, rsp: int, seed: int) -> Uc:
    """`code` at CODE, a random stack, random registers and status flags (from `seed`)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    for base in (CODE, DATA, STACK):
        uc.mem_map(base, 0x10000)
    uc.mem_write(CODE, code)
    uc.mem_write(END, b"\xf4")
    rnd = random.Random(seed)
    uc.mem_write(STACK, bytes(rnd.getrandbits(8) for _ in range(0x10000)))
    for reg in GPRS:
        uc.reg_write(getattr(U, f"UC_X86_REG_{reg}"), rnd.getrandbits(64))
    uc.reg_write(U.UC_X86_REG_RSP, rsp)
    uc.reg_write(U.UC_X86_REG_EFLAGS, 0x202 | (rnd.getrandbits(12) & STATUS_MASK))
    return uc


def state(uc: Uc) -> dict:
    """The general registers, rsp and the status flags."""
    regs = {r: uc.reg_read(getattr(U, f"UC_X86_REG_{r}")) for r in GPRS + ["RSP"]}
    regs["FLAGS"] = uc.reg_read(U.UC_X86_REG_EFLAGS) & STATUS_MASK
    return regs
