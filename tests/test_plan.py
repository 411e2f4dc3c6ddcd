"""Patch plans: serialisable, and relocatable through their fix-ups alone."""
import struct
import subprocess
from pathlib import Path

import pytest

from jprobe.elf import ElfModule
from jprobe.plan import ModulePlan
from jprobe.planner import build_plan, resolve_probes
from jprobe.spec import parse_probes

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    prog, cb = d / "calls", d / "cb.so"
    subprocess.run(["gcc", "-O2", "-o", prog, FIXTURES / "calls.c"], check=True)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-I", FIXTURES.parent.parent / "jprobe" / "runtime_c",
                    "-o", cb, FIXTURES / "cb_count.c"], check=True)
    module = ElfModule(str(prog))
    sites = [f"{s.address:#x}" for s in module.functions if s.name in ("main", "fib")]
    probes = resolve_probes(module, parse_probes(sites + [f"leaf={cb}:on_hit"]), strict=False)
    return module, probes


def apply_fixups(plan: ModulePlan, delta: int) -> tuple[bytes, list[bytes]]:
    text = bytearray(plan.text)
    for off in plan.text_fixups:
        (disp,) = struct.unpack_from("<i", text, off)
        struct.pack_into("<i", text, off, disp - delta)
    patched = []
    for p in plan.probes:
        b = bytearray(p.patched)
        if p.patch_fixup is not None:
            (disp,) = struct.unpack_from("<i", b, p.patch_fixup)
            struct.pack_into("<i", b, p.patch_fixup, disp + delta)
        patched.append(bytes(b))
    return bytes(text), patched


@pytest.mark.parametrize("delta", [0x1000, 0x7fff000, -0x8000])
def test_fixups_alone_move_a_plan(planned, delta):
    module, probes = planned
    base = module.end_of_image() + 0x10000
    here = build_plan(module, probes, base, base + 0x8000)
    there = build_plan(module, probes, base + delta, base + 0x8000 + delta)
    assert here.text_fixups, "a plan always reaches back into its module"
    assert apply_fixups(here, delta) == (there.text, [p.patched for p in there.probes])


def test_plan_round_trips_through_json(planned):
    module, probes = planned
    plan = build_plan(module, probes, 0x100000, 0x108000)
    assert ModulePlan.from_json(plan.to_json()) == plan


def test_fixups_recorded_while_emitting_match_a_decode_of_the_whole_text(planned):
    """The planner records each field as it emits it; decoding the finished text must find
    the same ones (a field missed would point elsewhere once the text moves)."""
    from jprobe.trampolines import x86_64 as arch
    module, probes = planned
    plan = build_plan(module, probes, 0x100000, 0x108000)
    added = [(plan.text_vaddr, plan.text_vaddr + len(plan.text)), (plan.data_vaddr, plan.data_vaddr + len(plan.data))]
    decoded = sorted(off for off, target in arch.references(plan.text, plan.text_vaddr)
                     if not any(lo <= target < hi for lo, hi in added))
    assert plan.text_fixups == decoded
