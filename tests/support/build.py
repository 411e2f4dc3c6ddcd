"""Compiling the C/C++ fixtures (tests/fixtures/) over a matrix of code-generation flags."""
from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import FIXTURES, REPO

RUNTIME_INCLUDE = REPO / "jprobe" / "runtime_c"

# the build matrix: -O0/-O2/-O3 x PIE/non-PIE, always with -g
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


class Builder:
    """build(source, flags, out_name) -> Path, cached for the session (one per xdist worker):
    fixtures are compiled at test time, once per distinct set of flags."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[tuple, Path] = {}
        self.lock = threading.Lock()

    def __call__(self, source: str | Path, flags: Iterable[str] = (), out_name: str | None = None) -> Path:
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

    def lib(self, source: str | Path, extra: Iterable[str] = (), out_name: str | None = None) -> Path:
        """A callback library: -shared -fPIC -I<runtime_c>."""
        extra = list(extra)
        flags = ["-shared", "-fPIC", "-g", "-I", str(RUNTIME_INCLUDE), *extra]
        if out_name is None:
            out_name = Path(source).stem + "".join(f.strip("-").replace("=", "") for f in extra) + ".so"
        return self(source, flags, out_name)
