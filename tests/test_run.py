"""`jprobe run`: the preloaded runtime applies the plans in-process (SPEC sections 2, 3).

Each test runs a fixture unprobed and under `jprobe run`, and checks that the
program behaves the same (stdout, stderr, exit status), that the report counts
exactly the calls the workload makes (over the whole process tree, with
`by_pid` when several processes hit), and, where tracefs is usable, that a
kernel uprobe counts the same.  Some tests drive the runtime directly with a
plan file and a counters file made through the Python API, to damage the plan
or to trace the program alone.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from support.build import SOME_VARIANTS
from support.elf import vaddr_to_offset
from support.kernel import kernel_uprobe_counts, require_tracefs
from support.run import assert_same_behaviour, child_env, run_prog

N = 1000
PYTHON = "/usr/bin/python3"          # an ELF program, not a pyenv shim


def audit_env() -> dict:
    """The runtime as LD_AUDIT, as `jprobe run` sets it.

    Any audit library changes what ld.so allocates, so a kernel uprobe baseline on malloc()
    runs with it as well: on its own it does nothing.
    """
    from jprobe.runtime import runtime_library
    return {"LD_AUDIT": runtime_library()}


def jprobe_run(tmp_path, argv, probes, env=None, timeout=120, name="report.json"):
    """`jprobe run -p P... --report FILE -- ARGV`; (completed process, report)."""
    report = tmp_path / name
    cmd = [sys.executable, "-m", "jprobe", "run", *[a for p in probes for a in ("-p", p)],
           "--report", str(report), "--", *[str(a) for a in argv]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(env), timeout=timeout)
    assert report.exists(), f"no report (exit {r.returncode}): {r.stderr[-2000:]}"
    return r, json.loads(report.read_text())


def hits(report, probe) -> int:
    [entry] = [p for p in report["probes"] if p["probe"] == probe]
    return entry["hits"]


def entry(report, probe) -> dict:
    [e] = [p for p in report["probes"] if p["probe"] == probe]
    return e


@pytest.fixture(scope="module")
def modes(build):
    """run_modes.c as a PIE at -O2: the usual build."""
    return build("run_modes.c", ["-O2", "-g", "-fPIE", "-pie"])


# --------------------------------------------------------------------------
# the program behaves as without probes; hits are exact
# --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", SOME_VARIANTS, ids=str)
def test_compute_output_status_and_hits(build, tmp_path, variant):
    """The SPEC example: `jprobe run -p compute -- ./fixture N`; basic exits non-zero."""
    prog = build("basic.c", variant.flags)
    args = [prog, "3000", "9"]
    orig = run_prog(args)
    assert orig.returncode != 0
    got, report = jprobe_run(tmp_path, args, ["compute"])
    assert_same_behaviour(orig, got)
    assert hits(report, "compute") == 9
    assert entry(report, "compute")["mechanism"] == "jump"
    assert report["errors"] == []
    require_tracefs("compute's 9 hits")
    [kc], _ = kernel_uprobe_counts(prog, [vaddr_to_offset(prog, int(entry(report, "compute")["address"], 16))], args)
    assert kc == 9


@pytest.mark.parametrize("status", [0, 7])
def test_exit_status_passes_through(modes, tmp_path, status):
    args = [modes, N, "exit", status]
    orig = run_prog(args)
    got, report = jprobe_run(tmp_path, args, ["work"])
    assert orig.returncode == status
    assert_same_behaviour(orig, got)
    assert hits(report, "work") == N


def _kernel_crosscheck(report, argv, probes, stdout):
    """The exact counts of libc probes, whose workloads nobody counts but the kernel: uprobes on
    the same libc sites, same workload (the same `stdout`), same counts. Skips without tracefs."""
    require_tracefs(f"the counts of {', '.join(probes)}")
    libc = entry(report, probes[0])["module"]
    offsets = [vaddr_to_offset(libc, int(entry(report, p)["address"], 16)) for p in probes]
    # A private copy of libc keeps other processes out of the kernel's counts.
    counts, proc = kernel_uprobe_counts(libc, offsets, argv, env={"LD_LIBRARY_PATH": "{COPYDIR}", **audit_env()})
    assert (proc.returncode, proc.stdout) == (0, stdout)
    assert {p: hits(report, p) for p in probes} == dict(zip(probes, counts))


LIBC_PROBES = ["libc.so.6:malloc", "libc.so.6:free"]


@pytest.mark.parametrize("source", ["ctor_alloc.c", "cxx_static_init.cpp"])
def test_hits_in_library_initialisers_count(build, tmp_path, source):
    """Initialisers that run before the runtime's constructor: their allocations count.

    The probes go live once the loader has relocated the program, before any initialiser,
    so malloc and free count what kernel uprobes count (the C library: 5 pairs in its
    constructor; the C++ one: a map of 16 vectors built by its static initialisers).
    """
    lib = build(source, ["-shared", "-fPIC", "-O2"], out_name=f"lib{Path(source).stem}.so")
    prog = build("hello.c", ["-O2", "-Wl,--no-as-needed", str(lib)], out_name=f"hello_{Path(source).stem}")
    argv = [prog]
    got, report = jprobe_run(tmp_path, argv, LIBC_PROBES)
    assert (got.returncode, got.stdout) == (0, "hello\n")
    assert report["errors"] == []
    least = 5 if source.endswith(".c") else 32
    assert hits(report, "libc.so.6:malloc") >= least and hits(report, "libc.so.6:free") >= 5
    _kernel_crosscheck(report, argv, LIBC_PROBES, got.stdout)


@pytest.mark.parametrize("opt", ["-O0", "-O2"])
def test_program_with_its_own_allocator(build, tmp_path, opt):
    """An executable that defines malloc/free/calloc/realloc serves every library's calls.

    The runtime's set-up calls none of them (freestanding.c), so the probes count exactly
    the calls the program counts itself, a library constructor's (before main) included.
    """
    lib = build("ctor_alloc.c", ["-shared", "-fPIC", "-O2"], out_name="libctor_alloc.so")
    prog = build("own_malloc.c", [opt, "-fno-builtin", "-rdynamic", "-Wl,--no-as-needed", str(lib)],
                 out_name=f"own_malloc{opt}")
    got, report = jprobe_run(tmp_path, [prog, 300], ["malloc", "calloc", "realloc", "free"])
    assert got.returncode == 0, got.stderr
    own = dict(pair.split("=") for pair in got.stdout.split())
    assert own == {"malloc": "305", "calloc": "300", "realloc": "300", "free": "605"}
    assert {name: hits(report, name) for name in own} == {name: int(n) for name, n in own.items()}
    assert report["errors"] == []


def test_libc_malloc_free_in_sort(tmp_path):
    sort = shutil.which("sort")
    data = tmp_path / "lines.txt"
    rng = random.Random(1)
    data.write_text("".join(f"{rng.randrange(10**9)} {rng.choice('abcdef') * rng.randrange(1, 40)}\n"
                            for _ in range(5000)))
    argv = [sort, data]
    orig = run_prog(argv)
    got, report = jprobe_run(tmp_path, argv, LIBC_PROBES)
    assert_same_behaviour(orig, got)
    assert report["errors"] == []
    assert hits(report, "libc.so.6:malloc") > 0 and hits(report, "libc.so.6:free") > 0
    _kernel_crosscheck(report, argv, LIBC_PROBES, orig.stdout)


@pytest.mark.skipif(not os.path.exists(PYTHON), reason=f"{PYTHON} is not installed")
def test_libc_malloc_free_in_python(tmp_path):
    # -E: the same allocations whatever PYTHON* variables the test runs with
    argv = [PYTHON, "-E", "-c", "import json; print(json.dumps([list(range(i)) for i in range(60)])[-40:])"]
    orig = run_prog(argv)
    got, report = jprobe_run(tmp_path, argv, LIBC_PROBES)
    assert_same_behaviour(orig, got)
    assert report["errors"] == []
    assert hits(report, "libc.so.6:malloc") > 1000
    _kernel_crosscheck(report, argv, LIBC_PROBES, orig.stdout)


def test_threads_exact(modes, tmp_path):
    n = 100000
    args = [modes, n, "threads", 8]
    orig = run_prog(args)
    got, report = jprobe_run(tmp_path, args, ["work"])
    assert_same_behaviour(orig, got)
    assert hits(report, "work") == 9 * n


def test_fork_totals_and_by_pid(modes, tmp_path):
    args = [modes, N, "fork", 3]
    got, report = jprobe_run(tmp_path, args, ["work"])
    assert got.returncode == 0, got.stderr
    expected = {m[1]: int(m[2]) for m in re.finditer(r"^pid=(\d+) work=(\d+)", got.stdout, re.M)}
    assert len(expected) == 4, got.stdout
    e = entry(report, "work")
    assert e["hits"] == sum(expected.values()) == N * (1 + 2 + 3 + 4)
    assert e["by_pid"] == expected


@pytest.mark.parametrize("trap, byte", [("int3", "0xcc"), ("ud", "0xd6")])
def test_trap_site_and_programs_own_sigtrap(build, tmp_path, trap, byte):
    """`tiny` is too short for a jump: a trap next to the program's own SIGTRAP and SIGILL handlers,
    an int3, or under a debugger (JPROBE_TRAP=ud here) the one-byte #UD."""
    prog = build("own_sigtrap.c", ["-O2", "-g"])
    args = [prog, N]
    orig = run_prog(args)
    got, report = jprobe_run(tmp_path, args, ["tiny"], env={"JPROBE_TRAP": trap})
    assert (got.returncode, got.stdout) == (orig.returncode, orig.stdout)
    assert "traps=11 ills=4" in got.stdout
    assert f"tiny[0]={byte}" in got.stderr
    assert entry(report, "tiny")["mechanism"] == "trap"
    assert hits(report, "tiny") == N
    assert report["errors"] == []


