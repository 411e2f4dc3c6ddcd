"""The live applier: patch plans written into a running process, and taken out again.

Plans are made as for any applier, before anything stops (planning reads only files and
/proc). Each module gets one region of memory shared between the target and jprobe (a memfd:
trampolines in its first half, mapped read-execute near the module; probe tables in its
second, read-write), so that hits are read live by jprobe with no system call in the target.
Every change is written in one stop of the world (world.py):

- a new batch of probes: its trampolines and table into free room of the region, then each
  site, after moving a thread stopped strictly inside the site to the relocated copy of the
  instruction it was about to run (the plan's boundaries);
- a batch taken out: each site's original bytes back (checked to be what jprobe wrote), and
  threads stopped in trampoline code single-stepped until they have left it, so that no
  thread can be in code that a later batch overwrites and the final counts are final.

Regions stay mapped when jprobe detaches: a thread may still be inside them (in a signal
handler's frame), and the next attach finds them by name and reuses them, so attach/detach
cycles do not add mappings. The table counts with locked increments: without the runtime,
threads have no private counter blocks (jprobe_table.h, tls_off 0).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
from dataclasses import dataclass, field

from .. import layout
from ..callbacks import Callback
from ..chooser import Policy
from ..elf import ElfModule
from ..errors import AttachError, HandlerError, JprobeError, ProcessGone, SiteError, SymbolError
from ..mechanisms import Mechanism
from ..plan import ModulePlan, ProbePlan
from ..planner import cycles_uncollected, resolve_probes
from ..probetable import PROBE_SIZE, TABLE_SIZE
from ..room import Room, plan_in_room
from ..spec import ProbeSpec
from . import inject, remote, rings, rstacks
from .ptrace import pidfd_getfd
from .target import Mapping, auxv, check_process, descendants, executable, file_of, maps
from .rings import Rings
from .regions import HALF, PAGE, LoadedModule, Region, free_room, page_up, region_name
from .world import StoppedWorld, stopped

CALLBACK = layout.offsetof("jp_probe", "callback")
GUARD_OFF = layout.offsetof("jp_table", "guard_off")
VEC_MODE = layout.offsetof("jp_table", "vec_mode")
RSTACK_OFF = layout.offsetof("jp_table", "rstack_off")
RING_OFF = layout.offsetof("jp_table", "ring_off")
PYTHON = "<python>"                # the callback "library" of a Python callable handler
# The callback guard (jprobe_table.h, "Callbacks are not re-entered") of a process without
# the runtime: a byte of glibc's thread control block at %fs:0x80, in __glibc_unused2, which
# glibc keeps, unused since 2.26, for the size of tcbhead_t that other programs rely on.
TCB_GUARD = 0x80


@dataclass
class Batch:
    """Probes planned and written together in one module."""
    module: LoadedModule
    plan: ModulePlan
    region: Region
    table_offset: int              # of its table in the region's view
    live: list[bool] = field(default_factory=list)
    callbacks: dict[int, int] = field(default_factory=dict)   # probe index -> function address
    wanted: dict[int, Callback] = field(default_factory=dict)  # C callbacks to load and resolve
    extra: list[tuple[int, bytes]] = field(default_factory=list)   # (region offset, code) of its own
    trace_ids_from: int = 0        # its probe i's records carry id trace_ids_from + i

    def hits(self, i: int) -> int:
        return self.counter(i, "hits")

    def counter(self, i: int, name: str) -> int:
        """Probe `i`'s counter `name` (hits, missed, skipped: struct jp_probe), read live."""
        at = self.table_offset + TABLE_SIZE + i * PROBE_SIZE + layout.offsetof("jp_probe", name)
        return struct.unpack_from("<Q", self.region.view, at)[0]


class NotLoaded(SymbolError):
    """The module a probe names is not (yet) loaded in the process."""


