"""Callback libraries: checked at patch time, and analysed for the vector-state fast path.

Saving every vector register around a C call costs more than the rest of the
probe (2 KiB of zmm and mask state on AVX-512). A callback that provably never
touches vector, mask, x87 or MXCSR state, nor calls anything that could, does not
need it. The proof covers the callback and every function it reaches by direct
calls and jumps inside its library; a call through the PLT, an indirect branch, or
any vector instruction ends it. The runtime keeps the fast path only when the
library it loads has the build-id analysed here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .elf import ElfModule
from .errors import HandlerError
from .spec import ProbeSpec
from . import arch

MAX_FUNCTIONS = 64


@dataclass(frozen=True)
class Callback:
    library: str                 # as the runtime will dlopen it
    function: str
    novec: bool = False          # proven free of vector state use
    build_id: int = 0            # first 8 bytes of the library's build-id, little-endian


def resolve_callback(spec: ProbeSpec) -> Callback | None:
    """The spec's callback, checked now when its library is a path."""
    handler = spec.handler
    if handler.kind != "callback":
        return None
    lib = handler.library
    if "/" not in lib:
        return Callback(lib, handler.function)   # a soname: the dynamic loader finds it at run time
    path = os.path.abspath(lib)
    if not os.path.isfile(path):
        raise HandlerError(f"'{spec.text}': callback library {lib} not found; build it first "
                           f"(gcc -shared -fPIC $(jprobe --cflags) ...)")
    try:
        module = ElfModule(path)
    except Exception as e:
        raise HandlerError(f"'{spec.text}': callback library {lib}: {e}") from None
    if handler.function not in {s.name for s in module.binary.exported_functions}:
        raise HandlerError(f"'{spec.text}': function {handler.function} not found in {lib}; "
                           f"export it (not static) and check its name with `nm -D {lib}`")
    if _vector_use(module, handler.function) is None and module.build_id:
        return Callback(path, handler.function, True, int.from_bytes(bytes.fromhex(module.build_id)[:8], "little"))
    return Callback(path, handler.function)


def _vector_use(module: ElfModule, function: str) -> str | None:
    """Why `function` may touch vector state, or None when it provably does not."""
    todo = [module.resolve(function)]
    seen = {todo[0].address}
    while todo:
        sym = todo.pop()
        if not sym.size or not module.is_code(sym.address, sym.size):
            return f"{sym.name}: no code to analyse"
        insns = arch.decode(module.read(sym.address, sym.size), sym.address)
        if sum(i.size for i in insns) != sym.size:
            # capstone stops at what it cannot decode (a newer extension, data in code)
            return f"{sym.name}: cannot decode all of it"
        for insn in insns:
            if arch.vector_state_use(insn):
                return f"{insn.address:#x}: `{insn.mnemonic} {insn.op_str}` uses vector state"
            if not arch.is_transfer(insn):
                continue
            target = arch.branch_target(insn)
            if target is None:
                return f"{insn.address:#x}: indirect `{insn.mnemonic} {insn.op_str}`"
            if sym.address <= target < sym.end:
                continue
            callee = module.function_at(target)
            if callee is None:
                return f"{insn.address:#x}: calls {target:#x} outside any function (PLT)"
            if callee.address not in seen:
                if len(seen) >= MAX_FUNCTIONS:
                    return f"calls more than {MAX_FUNCTIONS} functions"
                seen.add(callee.address)
                todo.append(callee)
    return None
