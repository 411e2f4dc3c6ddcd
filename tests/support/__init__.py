"""What jprobe's tests share besides fixtures (those stay in conftest.py): building the C
fixtures, running jprobe and patched programs, reading reports and ELF files, kernel uprobe
counts, and checks that keep property tests honest.

`tests/` is on pytest's pythonpath (pyproject.toml), so test files import `support.<module>`.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
