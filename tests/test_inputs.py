"""What jprobe takes as input, decided as the loader decides it (issue 11):

- a shared library is one whatever its PT_INTERP says (Debian's libc.so.6 and ld.so can run
  as programs); a PIE executable is one that carries DF_1_PIE. A library gets what libraries
  get from `jprobe patch`: no packed tables, no islands;
- a statically linked program has no dynamic loader to load the runtime: `patch` and `run`
  refuse it (exit 2, one line, nothing written, nothing run), `sites` says so;
- a trap in a library the runtime itself loads (libc.so.6) would fire before the runtime can
  serve it: `patch` refuses it.
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from support.elf import elf_symbols, symbol
from support.report import hits_by_address
from support.run import jprobe, patch, run_prog, run_with_report

TRUE = "/bin/true"


def _loaded_by(program: str, soname: str) -> str:
    """The path of `soname` that `program` loads (ldd)."""
    r = subprocess.run(["ldd", program], capture_output=True, text=True)
    m = re.search(rf"{re.escape(soname)} => (\S+)", r.stdout)
    if not m:
        pytest.skip(f"{program} does not load {soname}")
    return m[1]


@pytest.fixture(scope="module")
def libc() -> str:
    return _loaded_by(TRUE, "libc.so.6")


def test_library_or_program_as_the_loader_decides(libc, build):
    from jprobe.elf import ElfModule

    interp = re.search(r"\s(/\S*ld-linux\S*) \(", subprocess.run(["ldd", TRUE], capture_output=True,
                                                                    text=True).stdout)
    assert ElfModule(libc).is_library                      # PT_INTERP, no DF_1_PIE
    if interp:
        assert ElfModule(interp[1]).is_library             # the loader itself
    assert not ElfModule(str(build("basic.c", ["-O2", "-fPIE", "-pie"]))).is_library
    assert not ElfModule(str(build("basic.c", ["-O2", "-fno-pie", "-no-pie"]))).is_library
    assert ElfModule(str(build.lib("cb.c"))).is_library


def _jump_entries(libc: str, first: str, count: int) -> list[tuple[str, int]]:
    """`first` and other exported functions of libc whose entry gets a plain jump in a library
    (no trap: libc runs before the runtime could serve one), one name per address."""
    from jprobe.elf import ElfModule
    from jprobe.sites import SiteAnalyzer

    analyzer = SiteAnalyzer(ElfModule(libc))
    by_address = {}
    for name, (address, size) in sorted(elf_symbols(libc).items()):
        if size and "@" not in name and not name.startswith("_") and address not in by_address.values():
            by_address[name] = address
    chosen = [(first, by_address.pop(first))]
    for name, address in by_address.items():
        if len(chosen) == count:
            break
        if analyzer.analyse(address, tactics=False).mechanism == "jump":
            chosen.append((name, address))
    return chosen


def test_patched_libc_runs_every_program(libc, build, tmp_path):
    """`jprobe patch libc.so.6` with 40 probes including malloc (issue 11, defect 3): planned
    as a program (punned jumps, a packed table), it crashed every program loading it."""
    probes = _jump_entries(libc, "malloc", 40)
    patch(libc, tmp_path / "libc.so.6", [name for name, _ in probes])
    malloc = probes[0][1]
    env = {"LD_LIBRARY_PATH": str(tmp_path)}
    r, rep = run_with_report([TRUE], tmp_path / "true.json", env=env)
    assert r.returncode == 0, r.stderr
    assert {p["mechanism"] for p in rep["probes"]} == {"jump"}
    assert len(rep["probes"]) == 40 and hits_by_address(rep)[malloc] > 0
    # exact: N more calls of malloc, N more hits
    prog = build("mallocs.c", ["-O0"])
    per_run = []
    for n in (1000, 3000):
        r, rep = run_with_report([prog, n], tmp_path / f"{n}.json", env=env)
        assert (r.returncode, r.stdout) == (0, f"mallocs={n}\n"), r.stderr
        per_run.append(hits_by_address(rep)[malloc])
    assert per_run[1] - per_run[0] == 2000


@pytest.fixture(params=[["-static"], ["-static-pie"]], ids=["static", "static-pie"])
def static_prog(build, request):
    try:
        return build("basic.c", ["-O2", "-g", *request.param])
    except AssertionError as e:
        pytest.skip(f"cannot link a {request.param[0]} program here (no libc.a?): {str(e)[:200]}")


def _one_line_naming(r, path) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_static_program_is_refused_by_patch(static_prog, tmp_path):
    """`gcc -static` (issue 11, defect 2): patched, it ran unprobed and reported nothing."""
    out = tmp_path / "prog.p"
    line = _one_line_naming(jprobe("patch", static_prog, "-o", out, "-p", "compute"), static_prog)
    assert "statically linked" in line and "runtime" in line
    assert not out.exists()


@pytest.mark.parametrize("probe", ["compute", "libc.so.6:malloc"])
def test_static_program_is_refused_by_run(static_prog, tmp_path, probe):
    r = jprobe("run", "-p", probe, "--", static_prog, 10, 2)
    assert "statically linked" in _one_line_naming(r, static_prog)
    assert r.stdout == "", "the program ran"
    assert run_prog([static_prog, 10, 2]).stdout == "compute calls=2 total=671\n"


def test_sites_of_a_static_program_says_no_applier_can_load(static_prog):
    r = jprobe("sites", static_prog, "compute")
    assert r.returncode == 0
    assert "jump" in r.stdout
    assert "statically linked" in r.stderr and str(static_prog) in r.stderr


def test_trap_in_libc_is_refused_by_patch(libc, tmp_path):
    """`-p malloc -p malloc+0x4`: malloc can only trap in a library file (its 4 bytes end at the
    other probe), and libc runs malloc before the runtime can serve a trap (the loader and the
    runtime's own start-up call it): every program died of SIGTRAP. Refused, with a command
    that shows which instructions get a jump."""
    out = tmp_path / "libc.so.6"
    r = jprobe("patch", libc, "-o", out, "-p", "malloc", "-p", "malloc+0x4")
    line = _one_line_naming(r, "'malloc'")
    assert "libc.so.6" in line and "trap" in line
    assert not out.exists()
    [command] = re.findall(r"`jprobe (sites [^`]+)`", line)
    shown = jprobe(*command.split(), "--json", check=True)
    rows = {row["address"]: row["mechanism"] for row in json.loads(shown.stdout)["instructions"]}
    assert rows[hex(symbol(libc, "malloc")[0])] == "jump"       # alone; the trap came with malloc+0x4


# --------------------------------------------------------------------------
# files jprobe patch already rewrote
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rewritten(build, tmp_path_factory):
    prog = build("basic.c", ["-O2", "-g", "-fPIE", "-pie"])
    return prog, patch(prog, tmp_path_factory.mktemp("rewritten") / "basic.p", ["compute"])


def test_patching_a_patched_file_is_refused(rewritten, tmp_path):
    """It was accepted and `main` appeared twice in the report (issue 11, silent gap)."""
    _, once = rewritten
    out = tmp_path / "twice"
    line = _one_line_naming(jprobe("patch", once, "-o", out, "-p", "main"), once)
    assert "already rewritten by `jprobe patch`" in line and "original" in line
    assert not out.exists()


def test_running_a_named_rewritten_module_is_refused(rewritten, build, tmp_path):
    """`jprobe run -p compute -- ./basic.p`: the file's own probes counted nowhere."""
    _, once = rewritten
    lib = build.lib("short_lib.c", ["-O2"])
    twice = patch(lib, tmp_path / "short_lib.so", ["lib_calls"])
    for probe, command, path in (("compute", [once, 10, 3], once), (f"{twice}:tiny", ["true"], twice)):
        r = jprobe("run", "-p", probe, "--", *command)
        assert "rewritten by `jprobe patch`" in _one_line_naming(r, path)
        assert r.stdout == "", "the program ran"


def test_running_an_unnamed_rewritten_program_says_so(rewritten, tmp_path):
    """Probing libc in a program that `jprobe patch` rewrote: its own probes are not counted
    under `jprobe run`; stderr and the report's errors say so, and the program runs."""
    prog, once = rewritten
    report = tmp_path / "r.json"
    r = jprobe("run", "-p", "libc.so.6:malloc", "--report", report, "--", once, 10, 3)
    assert (r.returncode, r.stdout) == (run_prog([prog, 10, 3]).returncode, "compute calls=3 total=1177\n")
    lines = [line for line in r.stderr.splitlines() if str(once) in line]
    assert len(lines) == 1 and "not counted" in lines[0], r.stderr
    errors = json.loads(report.read_text())["errors"]
    assert any(str(once) in e and "not counted" in e for e in errors), errors
