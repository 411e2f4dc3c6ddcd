"""Stress tests on a real program (issue 4, part 5).

1. Every function entry of /usr/bin/bash (its ~1,670 sized .dynsym functions) gets a `count`
   probe; a shell workload runs the same on the original and on the patched bash, and every
   entry's count (summed over the shell and its forked children, SPEC §2) equals the count of
   a kernel uprobe on the same entry of the ORIGINAL bash on the same workload.
2. Every `call` instruction of bash's .text (a linear sweep: bash has no .symtab) gets a
   probe: same checks, and the call sites are retargeted (`jump`).
3. Every instruction of every function of a small C fixture (tests/fixtures/every_insn.c:
   loops, a jump table, recursion, 1-4 byte functions, direct and indirect calls), -O0/-O2 x
   PIE/non-PIE: same output, each function entry counts its (known) number of calls, and
   punned or evicting jumps are among the mechanisms.
4. The smallest reproducers of what 1 and 2 found (end of the file).

The workload runs under `env -i` with a fixed environment, identical for all three runs
(original, kernel-probed original, patched): bash imports every environment variable, so
even an extra JPROBE_REPORT changes the counts of its variable-table functions.

Kernel uprobes: support.kernel's kernel_uprobe_counts makes one tracefs event per probe, and
disabling an event waits for a grace period (≈65 ms per event on the 2-core test VM, so
≈110 s for bash's 1,670 entries, plus ≈25 ms per event to remove them). Here all the probes
of one run form ONE multi-probe event (tracefs appends a probe whose event name exists to
that event): 16,500 probes register, run and go away in ≈4 s.
"""
from __future__ import annotations

import collections
import fcntl
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import pytest

import jprobe
from jprobe.trampolines import tactics
from support.build import Variant
from support.elf import disasm_function, symbol
from support.kernel import TRACEFS, append_event, read_whole, require_tracefs
from support.report import hits_by_address
from support.run import assert_same_behaviour, patch, run_prog, run_with_report

BASH = Path("/usr/bin/bash")
MECHANISMS = {"jump", "pun", "evict", "trap"}

# argv of env(1): the whole environment of the shell, the same for every run
FIXED_ENV = ["PATH=/usr/bin:/bin", "HOME=/", "LANG=C", "LC_ALL=C"]

WORKLOADS = {
    # the workload: command substitution, pipelines, external commands (seq, sort,
    # tail: forked children that execve), ${x^^}, a function, a `while read` loop
    "external": ('for i in $(seq 1 300); do echo $((i*i)); done | sort -n | tail -3; '
                 'x=abc; echo ${x^^}; f() { echo $1; }; f hello; '
                 'printf "%s\\n" a b c | while read l; do echo "<$l>"; done'),
    # the same kind of work in the shell alone: its forked children (the pipeline's
    # subshells) exit without execve
    "builtins": ('s=0; for ((i=1;i<=300;i++)); do s=$((s+i*i)); done; echo $s; '
                 'x=abc; echo ${x^^}; f() { echo $1; }; f hello; '
                 'printf "%s\\n" a b c | while read l; do echo "<$l>"; done'),
}
EXPECTED_STDOUT = {
    "external": "88804\n89401\n90000\nABC\nhello\n<a>\n<b>\n<c>\n",
    "builtins": "9045050\nABC\nhello\n<a>\n<b>\n<c>\n",
}


# --------------------------------------------------------------------------
# kernel uprobes: one multi-probe event for all the probes of a run
# --------------------------------------------------------------------------

def _event_counts(group: str, event: str, n: int) -> dict[int, int]:
    """{file offset: hits} of the `n` probes of one multi-probe event.

    uprobe_events lists the probes with their offsets, uprobe_profile their hits under the
    event's name, both in the order of the kernel's probe list.  A read that spans several
    read() calls can miss lines while other processes add or remove uprobes (support.kernel's
    _read_profile): read again until both list all `n`."""
    prefix = f"p:{group}/{event} "
    for _ in range(20):
        offsets = [int(line.rsplit(":", 1)[1], 16)
                   for line in read_whole(TRACEFS / "uprobe_events").splitlines() if line.startswith(prefix)]
        hits = [int(parts[-1]) for parts in map(str.split, read_whole(TRACEFS / "uprobe_profile").splitlines())
                if len(parts) >= 3 and parts[-2] == event]
        if len(offsets) == len(hits) == n:
            return dict(zip(offsets, hits))
    raise AssertionError(f"tracefs never listed all {n} probes of {group}/{event} "
                         f"(uprobe_events: {len(offsets)}, uprobe_profile: {len(hits)})")


