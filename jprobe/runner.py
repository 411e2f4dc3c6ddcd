"""`jprobe run`: plan every module the probes name, run the program with the runtime preloaded,
and report the whole process tree's hits when it has ended."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading

from . import arch, counters, layout
from .events import Drainer, EventReader, TraceProbe, record_key, trace_args, tsc_note
from .chooser import Policy
from .elf import ElfModule
from .errors import JprobeError
from .loader import ModuleNotFound, find_module, find_program, needed_closure
from .planfile import PlannedModule, encode, identity
from .planner import cycles_uncollected, resolve_probes
from .room import Room, RoomFor, plan_in_room
from .runtime import FORCED_UNWIND, UNWINDER, UNWINDING, runtime_library
from .spec import ProbeSpec, parse_probe

ALIGN = 0x10000


def plan_modules(program: str, specs: list[ProbeSpec], strict: bool) -> list[PlannedModule]:
    """One plan per module the specs name, the main program's first.

    The program itself is read only when it is probed or an ELF file (a script whose
    interpreter loads the probed library is fine).
    """
    needs_main = any(spec.module is None for spec in specs)
    main = ElfModule(program) if needs_main or _is_elf(program) else None
    if main is not None:
        main.check_runtime_loads()             # LD_PRELOAD means nothing to a static program
    by_module: dict[str, tuple[str, list[ProbeSpec]]] = {}
    paths: dict[str | None, str] = {None: program}      # each MODULE searched for once
    for spec in specs:
        if spec.module not in paths:
            paths[spec.module] = find_module(spec.module, main)
        by_module.setdefault(paths[spec.module], (spec.module or "", []))[1].append(spec)
    unwinding = _unwinder_probe(specs, main)
    if unwinding is not None:
        by_module.setdefault(unwinding[0], (UNWINDER, []))[1].append(unwinding[1])
    with cycles_uncollected():
        return [_plan_module(path, name, module_specs, main if path == program else None, strict)
                for path, (name, module_specs) in by_module.items()]


def _unwinder_probe(specs: list[ProbeSpec], main: ElfModule | None) -> tuple[str, ProbeSpec] | None:
    """Where some probe follows returns: jprobe's own probe on libgcc_s's forced unwind
    (runtime.UNWINDING says why), unless the user probes that function or there is none."""
    if not any(spec.on_return for spec in specs) or any(
            spec.module == UNWINDER and spec.symbol == FORCED_UNWIND for spec in specs):
        return None
    try:
        path = find_module(UNWINDER, main)
    except ModuleNotFound:
        return None
    return path, parse_probe(f"{UNWINDER}:{FORCED_UNWIND}={runtime_library()}:{UNWINDING}")


def _plan_module(path: str, name: str, specs: list[ProbeSpec], module: ElfModule | None,
                 strict: bool) -> PlannedModule:
    """The plan of one module (`module`: the file at `path` when it is parsed already)."""
    if module is None:
        module = ElfModule(path)
    if module.rewritten:
        raise JprobeError(f"{path}: rewritten by `jprobe patch`, so `jprobe run` would count its probes "
                          f"in place of the file's own, which count nowhere; probe the original file, or "
                          f"run the rewritten one alone with JPROBE_REPORT=FILE")
    probes = resolve_probes(module, specs, strict)
    plan = plan_in_room(module, probes, _room_for(module, len(probes)), Policy(movable=True, strict=strict))
    return PlannedModule(plan, name, *identity(path))


def _room_for(module: ElfModule, nprobes: int) -> RoomFor:
    """The only room there is (room.RoomFor): past the image, below where islands may be."""
    text = _aligned(module.end_of_image())
    end = module.end_of_image() + arch.text_room(nprobes)
    # The table goes past the trampolines and an eighth more of their size: room a draft
    # plan once needed, kept so that plans stay as they were.
    room = Room(text, lambda size: text + _aligned(size + size // 8 + 1), end, end)
    return lambda outgrown: room if outgrown is None else None


def _aligned(size: int) -> int:
    """`size` rounded up to ALIGN."""
    return -(-size // ALIGN) * ALIGN


def rewritten_elsewhere(program: str, modules: list[PlannedModule]) -> list[str]:
    """A note for each module the program loads at start-up (itself included) that `jprobe
    patch` rewrote and no probe names: under `jprobe run` its own probes count nowhere.
    (One dlopen()ed later only the runtime sees.)"""
    if not _is_elf(program):
        return []
    main = ElfModule(program)
    planned = {m.plan.module for m in modules}
    found = [p for p in [program, *needed_closure(main)] if p not in planned and ElfModule(p).rewritten]
    return [f"{p} was rewritten by `jprobe patch`: its own probes are not counted under `jprobe run`; "
            f"run it alone with JPROBE_REPORT=FILE to count them" for p in found]


def _is_elf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def found_later(program: str, specs: list[ProbeSpec]) -> list[ProbeSpec]:
    """The specs on a library that the dynamic loader would not find (a plugin the program
    dlopen()s by a path of its own): they wait until the program loads it."""
    main = ElfModule(program) if _is_elf(program) else None
    later = []
    for spec in specs:
        if spec.module is not None and "/" not in spec.module:
            try:
                find_module(spec.module, main)
            except ModuleNotFound:
                later.append(spec)
    return later


def run(command: list[str], specs: list[ProbeSpec], strict: bool = False, events: str | None = None,
        events_json: bool = False) -> tuple[int, dict]:
    """Run `command` under the probes; its exit status (as a shell reports it) and the report.
    Trace events go to stderr as they happen, or to the file `events`; JSON lines with
    `events_json`."""
    program = find_program(command[0])
    later = found_later(program, specs)
    modules = plan_modules(program, [s for s in specs if s not in later], strict)
    notes = rewritten_elsewhere(program, modules)
    traced = trace_probes(modules)
    if traced and tsc_note():
        notes.append(tsc_note())
    for note in notes:
        sys.stderr.write(f"jprobe: note: {note}\n")
    with _Forwarding() as forwarding, tempfile.TemporaryDirectory(prefix="jprobe-run-") as work, \
            events_out(events if traced else None) as out:
        plan_path, counters_path = os.path.join(work, "plan"), os.path.join(work, "counters")
        with open(plan_path, "wb") as f:
            f.write(encode(modules))
        counters.create(counters_path, len(modules))
        reader = EventReader(traced, out, events_json, counters_path) if traced else None
        env = dict(os.environ, JPROBE_PLAN=plan_path, JPROBE_COUNTERS=counters_path)
        # Preloaded, the runtime patches what is mapped at start-up; as an audit library (the
        # same file) it patches what dlopen() maps later, before that code runs.
        for var in ("LD_PRELOAD", "LD_AUDIT"):
            env[var] = _prepend(runtime_library(), os.environ.get(var))
        env.pop("JPROBE_REPORT", None)
        with _Later(later, strict, env) as waiting, _draining(reader) as drainer:
            # close_fds=False: the program inherits every descriptor jprobe was given (make's
            # jobserver, `5>file`), as under perf stat or strace; jprobe's own are close-on-exec.
            proc = subprocess.Popen(command, executable=program, env=env, close_fds=False)
            waiting.attach(proc.pid)
            status = forwarding.wait(proc, waiting.lock)
        report = counters.build_report(counters_path, modules, proc.pid, program)
        if reader is not None:
            _note_events(report, reader, events, drainer.error)
            reader.close()
    report["probes"] += waiting.probes
    report["errors"] = notes + report["errors"] + waiting.errors
    return (128 - status if status < 0 else status), report


def trace_probes(modules: list[PlannedModule]) -> list[TraceProbe]:
    """The trace probes of the plans, as the event reader knows them (aliases by their first name)."""
    return [TraceProbe(record_key(m.plan.module, j), probe.target.split("\n")[0], args)
            for m in modules for j, probe in enumerate(m.plan.probes)
            if (args := trace_args(probe.handler)) is not None]


@contextlib.contextmanager
def events_out(path: str | None):
    """The descriptor trace events go to: stderr, or the file `path`, made anew."""
    if path is None:
        yield sys.stderr.fileno()
        return
    from .output import check_writable
    check_writable(path, "--events")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _draining(reader: EventReader | None):
    """The reader drained while the program runs, and once more after it has ended."""
    if reader is None:
        yield None
        return
    sys.stderr.flush()
    # Started with the signals _Forwarding waits for blocked, so that none lands in its thread.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, (*_Forwarding.SIGNALS, signal.SIGCHLD))
    try:
        drainer = Drainer(reader).__enter__()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    try:
        yield drainer
    finally:
        drainer.__exit__()


def _note_events(report: dict, reader: EventReader, path: str | None, error: Exception | None) -> None:
    """Where each trace probe's events went, and how many (under its first name)."""
    by_name = {(p.name, p.key >> layout.CONST["JP_REC_KEY_SHIFT"]): p for p in reader.probes}
    for entry in report["probes"]:
        probe = by_name.get((entry["probe"], layout.module_key(entry["module"])))
        if probe is None:
            continue
        entry["events_count"] = reader.events_of(probe)
        if path is not None:
            entry["events_file"] = os.path.abspath(path)
        else:
            entry["events_to"] = "stderr"
    unknown, corrupt = reader.dropped()
    if corrupt:
        report["errors"].append(f"trace: {corrupt} ring(s) held records that did not parse (a signal handler "
                                f"traced in the middle of a record of its own thread); the rest of each was skipped")
    if error is not None:
        report["errors"].append(str(error))


