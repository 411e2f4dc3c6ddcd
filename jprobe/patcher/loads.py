"""Probes on libraries a process loads after jprobe attached: applied before their code runs.

jprobe puts a callback probe on the dynamic loader's debugger hook, `_dl_debug_state`, which
ld.so calls once a library is mapped and relocated and before its initialisers run (the
r_debug protocol, link.h). The callback is a few instructions of jprobe's own
(arch.emit_load_hook): it takes a ticket in a word the process shares with jprobe and waits
on a futex for jprobe's answer (two seconds at most). jprobe's watcher thread, woken through
the same futex, applies the probes waiting for a library that is now there (stopping the
world as any change does; the loading thread holds the loader's lock, which jprobe does not
need), then answers. So the process makes two system calls per library it loads while
probes wait, none per probe hit.
"""
from __future__ import annotations

import struct
import threading
from dataclasses import replace
from collections.abc import Callable

from .. import arch
from ..errors import JprobeError, SymbolError
from ..spec import Handler, parse_probe
from . import ptrace
from .live import LiveSession
from .regions import HALF, PAGE

HOOK = "<jprobe>"                   # the callback "library" of jprobe's own code
R_STATE = 24                        # offsetof(struct r_debug, r_state)
FUTEX_WAIT, FUTEX_WAKE = 0, 1
PROT_RW, MAP_SHARED = 3, 1
POLL = 0.2                          # seconds between looks at whether to stop


class LoadWatcher:
    """The hook in the process and the thread that answers it; `on_load` runs (in that
    thread) each time the process has loaded something."""

    def __init__(self, session: LiveSession, on_load: Callable[[], None]):
        self.session, self.on_load = session, on_load
        self.stopping = threading.Event()
        loader = next((m for m in ("ld-linux-x86-64.so.2", "ld-linux.so.2") if session.loaded(m)), None)
        if loader is None:
            raise SymbolError(f"process {session.pid} has no dynamic loader: it cannot load libraries later")
        ld = session.loaded(loader)
        r_debug = session.module(ld).variable("_r_debug")
        if r_debug is None:
            raise SymbolError(f"{ld.path}: no _r_debug; probes on libraries loaded later need it")
        r_debug += ld.bias
        region = session.region_of(ld)
        text, words = region.text_used, HALF + region.data_used
        region.text_used += PAGE
        region.data_used += PAGE
        self.request, self.answer = region.base + words, region.base + words + 4
        buf = arch.CodeBuffer(region.base + text)
        arch.emit_load_hook(buf, r_debug + R_STATE, self.request, self.answer, session.pid)
        spec = parse_probe(f"{loader}:_dl_debug_state")
        spec = replace(spec, handler=Handler("callback", library=HOOK, function="load_hook"))
        batches = session.plan([spec])
        batches[0].callbacks[0] = region.base + text
        batches[0].extra.append((text, buf.finish()))
        session.apply(batches)
        self.hook = batches
        self.region = region
        self._words = ptrace.mmap(0, PAGE, PROT_RW, MAP_SHARED, region.fd, words)
        if self._words < 0:
            raise JprobeError(f"process {session.pid}: cannot map the load hook's words")
        self.thread = threading.Thread(target=self._serve, name="jprobe-loads", daemon=True)
        self.thread.start()

    def _word(self, offset: int) -> int:
        return struct.unpack_from("<I", self.region.view, self.request - self.region.base + offset)[0]

    def _futex(self, offset: int, op: int, value: int, timeout: float | None = None) -> None:
        ptrace.futex(self._words + offset, op, value, timeout)

    def _serve(self) -> None:
        seen = self._word(0)
        while not self.stopping.is_set():
            self._futex(0, FUTEX_WAIT, seen, POLL)
            now = self._word(0)
            if now == seen:
                continue
            try:
                self.on_load()
            finally:
                self._reply(now)
                seen = now

    def _reply(self, value: int) -> None:
        struct.pack_into("<I", self.region.view, self.answer - self.region.base, value)
        self._futex(4, FUTEX_WAKE, 1 << 30)

    def stop(self) -> None:
        """No more answers needed: whoever waits is let go."""
        self.stopping.set()
        self.thread.join()
        self._reply(self._word(0))
        ptrace.munmap(self._words, PAGE)
