"""Packed tables (jprobe/packing.py, runtime_c/unpack.c): a program probed at every
instruction carries its trampolines and table packed, and the runtime lays them out again
byte for byte before the program runs."""
import os
import subprocess

import lief
import pytest
from support.build import SOME_VARIANTS
from support.elf import symbol
from support.report import hits_by_address
from support.run import child_env, run_prog, sites

from jprobe import layout, packing, patch_file

N = 2000


def every_instruction(prog) -> list[str]:
    rows = sites(prog)["instructions"]
    spans = [symbol(prog, name) for name in ("mix", "walk", "main")]
    return [r["address"] for r in rows if r["mechanism"] != "none"
            and any(at <= int(r["address"], 16) < at + size for at, size in spans)]


def expected_walk_calls() -> dict[str, int]:
    return {"walk": 1, "mix": N}


@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_the_runtime_lays_out_exactly_the_planned_trampolines(variant, build, tmp_path):
    prog = build("packed.c", variant.flags)
    out = tmp_path / "p"
    plan = patch_file(str(prog), str(out), every_instruction(prog))
    assert plan.packed, "a program probed at every instruction should get a packed table"
    assert len(plan.packed) * 3 < len(plan.text) + len(plan.data)
    env = child_env({"JPROBE_REPORT": str(tmp_path / "r.json")})
    p = subprocess.Popen([str(out), str(N)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        line = p.stdout.readline()                   # its code ran: the runtime had unpacked it
        bias = 0
        if variant.pie == "pie":
            with open(f"/proc/{p.pid}/maps") as f:
                bias = min(int(m.split("-")[0], 16) for m in f if m.rstrip().endswith(str(out)))
        with open(f"/proc/{p.pid}/mem", "rb") as mem:
            mem.seek(bias + plan.text_vaddr)
            text = mem.read(len(plan.text))
            probes_at = layout.sizeof("jp_table")
            mem.seek(bias + plan.data_vaddr + probes_at)
            table = mem.read(len(plan.data) - probes_at)
    finally:
        p.stdin.close()
        p.wait(timeout=60)
    assert line == run_prog([prog, str(N)]).stdout.encode() and p.returncode == 0
    assert text == plan.text
    # the table as planned, but for what the runtime fills in (hits, callbacks)
    size = layout.sizeof("jp_probe")
    n = len(plan.probes)
    skip = {layout.offsetof("jp_probe", f) + k for f in ("hits", "callback") for k in range(8)}
    assert all(table[i] == plan.data[probes_at + i] for i in range(n * size) if i % size not in skip)
    assert table[n * size:] == plan.data[probes_at + n * size:]


def test_counts_stay_exact_when_packed(build, tmp_path):
    from support.run import run_with_report
    prog = build("packed.c", ["-O2", "-fPIE", "-pie"])
    out = tmp_path / "p"
    plan = patch_file(str(prog), str(out), every_instruction(prog))
    assert plan.packed
    got, report = run_with_report([out, str(N)], tmp_path / "r.json")
    assert got.stdout == run_prog([prog, str(N)]).stdout
    hits = hits_by_address(report)
    assert {name: hits[symbol(prog, name)[0]] for name in ("walk", "mix")} == expected_walk_calls()
    assert all(p["probe"] == p["address"] for p in report["probes"])   # address specs written back


def test_a_damaged_packed_table_stops_the_program_with_a_message(build, tmp_path):
    prog = build("packed.c", ["-O2", "-no-pie"])
    out = tmp_path / "p"
    plan = patch_file(str(prog), str(out), every_instruction(prog))
    offset = lief.ELF.parse(str(out)).virtual_address_to_offset(plan.text_vaddr)
    data = bytearray(out.read_bytes())
    assert data[offset:offset + len(packing.MAGIC)] == packing.MAGIC
    data[offset + len(plan.packed) - 1] ^= 0xFF         # the last operation's bytes
    data[offset + 20] ^= 0x40                           # and the header
    out.write_bytes(bytes(data))
    os.chmod(out, 0o755)
    r = run_prog([out, str(N)])
    assert r.returncode == 127 and "damaged packed probe table" in r.stderr and not r.stdout


def test_a_library_keeps_its_trampolines_unpacked(build, tmp_path):
    """Its code may run before the runtime sees it (a dlopen()): nothing to unpack first."""
    lib = build.lib("run_dllib.c")
    rows = sites(lib)["instructions"]
    plan = patch_file(str(lib), str(tmp_path / "lib.so"), [r["address"] for r in rows if r["mechanism"] != "none"])
    assert not plan.packed


def test_packing_gives_back_every_byte_of_a_plan():
    """The reference unpacker, on a plan made by hand-free means: the planner's own."""
    import jprobe.planner as planner
    from jprobe.elf import ElfModule
    from jprobe.spec import parse_probe
    path = "/bin/true"
    module = ElfModule(path)
    rows = [r["address"] for r in sites(path)["instructions"] if r["mechanism"] != "none"][:3000]
    probes = planner.resolve_probes(module, [parse_probe(a) for a in rows], False)
    base = -(-module.end_of_image() // 0x1000) * 0x1000
    plan = planner.build_plan(module, probes, base, base + 0x80_0000)
    blob = packing.pack(plan, module.read)
    assert packing.unpack(blob, plan, module.read) == (plan.text, plan.data[layout.sizeof("jp_table"):])
    assert len(blob) < (len(plan.text) + len(plan.data)) / 4


def test_a_final_plan_that_outgrows_its_packed_room_is_written_unpacked(build, tmp_path, monkeypatch):
    """The draft sizes the packed room; should the final plan pack larger, the file is
    planned again without packing, and runs the same."""
    import jprobe.patcher.static as static
    from support.run import run_with_report
    real = static.packing.pack

    def larger(plan, read, check=True):
        blob = real(plan, read, check)
        return blob + bytes(1 << 20) if check else blob
    monkeypatch.setattr(static.packing, "pack", larger)
    prog = build("packed.c", ["-O2", "-fPIE", "-pie"])
    plan = patch_file(str(prog), str(tmp_path / "p"), every_instruction(prog))
    assert not plan.packed
    got, report = run_with_report([tmp_path / "p", str(N)], tmp_path / "r.json")
    assert got.stdout == run_prog([prog, str(N)]).stdout
    hits = hits_by_address(report)
    assert {name: hits[symbol(prog, name)[0]] for name in ("walk", "mix")} == expected_walk_calls()