class _Later:
    """Probes on libraries the program loads by a path of its own: the runtime holds the
    program before any of its code runs (JPROBE_HOLD) while jprobe attaches to it and leaves
    them waiting for their library (jprobe attach's load watcher, patcher/loads.py). They are
    placed in the program's first process (and the processes it forks after it loaded the
    library), not in the programs it execs."""

    def __init__(self, specs: list[ProbeSpec], strict: bool, env: dict[str, str]):
        self.specs, self.strict = specs, strict
        self.probes: list[dict] = []
        self.errors: list[str] = []
        self.process = None
        # Held while jprobe's threads are stopped: the program is jprobe's child, so waiting
        # for it then (Popen.poll) would take a stop's status meant for the stopping.
        self.lock: threading.RLock | contextlib.nullcontext = contextlib.nullcontext()
        self.go = -1
        if specs:
            hold, self.go = os.pipe()
            os.set_inheritable(hold, True)
            self.hold = hold
            env["JPROBE_HOLD"] = str(hold)

    def __enter__(self) -> "_Later":
        return self

    def attach(self, pid: int) -> None:
        if not self.specs:
            return
        from .process import Process
        os.close(self.hold)
        try:
            self.process = Process(pid, self.strict)
            self.lock = self.process.stopping
            self.process.probes([s.text for s in self.specs])
        except JprobeError as err:
            self.errors.append(f"probes on libraries loaded later were not placed: {err}")
        finally:
            os.close(self.go)                   # the program goes on
            self.go = -1

    def __exit__(self, *exc) -> None:
        if self.go >= 0:
            os.close(self.go)
        if self.process is not None:
            self.process.detach()
            report = self.process.report()
            self.probes = report["probes"]
            self.errors = [e for e in report["errors"] if e != self.process.exited]