def test_callback(build, modes, tmp_path):
    lib = build.lib("cb_count.c")
    n = 20000
    args = [modes, n, "threads", 4]
    got, report = jprobe_run(tmp_path, args, [f"work={lib}:on_hit"])
    assert got.returncode == 0, got.stderr
    assert f"cb_count={5 * n}" in got.stderr
    assert hits(report, "work") == 5 * n


# --------------------------------------------------------------------------
# counts survive any end; exec
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mode, status", [("_exit", 3), ("abort", 128 + signal.SIGABRT)])
def test_counts_survive_exit_and_crash(modes, tmp_path, mode, status):
    got, report = jprobe_run(tmp_path, [modes, N, mode], ["work"])
    assert got.returncode == status, got.stderr
    assert hits(report, "work") == N


def test_sigkill_and_no_writable_code(modes, tmp_path):
    """A sleeping program: no mapping is writable and executable; killed, its counts stay."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "jprobe", "run", "-p", "work", "--report", str(report), "--",
           str(modes), str(N), "sleep"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        line = ""
        while "ready" not in line:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        pid = int(re.search(r"ready pid=(\d+)", line)[1])
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert not [m for m in maps.splitlines() if m.split()[1].startswith("rwx")], maps
        # the trampolines are there, read-only and executable, next to nothing but themselves
        assert any(m.split()[1] == "r-xp" and len(m.split()) == 5 for m in maps.splitlines()), maps
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == 128 + signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    assert hits(json.loads(report.read_text()), "work") == N


def test_exec_same_program(modes, tmp_path):
    """The new image matches the plan again: both images count, under the one pid."""
    got, report = jprobe_run(tmp_path, [modes, N, "exec", modes, 2 * N, "exit", 5], ["work"])
    assert got.returncode == 5, got.stderr
    assert hits(report, "work") == 3 * N
    assert "by_pid" not in entry(report, "work")


def test_exec_other_program(modes, tmp_path):
    """The new image is no planned module: it runs as usual, unprobed."""
    echo = shutil.which("echo")
    got, report = jprobe_run(tmp_path, [modes, N, "exec", echo, "hello"], ["work"])
    assert got.returncode == 0, got.stderr
    assert got.stdout.endswith("hello\n")
    assert hits(report, "work") == N
    assert report["errors"] == []


# --------------------------------------------------------------------------
# modules dlopen()ed later (LD_AUDIT)
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dlopener(build):
    return build("run_dlopen.c", ["-O2", "-g"]), build.lib("run_dllib.c", ["-O2"])


@pytest.mark.parametrize("rounds", [1, 3])
def test_dlopened_module_patched_before_its_code_runs(dlopener, tmp_path, rounds):
    """Its constructor's 7 calls count: the module is patched before it is even relocated.
    dlclose()d and loaded again (at the same address or not), it is patched again."""
    prog, lib = dlopener
    args = [prog, lib, N, rounds]
    orig = run_prog(args)
    got, report = jprobe_run(tmp_path, args, [f"{lib}:lib_work"])
    assert_same_behaviour(orig, got)
    assert hits(report, f"{lib}:lib_work") == rounds * (N + 7)
    assert report["errors"] == []


def test_dlopened_module_callbacks(build, dlopener, tmp_path):
    """Callbacks are resolved at start-up, in the program's namespace: they run from the first call."""
    prog, lib = dlopener
    cb = build.lib("cb_count.c")
    got, report = jprobe_run(tmp_path, [prog, lib, N], [f"{lib}:lib_work={cb}:on_hit"])
    assert got.returncode == 0, got.stderr
    assert f"cb_count={N + 7}" in got.stderr
    assert hits(report, f"{lib}:lib_work") == N + 7


