"""`make coverage`: how much of real binaries gets a jump rather than a trap.

For each binary found on the machine (bash, git, python3, perl, ls): the share of
(a) all instructions, (b) function entries, (c) jumps and calls that get a non-trap
mechanism, from `jprobe sites`; then the time and size growth of rewriting every
function entry with a `count` probe. Prints a Markdown table and writes
benchmarks/COVERAGE.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jprobe import patch_file  # noqa: E402
from jprobe.coverage import site_table  # noqa: E402
from jprobe.elf import ElfModule  # noqa: E402

BINARIES = ["bash", "git", "python3", "perl", "ls"]


def share(rows: list[dict]) -> str:
    if not rows:
        return "-"
    good = sum(r["mechanism"] not in ("trap", "none") for r in rows)
    return f"{100.0 * good / len(rows):.2f}% of {len(rows)}"


def find(name: str) -> str | None:
    """The system's binary (not a pyenv or venv shim of the same name)."""
    found = shutil.which(name, path="/usr/bin:/bin") or shutil.which(name)
    return os.path.realpath(found) if found else None


def tactics(rows: list[dict]) -> str:
    """Shares per mechanism: jump (B1 and multi-instruction), pun (B2/T1), evict (T2), trap."""
    n = len(rows) or 1
    counts = {m: sum(r["mechanism"] == m for r in rows) for m in ("jump", "pun", "evict", "trap")}
    return " / ".join(f"{100.0 * c / n:.2f}" for c in counts.values())


def measure(name: str, path: str) -> list[str]:
    module = ElfModule(path)
    t0 = time.monotonic()
    _, rows = site_table(path, None)
    sites_s = time.monotonic() - t0
    entries = {f.address for f in module.functions if f.size}
    entry_rows = [r for r in rows if int(r["address"], 16) in entries]
    branch_rows = [r for r in rows if r["instruction"].split()[0].startswith(("j", "call"))]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        t0 = time.monotonic()
        patch_file(path, out, [f"{a:#x}" for a in sorted(entries)])
        patch_s = time.monotonic() - t0
        growth = os.path.getsize(out) / os.path.getsize(path)
    return [name, share(rows), tactics(rows), share(entry_rows), share(branch_rows), f"{sites_s:.0f} s",
            f"{len(entries)} in {patch_s:.1f} s", f"{growth:.2f}×"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "COVERAGE.md"))
    ap.add_argument("binaries", nargs="*", default=BINARIES)
    args = ap.parse_args()
    lines = ["| binary | (a) instructions non-trap | jump / pun / evict / trap % | (b) function entries non-trap | "
             "(c) jumps and calls non-trap | `sites` time | entries rewritten | size |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in args.binaries:
        path = find(name)
        if path is None:
            lines.append(f"| {name} | not on this machine | | | | | | |")
            continue
        print(f"measuring {name} ({path}) ...", file=sys.stderr, flush=True)
        lines.append("| " + " | ".join(measure(name, path)) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
