"""`jprobe sites`: the mechanism every instruction of a function, or of a whole module, would get."""
from __future__ import annotations

from capstone import CsInsn

from .elf import ElfModule, Symbol
from .errors import JprobeError, SpecError, SymbolError
from .frames import PREFIX
from .mechanisms import Mechanism
from .planner import resolve_address
from .sites import SiteAnalyzer
from .spec import COUNT, ProbeSpec, parse_probe
from . import arch


def _row(analyzer: SiteAnalyzer, insn, tactics: bool, traps: bool = True) -> dict:
    try:
        site = analyzer.analyse(insn.address, tactics=tactics)
        mechanism, reason, tactic = site.mechanism, site.reason, site.tactic
    except JprobeError as e:
        mechanism, reason, tactic = "none", str(e), None
    if mechanism == Mechanism.TRAP and not traps:
        mechanism, reason = "none", f"refused: needs a trap ({reason}), which `jprobe attach` cannot serve"
    return {"address": f"{insn.address:#x}", "mechanism": mechanism, "tactic": tactic, "reason": reason,
            "instruction": f"{insn.mnemonic} {insn.op_str}".strip()}


def _loose_code(module: ElfModule, start: int, end: int):
    """Instructions of code no function symbol covers, decoded linearly."""
    address = start
    while address < end:
        insn = arch.decode_one(module.read(address, min(15, end - address)), address)
        if insn is None:
            address += 1
            continue
        yield insn
        address += insn.size


def predicted_applier(module: ElfModule, applier: str | None) -> str:
    """The applier a site table is for: the one asked for, else `jprobe run` for a library
    (whose short sites only `run` can give islands), else both (they decide alike)."""
    if applier is not None:
        return applier
    return "run" if module.is_library else "patch and run"


def site_table(path: str, location: str | None, applier: str | None = None) -> tuple[ElfModule, list[dict]]:
    """(the module, one row per instruction) for LOCATION's function, or for all executable code,
    as `applier` ("patch", "run", "attach", None: see predicted_applier) would decide each site.

    `jprobe patch` gives a library no islands (they would not be mapped before its code runs),
    so its short sites trap; for a program both appliers place islands. `jprobe attach` places
    no islands and no traps: a site that would need one is refused (mechanism "none")."""
    module = ElfModule(path)
    analyzer = SiteAnalyzer(module)
    tactics = applier != "attach" and not (module.is_library and applier == "patch")
    traps = applier != "attach"

    def rows_of(insns) -> list[dict]:
        return [_row(analyzer, i, tactics, traps) for i in insns]
    if location is not None:
        return module, rows_of(_instructions_at(analyzer, location))
    rows = []
    for _, start, end in module.code_sections():
        address = start
        for sym in (s for s in module.functions if start <= s.address < end):
            if sym.address < address:
                continue                       # nested or overlapping symbol: already covered
            rows += rows_of(_loose_code(module, address, sym.address))
            rows += rows_of(analyzer.facts(sym).insns)
            address = max(address, sym.end)
        rows += rows_of(_loose_code(module, address, end))
    return module, rows


def _location(path: str, text: str) -> ProbeSpec:
    """LOCATION parsed as `-p` parses it, without what only a probe has."""
    try:
        spec = parse_probe(text)
    except SpecError as e:
        raise SpecError(f"{path}: {str(e).replace('bad probe', 'bad location', 1)}") from None
    if spec.module is not None:
        raise SpecError(f"'{text}': `jprobe sites` reads one file, INPUT; drop the MODULE '{spec.module}:' "
                        f"and give that module's file as INPUT")
    if spec.handler != COUNT or spec.on_return:
        raise SpecError(f"'{text}': a handler or %return belongs to a probe; give only the location "
                        f"(`jprobe sites {path} {spec.location()}`)")
    return spec


def _instructions_at(analyzer: SiteAnalyzer, text: str) -> list[CsInsn]:
    """The instructions of the function LOCATION names or lies in (so that its boundaries show),
    or the one instruction there when no function holds it."""
    module = analyzer.module
    spec = _location(module.path, text)
    if spec.symbol is not None and spec.symbol.startswith(PREFIX):
        sym = _unwind_range(analyzer, spec.symbol)
        if spec.offset >= sym.size:
            raise SymbolError(f"'{text}': offset {spec.offset:#x} is outside {sym.name} ({sym.size} bytes)")
        address = sym.address + spec.offset
    elif spec.symbol is not None and not spec.offset:
        sym = module.resolve(spec.symbol)
        if not sym.size:
            raise JprobeError(f"{module.path}: {sym.name} has no size in the symbol table, so its instructions "
                              f"are unknown; probe it by address (`objdump -d` shows them)")
        return analyzer.facts(sym).insns
    else:
        address = resolve_address(module, spec)
        sym = analyzer.function_at(address)
    insns = analyzer.facts(sym).insns if sym is not None and sym.size else []
    return insns or [analyzer.instruction_at(address)]


def _unwind_range(analyzer: SiteAnalyzer, name: str) -> Symbol:
    """The pseudo-symbol `frame@0x...` that messages name for code only .eh_frame describes."""
    try:
        start = int(name[len(PREFIX):], 16)
    except ValueError:
        start = None
    sym = analyzer.frames.symbol_at(start) if start is not None else None
    if sym is None or sym.address != start:
        raise SymbolError(f"{analyzer.module.path}: no unwind range starts at '{name}'; give an address or "
                          f"a symbol, as -p takes them")
    return sym
