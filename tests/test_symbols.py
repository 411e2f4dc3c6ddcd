"""Probe lists made from `nm -D` (issue 11, silent gap): names as nm prints them resolve, a
bare name is the default (`@@`) version and `name@VERSION` another (SPEC §1), and aliases at
one address are one site whose every name is reported with the same hits."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from support.run import child_env, jprobe, patch, run_with_report

N, M = 40, 7
# as `nm -D libc.so.6` lists them: fgetpos and fgetpos64 share an address; fmemopen has two
ALIASES = ["fgetpos@@GLIBC_2.2.5", "fgetpos64@@GLIBC_2.2.5"]
VERSIONS = ["fmemopen", "fmemopen@@GLIBC_2.22", "fmemopen@GLIBC_2.2.5"]


@pytest.fixture(scope="module")
def libc() -> str:
    r = subprocess.run(["ldd", "/bin/true"], capture_output=True, text=True)
    m = re.search(r"libc\.so\.6 => (\S+)", r.stdout)
    if not m:
        pytest.skip("/bin/true does not load libc.so.6")
    nm = subprocess.run(["nm", "-D", m[1]], capture_output=True, text=True).stdout
    missing = [name for name in ALIASES + VERSIONS[1:] if f" {name}\n" not in nm]
    if missing:
        pytest.skip(f"this libc has no {', '.join(missing)}")
    return m[1]


@pytest.fixture(scope="module")
def prog(build):
    return build("versions.c", ["-O0"])


def _by_name(report: dict, prefix: str = "") -> dict[str, tuple[str, int]]:
    return {p["probe"][len(prefix):]: (p["address"], p["hits"]) for p in report["probes"]}


def _check(got: dict[str, tuple[str, int]]) -> None:
    assert got[ALIASES[0]][1] == got[ALIASES[1]][1] == N
    assert got[ALIASES[0]][0] == got[ALIASES[1]][0]
    assert got["fmemopen"] == got["fmemopen@@GLIBC_2.22"] and got["fmemopen"][1] == M
    assert got["fmemopen@GLIBC_2.2.5"][1] == 0 and got["fmemopen@GLIBC_2.2.5"][0] != got["fmemopen"][0]


def test_run_with_names_from_nm(libc, prog, tmp_path):
    report = tmp_path / "r.json"
    probes = [a for name in ALIASES + VERSIONS for a in ("-p", f"libc.so.6:{name}")]
    r = subprocess.run([sys.executable, "-m", "jprobe", "run", *probes, "--report", str(report), "--",
                        str(prog), str(N), str(M)], capture_output=True, text=True, env=child_env())
    assert (r.returncode, r.stdout) == (0, f"ok={N + M}\n"), r.stderr
    rep = json.loads(report.read_text())
    assert len(rep["probes"]) == 5
    _check(_by_name(rep, "libc.so.6:"))


def test_patch_with_names_from_nm(libc, prog, tmp_path):
    patched = patch(libc, tmp_path / "libc.so.6", ALIASES + VERSIONS)
    r, rep = run_with_report([prog, N, M], tmp_path / "r.json", env={"LD_LIBRARY_PATH": str(patched.parent)})
    assert (r.returncode, r.stdout) == (0, f"ok={N + M}\n"), r.stderr
    assert len(rep["probes"]) == 5
    _check(_by_name(rep))
    listing = jprobe("patch", libc, "-o", tmp_path / "again.so.6", *[a for n in ALIASES for a in ("-p", n)],
                     check=True).stdout
    assert all(name in listing for name in ALIASES)


def test_aliases_with_different_handlers_are_refused(libc, build, tmp_path):
    lib = build.lib("cb_count.c")
    r = jprobe("patch", libc, "-o", tmp_path / "x.so.6", "-p", ALIASES[0], "-p", f"{ALIASES[1]}={lib}:on_hit")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert ALIASES[0] in r.stderr and ALIASES[1] in r.stderr and "handler" in r.stderr
