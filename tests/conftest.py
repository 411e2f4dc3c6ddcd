"""Shared helpers for jprobe's end-to-end tests.

Fixtures (C/C++ sources in tests/fixtures/) are compiled at test time into a
per-session (per xdist worker) temporary directory, once per distinct set of
flags.  Everything here checks jprobe against its user contract (SPEC): the
CLI, the JSON report written by a patched binary, and the counts a kernel
uprobe gives on the same probe and workload.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RUNTIME_INCLUDE = REPO / "jprobe" / "runtime_c"
TRACEFS = Path("/sys/kernel/tracing")

# --------------------------------------------------------------------------
# the build matrix: -O0/-O2/-O3 x PIE/non-PIE, always with -g
# --------------------------------------------------------------------------

PIE_FLAGS = {
    "pie": ["-fPIE", "-pie"],
    "nopie": ["-fno-pie", "-no-pie"],
}
OPT_LEVELS = ["-O0", "-O2", "-O3"]


@dataclass(frozen=True)
class Variant:
    opt: str
    pie: str

    @property
    def flags(self) -> list[str]:
        return [self.opt, "-g", *PIE_FLAGS[self.pie]]

    @property
    def id(self) -> str:
        return f"{self.opt[1:]}-{self.pie}"

    def __str__(self) -> str:  # used in test ids
        return self.id


ALL_VARIANTS = [Variant(o, p) for o in OPT_LEVELS for p in PIE_FLAGS]
# a smaller matrix for tests whose subject is not code generation
SOME_VARIANTS = [Variant("-O0", "nopie"), Variant("-O2", "pie")]


@pytest.fixture(params=ALL_VARIANTS, ids=str)
def variant(request) -> Variant:
    return request.param


@pytest.fixture(params=SOME_VARIANTS, ids=str)
def some_variant(request) -> Variant:
    return request.param


# --------------------------------------------------------------------------
# building fixtures
# --------------------------------------------------------------------------

class Builder:
    """build(source, flags, out_name) -> Path, cached for the session."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[tuple, Path] = {}
        self.lock = threading.Lock()

    def __call__(self, source, flags=(), out_name=None) -> Path:
        src = Path(source)
        if not src.is_absolute():
            src = FIXTURES / src
        flags = list(flags)
        if out_name is None:
            out_name = src.stem + "-" + "_".join(f.strip("-").replace("=", "") for f in flags)
        key = (str(src), tuple(flags), out_name)
        with self.lock:
            if key in self.cache:
                return self.cache[key]
            out = self.root / out_name
            if out.exists():
                raise AssertionError(f"build name clash: {out_name} built with other flags")
            cc = "g++" if src.suffix in (".cc", ".cpp", ".cxx") else "gcc"
            libs = ["-lpthread"] if "-shared" not in flags else []
            cmd = [cc, *flags, "-o", str(out), str(src), *libs]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise AssertionError(f"fixture build failed: {' '.join(cmd)}\n{r.stderr}")
            self.cache[key] = out
            return out

    def lib(self, source, extra=(), out_name=None) -> Path:
        """A callback library: -shared -fPIC -I<runtime_c>."""
        flags = ["-shared", "-fPIC", "-g", "-I", str(RUNTIME_INCLUDE), *extra]
        if out_name is None:
            out_name = Path(source).stem + "".join(f.strip("-").replace("=", "") for f in extra) + ".so"
        return self(source, flags, out_name)


@pytest.fixture(scope="session")
def build(tmp_path_factory) -> Builder:
    for tool in ("gcc",):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is needed to build the test fixtures")
    return Builder(tmp_path_factory.mktemp("fixtures"))


# --------------------------------------------------------------------------
# running jprobe and patched programs
# --------------------------------------------------------------------------