# --------------------------------------------------------------------------
# placement, running threads
# --------------------------------------------------------------------------

def test_trampolines_placed_elsewhere(build, modes, tmp_path):
    """Where the plan put the trampolines is taken: they go elsewhere within reach, and count."""
    blocker = build.lib("run_blocker.c")
    args = [modes, 100000, "threads", 2]
    orig = run_prog(args)
    got, report = jprobe_run(tmp_path, args, ["work"], env={"LD_PRELOAD": str(blocker)})
    assert_same_behaviour(orig, got)
    assert hits(report, "work") == 300000
    assert report["errors"] == []


def test_probes_are_live_before_a_library_thread_starts(build, tmp_path):
    """A preloaded library's constructor starts a thread that calls `work` in a loop.

    The runtime sets the probes up before any initialiser runs (from the loader's audit
    interface), so every call the thread makes is counted, exactly.  (Before, the thread
    could run the -O0 prologue the jump replaces while the runtime wrote it.)
    """
    from jprobe import counters

    prog = build("run_modes.c", ["-O0", "-g", "-fPIE", "-pie", "-rdynamic"], out_name="run_modes_O0_rdynamic")
    spinner = build.lib("run_spinner.c")
    env, read = _plan(tmp_path, prog, ["work"])
    env = {**env, "LD_PRELOAD": f"{env['LD_PRELOAD']}:{spinner}", "SPIN_MS": "100"}
    for attempt in range(10):
        counters.create(env["JPROBE_COUNTERS"], 1)
        got = run_prog([prog, N], env=env)
        assert got.returncode == 0, got.stderr
        spun = int(re.search(r"spun=(\d+)", got.stderr)[1])
        report = read(0)
        assert spun > 0
        assert hits(report, "work") == N + spun
        assert report["errors"] == []


