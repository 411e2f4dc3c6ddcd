"""`%return` probes placed by `jprobe attach` in a running process (issue 13).

The targets (fixtures/attach_returns.c, attach_returns_cxx.cpp) run returns.c's and
returns_cxx.cpp's workloads on command, so that each runs while the probes are live, and
their output says whether every return went where it should. Counts are exact against the
workload and, where tracefs is usable, against kernel uretprobes on the same workload (the
plain returns.c, run alone). Then what only attach has: threads started after attach, a
thread or a forked child inside a followed function when jprobe detaches (its return
address back in place, or it would return into trampolines a later session overwrites),
threads returning at full speed while jprobe detaches, and the unwinder kept off followed
frames by jprobe's own probes (no runtime interposes it).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from jprobe import attach as jprobe_attach

from support.build import SOME_VARIANTS
from support.elf import symbol, vaddr_to_offset
from support.kernel import kernel_return_counts, require_tracefs
from support.run import run_prog
from support.target import ANSWER_S, Seen, Target, bounded, running_target
from test_attach import attached, cli_attach, grows

DEPTH = 64                                  # JP_RSTACK_DEPTH
FOLLOWED = ["twice", "fib", "down", "outer", "inner", "via", "outer_sig", "inner_sig"]
PROBES = [f"{f}%return" for f in FOLLOWED] + FOLLOWED
# mode, N, {probe: returns expected} (None: as many as the kernel sees), entries == returns + missed
MODES = [
    ("calls", 1000, {"twice%return": 1000}),
    ("fib", 15, {"fib%return": None}),
    ("threads", 20000, {"twice%return": 4 * 20000}),        # 4 threads started after attach
    ("deep", 100, {"down%return": 3 * DEPTH, "twice%return": 10}),
    ("longjmp", 1000, {"outer%return": 0, "inner%return": 0, "twice%return": 1000}),
    ("sigalt", 300, {"outer_sig%return": 300, "twice%return": 600}),
    ("siglongjmp", 1000, {"inner_sig%return": 0, "twice%return": 2000}),
    ("tail", 1000, {"via%return": 1000, "twice%return": 1000}),
    ("fork", 500, {"twice%return": 1000}),                   # the child's returns in the same table
]


@pytest.fixture(scope="module", params=SOME_VARIANTS, ids=str)
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def target_c(build, variant) -> Path:
    return build("attach_returns.c", [*variant.flags, "-Wall", "-Werror"])


@pytest.fixture(scope="module")
def plain_c(build, variant) -> Path:
    return build("returns.c", variant.flags)


def run(t: Target, mode: str, n: int) -> list[str]:
    """One workload in the target (returns.c's MODE N; returns_cxx.cpp's rounds: `mode`): its
    output lines."""
    t.proc.stdin.write(f"run {mode} {n}\n" if n else f"run {mode}\n")
    t.proc.stdin.flush()
    out = []
    while (line := t.expect("")) != "done":
        out.append(line)
    return out


def counts(probes) -> dict[str, tuple[int, int]]:
    return {p.spec: (p.hits, p.returns_missed if p.on_return else 0) for p in probes}


def delta(after: dict, before: dict) -> dict[str, tuple[int, int]]:
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}


def test_returns_counted_exactly(target_c, plain_c):
    """Each workload, run while the probes are live, prints what it prints unprobed, and
    every call is followed to its return, counted missed (past 64 deep), or left by a jump."""
    unprobed = {mode: run_prog([plain_c, mode, n]).stdout.splitlines() for mode, n, _ in MODES}
    with running_target(target_c) as t:
        assert {mode: run(t, mode, n) for mode, n, _ in MODES} == unprobed
        with attached(t.pid) as proc:
            probes = bounded(ANSWER_S, proc.probes, PROBES)
            got = {}
            for mode, n, expected in MODES:
                before = counts(probes)
                assert run(t, mode, n) == unprobed[mode], mode
                got[mode] = delta(counts(probes), before)
            report = proc.report()
        assert report["errors"] == [] and all("returns_missed" in e for e in report["probes"]
                                               if e["probe"].endswith("%return")), report
        assert run(t, "calls", 10) == ["calls 90"]
        assert t.quit() == "ok"
    for mode, n, expected in MODES:
        seen = got[mode]
        for probe, want in expected.items():
            if want is not None:
                assert seen[probe][0] == want, (mode, probe, seen[probe])
            if mode not in ("longjmp", "siglongjmp"):
                assert sum(seen[probe]) == seen[probe.split("%")[0]][0], (mode, probe, seen)
        missed = {p: m for p, (_, m) in seen.items() if m}
        assert missed == ({"down%return": 3 * (n + 1 - DEPTH)} if mode == "deep" else {}), (mode, missed)
    require_tracefs("the %return counts under attach")
    for mode, n, expected in MODES:
        if mode == "deep":
            continue                        # the kernel follows deeper than 64
        names = [p.split("%")[0] for p in expected]
        kernel = kernel_return_counts(plain_c, {f: vaddr_to_offset(plain_c, symbol(plain_c, f)[0]) for f in names},
                                      [plain_c, mode, n])
        assert {f"{f}%return": c for f, c in kernel.items()} == {p: got[mode][p][0] for p in expected}, mode


@pytest.mark.parametrize("flags", [["-O0", "-fno-pie", "-no-pie"], ["-O2", "-fPIE", "-pie"]], ids=["O0", "O2pie"])
def test_cxx_exceptions_through_followed_frames(build, flags):
    """Exceptions thrown through two followed frames reach their catch (kernel uretprobes on
    these functions end the program in std::terminate): jprobe's probes on the unwinder put
    the real return addresses back before it walks, and the frames above the catch are
    followed again. A backtrace under three followed frames reaches main; the return it
    took for good is counted in returns_missed."""
    prog = build("attach_returns_cxx.cpp", ["-g", *flags])
    probes = ["thrower%return", "middle%return", "catcher%return", "rethrower%return", "leaf_trace%return",
              "thrower", "middle"]
    with running_target(prog) as t:
        [unprobed] = run(t, "100", 0)          # the destructors run add up from one run to the next
        assert unprobed.startswith("sum 181926 dtors 110 backtrace "), unprobed
        with attached(t.pid) as proc:
            placed = bounded(ANSWER_S, proc.probes, probes)
            assert run(t, "100", 0) == [unprobed.replace("dtors 110", "dtors 220")]
            got = counts(placed)
            assert [e["probe"] for e in proc.report()["probes"]] == probes      # jprobe's own not reported
        assert run(t, "100", 0) == [unprobed.replace("dtors 110", "dtors 330")]
        assert t.quit() == "ok"
    # 110 calls of thrower (100 from catcher, 10 from rethrower), 38 of them throw
    assert got == {"thrower%return": (72, 0), "middle%return": (72, 0), "catcher%return": (100, 0),
                   "rethrower%return": (6, 0), "leaf_trace%return": (0, 1), "thrower": (110, 0),
                   "middle": (110, 0)}


def in_read(pid: int, tid: int) -> None:
    """Until thread `tid` of `pid` is blocked in read()."""
    deadline = time.monotonic() + ANSWER_S
    while Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()[0] != "0":
        assert time.monotonic() < deadline, f"thread {tid} never blocked in read()"
        time.sleep(0.005)


def held_value(key: int) -> int:
    """What held(fd, key) returns after reading "A" (attach_returns.c)."""
    return ord("A") + key + (key ^ 1) + (key ^ 2) + (key ^ 3)


@pytest.mark.parametrize("how", ["detach", "remove"])
def test_a_thread_inside_a_followed_function_when_jprobe_leaves(target_c, how):
    """A thread blocked in read() under a followed frame, and a child forked meanwhile in the
    same state, when the probe goes (removed, or jprobe detaches): their return addresses are
    back in place. A later session's probes overwrite the trampolines; then they return, and
    must return where they were called from, with their frames intact."""
    with running_target(target_c) as t:
        with attached(t.pid) as proc:
            held = bounded(ANSWER_S, proc.probes, ["held%return", "held"])
            tid = int(t.send("hold", "holding").split()[1])
            in_read(t.pid, tid)
            child = int(t.send("forkhold", "forked").split()[1])
            in_read(child, child)
            assert [p.hits for p in held] == [0, 2]
            if how == "remove":
                bounded(ANSWER_S, proc.remove, held[0])
                assert held[1].removed                  # one site: both go
        with attached(t.pid) as proc:                   # the room reused
            again = bounded(ANSWER_S, proc.probes, ["twice%return", "twice", "fib%return", "held%return"])
            assert run(t, "calls", 100) == ["calls 9900"]
            assert [p.hits for p in again[:2]] == [100, 100]
        Seen(child, target_c).assert_free()
        assert t.send("release", "released") == f"released {held_value(0x1234)}"
        assert t.send("forkrelease", "child-released") == f"child-released {held_value(0x4321)}"
        assert t.expect("child") == "child 0"
        assert run(t, "calls", 10) == ["calls 90"]
        assert t.quit() == "ok"


def test_attach_and_detach_while_threads_return(target_c):
    """Four threads call followed functions (a leaf, and a recursion 0..7 deep) as fast as
    they can while jprobe attaches and detaches, again and again: a thread may be anywhere
    in the hijack or the return trampoline, or between the two, when the world stops. Every
    result stays right, and each session's returns are its calls but for those in flight
    when it detached (at most 8 frames deep on each of 4 threads)."""
    with running_target(target_c) as t:
        t.send("spin", "spinning")
        for _ in range(CYCLES):
            with attached(t.pid) as proc:
                placed = bounded(ANSWER_S, proc.probes, ["twice%return", "twice", "down%return", "down"])
                grows(lambda: placed[0].hits, "followed returns")
                grows(lambda: placed[2].hits, "followed returns")
            (returns, calls), (down_returns, down_calls) = (counts(placed[:2]).values(), counts(placed[2:]).values())
            assert 0 <= calls[0] - sum(returns) <= 4, (calls, returns)
            assert 0 <= down_calls[0] - sum(down_returns) <= 4 * 8, (down_calls, down_returns)
        assert t.send("stop", "stopped") == "stopped bad=0"
        t.assert_free()
        assert run(t, "calls", 10) == ["calls 90"]
        assert t.quit() == "ok"


CYCLES = 10


def test_cli_reports_returns(target_c):
    """`jprobe attach PID -p 'f%return' --json`: the report has the returns and returns_missed."""
    with running_target(target_c) as t:
        with cli_attach(t.pid, "-p", "down%return", "-p", "down", "--json", "--duration", 2) as c:
            t.wait_patched("down", lambda: c.poll() is None)
            assert run(t, "deep", 100) == ["deep 390"]
            out, err = c.communicate(timeout=ANSWER_S)
        assert c.returncode == 0, err
        got = {p["probe"]: p for p in json.loads(out)["probes"]}
        assert (got["down%return"]["hits"], got["down%return"]["returns_missed"]) == (3 * DEPTH, 303 - 3 * DEPTH)
        assert got["down"]["hits"] == 303 and "returns_missed" not in got["down"]
        assert t.quit() == "ok"


def test_pthread_exit_under_a_followed_frame(target_c):
    """A thread ends by pthread_exit() from a followed function: glibc loads libgcc_s then and
    unwinds the thread through it; jprobe's probes on pthread_exit, and on libgcc_s placed as
    it loads, keep the unwinder off the followed slot; the process goes on unharmed."""
    with running_target(target_c) as t:
        with attached(t.pid) as proc:
            placed = bounded(ANSWER_S, proc.probes, ["leaver%return", "leaver"])
            assert t.send("exit", "exited") == "exited 42"
            assert t.send("exit", "exited") == "exited 42"
            assert counts(placed) == {"leaver%return": (0, 0), "leaver": (2, 0)}
            assert proc.report()["errors"] == []
        assert run(t, "calls", 10) == ["calls 90"]
        assert t.quit() == "ok"


def test_pthread_exit_runs_the_destructors_above_a_followed_frame(build):
    """In C++, pthread_exit() unwinds the thread running destructors: one above a followed
    frame runs only if the unwinder walks past that frame's slot (with the trampoline's
    address there the walk ends at it, as under a kernel uretprobe, and the destructor is
    skipped)."""
    prog = build("attach_returns_cxx.cpp", ["-g", "-O2"])
    with running_target(prog) as t:
        with attached(t.pid) as proc:
            placed = bounded(ANSWER_S, proc.probes, ["leaver%return", "leaver"])
            assert t.send("exit", "exited") == "exited 42 dtors 1"
            assert counts(placed) == {"leaver%return": (0, 0), "leaver": (1, 0)}
            assert proc.report()["errors"] == []
        assert t.quit() == "ok"


def test_in_jprobes_own_process(build):
    """`jprobe.attach(os.getpid())`: the pool and the unwinder's library mapped by jprobe
    itself; a count and a Python callable at the return (rax as the function returns it)."""
    import ctypes
    import os

    path = str(build.lib("attach_self.c", ["-O2"]))
    lib = ctypes.CDLL(path)
    lib.mix_many.restype = lib.mix_twice.restype = ctypes.c_long
    lib.mix_many.argtypes = lib.mix_twice.argtypes = [ctypes.c_long]
    want = lib.mix_many(1000)
    seen = []
    with jprobe_attach(os.getpid()) as me:
        returns, calls = me.probes([f"{path}:mix%return", f"{path}:mix"])
        assert lib.mix_many(1000) == want
        assert counts([returns, calls]) == {f"{path}:mix%return": (1000, 0), f"{path}:mix": (1000, 0)}
        me.probe(f"{path}:mix_twice%return", handler=lambda ctx: seen.append(ctx.regs.rax))
        assert lib.mix_twice(5) == seen[0] and len(seen) == 1
    assert lib.mix_many(1000) == want
