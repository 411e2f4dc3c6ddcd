"""What the tests read from ELF files themselves (pyelftools, capstone), to check jprobe
against an independent reading of the binary."""
from __future__ import annotations


def elf_symbols(binary) -> dict[str, tuple[int, int]]:
    """{name: (value, size)} of function symbols from .symtab and .dynsym."""
    from elftools.elf.elffile import ELFFile
    out = {}
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        for secname in (".dynsym", ".symtab"):
            sec = elf.get_section_by_name(secname)
            if sec is None:
                continue
            for s in sec.iter_symbols():
                if s["st_info"]["type"] == "STT_FUNC" and s["st_shndx"] != "SHN_UNDEF":
                    out[s.name] = (s["st_value"], s["st_size"])
    return out


def symbol(binary, name: str) -> tuple[int, int]:
    syms = elf_symbols(binary)
    assert name in syms, f"{name} not in {binary}"
    return syms[name]


def vaddr_to_offset(binary, vaddr: int) -> int:
    """File offset of a link-time virtual address (via PT_LOAD headers)."""
    from elftools.elf.elffile import ELFFile
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            if seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
                return vaddr - seg["p_vaddr"] + seg["p_offset"]
    raise AssertionError(f"{vaddr:#x} is in no PT_LOAD segment of {binary}")


def read_vaddr(binary, vaddr: int, size: int) -> bytes:
    off = vaddr_to_offset(binary, vaddr)
    with open(binary, "rb") as f:
        f.seek(off)
        return f.read(size)


def disasm_function(binary, name: str) -> list:
    """Capstone instructions (Intel syntax) of a function, at link-time addresses."""
    import capstone
    value, size = symbol(binary, name)
    assert size > 0, f"{name} has no size"
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    code = read_vaddr(binary, value, size)
    insns = list(md.disasm(code, value))
    assert sum(i.size for i in insns) == size, f"could not disassemble all of {name}"
    return insns


def branch_target(insn) -> int | None:
    """The immediate target of a direct jmp/jcc/call, else None."""
    import capstone
    from capstone import x86
    groups = set(insn.groups)
    if groups & {capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL}:
        if insn.operands and insn.operands[0].type == x86.X86_OP_IMM:
            return insn.operands[0].imm
    return None


def is_control_flow(insn) -> bool:
    import capstone
    return bool(set(insn.groups) & {capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL,
                                    capstone.CS_GRP_RET, capstone.CS_GRP_INT, capstone.CS_GRP_IRET})
