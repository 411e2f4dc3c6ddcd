"""The C structures shared with the runtime, read from its headers with cffi.

The headers in runtime_c/ are the single source of truth: trampoline offsets and
the probe table bytes come from cffi's view of the same declarations the C
runtime compiles, so the two cannot drift apart.
"""
from __future__ import annotations

import codecs
import re
import zlib
from pathlib import Path

import cffi

from .mechanisms import Mechanism

RUNTIME_DIR = Path(__file__).resolve().parent / "runtime_c"
_BLOCK = re.compile(r"/\* JPROBE_LAYOUT_BEGIN.*?\*/(.*?)/\* JPROBE_LAYOUT_END \*/", re.S)
_COMMENT = re.compile(r"/\*.*?\*/", re.S)


def _declarations(header: str) -> str:
    text = (RUNTIME_DIR / header).read_text()
    return "".join(_COMMENT.sub("", block) for block in _BLOCK.findall(text))


def _enums(header: str) -> dict[str, int]:
    text = (RUNTIME_DIR / header).read_text()
    found = {m[0]: int(m[1], 0) for m in re.findall(r"\b(JP_\w+)\s*=\s*(\w+)", text)}
    found.update({m[0]: int(m[1], 0) for m in re.findall(r"#define\s+(JP_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text)})
    return found


def _strings(header: str) -> dict[str, bytes]:
    text = (RUNTIME_DIR / header).read_text()
    return {name: codecs.escape_decode(value)[0]
            for name, value in re.findall(r'#define\s+(JP_\w+)\s+"((?:[^"\\]|\\.)*)"', text)}


ffi = cffi.FFI()
ffi.cdef(_declarations("jprobe.h") + _declarations("jprobe_table.h") + _declarations("jprobe_plan.h")
         + _declarations("jprobe_shm.h") + _declarations("jprobe_ring.h"))
_HEADERS = ("jprobe_table.h", "jprobe_plan.h", "jprobe_shm.h", "jprobe_ring.h")
CONST = {name: value for header in _HEADERS for name, value in _enums(header).items()}
STRING = {name: value for header in _HEADERS for name, value in _strings(header).items()}

MAGIC = STRING["JP_MAGIC"]
TABLE_VERSION = CONST["JP_TABLE_VERSION"]
MECHANISMS = {m: CONST[f"JP_MECH_{m.name}"] for m in Mechanism}
HANDLERS = {"count": CONST["JP_HANDLER_COUNT"], "callback": CONST["JP_HANDLER_CALLBACK"],
            "trace": CONST["JP_HANDLER_TRACE"]}


def offsetof(struct: str, field: str) -> int:
    return ffi.offsetof(f"struct {struct}", field)


def sizeof(struct: str) -> int:
    return ffi.sizeof(f"struct {struct}")


def module_key(module_path: str) -> int:
    """The key trace records name their module by (jprobe_ring.h): the low 24 bits of the
    CRC-32 of its path as the plan names it."""
    return zlib.crc32(module_path.encode()) & 0xFFFFFF
