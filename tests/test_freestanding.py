"""The runtime imports nothing the program may interpose or the user may probe on its set-up path.

Its set-up runs before the program's initialisers (freestanding.c says why): allocation,
strings, sorting and system calls are the runtime's own hidden copies. What it still imports
is listed here with the reason it is safe; anything new must be argued into this list.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from jprobe.runtime import runtime_library

ALLOWED = {
    # The loader's services: nothing else can say what is loaded; not probed through libc.
    "dl_iterate_phdr", "dladdr", "dladdr1", "dlinfo", "dlopen", "dlsym", "dlerror",
    # libc's thread state: mutexes, thread-exit keys and fork handlers are libc's to keep.
    "pthread_mutex_lock", "pthread_mutex_trylock", "pthread_mutex_unlock",
    "pthread_key_create", "pthread_setspecific", "__register_atfork",
    # Formatting, on error paths and for the report at exit only.
    "snprintf", "vsnprintf", "dprintf", "strerror",
    # Data and the C runtime's own glue.
    "environ", "__environ", "__errno_location", "__cxa_finalize",
    "_ITM_deregisterTMCloneTable", "_ITM_registerTMCloneTable", "__gmon_start__",
}
# What programs interpose (allocators) and users probe (string functions are IFUNCs users
# reach for): named so that a failure says which one came back.
NEVER = {"malloc", "calloc", "realloc", "free", "aligned_alloc", "strdup", "qsort", "qsort_r",
         "memcpy", "memmove", "memset", "memcmp", "strlen", "strcmp", "open", "read", "mmap",
         "mprotect", "munmap", "stat", "fstat", "syscall", "realpath", "getpid"}


def imported() -> set[str]:
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is needed to list the runtime's imports")
    out = subprocess.run(["nm", "-D", "--undefined-only", runtime_library()],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def test_runtime_imports_no_interposable_function():
    names = imported()
    assert names, "nm listed no imports at all: the check would be empty"
    assert not names & NEVER
    assert names <= ALLOWED, f"new imports, argue them into ALLOWED: {sorted(names - ALLOWED)}"
