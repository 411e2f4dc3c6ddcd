"""`jprobe run`: plan every module the probes name, run the program with the runtime preloaded,
and report the whole process tree's hits when it has ended."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile

from . import counters
from .elf import ElfModule
from .loader import find_module, find_program
from .planfile import PlannedModule, encode, identity
from .planner import build_plan, resolve_probes
from .runtime import runtime_library
from .spec import ProbeSpec, check_supported

ALIGN = 0x10000


def plan_modules(program: str, specs: list[ProbeSpec], strict: bool) -> list[PlannedModule]:
    """One plan per module the specs name, the main program's first."""
    main = ElfModule(program)
    by_module: dict[str, tuple[str, list[ProbeSpec]]] = {}
    for spec in specs:
        check_supported(spec)
        path = program if spec.module is None else find_module(spec.module, main)
        by_module.setdefault(path, (spec.module or "", []))[1].append(spec)
    planned = []
    for path, (name, module_specs) in by_module.items():
        module = main if path == program else ElfModule(path)
        probes = resolve_probes(module, module_specs, strict)
        text = -(-module.end_of_image() // ALIGN) * ALIGN
        data = text + -(-(len(build_plan(module, probes, text, text).text) + 1) // ALIGN) * ALIGN
        planned.append(PlannedModule(build_plan(module, probes, text, data), name, *identity(path)))
    return planned


def run(command: list[str], specs: list[ProbeSpec], strict: bool = False) -> tuple[int, dict]:
    """Run `command` under the probes; its exit status (as a shell reports it) and the report."""
    program = find_program(command[0])
    modules = plan_modules(program, specs, strict)
    with tempfile.TemporaryDirectory(prefix="jprobe-run-") as work:
        plan_path, counters_path = os.path.join(work, "plan"), os.path.join(work, "counters")
        with open(plan_path, "wb") as f:
            f.write(encode(modules))
        counters.create(counters_path, len(modules))
        env = dict(os.environ, JPROBE_PLAN=plan_path, JPROBE_COUNTERS=counters_path)
        env["LD_PRELOAD"] = ":".join(filter(None, [runtime_library(), os.environ.get("LD_PRELOAD")]))
        env.pop("JPROBE_REPORT", None)
        proc = subprocess.Popen(command, executable=program, env=env)
        with _ignoring(signal.SIGINT), _ignoring(signal.SIGQUIT):
            status = proc.wait()
        report = counters.build_report(counters_path, modules, proc.pid, program)
    return (128 - status if status < 0 else status), report


class _ignoring:
    """While the program runs, terminal signals are its business (like `time` and `perf stat`)."""

    def __init__(self, sig: int):
        self.sig = sig

    def __enter__(self):
        self.old = signal.signal(self.sig, signal.SIG_IGN)

    def __exit__(self, *exc):
        signal.signal(self.sig, self.old)