def _prepend(library: str, search_list: str | None) -> str:
    """`library` first in a ld.so list variable, once."""
    others = [p for p in (search_list or "").split(":") if p and p != library]
    return ":".join([library, *others])


class _Forwarding:
    """Signals sent to `jprobe run` go to the program, as `timeout` and `perf stat` do; jprobe
    itself lives on to write the report and remove its files once the program has ended.

    A terminal's ^C and ^\\, and the hang-up of its foreground group, come from the kernel
    (SI_KERNEL) to the whole group, the program with it: those are not sent a second time.
    Signals that come before the program has started are sent to it once it has.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
    SI_KERNEL = 0x80               # siginfo.si_code of a signal the kernel sent (a terminal's)

    def __enter__(self) -> "_Forwarding":
        self.pending: list[int] = []
        self.old = {sig: signal.signal(sig, self._record) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def _record(self, sig: int, frame) -> None:
        self.pending.append(sig)

    def wait(self, proc: subprocess.Popen, lock) -> int:
        """The program's wait status (negative: killed by that signal), signals passed on;
        never while `lock` is held (jprobe's threads stopping the program's).

        With the signals blocked, sigtimedwait() tells who sent each one; SIGCHLD (blocked
        too) ends the wait when the program ends.
        """
        waited = (*self.SIGNALS, signal.SIGCHLD)
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)
        try:
            while True:
                with lock:
                    while self.pending:
                        proc.send_signal(self.pending.pop(0))
                    if proc.poll() is not None:
                        return proc.returncode
                info = signal.sigtimedwait(waited, 1.0)
                if info is not None and info.si_signo != signal.SIGCHLD and info.si_code != self.SI_KERNEL:
                    with lock:
                        proc.send_signal(info.si_signo)
        finally:
            while signal.sigtimedwait(waited, 0) is not None:
                pass               # the program has ended: nobody to pass them to
            signal.pthread_sigmask(signal.SIG_UNBLOCK, waited)
