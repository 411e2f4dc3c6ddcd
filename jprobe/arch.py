"""The instruction-set seam: everything the rest of jprobe may ask of a back end, in one list.

Site analysis, the planner, the packer and the appliers import this module, never a back end:
what they need of an instruction set is named below, grouped by the job it does. x86-64
(trampolines/) is the only back end today, and elf.py refuses any other machine. An aarch64
back end provides the same names from its own package; this module then picks one by the ELF
header's machine instead of importing x86-64 unconditionally.
"""
from __future__ import annotations

from .trampolines import tactics
from .trampolines.asm import Address, CodeBuffer, Later
from .trampolines.islands import Islands, text_room
from .trampolines.relocate import can_relocate, can_relocate_together
from .trampolines.returns import (
    FRAME_ARGS, FRAME_TSC, Pool, emit_hijack, emit_lost, emit_return_head, emit_return_tail, stashed_at,
)
from .trampolines.x86_64 import (
    FILL, FILL_BYTE, JUMP_FIXUP, JUMP_OPCODE, JUMP_SIZE, LOADER_SLOTS, REACH, RESUME_GPRS, RESUME_RESULT,
    RESUME_STACK, RESUME_XSAVE, ModuleStubs, Sweep, branch_target, call_bytes, call_fixup,
    decode, decode_lazily, decode_one, emit_call_continuation, emit_callback, emit_count, emit_displaced, emit_load_hook, emit_loader, emit_resume,
    emit_trace, trace_header, trace_values, RingPool, TraceValue,
    ends_flow,
    flags_dead_after, is_call, is_rel32_call, is_rip_indirect_call, is_transfer, jump_bytes, jump_target, sweep,
    trap_bytes, vector_state_use,
)

__all__ = [
    # Decoding: whole functions (a linear sweep with its branch targets) or a few instructions.
    "Sweep", "sweep", "decode", "decode_one", "decode_lazily",
    # Instruction facts the site analysis rests on.
    "FILL", "branch_target", "ends_flow", "flags_dead_after", "is_call", "is_rel32_call", "is_rip_indirect_call",
    "is_transfer", "vector_state_use",
    # Moving instructions: whether they run elsewhere with the same effect (relocate.py's proof).
    "can_relocate", "can_relocate_together",
    # The bytes written at a site: a jump (with where its displacement sits), a retargeted call, a trap.
    "JUMP_SIZE", "JUMP_OPCODE", "JUMP_FIXUP", "jump_bytes", "jump_target", "call_bytes", "call_fixup", "trap_bytes",
    # Jumps shorter than JUMP_SIZE (E9Patch's tactics), through islands outside the image, in
    # zones that the trampolines' room (text_room) and the jumps' REACH bound.
    "tactics", "Islands", "text_room", "REACH",
    # Trampolines: a code buffer at link-time addresses, and what goes in it.
    "Address", "CodeBuffer", "Later", "FILL_BYTE", "ModuleStubs", "emit_count", "emit_callback", "emit_displaced",
    "emit_call_continuation",
    # Following a function's return: the entry's hijack, the return trampoline around the work.
    "Pool", "emit_hijack", "emit_return_head", "emit_return_tail", "emit_lost", "FRAME_ARGS", "FRAME_TSC", "stashed_at",
    # Trace records: one into the thread's ring (the values as descriptors, so that a return
    # trampoline can name saved ones), its header word, the values trace(ARG,...) names.
    "emit_trace", "trace_header", "trace_values", "RingPool", "TraceValue",
    # Loading a library into a running process: a thread's start routine that dlopen()s it,
    # and the way a borrowed thread takes back its state after the call that starts it.
    "LOADER_SLOTS", "emit_loader", "RESUME_RESULT", "RESUME_GPRS", "RESUME_STACK", "RESUME_XSAVE", "emit_resume",
    # Libraries loaded later: a hook on the dynamic loader that waits for jprobe's probes.
    "emit_load_hook",
]