class LiveSession:
    """Probes in one running process; `remove_all` takes every one out, `release` leaves."""

    def __init__(self, pid: int, strict: bool = False):
        check_process(pid)
        self.pid, self.strict = pid, strict
        self.local = pid == os.getpid()          # jprobe's own process: no remote system calls
        if not self.local:
            _check_seccomp(pid)
        self.executable = executable(pid)
        # The image's identity, another after an exec (new stack, vDSO...): read with the
        # threads stopped, since a process caught in execve() stops once it is complete.
        self._image = auxv(pid) if self.local else _stopped_auxv(pid)
        self.regions: dict[str, Region] = {}
        self._modules: dict[str, ElfModule] = {}
        self.batches: list[Batch] = []
        self.rewound = 0
        self.pool: int | None = None             # the return stacks' pool (rstacks.py), once %return needs it
        self.rings: Rings | None = None          # the trace rings' pool (rings.py), once trace needs it
        self._trace_ids: dict[str, int] = {}     # module -> its next batch's first probe id in records
        # Seconds the last plan() and apply() took, by step (benchmarks/bench.py shows them).
        self.timings: dict[str, float] = {}

    # -- planning -------------------------------------------------------------------------
    def plan(self, specs: list[ProbeSpec]) -> list[Batch]:
        """Batches for `specs`, one per module, planned into free room of its region."""
        started = time.perf_counter()
        self.check_image()
        mapped = maps(self.pid)
        glibc = any(os.path.basename(m.path) == "libc.so.6" for m in mapped)
        if any(spec.handler.kind == "callback" for spec in specs) and not glibc:
            raise HandlerError(f"process {self.pid} does not run on glibc: jprobe attach gives it `count` "
                               f"probes only (a callback's guard lives in glibc's thread control block)")
        returns = [spec for spec in specs if spec.on_return]
        if returns:
            self._check_returns(returns[0], glibc)
        traced = [spec for spec in specs if spec.handler.kind == "trace"]
        if traced and self.rings is None:
            self._open_rings(traced[0], glibc)
        found = {name: self._find(name, mapped) for name in {spec.module for spec in specs}}
        by_module: dict[str, tuple[LoadedModule, list[ProbeSpec]]] = {}
        for spec in specs:
            loaded = found[spec.module]
            by_module.setdefault(loaded.path, (loaded, []))[1].append(spec)
        with cycles_uncollected():
            batches = [self._plan(loaded, module_specs, mapped) for loaded, module_specs in by_module.values()]
        self.timings = {"planning": time.perf_counter() - started}
        return batches

    def _plan(self, loaded: LoadedModule, specs: list[ProbeSpec], mapped: list[Mapping]) -> Batch:
        module = self._module(loaded.path, loaded.file)
        probes = resolve_probes(module, specs, strict=False)
        region = self._region(loaded, mapped)
        # Planned just past the image, where every address is positive (the back end
        # decodes at link-time addresses), then moved to the region, which may lie below.
        planned = page_up(module.end_of_image())
        text, data = planned + region.text_used, planned + HALF + region.data_used
        room = Room(text, data, planned + HALF, planned + 2 * HALF)
        try:
            plan = plan_in_room(module, probes, lambda outgrown: room if outgrown is None else None,
                                Policy(islands=False, strict=self.strict, return_pool=self.pool,
                                       ring_pool=None if self.rings is None else self.rings.pool(),
                                       trace_ids_from=self._trace_ids.get(loaded.path, 0)))
        except JprobeError as err:
            if "outgrew" not in str(err):
                raise
            raise AttachError(f"process {self.pid}: no room left for more probes in {loaded.path} in "
                              f"this session; detach and attach again") from None
        base = region.base - loaded.bias
        try:
            plan = plan.moved(base - planned)
        except ValueError as err:
            raise AttachError(f"process {self.pid}: {err}; no room near enough for jprobe's trampolines") from None
        for p in plan.probes:
            if p.mechanism is Mechanism.TRAP:
                raise SiteError(f"'{p.spec}': needs a trap at {p.address:#x} ({p.reason}), which jprobe attach "
                                f"cannot serve (no runtime in the target yet); probe another instruction")
        batch = Batch(loaded, plan, region, plan.data_vaddr - base, [True] * len(plan.probes),
                      trace_ids_from=self._trace_ids.get(loaded.path, 0),
                      wanted={i: p.callback for i, p in enumerate(probes)
                              if p.callback is not None and not p.callback.library.startswith("<")})
        self._trace_ids[loaded.path] = batch.trace_ids_from + len(plan.probes)
        region.text_used = page_up(plan.text_vaddr + len(plan.text) - base)
        region.data_used = page_up(plan.data_vaddr + len(plan.data) - base - HALF)
        return batch

    def _check_returns(self, spec: ProbeSpec, glibc: bool) -> None:
        """%return can be followed here (glibc, no shadow stack), and the return stacks' pool
        is mapped: its address goes into the trampolines."""
        if not glibc:
            raise HandlerError(f"'{spec.text}': process {self.pid} does not run on glibc, whose thread control "
                               f"block holds each thread's return stack under jprobe attach")
        if _shadow_stack(self.pid):
            raise HandlerError(f"'{spec.text}': process {self.pid} runs with a CET shadow stack, which faults "
                               f"on a followed return; probe the function's entry instead")
        if self.pool is None:
            self.pool = rstacks.find_pool(self.pid)
        if self.pool is None:
            if self.local:
                self.pool = rstacks.create_pool_here()
            else:
                made: list[int] = []
                self.rewound += stopped(self.pid, lambda world: made.append(rstacks.create_pool(world)))
                self.pool = made[0]

    def _open_rings(self, spec: ProbeSpec, glibc: bool) -> None:
        """Trace can be recorded here (glibc, whose thread control block holds each thread's
        ring and tid), and the rings' pool is mapped, in the process and in jprobe."""
        if not glibc:
            raise HandlerError(f"'{spec.text}': process {self.pid} does not run on glibc, whose thread control "
                               f"block holds each thread's trace ring under jprobe attach")
        self.rings, rewound = rings.open_rings(self.pid, self.local, spec.text)
        self.rewound += rewound

    def _module(self, path: str, file: str) -> ElfModule:
        if path not in self._modules:
            self._modules[path] = ElfModule(file)
        return self._modules[path]

    def _find(self, name: str | None, mapped: list[Mapping]) -> LoadedModule:
        """The module a spec names, as the target has it mapped."""
        paths = {m.path for m in mapped if m.path.startswith("/")}
        if name is None:
            path = self.executable
        else:
            wanted = os.path.basename(name) if "/" not in name else os.path.abspath(name)
            candidates = sorted(p for p in paths if p == wanted or os.path.basename(p) == wanted)
            if not candidates:
                candidates = sorted(p for p in paths if os.path.basename(p).startswith(wanted + "."))
            if not candidates:
                loaded = sorted({os.path.basename(p) for p in paths if ".so" in p})
                raise NotLoaded(f"'{name}': not loaded in process {self.pid}; it has loaded "
                                  f"{', '.join(loaded) or 'no library'}")
            if len(candidates) > 1:
                raise SymbolError(f"'{name}': names several modules of process {self.pid} "
                                  f"({', '.join(candidates)}); give its path")
            path = candidates[0]
        parts = [m for m in mapped if m.path == path]
        if not parts:
            raise SymbolError(f"'{path}': not mapped in process {self.pid}")
        first = min(parts, key=lambda m: (m.offset, m.start))
        file = file_of(self.pid, first)
        module = self._module(path, file)
        bias = first.start - (module.start_of_image() & ~(PAGE - 1))
        return LoadedModule(path, file, bias, bias + module.start_of_image(), bias + module.end_of_image())

    def _region(self, loaded: LoadedModule, mapped: list[Mapping]) -> Region:
        region = self.regions.get(loaded.path)
        if region is not None:
            return region
        found = remote.find_shared(self.pid, region_name(loaded))
        if found is not None:
            mapping, target_fd = found
            fd = pidfd_getfd(self.pid, target_fd)
            region = Region(mapping.start, fd, mmap.mmap(fd, 2 * HALF))
        else:
            if self.local:          # as now: jprobe's own allocations (planning) map memory meanwhile
                mapped[:] = maps(self.pid)
            region = Region(free_room(loaded, mapped, self.executable), -1, None, mapped=False)  # type: ignore[arg-type]
            # Taken: another module planned in the same batch must not choose the same room.
            mapped.append(Mapping(region.base, region.base + 2 * HALF, "---p", 0, 0, region_name(loaded)))
            if self.local:          # at once, before they take the room
                self._map(None, loaded, region)
        self.regions[loaded.path] = region
        return region

    # -- writing --------------------------------------------------------------------------
    def apply(self, batches: list[Batch]) -> None:
        """Write `batches` into the process in one stop of the world."""
        clock = [time.perf_counter()]

        def lap(step: str) -> None:
            clock.append(time.perf_counter())
            self.timings[step] = clock[-1] - clock[-2]
        def work(world: StoppedWorld) -> None:
            self.check_image()                 # the threads are stopped: no exec now
            lap("stopping")
            for batch in batches:
                self._map(world, batch.module, batch.region)
                self._vacate(world, batch.region)
            lap("injecting")
            for batch in batches:
                _check_sites(world, batch)
            written: list[tuple[ProbePlan, int]] = []
            try:
                for batch in batches:
                    self._write(world, batch, written)
            except BaseException:
                _roll_back(world, written)
                raise
            lap("patching")
        try:
            if self.local:
                for batch in batches:
                    self._map(None, batch.module, batch.region)
            self._resolve_callbacks(batches)
            loading = time.perf_counter() - clock[-1]
            self.rewound += stopped(self.pid, work)
            if "stopping" in self.timings:          # not when a forked child stopped the threads
                self.timings["injecting"] += loading
                self.timings["stopping"] -= loading
            lap("resuming")
        except BaseException:
            for batch in batches:           # their room is free again
                self._forget(batch)
            raise
        self.batches.extend(batches)

    def _resolve_callbacks(self, batches: list[Batch]) -> None:
        """The run-time address of each C callback, its library loaded first where it is not
        yet (inject.py: by a thread of the process's own; in jprobe's own process, ctypes)."""
        wanted = [(b, i, cb) for b in batches for i, cb in b.wanted.items()]
        if not wanted:
            return
        libraries = {cb.library: inject.Library.of(cb.library) for _, _, cb in wanted}
        if self.local:
            for batch, i, cb in wanted:
                function = getattr(ctypes.CDLL(libraries[cb.library].path), cb.function)
                batch.callbacks[i] = ctypes.cast(function, ctypes.c_void_p).value
            return
        start = {path: self._module(lib.path, lib.path).start_of_image() for path, lib in libraries.items()}
        mapped = maps(self.pid)
        todo = [lib for path, lib in libraries.items() if lib.mapped(mapped, start[path]) is None]
        if todo:
            functions = inject.functions_of(self.pid, mapped, self._module_and_bias)
            first, region = batches[0].module, batches[0].region
            for lib in todo:
                # Room of its own for each: the borrowed thread may still be on its way out
                # of the last one's code when the next is written.
                text, data = region.text_used, HALF + region.data_used
                region.text_used += PAGE
                region.data_used += inject.SAVE_PAGES * PAGE
                loader = inject.Loader(self.pid, region.view, region.base, text, data)

                def work(world: StoppedWorld) -> None:
                    for batch in batches:           # before dlopen() maps anything into their room
                        self._map(world, batch.module, batch.region)
                    loader.region = region.view             # mapped now, if it was not
                    loader.start(world, lib, functions)
                for attempt in range(inject.TRIES):
                    try:
                        self.rewound += stopped(self.pid, work)
                        break
                    except inject.NoSafeThread:
                        if attempt == inject.TRIES - 1:
                            raise
                        time.sleep(inject.TRY_AGAIN_S)       # the threads run on a moment
                loader.finish(lib)
            mapped = maps(self.pid)
        for batch, i, cb in wanted:
            lib = libraries[cb.library]
            bias = lib.mapped(mapped, start[cb.library])
            if bias is None:
                raise AttachError(f"process {self.pid}: {lib.path} is not mapped after loading it")
            batch.callbacks[i] = bias + self._module(lib.path, lib.path).resolve(cb.function).address

    def _module_and_bias(self, path: str) -> tuple[ElfModule, int]:
        loaded = self._find(path, maps(self.pid))
        return self._module(loaded.path, loaded.file), loaded.bias

    def loaded(self, name: str | None) -> LoadedModule | None:
        """The module `name` names (a spec's MODULE) as the process has it, or None while the
        process has not loaded it."""
        try:
            return self._find(name, maps(self.pid))
        except NotLoaded:
            return None

    def region_of(self, loaded: LoadedModule) -> Region:
        return self._region(loaded, maps(self.pid))

    def module(self, loaded: LoadedModule) -> ElfModule:
        return self._module(loaded.path, loaded.file)

    def _map(self, world: StoppedWorld | None, loaded: LoadedModule, region: Region) -> None:
        """The region mapped in the process (by its system calls; in jprobe's own process,
        `world` None, by jprobe's) and in jprobe."""
        if region.mapped:
            return
        name = region_name(loaded)
        fd = (remote.create_shared_here(name, region.base, HALF) if world is None
              else remote.create_shared(world, name, region.base, HALF))
        region.fd, region.view, region.mapped = fd, mmap.mmap(fd, 2 * HALF), True

    @staticmethod
    def _vacate(world: StoppedWorld, region: Region) -> None:
        """No thread in the region's code (one in a signal handler's frame since the last
        session, or stepped no further when a batch came out): it is about to be rewritten."""
        for thread in list(world.threads.values()):
            world.step_while(thread, lambda rip: region.base <= rip < region.base + HALF)

    def _write(self, world: StoppedWorld, batch: Batch, written: list[tuple[ProbePlan, int]]) -> None:
        plan, bias, view = batch.plan, batch.module.bias, batch.region.view
        base = batch.region.base - bias
        view[plan.text_vaddr - base:plan.text_vaddr - base + len(plan.text)] = plan.text
        view[batch.table_offset:batch.table_offset + len(plan.data)] = plan.data
        for offset, code in batch.extra:
            view[offset:offset + len(code)] = code
        if self.pool is not None:
            struct.pack_into("<q", view, batch.table_offset + RSTACK_OFF, rstacks.RSTACK_OFF)
        if self.rings is not None:
            struct.pack_into("<q", view, batch.table_offset + RING_OFF, rings.RING_OFF)
        if batch.callbacks:
            table = batch.table_offset
            struct.pack_into("<qQ", view, table + GUARD_OFF, TCB_GUARD, 0)
            struct.pack_into("<Q", view, table + VEC_MODE, vec_mode())
            for i, function in batch.callbacks.items():
                struct.pack_into("<Q", view, table + TABLE_SIZE + i * PROBE_SIZE + CALLBACK, function)
        sites: set[int] = set()
        # An entry and a return probe share a site: written once, by the entry probe, which
        # has the boundary map (the return probe rides on its jump).
        for probe in sorted(plan.probes, key=lambda p: not p.boundaries):
            if probe.address in sites:
                continue
            sites.add(probe.address)
            _move_out_of_site(world, probe, bias)
            written.append((probe, bias))
            world.write(bias + probe.address, probe.patched)
            if world.read(bias + probe.address, len(probe.patched)) != probe.patched:
                raise AttachError(f"'{probe.spec}': process {self.pid} does not read back what jprobe wrote "
                                  f"at {bias + probe.address:#x}")

    def _forget(self, batch: Batch) -> None:
        """A batch never written gives its room back (batches are planned and written in turn)."""
        region = batch.region
        base = region.base - batch.module.bias
        region.text_used = min(region.text_used, batch.plan.text_vaddr - base)
        region.data_used = min(region.data_used, batch.table_offset - HALF)

    def remove(self, batch: Batch, indices: list[int]) -> list[int]:
        """Take probes `indices` of `batch` out, in one stop of the world; the probes taken
        out: with them, those that share their sites (an entry and a return probe on one
        function have one site and one trampoline)."""
        sites = {batch.plan.probes[i].address for i in indices}
        indices = [i for i, p in enumerate(batch.plan.probes) if p.address in sites and batch.live[i]]
        self.rewound += stopped(self.pid, lambda world: self._unpatch(world, [(batch, indices)]))
        for i in indices:
            batch.live[i] = False
        return indices

    def remove_all(self) -> None:
        """Every probe out, in one stop of the world; then out of the processes forked
        meanwhile, which inherited the patched code and the regions (their hits counted
        in the same tables)."""
        self.check_image()
        names = self._region_labels()
        live = [(b, [i for i, on in enumerate(b.live) if on]) for b in self.batches]
        if any(indices for _, indices in live):
            self.rewound += stopped(self.pid, lambda world: self._unpatch(world, live, whole=True))
            for batch, indices in live:
                for i in indices:
                    batch.live[i] = False
        everything = [(b, list(range(len(b.live)))) for b in self.batches]
        for child in descendants(self.pid):
            try:
                if names & {m.path for m in maps(child)}:
                    stopped(child, lambda world: self._unpatch(world, everything, whole=True, inherited=True))
            except ProcessGone:
                continue

    def exec_happened(self) -> bool:
        """The process has replaced its image (exec) since jprobe attached: its auxiliary
        vector is another, or none of the regions is mapped any more."""
        names = self._region_labels()
        return auxv(self.pid) != self._image or bool(names) and not names & {m.path for m in maps(self.pid)}

    def check_image(self) -> None:
        if self.exec_happened():
            raise ProcessGone(f"process {self.pid} exec'd {executable(self.pid)}: the session ended with "
                              f"its old image; attach again")

    def _region_labels(self) -> set[str]:
        return {f"/memfd:{region_name(b.module)} (deleted)" for b in self.batches}

    def release(self) -> None:
        """jprobe's views of the regions and the rings closed (drained for the last time before);
        the target keeps them mapped for reuse."""
        for region in self.regions.values():
            if region.mapped:
                region.close()
                region.mapped = False
        self.regions.clear()
        if self.rings is not None:
            self.rings.close()

    def _unpatch(self, world: StoppedWorld, work: list[tuple[Batch, list[int]]], whole: bool = False,
                 inherited: bool = False) -> None:
        """Sites back as they were; threads stepped out of the taken probes' trampolines (with
        `whole`, out of the regions' code altogether: no probe is left in them). In a forked
        child (`inherited`), the sites that hold what jprobe wrote: it forked with those.
        Then the return addresses the taken probes' trampolines hold back in place."""
        for batch, indices in work:
            bias = batch.module.bias
            done: set[int] = set()
            for i in indices:
                probe = batch.plan.probes[i]
                at = bias + probe.address
                if at in done:                  # an entry and a return probe: one site
                    continue
                done.add(at)
                if world.read(at, len(probe.patched)) != probe.patched:
                    if inherited:
                        continue
                    raise AttachError(f"process {self.pid}: the code at '{probe.spec}' ({at:#x}) changed "
                                      f"since jprobe patched it; left as it is")
                world.write(at, probe.original[:len(probe.patched)])
        if whole:
            for region in {id(b.region): b.region for b, _ in work}.values():
                self._vacate(world, region)
            if self.pool is not None:
                rstacks.restore(world, None)
            return
        spans = [span for batch, indices in work for span in _trampolines(batch, indices)]
        for thread in list(world.threads.values()):
            world.step_while(thread, lambda rip: any(lo <= rip < hi for lo, hi in spans))
        if self.pool is not None:
            rstacks.restore(world, spans)


