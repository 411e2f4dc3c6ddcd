"""`jprobe run`'s Python side: finding modules, the plan file, reading the counters file."""
import os
import struct
import subprocess
from pathlib import Path

import pytest

from jprobe import counters, layout
from jprobe.elf import ElfModule
from jprobe.errors import JprobeError
from jprobe.loader import ModuleNotFound, find_module, find_program
from jprobe.planfile import encode
from jprobe.runner import plan_modules
from jprobe.spec import parse_probes

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    out = tmp_path_factory.mktemp("runplan") / "basic"
    subprocess.run(["gcc", "-O2", "-o", out, FIXTURES / "basic.c"], check=True)
    return str(out)


def test_soname_resolves_like_the_dynamic_loader(prog):
    path = find_module("libc.so.6", ElfModule(prog))
    ldd = subprocess.run(["ldd", prog], capture_output=True, text=True).stdout
    [line] = [x for x in ldd.splitlines() if "libc.so.6" in x]
    assert os.path.realpath(line.split("=>")[1].split()[0]) == path


def test_unknown_module_and_command_are_bad_input(prog):
    with pytest.raises(ModuleNotFound, match="libnope.so.9: not found"):
        find_module("libnope.so.9", ElfModule(prog))
    with pytest.raises(JprobeError, match="command not found"):
        find_program("no-such-command-jprobe")
    with pytest.raises(JprobeError, match="not executable"):
        find_program(str(FIXTURES / "basic.c"))


def test_plan_file_holds_what_the_plans_say(prog):
    modules = plan_modules(prog, parse_probes(["compute", "libc.so.6:malloc"]), strict=False)
    assert [m.name for m in modules] == ["", "libc.so.6"]
    blob = encode(modules)
    ffi = layout.ffi
    header = ffi.from_buffer("struct jp_plan_header *", blob)
    assert ffi.unpack(header.magic, 8) == b"JPPLAN\0\1" and header.nmodules == 2
    size = layout.sizeof("jp_plan_module")
    for i, m in enumerate(modules):
        entry = ffi.from_buffer("struct jp_plan_module *", blob[layout.sizeof("jp_plan_header") + i * size:])
        plan = m.plan
        assert blob[entry.text:entry.text + entry.text_size] == plan.text
        assert blob[entry.data:entry.data + entry.data_size] == plan.data
        fixups = struct.unpack_from(f"<{entry.nfixups}I", blob, entry.fixups)
        assert list(fixups) == plan.text_fixups
        assert bytes(ffi.unpack(entry.build_id, 20))[:entry.build_id_len].hex() == (plan.build_id or "")
        name = blob[header.strings + entry.path:].split(b"\0", 1)[0].decode()
        assert name == plan.module
        patch = ffi.from_buffer("struct jp_plan_patch *", blob[entry.patches:])
        assert patch.vaddr == plan.probes[0].address
        assert bytes(ffi.unpack(patch.patched, 16))[:patch.len] == plan.probes[0].patched


def test_counters_file_sums_tables_and_blocks_per_pid(prog, tmp_path):
    """Records as the runtime appends them: tables per process, blocks per thread."""
    modules = plan_modules(prog, parse_probes(["compute", "main"]), strict=False)
    path = tmp_path / "counters"
    counters.create(str(path), len(modules))
    data = bytearray(path.read_bytes())
    table = bytearray(modules[0].plan.data)
    hits_at = layout.sizeof("jp_table")
    struct.pack_into("<Q", table, hits_at, 5)                          # compute, shared counter
    records = [(layout.CONST["JP_SHM_TABLE"], 100, bytes(table)),
               (layout.CONST["JP_SHM_BLOCK"], 100, struct.pack("<2Q", 7, 1)),
               (layout.CONST["JP_SHM_BLOCK"], 101, struct.pack("<2Q", 30, 0)),
               (layout.CONST["JP_SHM_ERROR"], 101, b"libfoo: build-id differs\0")]
    at = counters.PAGE
    for kind, pid, payload in records:
        payload_at = at + 4096
        data += bytes(payload_at + len(payload) - len(data) + 8)
        struct.pack_into("<IIIIQQ", data, at, kind, 0, pid, pid, len(payload), payload_at)
        data[payload_at:payload_at + len(payload)] = payload
        at = payload_at + len(payload)
        at += -at % 8
    struct.pack_into("<Q", data, 16, at)
    path.write_bytes(bytes(data))
    report = counters.build_report(str(path), modules, 100, prog)
    compute, main = report["probes"]
    assert (compute["hits"], compute["by_pid"]) == (42, {"100": 12, "101": 30})
    assert (main["hits"], "by_pid" in main) == (1, False)
    assert report["errors"] == ["libfoo: build-id differs"]


def test_a_script_may_run_probes_on_libraries(tmp_path):
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    [libc] = plan_modules(str(script), parse_probes(["libc.so.6:malloc"]), strict=False)
    assert libc.name == "libc.so.6" and libc.plan.probes[0].target == "libc.so.6:malloc"
    with pytest.raises(JprobeError, match="not an ELF file"):
        plan_modules(str(script), parse_probes(["main"]), strict=False)