def kernel_counts(target: Path, offsets: list[int], argv, timeout=120):
    """A kernel uprobe on each file offset of `target`, one run of argv: (counts, completed).

    `target` must be a private copy (a uprobe counts every process that maps the inode,
    other xdist workers' included)."""
    assert len(set(offsets)) == len(offsets)
    tag = f"{os.getpid()}_{uuid.uuid4().hex[:8]}"
    group, event = f"jps_{tag}", f"s{tag}"
    events = TRACEFS / "uprobe_events"
    enable = TRACEFS / "events" / group / "enable"
    added = enabled = False
    try:
        append_event(events, "\n".join(f"p:{group}/{event} {target}:{off:#x}" for off in offsets))
        added = True
        enable.write_text("1\n")
        enabled = True
        proc = run_prog(argv, timeout=timeout)
        by_offset = _event_counts(group, event, len(offsets))
    finally:
        if enabled:
            enable.write_text("0\n")
        if added:
            append_event(events, f"-:{group}/{event}")     # removes every probe of the event
    return [by_offset[off] for off in offsets], proc


def file_offsets(binary, vaddrs) -> list[int]:
    """support.elf.vaddr_to_offset for many addresses (it parses the ELF file once per call)."""
    from elftools.elf.elffile import ELFFile
    with open(binary, "rb") as f:
        loads = [(s["p_vaddr"], s["p_filesz"], s["p_offset"]) for s in ELFFile(f).iter_segments()
                 if s["p_type"] == "PT_LOAD"]
    out = []
    for v in vaddrs:
        off = [v - lo + fo for lo, size, fo in loads if lo <= v < lo + size]
        assert off, f"{v:#x} is in no PT_LOAD segment of {binary}"
        out.append(off[0])
    return out


# --------------------------------------------------------------------------
# bash: patched once per test session, shared by the xdist workers
# --------------------------------------------------------------------------

