"""Planning at scale (issue 11): the work `jprobe run` does to plan many probes, counted rather
than timed, so that a regression fails here whatever else shares the machine (its timings
move by 2x with the load; benchmarks/plan_scale.py times it).

Before the fix, planning 1,000 libc probes parsed libc once but decoded ~62 instructions a
probe with capstone's details (~15 us and ~2 KiB each, all kept), every probe's trampoline
twice (a draft, then the plan) and asked keystone for one new template a probe: 3.6 s and
300 MiB. Now each function is swept once without details, a probe decodes the few
instructions it reads, the plan is built once and keystone assembles only fixed templates.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import lief
import pytest

from jprobe import arch, room, runner
from jprobe.elf import ElfModule
from jprobe.loader import find_library
from jprobe.planfile import encode
from jprobe.spec import parse_probes
from jprobe.trampolines import x86_64
from jprobe.trampolines.asm import assemble

LIBC = find_library("libc.so.6")
pytestmark = pytest.mark.skipif(LIBC is None, reason="libc.so.6 not found")


@dataclass
class Work:
    """What one planning did, counted."""

    parsed: list[str] = field(default_factory=list)          # files LIEF parsed
    swept: collections.Counter = field(default_factory=collections.Counter)   # sweeps by address
    detailed: int = 0                                        # instructions decoded with details
    builds: int = 0                                          # build_plan calls
    assembled: int = 0                                       # keystone calls (assembler cache misses)


def libc_probes(count: int, skip: int = 0) -> list[str]:
    """`count` libc functions spread over the library, from the `skip`-th of every stride on."""
    functions = [s for s in ElfModule(LIBC).functions if s.size]
    stride = len(functions) // count
    return [f"libc.so.6:{s.address:#x}" for s in functions[skip::stride][:count]]


def plan_counted(monkeypatch, texts: list[str]) -> Work:
    """Plan `texts` as `jprobe run` does before it starts the program, counting the work."""
    work = Work()
    parse, sweep, disasm, build = lief.ELF.parse, arch.sweep, x86_64._cs.disasm, room.build_plan

    def parsed(path, *args, **kwargs):
        work.parsed.append(str(path))
        return parse(path, *args, **kwargs)

    def swept(code, address):
        work.swept[address] += 1
        return sweep(code, address)

    def detailed(*args):
        for insn in disasm(*args):
            work.detailed += 1
            yield insn

    def built(*args, **kwargs):
        work.builds += 1
        return build(*args, **kwargs)

    monkeypatch.setattr(lief.ELF, "parse", parsed)
    monkeypatch.setattr(arch, "sweep", swept)
    monkeypatch.setattr(x86_64._cs, "disasm", detailed)
    monkeypatch.setattr(room, "build_plan", built)
    misses = assemble.cache_info().misses
    encode(runner.plan_modules("/bin/true", parse_probes(texts), strict=False))
    work.assembled = assemble.cache_info().misses - misses
    monkeypatch.undo()
    return work


def test_libc_is_parsed_once_each_function_swept_once_and_the_plan_built_once(monkeypatch):
    texts = libc_probes(300)
    work = plan_counted(monkeypatch, texts)
    assert work.parsed.count(LIBC) == 1, work.parsed
    assert max(work.swept.values()) == 1
    # a function and its pieces (`foo.cold`), no more: no sweep of the whole module
    assert len(texts) <= sum(work.swept.values()) <= 1.2 * len(texts)
    assert work.builds == 1


def test_a_probe_decodes_a_few_instructions_with_details_and_assembles_nothing_new(monkeypatch):
    plan_counted(monkeypatch, libc_probes(50))          # the templates every plan shares
    texts = libc_probes(400, skip=1)
    work = plan_counted(monkeypatch, texts)
    # ~2.6 a probe on Debian 12's libc (its first instruction or two, their relocated
    # copies): whole functions (~60 a probe) must not come back
    assert work.detailed <= 8 * len(texts), work.detailed
    assert work.assembled <= 10, work.assembled
