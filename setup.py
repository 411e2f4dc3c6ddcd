"""Builds the C runtime that patched programs load, the tool's trace reader, and the unwinder library
jprobe attach loads (plain shared objects, no Python inside)."""
from setuptools import Extension, setup

runtime = Extension(
    "jprobe.runtime_c.libjprobe_rt",
    sources=[f"jprobe/runtime_c/{name}.c" for name in ("util", "freestanding", "modules", "tables", "unpack", "shm", "rings", "threads", "returns", "callbacks", "traps", "islands", "quiesce", "report", "exec", "apply", "startup", "audit")],
    depends=[f"jprobe/runtime_c/{name}.h" for name in ("rt", "sys", "tables", "unpack", "modules", "shm", "rings", "threads", "returns", "callbacks", "traps", "islands", "quiesce", "report", "apply", "startup", "jprobe", "jprobe_table", "jprobe_plan", "jprobe_shm", "jprobe_ring")],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"],
    extra_link_args=["-Wl,-z,now", "-Wl,-z,nodelete", "-ldl", "-lpthread"],
)

# The reader of trace buffers, for the jprobe tool only (events.py): never loaded into a program.
events_reader = Extension(
    "jprobe.runtime_c.libjprobe_events",
    sources=["jprobe/runtime_c/events_reader.c"],
    depends=["jprobe/runtime_c/jprobe_ring.h", "jprobe/runtime_c/jprobe_shm.h"],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"],
)

# Loaded by `jprobe attach` into a process that follows returns: the unwinder kept off them (unwind.c).
unwinder = Extension(
    "jprobe.runtime_c.libjprobe_unwind",
    sources=["jprobe/runtime_c/unwind.c"],
    depends=["jprobe/runtime_c/jprobe.h", "jprobe/runtime_c/jprobe_ring.h"],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"],
)

setup(ext_modules=[runtime, events_reader, unwinder])
