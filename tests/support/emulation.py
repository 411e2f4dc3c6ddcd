"""What the unicorn-based tests share (test_relocate.py, test_boundaries.py)."""
from __future__ import annotations


def contiguous(pages: dict[int, bytes]) -> list[tuple[int, bytes]]:
    """Pages merged into contiguous runs: one unicorn mapping each (mapping is the slow part)."""
    runs: list[tuple[int, bytes]] = []
    for page in sorted(pages):
        if runs and runs[-1][0] + len(runs[-1][1]) == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + pages[page])
        else:
            runs.append((page, pages[page]))
    return runs