def _trampolines(batch: Batch, indices: list[int]) -> list[tuple[int, int]]:
    """Run-time extents of probes `indices`' trampolines: straight-line code, each up to the
    next trampoline (or the batch's text end), so a thread stepped through one leaves it."""
    bias, plan = batch.module.bias, batch.plan
    starts = sorted({p.trampoline for p in plan.probes if p.trampoline is not None})
    ends = dict(zip(starts, starts[1:] + [plan.text_vaddr + len(plan.text)]))
    wanted = [plan.probes[i].trampoline for i in indices]
    return [(bias + t, bias + ends[t]) for t in wanted if t is not None]


def _stopped_auxv(pid: int) -> bytes:
    image = []
    stopped(pid, lambda world: image.append(auxv(pid)))
    return image[0]


def _roll_back(world: StoppedWorld, written: list[tuple[ProbePlan, int]]) -> None:
    """A change that failed halfway: the sites written so far get their bytes back, and the
    threads moved into their trampolines go back to the same instructions in place."""
    for probe, bias in reversed(written):
        world.write(bias + probe.address, probe.original[:len(probe.patched)])
        back = {bias + copy: bias + orig for orig, copy in probe.boundaries}
        for thread in world.threads.values():
            if thread.regs.rip in back:
                moved = thread.regs.copy()
                moved.rip = back[thread.regs.rip]
                world.set_regs(thread, moved)