# --------------------------------------------------------------------------
# the runtime alone: damaged plans, system calls
# --------------------------------------------------------------------------

def _plan(tmp_path, program, probes, damage=None):
    """A plan file and a counters file as `jprobe run` makes them; (env, report function)."""
    from jprobe import counters
    from jprobe.planfile import encode
    from jprobe.runner import plan_modules
    from jprobe.runtime import runtime_library
    from jprobe.spec import parse_probes

    modules = plan_modules(str(program), parse_probes(probes), False)
    if damage:
        damage(modules)
    (tmp_path / "plan").write_bytes(encode(modules))
    counters.create(str(tmp_path / "counters"), len(modules))
    env = {"JPROBE_PLAN": str(tmp_path / "plan"), "JPROBE_COUNTERS": str(tmp_path / "counters"),
           "LD_PRELOAD": runtime_library(), **audit_env()}
    return env, lambda pid: counters.build_report(str(tmp_path / "counters"), modules, pid, str(program))


def test_other_build_is_not_patched(modes, tmp_path):
    def other_build(modules):
        modules[0].plan = replace(modules[0].plan, build_id="00" * 20)

    env, read = _plan(tmp_path, modes, ["work"], other_build)
    orig = run_prog([modes, N])
    got = run_prog([modes, N], env=env)
    assert_same_behaviour(orig, got)
    report = read(0)
    assert hits(report, "work") == 0
    assert report["errors"] == [f"{modes}: build-id differs from the plan's; not patched"]


