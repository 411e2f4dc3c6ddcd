"""The closing line of `make mutation`: how many mutants the tests killed, from mutmut's
mutants/mutmut-cicd-stats.json. A mutant that crashed or hung the tests counts as killed;
one that no selected test reaches counts as a survivor (nothing would notice it)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(stats: dict) -> str:
    killed = stats["killed"] + stats["timeout"] + stats["segfault"]
    tested = killed + stats["survived"] + stats["no_tests"] + stats["suspicious"]     # not: skipped, not run
    return (f"mutation score: {killed} of {tested} mutants killed ({100 * killed / max(tested, 1):.1f}%); "
            f"{stats['survived']} survived, {stats['no_tests']} reached by no selected test, "
            f"{stats['suspicious']} suspicious, {stats['total'] - tested} not run")


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "mutants/mutmut-cicd-stats.json")
    print(summary(json.loads(path.read_text())))