def _move_out_of_site(world: StoppedWorld, probe: ProbePlan, bias: int) -> None:
    """A thread stopped strictly inside the bytes a site's patch covers resumes at the
    relocated copy of the instruction it was about to run."""
    start, end = bias + probe.address, bias + probe.address + len(probe.patched)
    copies = {bias + orig: bias + copy for orig, copy in probe.boundaries}
    for thread in world.threads.values():
        rip = thread.regs.rip
        if start < rip < end:
            if rip not in copies:
                raise AttachError(f"thread {thread.tid} is stopped at {rip:#x}, inside '{probe.spec}' "
                                  f"but at no instruction jprobe relocated; try again")
            moved = thread.regs.copy()
            moved.rip = copies[rip]
            world.set_regs(thread, moved)


def _check_sites(world: StoppedWorld, batch: Batch) -> None:
    """Each site holds the bytes the plan was made from: the file is the one mapped, and no
    one else (another jprobe, a debugger's breakpoint) has changed it."""
    for probe in batch.plan.probes:
        at = batch.module.bias + probe.address
        now = world.read(at, len(probe.patched))
        if now != probe.original[:len(probe.patched)]:
            why = ("another jprobe session has probed it" if now[:1] == b"\xe9" else
                   "a debugger's breakpoint is there" if now[:1] == b"\xcc" else
                   "the file on disk differs from the one mapped")
            raise AttachError(f"'{probe.spec}': the code at {at:#x} in process {world.pid} is not the "
                              f"file's ({why}); nothing was changed")


def _shadow_stack(pid: int) -> bool:
    """The process runs with a CET shadow stack enabled (the kernel says so in its status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            features = next((line for line in f if line.startswith("x86_Thread_features:")), "")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} exited") from None
    return "shstk" in features.split()


def _check_seccomp(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/status") as f:
            mode = next((line.split()[1] for line in f if line.startswith("Seccomp:")), "0")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} exited") from None
    if mode != "0":
        raise AttachError(f"process {pid} runs under seccomp ({'strict' if mode == '1' else 'a filter'}): "
                          f"the system calls jprobe attach makes in it (memfd_create, mmap) may kill it; "
                          f"use `jprobe run` to start it probed instead")


def vec_mode() -> int:
    """The vector state callback trampolines save on this CPU (JP_VEC_*), as the runtime
    decides it (modules.c): /proc/cpuinfo lists a feature only when the kernel enabled its
    state."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    if "avx512f" in flags:
        return layout.CONST["JP_VEC_AVX512"]
    return layout.CONST["JP_VEC_AVX" if "avx" in flags else "JP_VEC_SSE"]
