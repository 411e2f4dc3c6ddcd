"""The unwinder kept off followed returns under `jprobe attach` (runtime_c/unwind.c says why
and what each callback does): the probes of jprobe's own that a session places before its
first `%return` probe, on the unwinder's entry points wherever the process has them.

Probes, not interposition: a probe is on the function's code, so it sees every caller, also
glibc's own calls into libgcc_s (pthread_exit and cancellation unwind through it) and a copy
of the unwinder linked into the executable (-static-libgcc). A module the process loads later
(libgcc_s, which glibc loads on the first pthread_exit or backtrace) gets them when it loads
(patcher/loads.py), before its code runs.
"""
from __future__ import annotations

from dataclasses import replace

from .. import arch
from ..elf import ElfModule
from ..errors import JprobeError, SymbolError
from ..layout import RUNTIME_DIR
from ..mechanisms import Mechanism
from ..sites import SiteAnalyzer
from ..spec import Handler, ProbeSpec, parse_probe
from .live import LiveSession

STEM = "libjprobe_unwind"
PROLOGUE = 16                          # instructions looked at for a site that takes a jump
RAISE, CATCH, WALK = "jprobe_unwind_raise", "jprobe_unwind_catch", "jprobe_unwind_walk"
ENTRY_POINTS = {
    "_Unwind_RaiseException": RAISE, "_Unwind_Resume": RAISE, "_Unwind_Resume_or_Rethrow": RAISE,
    "_Unwind_ForcedUnwind": RAISE, "_Unwind_Backtrace": WALK, "pthread_exit": RAISE, "__cxa_begin_catch": CATCH,
}
# Where the process may have them: None is the executable (an unwinder linked in).
MODULES: tuple[str | None, ...] = ("libgcc_s.so.1", "libstdc++.so.6", "libc.so.6", None)
# Known to hold them, so waited for when not loaded yet: glibc loads libgcc_s itself.
AWAITED = {"libgcc_s.so.1": ("_Unwind_RaiseException", "_Unwind_Resume", "_Unwind_Resume_or_Rethrow",
                             "_Unwind_ForcedUnwind", "_Unwind_Backtrace"),
           "libstdc++.so.6": ("__cxa_begin_catch",)}


def library() -> str:
    """The built unwind.c, as a callback library's path."""
    found = sorted(RUNTIME_DIR.glob(f"{STEM}*.so"))
    if not found:
        raise SymbolError(f"{STEM} is not built in {RUNTIME_DIR}; reinstall jprobe with `pip install .`")
    return str(found[0])


def probes(session: LiveSession) -> tuple[list[ProbeSpec], list[ProbeSpec]]:
    """The unwinder's probes: those on modules the process has loaded, and those to place
    when it loads the others."""
    lib = library()
    present: list[ProbeSpec] = []
    waiting: list[ProbeSpec] = []
    for name in MODULES:
        loaded = session.loaded(name)
        if loaded is None:
            waiting += [_spec(name, fn, 0, lib) for fn in AWAITED.get(name, ())]
            continue
        module = session.module(loaded)
        analyzer = SiteAnalyzer(module)
        for fn in ENTRY_POINTS:
            try:
                module.resolve(fn)
            except SymbolError:
                continue
            present.append(_spec(name, fn, site_offset(analyzer, fn), lib))
    return present, waiting


def settled(session: LiveSession, spec: ProbeSpec) -> ProbeSpec:
    """A probe that waited for its module, now loaded: at its site there (site_offset)."""
    loaded = session.loaded(spec.module)
    analyzer = SiteAnalyzer(session.module(loaded))
    return _spec(spec.module, spec.symbol, site_offset(analyzer, spec.symbol), spec.handler.library)


def site_offset(analyzer: SiteAnalyzer, function: str) -> int:
    """Where in `function` its probe goes: its entry, or, for a raise or a walk, the first
    instruction of its straight-line prologue that takes a jump under jprobe attach (their
    callbacks restore the slots above the stack pointer: one lower than at the entry, by
    the registers pushed, covers the same frames). At the entry when none does: the probe is
    then refused with the entry's reason."""
    if ENTRY_POINTS[function] == CATCH:
        return 0
    module: ElfModule = analyzer.module
    sym = module.resolve(function)
    for insn in analyzer.facts(sym).insns[:PROLOGUE]:
        try:
            site = analyzer.analyse(insn.address, tactics=False)
        except JprobeError:
            site = None
        if site is not None and site.mechanism is Mechanism.JUMP and site.jump is None:
            return insn.address - sym.address
        if arch.is_transfer(insn):
            break
    return 0


def _spec(module: str | None, function: str, offset: int, lib: str) -> ProbeSpec:
    location = f"{function}+{offset:#x}" if offset else function
    spec = parse_probe(f"{module}:{location}" if module else location)
    return replace(spec, handler=Handler("callback", library=lib, function=ENTRY_POINTS[function]))
