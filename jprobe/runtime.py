"""Where the installed C runtime and its header are."""
from __future__ import annotations

from .elf import RUNTIME_STEM
from .errors import JprobeError
from .layout import RUNTIME_DIR


# glibc cancels a thread by unwinding through its own handle on libgcc_s, which the runtime's
# interposition does not reach: under `jprobe run`, a probe of jprobe's own on the unwinder's
# code calls this runtime function first (returns.c), when some probe follows returns.
UNWINDER, FORCED_UNWIND, UNWINDING = "libgcc_s.so.1", "_Unwind_ForcedUnwind", "jprobe_rt_unwinding"


def runtime_library() -> str:
    """Absolute path of libjprobe_rt (built by `pip install`), for DT_NEEDED and LD_PRELOAD."""
    found = sorted(RUNTIME_DIR.glob(f"{RUNTIME_STEM}*.so"))
    if not found:
        raise JprobeError(f"the jprobe runtime is not built in {RUNTIME_DIR}; reinstall with `pip install .`")
    return str(found[0])


def include_dir() -> str:
    """The directory holding jprobe.h, for `jprobe --cflags`."""
    return str(RUNTIME_DIR)
