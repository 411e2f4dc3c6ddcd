"""jprobe: user-space jump probes for Linux x86-64 (see README and SPEC)."""
from __future__ import annotations

from collections.abc import Iterable

from typing import TYPE_CHECKING

from .errors import AttachError, JprobeError, ProcessGone
from .plan import ModulePlan

if TYPE_CHECKING:
    from .process import Process

__all__ = ["AttachError", "JprobeError", "ProcessGone", "attach", "patch_file"]


def patch_file(input_path: str, output_path: str, probes: Iterable[str], strict: bool = False) -> ModulePlan:
    """Rewrite `input_path` into `output_path` with `probes` (SPEC §1 specs); returns the plan applied."""
    from .patcher.static import patch_file as _patch
    from .spec import parse_probes

    return _patch(input_path, output_path, parse_probes(probes), strict=strict)


def attach(pid: int, strict: bool = False) -> "Process":
    """Attach to running process `pid`; a context manager whose end takes every probe out
    and detaches (SPEC §5, README "jprobe attach")."""
    from .process import Process

    return Process(pid, strict)
