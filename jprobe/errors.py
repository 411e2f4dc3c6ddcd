"""Errors with user-facing messages: the CLI prints them as one line and exits 2."""


class JprobeError(Exception):
    """Base of every error jprobe reports to a user (bad input, unsafe site, ...)."""


class SpecError(JprobeError):
    """A probe spec does not follow the grammar."""


class ElfError(JprobeError):
    """The input is not an ELF file jprobe can patch."""


class SymbolError(JprobeError):
    """A symbol, offset or address does not resolve to an instruction."""


class SiteError(JprobeError):
    """A probe site cannot be patched safely (under --strict, or not at all)."""


class RelocationError(JprobeError):
    """An instruction cannot run at another address with the same effect."""


class HandlerError(JprobeError):
    """A callback library or function cannot be found."""


class OutputError(JprobeError):
    """The output cannot be written."""


class AttachError(JprobeError):
    """A process cannot be attached to (or stopped being there)."""


class ProcessGone(AttachError):
    """The process exited (or exec'd) while jprobe was attached."""
