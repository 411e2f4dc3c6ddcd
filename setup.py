"""Builds the C runtime that patched programs load (a plain shared object, no Python inside)."""
from setuptools import Extension, setup

runtime = Extension(
    "jprobe.runtime_c.libjprobe_rt",
    sources=["jprobe/runtime_c/runtime.c"],
    depends=["jprobe/runtime_c/jprobe.h", "jprobe/runtime_c/jprobe_table.h"],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"],
    extra_link_args=["-Wl,-z,now", "-ldl", "-lpthread"],
)

setup(ext_modules=[runtime])
