"""`jprobe sites`: the mechanism every instruction of a function, or of a whole module, would get."""
from __future__ import annotations

from .elf import ElfModule
from .errors import JprobeError
from .sites import SiteAnalyzer
from .trampolines import x86_64 as arch


def _row(analyzer: SiteAnalyzer, insn) -> dict:
    try:
        site = analyzer.analyse(insn.address)
        mechanism, reason, tactic = site.mechanism, site.reason, site.tactic
    except JprobeError as e:
        mechanism, reason, tactic = "none", str(e), None
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


def site_table(path: str, symbol: str | None) -> tuple[ElfModule, list[dict]]:
    """(the module, one row per instruction) for `symbol`, or for all executable code."""
    module = ElfModule(path)
    analyzer = SiteAnalyzer(module)
    if symbol is not None:
        sym = module.resolve(symbol)
        if not sym.size:
            raise JprobeError(f"{path}: {sym.name} has no size in the symbol table, so its instructions "
                              f"are unknown; probe it by address (`objdump -d` shows them)")
        facts = analyzer.facts(sym)
        return module, [_row(analyzer, i) for i in facts.insns]
    rows = []
    for _, start, end in module.code_sections():
        address = start
        for sym in (s for s in module.functions if start <= s.address < end):
            if sym.address < address:
                continue                       # nested or overlapping symbol: already covered
            rows += [_row(analyzer, i) for i in _loose_code(module, address, sym.address)]
            rows += [_row(analyzer, i) for i in analyzer.facts(sym).insns]
            address = max(address, sym.end)
        rows += [_row(analyzer, i) for i in _loose_code(module, address, end)]
    return module, rows
