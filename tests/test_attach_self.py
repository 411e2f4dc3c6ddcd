"""`jprobe.attach(os.getpid())`: the test process probes a library it loaded itself (issue 12,
part 6), with count probes and Python callables as handlers."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading

import pytest

import jprobe
from jprobe.errors import HandlerError


@pytest.fixture(params=["-O0", "-O2"])
def lib(build, request) -> ctypes.CDLL:
    path = build("attach_self.c", [request.param, "-g", "-shared", "-fPIC"],
                 out_name=f"libattach_self{request.param}.so")
    lib = ctypes.CDLL(str(path))
    for name, nargs in (("mix", 2), ("mix_twice", 1), ("mix_many", 1)):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_long, [ctypes.c_long] * nargs
    lib.path = str(path)
    return lib


def mix(a: int, b: int) -> int:
    x = a * 31 + b
    return x ^ (x >> 3)


def code(lib: ctypes.CDLL, size: int = 16) -> bytes:
    return ctypes.string_at(ctypes.cast(lib.mix, ctypes.c_void_p).value, size)


def test_count_probe_in_own_process(lib):
    before = code(lib)
    with jprobe.attach(os.getpid()) as me:
        p = me.probe(f"{os.path.basename(lib.path)}:mix")
        assert code(lib) != before                    # patched
        assert [lib.mix(i, 2) for i in range(1000)] == [mix(i, 2) for i in range(1000)]
        assert (p.hits, p.mechanism) == (1000, "jump")
        me.remove(p)
        lib.mix(1, 1)
        assert p.hits == 1000 and p.removed
        assert code(lib) == before
    assert me.report()["probes"][0]["hits"] == 1000


def test_trace_probe_in_own_process(lib):
    """trace in jprobe's own process: its rings' pool mapped here, events() as it runs."""
    with jprobe.attach(os.getpid()) as me:
        name = os.path.basename(lib.path)
        p, r = me.probes([f"{name}:mix=trace(arg1,arg2)", f"{name}:mix%return=trace(rax)"])
        assert [lib.mix(i, 2) for i in range(100)] == [mix(i, 2) for i in range(100)]
        me.remove(p)                                  # and r: one site
        assert [(e.tid, e.pid, e.args) for e in p.events()] == \
            [(threading.get_native_id(), os.getpid(), {"arg1": i, "arg2": 2}) for i in range(100)]
        assert [e.args["rax"] for e in r.events()] == [mix(i, 2) for i in range(100)]
    assert (p.hits, p.lost, r.hits, r.lost) == (100, 0, 100, 0)


def test_python_callable_sees_and_writes_registers(lib):
    seen = []

    def on_mix(ctx):
        seen.append((ctx.regs.rdi, ctx.regs.rsi))
        if ctx.regs.rdi == 5:
            ctx.regs.rsi = 8                        # takes effect when mix resumes

    with jprobe.attach(os.getpid()) as me:
        p = me.probe(f"{lib.path}:mix", handler=on_mix)
        assert lib.mix(4, 7) == mix(4, 7)
        assert lib.mix(5, 7) == mix(5, 8)
        assert seen == [(4, 7), (5, 7)] and p.hits == 2
        entry = me.report()["probes"][0]
        assert entry["handler"].endswith("on_mix") and entry["missed"] == 0
    assert lib.mix(5, 7) == mix(5, 7)


def test_threads_count_exactly_and_every_call_runs_the_callable(lib):
    calls = []
    with jprobe.attach(os.getpid()) as me:
        p = me.probe(f"{lib.path}:mix", handler=lambda ctx: calls.append(ctx.regs.rdi))
        threads = [threading.Thread(target=lib.mix_many, args=(500,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert p.hits == 2000 and len(calls) == 2000 and p.missed == 0


def test_a_handler_that_reenters_its_probe_is_not_run_again(lib):
    """The guard (jprobe_table.h, "Callbacks are not re-entered"): a hit inside the handler is
    counted as missed, its handler not run."""
    depth = []

    def on_mix(ctx):
        depth.append(ctx.regs.rdi)
        lib.mix(100, 0)                               # hits the probe from inside its handler

    with jprobe.attach(os.getpid()) as me:
        p = me.probe(f"{lib.path}:mix", handler=on_mix)
        assert lib.mix_twice(3) == mix(3, 0) + mix(3, 1)
        assert depth == [3, 3] and (p.hits, p.missed) == (4, 2)


def test_handler_errors(lib):
    with jprobe.attach(os.getpid()) as me:
        with pytest.raises(HandlerError, match="handler= too"):
            me.probe(f"{lib.path}:mix=count", handler=print)
    other = subprocess.Popen(["sleep", "30"])
    try:
        with jprobe.attach(other.pid) as proc, pytest.raises(HandlerError, match="own process"):
            proc.probe("main", handler=print)
    finally:
        other.kill()
        other.wait()


def test_an_exception_in_the_handler_leaves_the_call_alone(lib, monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_value))

    def on_mix(ctx):
        raise RuntimeError("handler bug")

    with jprobe.attach(os.getpid()) as me:
        p = me.probe(f"{lib.path}:mix", handler=on_mix)
        assert lib.mix(2, 3) == mix(2, 3) and p.hits == 1
    assert [str(e) for e in reported] == ["handler bug"]   # cffi reports it, as for any callback


def test_a_change_that_fails_halfway_is_rolled_back(lib, monkeypatch):
    """The second site of a batch cannot be written: the first gets its bytes back, nothing
    is left patched, and the session goes on."""
    from jprobe.errors import AttachError
    from jprobe.patcher import live

    before = {name: code(lib) for name in ("mix",)}
    many = ctypes.string_at(ctypes.cast(lib.mix_many, ctypes.c_void_p).value, 16)
    real, seen = live._move_out_of_site, []

    def fail_second(world, probe, bias):
        seen.append(probe.spec)
        if len(seen) == 2:
            raise AttachError("injected failure")
        real(world, probe, bias)

    with jprobe.attach(os.getpid()) as me:
        monkeypatch.setattr(live, "_move_out_of_site", fail_second)
        with pytest.raises(AttachError, match="injected failure"):
            me.probes([f"{lib.path}:mix", f"{lib.path}:mix_many"])    # (in the forked child)
        assert code(lib) == before["mix"]
        assert ctypes.string_at(ctypes.cast(lib.mix_many, ctypes.c_void_p).value, 16) == many
        monkeypatch.setattr(live, "_move_out_of_site", real)
        p = me.probe(f"{lib.path}:mix")
        assert lib.mix(1, 2) == mix(1, 2) and p.hits == 1
