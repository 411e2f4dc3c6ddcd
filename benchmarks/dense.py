"""`make dense`: every instruction of a real program probed at once, and the program run.

For each binary given (by default python3): `jprobe sites` lists every instruction, all of
them get a `count` probe in one `jprobe patch`, and the rewritten file runs a workload whose
output must equal the original's. Reports the planning time, the output size against the
input's, the mappings the running program has (the kernel allows 65,530) and the share of
traps. Slow (~15 minutes per binary): not part of `make test`. Appends a row to
benchmarks/DENSE.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jprobe import patch_file  # noqa: E402
from jprobe.coverage import site_table  # noqa: E402

# Workloads whose output does not depend on the run.
WORKLOADS = {
    "python": ["-c", "import json, re, zlib; d = {str(i): [i] * 3 for i in range(5000)}; "
                      "s = json.dumps(d); print(len(s), zlib.crc32(s.encode()), len(re.findall(r'\\d+', s)), "
                      "sum(1 for _ in open('/proc/self/maps')) > 0)"],
    "git": ["-C", str(REPO), "log", "--stat", "-n", "30"],
}


def maps_of(path: str) -> int:
    """Mappings of the rewritten program once it runs (its runtime has mapped every island
    by then), read from /proc while it waits on its standard input."""
    if "python" in Path(path).name:
        argv = [path, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"]
    else:
        argv = [path, "cat-file", "--batch"]                     # git
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if argv[1] == "-c":
            p.stdout.readline()
        else:
            time.sleep(3)
        with open(f"/proc/{p.pid}/maps") as f:
            return sum(1 for _ in f)
    finally:
        p.communicate(b"", timeout=60)


def measure(path: str, tmp: str) -> str:
    name = Path(path).name.rstrip("0123456789.") or Path(path).name
    t0 = time.monotonic()
    _, rows = site_table(path, None)
    addresses = [r["address"] for r in rows if r["mechanism"] != "none"]
    out = os.path.join(tmp, Path(path).name)
    plan = patch_file(path, out, addresses)
    plan_s = time.monotonic() - t0
    traps = sum(p.mechanism == "trap" for p in plan.probes)
    workload = WORKLOADS.get(name, ["--version"])
    env = {**os.environ, "JPROBE_REPORT": os.path.join(tmp, "report.json")}
    want = subprocess.run([path, *workload], capture_output=True, timeout=600)
    got = subprocess.run([out, *workload], capture_output=True, timeout=600, env=env)
    same = (got.returncode, got.stdout) == (want.returncode, want.stdout)
    maps = maps_of(out)
    size = os.path.getsize(out) / os.path.getsize(path)
    return (f"| {Path(path).name} | {len(addresses):,} | {plan_s:.0f} s | {100.0 * traps / len(addresses):.2f}% | "
            f"{size:.2f}× | {maps:,} | {'identical' if same else 'DIFFERENT'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binaries", nargs="*", default=["/usr/bin/python3"])
    args = parser.parse_args()
    table = REPO / "benchmarks" / "DENSE.md"
    if not table.exists():
        table.write_text("# Every instruction probed (`make dense`)\n\n"
                         "| binary | probes | plan + write | traps | size (× input) | mappings | output |\n"
                         "|---|---:|---:|---:|---:|---:|---|\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.binaries:
            row = measure(os.path.realpath(b), tmp)
            print(row, flush=True)
            with open(table, "a") as f:                 # one row a run: runs may go side by side
                f.write(row + "\n")
            rows.append(row)
    return 0 if all("identical" in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