def test_site_that_differs_is_skipped(modes, tmp_path):
    def other_code(modules):
        plan = modules[0].plan
        [work] = [p for p in plan.probes if p.target == "work"]
        damaged = replace(work, original=bytes([work.original[0] ^ 0xff]) + work.original[1:])
        modules[0].plan = replace(plan, probes=[damaged if p is work else p for p in plan.probes])

    env, read = _plan(tmp_path, modes, ["work", "main"], other_code)
    got = run_prog([modes, N], env=env)
    assert got.returncode == 0, got.stderr
    report = read(0)
    assert (hits(report, "work"), hits(report, "main")) == (0, 1)
    assert (entry(report, "work").get("patched"), entry(report, "main").get("patched")) == (False, None)
    [error] = report["errors"]
    assert re.fullmatch(rf"{modes}: the code at 0x[0-9a-f]+ differs from the plan's; probe work not patched",
                        error), error


def test_module_without_build_id(build, tmp_path):
    """Without a build-id the file (and its size and time) identify the module; touched, it is refused."""
    prog = build("run_modes.c", ["-O2", "-g", "-Wl,--build-id=none"], out_name="run_modes_no_build_id")
    env, read = _plan(tmp_path, prog, ["work"])
    assert run_prog([prog, N], env=env).returncode == 0
    assert hits(read(0), "work") == N
    os.utime(prog, (0, 0))
    (tmp_path / "again").mkdir()
    env, read = _plan(tmp_path / "again", prog, ["work"])
    os.utime(prog)
    assert run_prog([prog, N], env=env).returncode == 0
    report = read(0)
    assert hits(report, "work") == 0
    assert report["errors"] == [f"{prog}: changed since it was planned; not patched"]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_no_system_call_or_signal_per_hit(modes, tmp_path):
    """strace: the same system calls at 10^3 and 10^6 hits, and no SIGTRAP at a jump site."""
    def trace(n):
        d = tmp_path / str(n)
        d.mkdir()
        env, read = _plan(d, modes, ["work"])
        log = d / "strace.log"
        r = subprocess.run(["strace", "-f", "-qq", "-o", str(log),
                            *[a for k, v in env.items() for a in ("-E", f"{k}={v}")], str(modes), str(n)],
                           capture_output=True, text=True, env=child_env(), timeout=120)
        assert r.returncode == 0, r.stderr
        text = log.read_text()
        assert "SIGTRAP" not in text and "SIGILL" not in text, text
        calls = Counter(m[1] for m in re.finditer(r"^\d+\s+(\w+)\(", text, re.M))
        pid = int(re.match(r"\d+", text)[0])
        return calls, hits(read(pid), "work")

    few, few_hits = trace(10**3)
    many, many_hits = trace(10**6)
    assert (few_hits, many_hits) == (10**3, 10**6)
    assert few == many