def _shared(tmp_path_factory, name, make):
    """make(directory) once for the whole session, whichever xdist worker comes first (the
    others wait for it); its JSON-able result is returned to all of them."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                     # the session's directory, shared by the workers
    meta = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not meta.exists():
            (root / name).mkdir(exist_ok=True)
            try:
                data = make(root / name)
            except Exception as e:             # the other workers fail the same way, at once
                meta.write_text(json.dumps({"__error__": f"{type(e).__name__}: {e}"}))
                raise
            meta.write_text(json.dumps(data))
        data = json.loads(meta.read_text())
    if "__error__" in data:
        raise AssertionError(f"building {name} failed in another xdist worker: {data['__error__']}")
    return root / name, data


def _need_bash():
    if not BASH.exists():
        pytest.skip(f"{BASH} is not on this machine")
    from jprobe.elf import ElfModule
    from jprobe.errors import JprobeError
    try:
        return ElfModule(str(BASH))
    except JprobeError as e:
        pytest.skip(f"{BASH} cannot be patched here: {e}")


@pytest.fixture(scope="session")
def bash_entries(tmp_path_factory):
    """(patched bash, [(address, name)], {address: (mechanism, reason, depends)}): a probe on
    every sized function."""
    module = _need_bash()
    funcs = [(f.address, f.name) for f in module.functions if f.size > 0]
    assert len(funcs) > 1000, f"{BASH} has only {len(funcs)} sized function symbols"

    def make(d):
        plan = jprobe.patch_file(str(BASH), str(d / "bash"), [f"{a:#x}" for a, _ in funcs])
        return {str(p.address): [p.mechanism, p.reason, p.depends] for p in plan.probes}
    d, plan = _shared(tmp_path_factory, "bash_entries", make)
    return d / "bash", funcs, {int(a): tuple(v) for a, v in plan.items()}


def _call_sweep(module):
    """Every `call` of .text, decoded linearly: [(address, text, kind)], kind "rel32",
    "rip" (call [rip+x]) or "other" (through a register or other memory)."""
    from jprobe.trampolines.x86_64 import decode_one
    calls = []
    for name, lo, hi in module.code_sections():
        if name != ".text":
            continue
        code = module.read(lo, hi - lo)
        address = lo
        while address < hi:
            insn = decode_one(code[address - lo:address - lo + 15], address)
            if insn is None:
                address += 1
                continue
            if insn.mnemonic == "call":
                op = insn.op_str
                kind = ("rel32" if insn.size == 5 and insn.bytes[0] == 0xE8
                        else "rip" if "rip" in op else "other")
                calls.append((insn.address, f"{insn.mnemonic} {op}", kind))
            address += insn.size
    return calls


@pytest.fixture(scope="session")
def bash_calls(tmp_path_factory):
    """(patched bash, [(address, text, kind)], {address: (mechanism, reason, depends)},
    rejected): a probe on every `call` of .text that site analysis accepts."""
    module = _need_bash()

    def make(d):
        from jprobe.errors import JprobeError
        from jprobe.sites import SiteAnalyzer
        analyzer = SiteAnalyzer(module)
        calls, rejected = [], []
        for c in _call_sweep(module):
            try:
                analyzer.analyse(c[0], tactics=False)   # only whether it raises (as `jprobe sites`)
            except JprobeError as e:
                rejected.append([c, str(e)])
                continue
            calls.append(c)
        assert len(calls) > 10000, f"only {len(calls)} calls in {BASH}'s .text ({len(rejected)} rejected)"
        plan = jprobe.patch_file(str(BASH), str(d / "bash"), [f"{a:#x}" for a, _, _ in calls])
        return {"calls": calls, "rejected": rejected,
                "plan": {str(p.address): [p.mechanism, p.reason, p.depends] for p in plan.probes}}
    d, data = _shared(tmp_path_factory, "bash_calls", make)
    return (d / "bash", [tuple(c) for c in data["calls"]],
            {int(a): tuple(v) for a, v in data["plan"].items()}, data["rejected"])


def _copies(tmp_path: Path, patched: Path) -> tuple[Path, Path]:
    """A private copy of the original (kernel uprobes go on its inode) and of the patched
    bash, at paths of the same length ($BASH, $0)."""
    (tmp_path / "k").mkdir()
    (tmp_path / "j").mkdir()
    orig = tmp_path / "k" / "bash"
    mine = tmp_path / "j" / "bash"
    shutil.copy2(BASH, orig)
    shutil.copy2(patched, mine)
    return orig, mine


def _shell(binary: Path, workload: str, report: Path) -> list[str]:
    # JPROBE_REPORT in every run: the original ignores it, and the environments stay equal
    return ["/usr/bin/env", "-i", *FIXED_ENV, f"JPROBE_REPORT={report}", str(binary), "-c", WORKLOADS[workload]]


def collect_reports(report: Path) -> tuple[dict[int, int], dict[int, str], int]:
    """Hits summed over the report of the process and those of its forked children
    (PATH.PID), mechanism by address, and the number of reports."""
    names = [p for p in report.parent.iterdir()
             if p.name == report.name or re.fullmatch(re.escape(report.name) + r"\.\d+", p.name)]
    assert report in names, f"no report at {report} (have: {sorted(p.name for p in report.parent.iterdir())})"
    hits: dict[int, int] = collections.Counter()
    mechanism: dict[int, str] = {}
    for path in names:
        with open(path) as f:
            rep = json.load(f)
        assert rep.get("errors", []) == [], f"{path.name}: {rep['errors']}"
        for p in rep["probes"]:
            a = int(p["address"], 16)
            assert p["mechanism"] in MECHANISMS, p
            assert p.get("lost", 0) == 0, p
            hits[a] += int(p["hits"])
            assert mechanism.setdefault(a, p["mechanism"]) == p["mechanism"], (path.name, p)
    return dict(hits), mechanism, len(names)


def _mismatches(rows, limit=40) -> str:
    """rows: (address, what, mechanism, jprobe, kernel) that differ; the largest first."""
    rows = sorted(rows, key=lambda r: -abs(r[3] - r[4]))
    lines = [f"  {a:#x} {what} [{mech}]: jprobe {j}, kernel {k}" for a, what, mech, j, k in rows[:limit]]
    more = f"\n  ... and {len(rows) - limit} more" if len(rows) > limit else ""
    return "\n".join(lines) + more


def _run_bash(tmp_path, patched, workload):
    """Run the workload on the original and the patched bash; check they behave the same.
    Returns (patched copy, original run, hits, mechanisms)."""
    orig, mine = _copies(tmp_path, patched)
    report = tmp_path / "report" / "r.json"
    report.parent.mkdir()
    o = run_prog(_shell(orig, workload, report))
    assert (o.returncode, o.stdout, o.stderr) == (0, EXPECTED_STDOUT[workload], ""), o
    assert not any(report.parent.iterdir()), "the original bash wrote a report?"
    p = run_prog(_shell(mine, workload, report))
    assert_same_behaviour(o, p)
    hits, mechanism, nreports = collect_reports(report)
    assert nreports > 1, "the workload forks: its children write PATH.PID reports"
    return mine, o, hits, mechanism


def _same_run_mismatches(tmp_path, mine, o, workload, sites, mechanism, plan):
    """Run the patched bash once more with a kernel uprobe on each non-trap site of `sites`
    ((address, description) pairs) and return the sites whose jprobe count in that same
    run differs from the kernel's: (address, description, mechanism, jprobe, kernel).

    The same run, because bash's counts are not the same from run to run: which code reaps
    a child (its SIGCHLD handler or the wait it was in) depends on when the child exits.
    The kernel probes the patched bytes (a jump or a retargeted call) at the same address,
    except where another probe's punned rel32 reads them (`plan`'s depends): the uprobe's
    int3 over the first byte would send that jump elsewhere; and except a jump after
    prefixes (T1, or a chain's first jump): the kernel refuses a uprobe after an ES prefix,
    silently (is_prefix_bad()), and is not asked to emulate a REX.W jmp either."""
    require_tracefs("patched bash's counts (it behaved as the original)")
    read = {v[2] for v in plan.values() if v[2] is not None}
    data = Path(mine).read_bytes()
    prefixed = {a for (a, _), off in zip(sites, file_offsets(mine, [a for a, _ in sites]))
                if data[off] in tactics.PADDINGS[2]}
    sites = [(a, what) for a, what in sites if a not in read and a not in prefixed]
    report = tmp_path / "report-kernel" / "r.json"
    report.parent.mkdir()
    offsets = file_offsets(mine, [a for a, _ in sites])
    counts, kp = kernel_counts(mine, offsets, _shell(mine, workload, report))
    assert_same_behaviour(o, kp)
    hits, _, _ = collect_reports(report)
    return [(a, what, mechanism[a], hits[a], k) for (a, what), k in zip(sites, counts) if hits[a] != k]


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bash_every_function_entry(workload, bash_entries, tmp_path):
    """A count probe on each of bash's ~1,670 function entries: same behaviour, and each
    entry's count (all processes) equals a kernel uprobe's in the same run."""
    patched, funcs, plan = bash_entries
    patched_copy, o, hits, mechanism = _run_bash(tmp_path, patched, workload)
    missing = [f"{a:#x} {n}" for a, n in funcs if a not in hits]
    assert not missing, f"{len(missing)} probes missing from the report: {missing[:20]}"
    assert sum(hits.values()) > 10000
    wrong = _same_run_mismatches(tmp_path, patched_copy, o, workload,
                                 [(a, n) for a, n in funcs if mechanism[a] != "trap"], mechanism, plan)
    assert not wrong, (f"{len(wrong)} of {len(funcs)} function entries count differently from a kernel "
                       f"uprobe (workload {workload!r}):\n{_mismatches(wrong)}")


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bash_every_call(workload, bash_calls, tmp_path):
    """A count probe on every `call` of bash's .text (~16,500): same behaviour, calls are
    hit, retargeted calls are `jump`, and each count equals a kernel uprobe's in the same run."""
    patched, calls, plan, rejected = bash_calls
    patched_copy, o, hits, mechanism = _run_bash(tmp_path, patched, workload)
    missing = [f"{a:#x} {t}" for a, t, _ in calls if a not in hits]
    assert not missing, f"{len(missing)} probes missing from the report: {missing[:20]}"
    assert sum(hits.values()) > 0
    dist = collections.Counter(mechanism[a] for a, _, _ in calls)
    by_kind = collections.Counter((kind, mechanism[a]) for a, _, kind in calls)
    # `call rel32` and `call [rip+x]` are retargeted to the trampoline (README, "How a site is decided")
    not_retargeted = [f"{a:#x} {t} [{mechanism[a]}: {plan[a][1]}]" for a, t, kind in calls
                      if kind in ("rel32", "rip") and (mechanism[a] != "jump" or "retarget" not in plan[a][1])]
    assert not not_retargeted, (f"{len(not_retargeted)} direct/rip calls not retargeted: {not_retargeted[:20]}; "
                                f"mechanisms {dict(dist)}")
    assert dist["jump"] >= 0.9 * len(calls), f"mechanisms: {dict(dist)} by kind: {dict(by_kind)}"
    wrong = _same_run_mismatches(tmp_path, patched_copy, o, workload,
                                 [(a, t) for a, t, _ in calls if mechanism[a] != "trap"], mechanism, plan)
    assert not wrong, (f"{len(wrong)} of {len(calls)} calls count differently from a kernel uprobe "
                       f"(workload {workload!r}):\n{_mismatches(wrong)}")


@pytest.fixture(scope="session")
def bash_short_sites(tmp_path_factory):
    """(patched bash, [(address, text)], {address: (mechanism, reason, depends)}): a probe on
    every instruction of bash that gets an evicting jump alone (T2, chains, T3), and on every
    16th one that gets a punned jump."""
    module = _need_bash()

    def make(d):
        from jprobe.coverage import site_table
        _, rows = site_table(str(BASH), None)
        evicts = [r for r in rows if r["mechanism"] == "evict"]
        puns = [r for r in rows if r["mechanism"] == "pun"][::16]
        sites = sorted(((int(r["address"], 16), r["instruction"]) for r in evicts + puns))
        assert len(evicts) > 100 and any("`, `" in r["reason"] for r in evicts), "no chain among the evictions"
        plan = jprobe.patch_file(str(BASH), str(d / "bash"), [f"{a:#x}" for a, _ in sites])
        return {"sites": sites, "plan": {str(p.address): [p.mechanism, p.reason, p.depends] for p in plan.probes}}
    d, data = _shared(tmp_path_factory, "bash_short_sites", make)
    assert module is not None
    return d / "bash", [tuple(s) for s in data["sites"]], {int(a): tuple(v) for a, v in data["plan"].items()}


def test_bash_short_sites_evicted_and_punned(bash_short_sites, tmp_path):
    """Evictions (T2, chains of them, T3) and puns all over bash, probed at once (next to
    each other too, so some re-aim their neighbours' jumps or fall back to traps): same
    behaviour, and each count equals a kernel uprobe's in the same run."""
    patched, sites, plan = bash_short_sites
    patched_copy, o, hits, mechanism = _run_bash(tmp_path, patched, "external")
    dist = collections.Counter(mechanism[a] for a, _ in sites)
    assert dist["evict"] > 100 and dist["pun"] > 1000, dict(dist)
    checked = [(a, t) for a, t in sites if mechanism[a] != "trap"]
    wrong = _same_run_mismatches(tmp_path, patched_copy, o, "external", checked, mechanism, plan)
    assert not wrong, (f"{len(wrong)} of {len(sites)} sites count differently from a kernel uprobe:\n"
                       f"{_mismatches(wrong)}")


# --------------------------------------------------------------------------
# every instruction of a fixture
# --------------------------------------------------------------------------

FIXTURE_FUNCS = ["main", "inc", "dbl", "sq", "low", "classify", "rec", "sum_loop", "collatz", "apply"]
FIXTURE_N = 100


def expected_calls(n: int) -> dict[str, int]:
    """How often every_insn.c calls each of its functions with argv N = n."""
    ks = [i % 10 for i in range(n)]
    rec = [1, 1]
    while len(rec) <= 15:
        rec.append(1 + rec[-1] + rec[-2])
    even, odd = (n + 1) // 2, n // 2                 # apply(i, .): inc for even i, dbl for odd
    return {
        "main": 1, "sum_loop": 1, "collatz": 1, "sq": n, "classify": n, "apply": n,
        "inc": ks.count(1) + ks.count(8) + even,
        "dbl": ks.count(3) + ks.count(8) + odd,
        "low": ks.count(5),
        "rec": rec[15],
    }


@pytest.mark.parametrize("variant", [Variant(o, p) for o in ("-O0", "-O2") for p in ("pie", "nopie")], ids=str)
def test_fixture_every_instruction(variant, build, tmp_path):
    """A probe on every instruction of every_insn.c's own functions: same output, each entry
    counts the function's calls, pun/evict among the mechanisms, and (with tracefs) every
    instruction counts what a kernel uprobe counts."""
    b = build("every_insn.c", variant.flags, f"every_insn-{variant}")
    insns = [(f, i) for f in FIXTURE_FUNCS for i in disasm_function(b, f)]
    entries = {f: symbol(b, f)[0] for f in FIXTURE_FUNCS}
    out = patch(b, tmp_path / "patched", [f"{i.address:#x}" for _, i in insns])
    o = run_prog([b, FIXTURE_N])
    pr, rep = run_with_report([out, FIXTURE_N], tmp_path / "r.json")
    assert_same_behaviour(o, pr)
    assert rep.get("errors", []) == [], rep["errors"]
    assert all(p.get("lost", 0) == 0 for p in rep["probes"])
    hits = hits_by_address(rep)
    mechanism = {int(p["address"], 16): p["mechanism"] for p in rep["probes"]}
    dist = collections.Counter(mechanism[i.address] for _, i in insns)
    assert set(dist) <= MECHANISMS, dist
    assert len(mechanism) == len(insns), f"{len(insns)} probes, {len(mechanism)} in the report"
    got = {f: hits[a] for f, a in entries.items()}
    assert got == expected_calls(FIXTURE_N), (
        f"entry counts (jprobe) vs calls: {got} != {expected_calls(FIXTURE_N)}; "
        f"entry mechanisms {({f: mechanism[a] for f, a in entries.items()})}")
    assert set(dist) - {"jump", "trap"}, f"no punned or evicting jump among {len(insns)} probes: {dict(dist)}"
    require_tracefs(f"the counts of {len(insns)} instructions")   # every one, against the kernel
    (tmp_path / "k").mkdir()
    copy = tmp_path / "k" / b.name                 # a private inode (see kernel_counts)
    shutil.copy2(b, copy)
    counts, kp = kernel_counts(copy, file_offsets(b, [i.address for _, i in insns]), [copy, FIXTURE_N])
    assert kp.stdout == o.stdout
    wrong = [(i.address, f"{f}: {i.mnemonic} {i.op_str}", mechanism[i.address], hits[i.address], k)
             for (f, i), k in zip(insns, counts) if hits[i.address] != k]
    assert not wrong, f"counts differ from a kernel uprobe's ({dict(dist)}):\n{_mismatches(wrong)}"


# --------------------------------------------------------------------------
# the smallest reproducers of what the stress tests above found
# --------------------------------------------------------------------------

OWN_GETENV_C = r"""
#include <stdio.h>
#include <string.h>
extern char **environ;
static int calls;
char *getenv(const char *name)		/* the program's own getenv, as bash has */
{
	size_t n = strlen(name);
	calls++;
	for (char **e = environ; *e; e++)
		if (!strncmp(*e, name, n) && (*e)[n] == '=')
			return *e + n + 1;
	return NULL;
}
int main(void)
{
	printf("getenv called %d times before main\n", calls);
	return 0;
}
"""


def test_runtime_leaves_the_programs_getenv_alone(build, tmp_path):
    """bash defines (and exports) its own getenv; the runtime's getenv("JPROBE_...") calls
    bind to it, so the patched program runs its own code before main, and a probe on
    getenv counts the runtime's calls (bash's getenv: 7 instead of 2)."""
    src = tmp_path / "own_getenv.c"
    src.write_text(OWN_GETENV_C)
    b = build(src, ["-O2"], "stress-own_getenv")
    out = patch(b, tmp_path / "patched", ["main", "getenv"])
    o = run_prog([b])
    assert o.stdout == "getenv called 0 times before main\n"
    pr, rep = run_with_report([out], tmp_path / "r.json")
    assert_same_behaviour(o, pr)
    assert hits_by_address(rep)[symbol(b, "getenv")[0]] == 0


FORK_EXEC_C = r"""
#include <stdio.h>
#include <unistd.h>
#include <sys/wait.h>
__attribute__((noipa)) int work(int x) { return x + 1; }
int main(void)
{
	int s = 0;
	pid_t pid = fork();
	if (pid == 0) {
		s = work(s);				/* a hit in the child, before execve */
		execl("/bin/true", "true", (char *)0);
		_exit(127);
	}
	waitpid(pid, NULL, 0);
	printf("%d\n", work(s));		/* a hit in the parent */
	return 0;
}
"""


def test_hits_of_a_child_before_execve_are_reported(build, tmp_path):
    """bash forks a child per external command, which counts a few hits and then execve()s
    the command: those hits are in no report (the child never exits as the patched program),
    while a kernel uprobe counts them: 90 of bash's function entries count less."""
    src = tmp_path / "fork_exec.c"
    src.write_text(FORK_EXEC_C)
    b = build(src, ["-O2"], "stress-fork_exec")
    out = patch(b, tmp_path / "patched", ["work"])
    report = tmp_path / "rep" / "r.json"
    report.parent.mkdir()
    o = run_prog([b])
    p = run_prog(["/usr/bin/env", f"JPROBE_REPORT={report}", out])
    assert_same_behaviour(o, p)
    hits, _, nreports = collect_reports(report)
    assert hits[symbol(b, "work")[0]] == 2, (
        f"work() runs once in the parent and once in the child before execve; the {nreports} "
        f"report(s) count {hits[symbol(b, 'work')[0]]}")


CALL_RAX_S = r"""
	.intel_syntax noprefix
	.text
	.globl	one
	.type	one, @function
one:	mov	eax, 1
	ret
	.size	one, .-one

	.globl	f
	.type	f, @function
f:	sub	rsp, 8
	lea	rax, [rip + one]
	call	rax			/* ff d0, f+0xb: the probe */
	mov	eax, 0x80808080		/* b8 80 80 80 80: no punned jump fits over it */
	add	rsp, 8
	ret
	.size	f, .-f

	.globl	main
	.type	main, @function
main:	sub	rsp, 8
	call	f
	shr	eax, 24
	add	rsp, 8
	ret
	.size	main, .-main
	.section .note.GNU-stack,"",@progbits
"""


def test_a_call_may_evict_the_instruction_it_returns_to(build, tmp_path):
    """A 2-byte `call rax` where no punned jump fits: T2 evicts the next instruction, which
    the call returns to. The call's trampoline must then not run that instruction itself
    (the relocated call returns to the original code: the evicted instruction's own jump).
    Once, `jprobe patch` stopped with a RelocationError here (bash, `call rax` at 0xe375f)."""
    src = tmp_path / "call_rax.S"
    src.write_text(CALL_RAX_S)
    b = build(src, ["-no-pie"], "stress-call_rax")
    f_a, _ = symbol(b, "f")
    o = run_prog([b])
    assert o.returncode == 0x80
    out = patch(b, tmp_path / "patched", ["f+0xb"])
    pr, rep = run_with_report([out], tmp_path / "r.json")
    assert_same_behaviour(o, pr)
    entry = rep["probes"][0]
    assert (entry["hits"], entry["mechanism"]) == (1, "evict"), entry
