"""Finding the file a MODULE names, the way the dynamic loader will at run time."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import lru_cache

import lief

from .elf import ElfModule
from .errors import JprobeError

DEFAULT_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")


class ModuleNotFound(JprobeError):
    """A MODULE of a probe names no library the program can load."""


def find_program(command: str) -> str:
    """The absolute path of CMD as execvp would run it."""
    path = command if "/" in command else shutil.which(command)
    if path is None or not os.path.isfile(path):
        raise JprobeError(f"{command}: command not found; give a path or a program on PATH")
    if not os.access(path, os.X_OK):
        raise JprobeError(f"{command}: not executable; check its permissions")
    return os.path.abspath(path)


@lru_cache(maxsize=1)
def _ldconfig_cache() -> dict[str, str]:
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return {}
    cache: dict[str, str] = {}
    for m in re.finditer(r"^\s*(\S+) \(([^)]*)\) => (\S+)$", out, re.M):
        if "x86-64" in m[2]:
            cache.setdefault(m[1], m[3])
    return cache


def _dynamic_dirs(binary: lief.ELF.Binary, tag: lief.ELF.DynamicEntry.TAG, origin: str) -> list[str]:
    entry = binary.get(tag)
    if entry is None:
        return []
    paths = entry.runpath if tag == lief.ELF.DynamicEntry.TAG.RUNPATH else entry.rpath
    return [p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for p in paths.split(":") if p]


def needed_closure(program: ElfModule) -> list[str]:
    """Sonames the program loads at start-up (breadth first), resolved to paths."""
    seen: dict[str, str] = {}
    todo = [program]
    while todo:
        module = todo.pop(0)
        for soname in module.binary.libraries:
            if soname in seen:
                continue
            path = _search(soname, program)
            if path:
                seen[soname] = path
                todo.append(ElfModule(path))
    return list(seen.values())


def _search(soname: str, program: ElfModule | None) -> str | None:
    runpath: list[str] = []
    dirs: list[str] = []
    if program is not None:
        origin = os.path.dirname(program.path)
        runpath = _dynamic_dirs(program.binary, lief.ELF.DynamicEntry.TAG.RUNPATH, origin)
        dirs = [] if runpath else _dynamic_dirs(program.binary, lief.ELF.DynamicEntry.TAG.RPATH, origin)
    dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += runpath
    for d in dirs:
        candidate = os.path.join(d, soname)
        if os.path.isfile(candidate):
            return os.path.realpath(candidate)
    cached = _ldconfig_cache().get(soname)
    if cached and os.path.isfile(cached):
        return os.path.realpath(cached)
    for d in DEFAULT_DIRS:
        candidate = os.path.join(d, soname)
        if os.path.isfile(candidate):
            return os.path.realpath(candidate)
    return None


def find_library(soname: str) -> str | None:
    """Where the loader finds `soname` for a program without RPATH or RUNPATH, if anywhere."""
    return _search(soname, None)


def find_module(name: str, program: ElfModule | None) -> str:
    """The file MODULE `name` (a path, or a soname or file name) stands for in `program`
    (None: a program that is no ELF file, such as a script: the default search only)."""
    if "/" in name:
        if not os.path.isfile(name):
            raise ModuleNotFound(f"module {name}: no such file; give the library's path or soname")
        return os.path.realpath(name)
    path = _search(name, program)
    if path is None and program is not None:
        loaded = [p for p in needed_closure(program) if os.path.basename(p).startswith(name + ".so")]
        if loaded:
            return loaded[0]
    if path is None:
        raise ModuleNotFound(f"module {name}: not found where the dynamic loader looks (RPATH, "
                             f"LD_LIBRARY_PATH, RUNPATH, ld.so.cache, {DEFAULT_DIRS[1]}); give its path")
    return path