def _env(extra=None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("JPROBE_REPORT", None)
    if extra:
        env.update(extra)
    return env


def jprobe(*args, check=False, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m jprobe ARGS...` and return the completed process."""
    cmd = [sys.executable, "-m", "jprobe", *[str(a) for a in args]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def patch(inp, out, probes, *extra) -> Path:
    """`jprobe patch INP -o OUT -p P ...`; fails the test unless it exits 0."""
    args = ["patch", inp, "-o", out]
    for p in probes:
        args += ["-p", p]
    jprobe(*args, *extra, check=True)
    out = Path(out)
    assert out.exists(), f"jprobe patch exited 0 but wrote no {out}"
    return out


def sites(binary, symbol=None) -> dict:
    args = ["sites", binary] + ([symbol] if symbol else []) + ["--json"]
    r = jprobe(*args, check=True)
    return json.loads(r.stdout)


def run_prog(argv, env=None, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          env=_env(env), timeout=timeout, cwd=cwd)


def run_with_report(argv, report_path, env=None, timeout=120):
    """Run a patched program with JPROBE_REPORT set; return (completed, report)."""
    report_path = Path(report_path)
    if report_path.exists():
        report_path.unlink()
    e = dict(env or {})
    e["JPROBE_REPORT"] = str(report_path)
    r = run_prog(argv, env=e, timeout=timeout)
    assert report_path.exists(), (
        f"no report written to JPROBE_REPORT={report_path} (exit {r.returncode}, stderr: {r.stderr[-2000:]})")
    with open(report_path) as f:
        rep = json.load(f)
    return r, rep


class Hits(dict):
    """{link-time address: hits}; a missing address fails with a readable message."""

    def __missing__(self, key):
        have = ", ".join(hex(k) for k in sorted(self))
        raise AssertionError(f"the report has no probe at {key:#x} (it has: {have})")


def hits_by_address(report) -> dict[int, int]:
    """{link-time address: hits} from a JSON report (SPEC section 3)."""
    out = Hits()
    for p in report["probes"]:
        addr = int(p["address"], 16) if isinstance(p["address"], str) else int(p["address"])
        out[addr] = out.get(addr, 0) + int(p["hits"])
    return out


def probe_entry(report, address) -> dict:
    for p in report["probes"]:
        a = int(p["address"], 16) if isinstance(p["address"], str) else int(p["address"])
        if a == address:
            return p
    raise AssertionError(f"no probe at {address:#x} in report: {json.dumps(report)[:2000]}")


def assert_same_behaviour(orig: subprocess.CompletedProcess, patched: subprocess.CompletedProcess,
                          stderr=True):
    assert patched.returncode == orig.returncode, (
        f"exit status {patched.returncode} != original {orig.returncode}; stderr: {patched.stderr[-2000:]}")
    assert patched.stdout == orig.stdout
    if stderr:
        assert patched.stderr == orig.stderr, "a patched binary must be silent"


# --------------------------------------------------------------------------
# ELF helpers (pyelftools, capstone)
# --------------------------------------------------------------------------

def elf_symbols(binary) -> dict[str, tuple[int, int]]:
    """{name: (value, size)} of function symbols from .symtab and .dynsym."""
    from elftools.elf.elffile import ELFFile
    out = {}
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        for secname in (".dynsym", ".symtab"):
            sec = elf.get_section_by_name(secname)
            if sec is None:
                continue
            for s in sec.iter_symbols():
                if s["st_info"]["type"] == "STT_FUNC" and s["st_shndx"] != "SHN_UNDEF":
                    out[s.name] = (s["st_value"], s["st_size"])
    return out


def symbol(binary, name) -> tuple[int, int]:
    syms = elf_symbols(binary)
    assert name in syms, f"{name} not in {binary}"
    return syms[name]


def vaddr_to_offset(binary, vaddr) -> int:
    """File offset of a link-time virtual address (via PT_LOAD headers)."""
    from elftools.elf.elffile import ELFFile
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            if seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
                return vaddr - seg["p_vaddr"] + seg["p_offset"]
    raise AssertionError(f"{vaddr:#x} is in no PT_LOAD segment of {binary}")


def read_vaddr(binary, vaddr, size) -> bytes:
    off = vaddr_to_offset(binary, vaddr)
    with open(binary, "rb") as f:
        f.seek(off)
        return f.read(size)


def disasm_function(binary, name):
    """Capstone instructions (Intel syntax) of a function, at link-time addresses."""
    import capstone
    value, size = symbol(binary, name)
    assert size > 0, f"{name} has no size"
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    code = read_vaddr(binary, value, size)
    insns = list(md.disasm(code, value))
    assert sum(i.size for i in insns) == size, f"could not disassemble all of {name}"
    return insns


def branch_target(insn):
    """The immediate target of a direct jmp/jcc/call, else None."""
    import capstone
    from capstone import x86
    groups = set(insn.groups)
    if groups & {capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL}:
        if insn.operands and insn.operands[0].type == x86.X86_OP_IMM:
            return insn.operands[0].imm
    return None


def is_control_flow(insn) -> bool:
    import capstone
    return bool(set(insn.groups) & {capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL,
                                    capstone.CS_GRP_RET, capstone.CS_GRP_INT, capstone.CS_GRP_IRET})


# --------------------------------------------------------------------------
# kernel uprobes (tracefs)
# --------------------------------------------------------------------------

_counter = itertools.count()


def tracefs_status() -> str | None:
    """None when kernel uprobes are usable, else the reason they are not."""
    events = TRACEFS / "uprobe_events"
    if not events.exists():
        if os.geteuid() != 0:
            return "tracefs uprobes need root (no /sys/kernel/tracing/uprobe_events)"
        TRACEFS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
        if not events.exists():
            return "tracefs with uprobe_events is not available (mount -t tracefs failed or no CONFIG_UPROBE_EVENTS)"
    if not os.access(events, os.W_OK):
        return "no write access to /sys/kernel/tracing/uprobe_events (need root)"
    return None


def tracefs_usable() -> bool:
    return tracefs_status() is None


@pytest.fixture(scope="session")
def tracefs():
    reason = tracefs_status()
    if reason:
        pytest.skip(reason)
    return TRACEFS


def _append(path: Path, line: str):
    # always append: truncating uprobe_events would remove other workers' probes.
    # (os.open, not open(path, "a"): Python's append mode seeks, which tracefs refuses)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_whole(path) -> str:
    """A tracefs file with large read() calls (one, mostly): see _read_profile."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 22)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _read_profile(names) -> dict:
    """Hit counts of the named events from uprobe_profile.

    Lines can go missing from a read that spans several read() calls while other
    processes add or remove uprobes (the list changes between the calls); so read
    with one large read() and, for names still missing, read again.  The counts of
    our events no longer change (the workload has exited)."""
    want, counts = set(names), {}
    for _ in range(20):
        for line in read_whole(TRACEFS / "uprobe_profile").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[-2] in want:
                counts[parts[-2]] = int(parts[-1])
        if want <= counts.keys():
            return counts
    raise AssertionError(f"uprobe_profile never listed {sorted(want - counts.keys())[:5]}")


def kernel_uprobe_counts(binary, file_offsets, argv, env=None, private_copy=True, timeout=300):
    """Put one kernel uprobe on each file offset of `binary`, run argv, return the hit counts.

    A uprobe counts every process that maps the file's inode; to keep other
    tests (xdist workers) from adding to the count, the probes go on a
    private copy of `binary` by default: argv items equal to `binary` are
    replaced by the copy, and "{COPYDIR}" in argv items and env values by its
    directory (for LD_LIBRARY_PATH).  Returns (counts, completed_process).
    """
    binary = Path(binary)
    target = binary
    if private_copy:
        d = Path(os.environ.get("TMPDIR", "/tmp")) / f"jpt-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        target = d / binary.name
        shutil.copy2(binary, target)
        argv = [str(target) if str(a) == str(binary) else str(a).replace("{COPYDIR}", str(d)) for a in argv]
        env = {k: v.replace("{COPYDIR}", str(d)) for k, v in (env or {}).items()}
    events = TRACEFS / "uprobe_events"
    # one group per call (enabled and disabled with one write each); event names unique
    # across processes too, since uprobe_profile prints only the event name
    tag = f"{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    group = f"jpt_{tag}"
    names = [f"e{tag}_{k}" for k in range(len(file_offsets))]
    added = enabled = False
    try:
        if names:
            _append(events, "\n".join(f"p:{group}/{n} {target}:{off:#x}"
                                       for n, off in zip(names, file_offsets)))
            added = True
            (TRACEFS / "events" / group / "enable").write_text("1\n")
            enabled = True
        proc = run_prog(argv, env=env, timeout=timeout)
        counts = _read_profile(names)
        return [counts[n] for n in names], proc
    finally:
        # Synchronously: a test that writes new files while the kernel is still tearing
        # down uprobes of a deleted copy has seen an int3 of its own vanish.
        if enabled:
            (TRACEFS / "events" / group / "enable").write_text("0\n")
        if added:
            _append(events, "\n".join(f"-:{group}/{n}" for n in names))
        if private_copy:
            shutil.rmtree(target.parent, ignore_errors=True)


def kernel_uprobe_count(binary, address_file_offset, argv, env=None) -> int:
    counts, proc = kernel_uprobe_counts(binary, [address_file_offset], argv, env=env)
    return counts[0]


def check_kernel_counts(binary, vaddrs, argv, jprobe_hits, env=None):
    """Where tracefs is usable, a kernel uprobe on each vaddr of the ORIGINAL binary, on the
    same workload, must count exactly what jprobe counted."""
    if not tracefs_usable():
        return
    offsets = [vaddr_to_offset(binary, v) for v in vaddrs]
    counts, _ = kernel_uprobe_counts(binary, offsets, argv, env=env)
    for v, kc in zip(vaddrs, counts):
        assert jprobe_hits[v] == kc, (
            f"probe at {v:#x}: jprobe counted {jprobe_hits[v]}, a kernel uprobe counted {kc}")
