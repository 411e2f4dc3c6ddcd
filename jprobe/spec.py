"""Probe specs: the one grammar shared by the CLI, the Python API and plan files (SPEC §1).

    PROBE    := [MODULE ':'] LOCATION ['%return'] ['=' HANDLER]
    LOCATION := SYMBOL ['+' OFFSET] | ADDRESS
    HANDLER  := count | trace[(ARG,...)] | LIBRARY.so:FUNCTION
    ARG      := a register name (rdi, rax, ...) or argN (N = 1..6)

Splitting rules, in order:

* the handler starts after the first '=' that is outside brackets and not part of a C++
  operator name (``operator==``, ``operator<=``, ...), so ``LIBRARY.so:FUNCTION`` keeps its ':';
* the module ends at the first single ':' outside brackets; '::' is C++ scope
  (``libfoo.so:ns::Klass::run``, ``ns::f``);
* ``%return`` must end the location;
* the offset follows the last '+' that is not part of a C++ operator name (``operator+``);
* a location that is all decimal digits or 0x-hex is an ADDRESS.

A bare C++ operator name directly followed by '=' or '+' is ambiguous (``operator<=count``,
``operator+4``) and rejected: put a space after the operator name (``operator< =count``) or
write the demangled name with its parameter list (``operator<(A const&, A const&)=count``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .errors import SpecError

__all__ = [
    "Handler",
    "ProbeSpec",
    "parse_probe",
    "parse_probes",
    "TRACE_REGISTERS",
    "TRACE_ARGS",
]

#: Registers a ``trace(...)`` handler can record: the 16 64-bit GPRs and rip.
TRACE_REGISTERS: tuple[str, ...] = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip",
)
#: Every name a ``trace(...)`` handler accepts: the registers, then arg1..arg6 (SysV order),
#: and at a ``%return`` the call's duration (from the entry's time stamp to the return's).
DURATION = "duration"
TRACE_ARGS: tuple[str, ...] = TRACE_REGISTERS + tuple(f"arg{n}" for n in range(1, 7)) + (DURATION,)

HANDLER_KINDS = ("count", "trace", "callback")

_MAX_ADDRESS = 1 << 64
_HANDLER_HINT = "use count, trace(ARG,...) or LIBRARY.so:FUNCTION"

_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F]+|[0-9]+)\Z")
_C_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# A plain (C, assembler, versioned) symbol: memcpy, foo.cold, memcpy@GLIBC_2.14, puts@@V, $x.
_PLAIN_SYMBOL = re.compile(r"(?:[^\W\d]|[.$])[\w.$]*(?:@{1,2}[\w.$]+)?\Z")
# Characters that only appear in demangled (C++, Rust, Go) names.
_DEMANGLED_CHARS = frozenset(":()<>[]{}~,*&' #-")
# C++ operator names whose punctuation must not be read as spec syntax.
_OPERATOR = re.compile(
    r"(?<![\w$./])operator\s*"
    r"(<=>|<<=|>>=|->\*|->|\(\)|\[\]|<<|>>|<=|>=|==|!=|&&|\|\||\+\+|--"
    r"|\+=|-=|\*=|/=|%=|&=|\|=|\^=|[-+*/%^&|~!=<>,])"
)
_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}
_MASK = "\0"  # stands in for operator punctuation; control characters are rejected up front


@dataclass(frozen=True)
class Handler:
    """What runs when a probe fires: ``count``, ``trace(ARGS)`` or a C callback."""

    kind: str                      # "count" | "trace" | "callback"
    args: tuple[str, ...] = ()     # trace args, normalised lower-case
    library: str | None = None     # callback: path or soname as written
    function: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in HANDLER_KINDS:
            raise ValueError(f"handler kind must be one of {', '.join(HANDLER_KINDS)}, not {self.kind!r}")
        if self.kind == "callback" and not (self.library and self.function):
            raise ValueError("a callback handler needs a library and a function")

    def __str__(self) -> str:
        """The handler as a spec writes it: ``count``, ``trace(arg1,rax)``, ``./h.so:on_hit``."""
        if self.kind == "trace":
            return f"trace({','.join(self.args)})" if self.args else "trace"
        if self.kind == "callback":
            return f"{self.library}:{self.function}"
        return "count"


COUNT = Handler("count")


@dataclass(frozen=True)
class ProbeSpec:
    """One parsed probe spec; ``text`` is what the user wrote (stripped)."""

    text: str                      # as the user wrote it (stripped)
    module: str | None             # None = main executable
    symbol: str | None             # None when address is given
    offset: int                    # 0 by default
    address: int | None            # link-time address when LOCATION is an ADDRESS
    on_return: bool
    handler: Handler

    def location(self) -> str:
        """The location in canonical form: ``compute+0x1a``, ``0x401136``, ``malloc``."""
        if self.symbol is None:
            return f"{self.address or 0:#x}"
        if not self.offset:
            return self.symbol
        return f"{self.symbol}{_operator_gap(self.symbol)}+{self.offset:#x}"

    def target(self) -> str:
        """Where the probe sits, without its handler: ``libc.so.6:malloc%return``."""
        module = f"{self.module}:" if self.module is not None else ""
        ret = "%return" if self.on_return else ""
        location = self.location()
        return f"{module}{location}{_operator_gap(location) if ret else ''}{ret}"

    def __str__(self) -> str:
        """Canonical spec text; ``parse_probe(str(spec))`` gives the same probe back."""
        target = self.target()
        if self.handler == COUNT:
            return target
        return f"{target}{_operator_gap(target)}={self.handler}"


def parse_probe(text: str) -> ProbeSpec:
    """Parse one probe spec; raise SpecError with a one-line message on bad input."""
    if not isinstance(text, str):
        raise SpecError(f"bad probe {text!r}: a probe spec is a string such as 'main' or 'libc.so.6:malloc'")
    text = text.strip()
    if not text:
        raise SpecError("bad probe '': empty spec; write e.g. 'main', 'compute+0x1a' or 'libc.so.6:malloc'")
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in text):
        raise SpecError(f"bad probe {text!r}: contains control characters; write the spec on one line")

    def fail(message: str) -> SpecError:
        return SpecError(f"bad probe '{text}': {message}")

    masked = _mask_operators(text)

    # Handler: after the first '=' outside brackets and operator names.
    eq = _find_top(masked, "=")
    if eq is None:
        head, handler = text, COUNT
    else:
        head, handler = text[:eq], _parse_handler(text[eq + 1:], fail)
    head_masked = masked[: len(head)]
    if not head.strip():
        raise fail("expected a symbol or address before '='")
    if re.search(_MASK + r"[\w./]", head_masked):
        raise fail(f"'{head.strip()}' is ambiguous: end the operator name with a space (e.g. 'operator< =count', "
                   "'operator+ +4') or write the demangled name with its parameters")

    # Module: up to the first single ':' outside brackets ('::' is C++ scope).
    module: str | None = None
    colon = _module_colon(head_masked, fail)
    if colon is not None:
        module = head[:colon].strip()
        if not module:
            raise fail("empty module before ':'; write MODULE:SYMBOL (e.g. libc.so.6:malloc) or drop the ':'")
        if "::" in module:
            raise fail(f"module '{module}' contains '::'; write MODULE:SYMBOL with the C++ name after the module")
        if "%" in module:
            raise fail(f"'%' in module '{module}'; '%return' goes after the symbol (MODULE:SYMBOL%return)")
        loc_start = colon + 1
    else:
        loc_start = 0
    loc = head[loc_start:]
    loc_masked = head_masked[loc_start:]
    if not loc.strip():
        where = f"after '{module}:'" if module is not None else "in the spec"
        raise fail(f"expected a symbol or address {where}")

    # '%return' suffix.
    on_return = False
    pct = _find_top(loc_masked, "%")
    if pct is not None:
        suffix = loc[pct:]
        if suffix.rstrip() != "%return":
            if suffix.startswith("%return"):
                raise fail(f"unexpected '{suffix[len('%return'):].strip()}' after '%return'; "
                           "'%return' ends the location, only '=HANDLER' may follow")
            raise fail(f"unknown suffix '{suffix.strip()}'; the only suffix is '%return'")
        on_return = True
        loc, loc_masked = loc[:pct], loc_masked[:pct]
        if not loc.strip():
            raise fail("expected a function symbol before '%return'")

    # LOCATION := SYMBOL ['+' OFFSET] | ADDRESS
    symbol: str | None = None
    address: int | None = None
    offset = 0
    plus = _find_top(loc_masked, "+", last=True)
    has_offset = plus is not None
    if has_offset:
        base, off_text = loc[:plus].strip(), loc[plus + 1:].strip()
        base_masked = loc_masked[:plus].strip()
        if not off_text:
            raise fail("expected an offset after '+' (decimal or 0x-hex)")
        if not base:
            raise fail("expected a symbol before '+OFFSET'")
        if not _NUMBER.match(off_text):
            raise fail(f"bad offset '{off_text}': expected decimal or 0x-hex (e.g. +0x1a or +26)")
        if _NUMBER.match(base):
            raise fail(f"an address takes no '+OFFSET'; write the sum ({_number(base) + _number(off_text):#x})")
        offset = _number(off_text)
        if offset >= _MAX_ADDRESS:
            raise fail(f"offset '{off_text}' does not fit in 64 bits")
        symbol = _check_symbol(base, base_masked, fail)
    else:
        loc = loc.strip()
        if _NUMBER.match(loc):
            address = _number(loc)
            if address >= _MAX_ADDRESS:
                raise fail(f"address '{loc}' does not fit in 64 bits")
        else:
            symbol = _check_symbol(loc, loc_masked.strip(), fail)

    if on_return and (address is not None or has_offset):
        what = "an address" if address is not None else "'+OFFSET'"
        raise fail(f"%return needs a function symbol, not {what}; probe the function's entry symbol with %return")

    if DURATION in handler.args and not on_return:
        raise fail("'duration' is the time a call took, known at its return: write FUNCTION%return=trace(...,duration)")

    return ProbeSpec(text=text, module=module, symbol=symbol, offset=offset,
                     address=address, on_return=on_return, handler=handler)


def parse_probes(texts: Iterable[str]) -> list[ProbeSpec]:
    """Parse several specs (a lone string counts as one); reject a probe given twice."""
    if isinstance(texts, str):
        texts = [texts]
    specs: list[ProbeSpec] = []
    seen: dict[tuple, str] = {}
    for text in texts:
        spec = parse_probe(text)
        key = (spec.module, spec.symbol, spec.offset, spec.address, spec.on_return, spec.handler)
        if key in seen:
            raise SpecError(f"probe '{spec.text}' is given twice (also as '{seen[key]}'); drop one")
        seen[key] = spec.text
        specs.append(spec)
    return specs


# --------------------------------------------------------------------------------------------
# helpers


def _number(s: str) -> int:
    return int(s[2:], 16) if s[:2] in ("0x", "0X") else int(s, 10)


def _mask_operators(text: str) -> str:
    """``text`` with the punctuation of C++ operator names replaced by _MASK (same length)."""
    out = list(text)
    for m in _OPERATOR.finditer(text):
        for i in range(m.start(1), m.end(1)):
            out[i] = _MASK
    return "".join(out)


def _operator_gap(text: str) -> str:
    """A space to put after ``text`` when it ends in an operator name (``operator<``)."""
    return " " if _mask_operators(text).endswith(_MASK) else ""


def _top_level(masked: str) -> list[int]:
    """Indices of ``masked`` that are outside (), [] and {}."""
    depth, out = 0, []
    for i, c in enumerate(masked):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(i)
    return out


def _find_top(masked: str, char: str, last: bool = False) -> int | None:
    hits = [i for i in _top_level(masked) if masked[i] == char]
    if not hits:
        return None
    return hits[-1] if last else hits[0]


def _module_colon(masked: str, fail) -> int | None:
    """Index of the ':' that ends MODULE, or None; runs of two colons are C++ scope."""
    top = set(_top_level(masked))
    found: int | None = None
    i = 0
    while i < len(masked):
        if masked[i] != ":" or i not in top:
            i += 1
            continue
        j = i
        while j < len(masked) and masked[j] == ":":
            j += 1
        run = j - i
        if run == 1:
            if found is not None:
                raise fail("more than one ':' outside C++ '::'; write MODULE:SYMBOL")
            found = i
        elif run > 2:
            raise fail(f"unexpected '{':' * run}'; write MODULE:SYMBOL, with '::' only inside C++ names")
        i = j
    return found


def _check_symbol(sym: str, masked: str, fail) -> str:
    """Validate a SYMBOL (C, versioned or demangled C++ name) and return it."""
    if sym[:2] in ("0x", "0X"):
        raise fail(f"bad address '{sym}'; expected 0x and hex digits (e.g. 0x401136) or decimal digits")
    if sym[0].isdigit():
        raise fail(f"'{sym}' is not an address (decimal or 0x-hex) and a symbol cannot start with a digit")
    if "+" in masked:
        raise fail(f"'{sym}' is not a symbol; give at most one '+OFFSET' (e.g. compute+0x1a)")
    if _PLAIN_SYMBOL.match(sym):
        return sym
    m = re.fullmatch(r"(.+?)\s*-\s*((?:0[xX])?[0-9a-fA-F]+)", sym)
    if m and _PLAIN_SYMBOL.match(m.group(1)) and _NUMBER.match(m.group(2)):
        raise fail("negative offsets are not supported; write SYMBOL+OFFSET or an address")
    if any(c in _DEMANGLED_CHARS for c in sym) or _MASK in masked:
        # A demangled name: anything printable, with balanced brackets.
        stack: list[str] = []
        for c in masked:
            if c in _OPEN:
                stack.append(c)
            elif c in _CLOSE:
                if not stack or stack[-1] != _CLOSE[c]:
                    raise fail(f"unbalanced '{c}' in symbol '{sym}'")
                stack.pop()
        if stack:
            raise fail(f"unbalanced '{stack[-1]}' in symbol '{sym}'")
        return sym
    raise fail(f"bad symbol '{sym}'; expected a C name (foo.cold, memcpy@GLIBC_2.14), "
               "a C++ name (ns::f, foo(int)) or an address (0x401136)")


def _parse_handler(raw: str, fail) -> Handler:
    """Parse the text after '='."""
    h = raw.strip()
    if not h:
        raise fail(f"empty handler after '='; {_HANDLER_HINT}, or drop the '=' for count")
    low = h.lower()
    if low == "count":
        return COUNT
    if low[:5] == "trace" and (len(h) == 5 or h[5] == "(" or h[5].isspace()):
        return _parse_trace(h, fail)
    if low[:5] == "count" and (h[5:6] == "(" or h[5:6].isspace()):
        rest = h[5:].strip()
        raise fail(f"unexpected '{rest}' after 'count'; the count handler takes no arguments")
    if ":" in h:
        # FUNCTION is a C name, so the last ':' splits; with a C++ '::' the first one does,
        # so that the message names the function.
        library, _, function = h.partition(":") if "::" in h else h.rpartition(":")
        library, function = library.strip(), function.strip()
        if not library:
            raise fail(f"expected a library before ':{function}'; write LIBRARY.so:FUNCTION")
        if not function:
            raise fail(f"expected a function name after '{library}:'; write LIBRARY.so:FUNCTION")
        if not (library.endswith(".so") or ".so." in library or "/" in library):
            raise fail(f"library '{library}' is not a shared object; write NAME.so, NAME.so.N "
                       "or a path (e.g. ./handlers.so)")
        if library.endswith("/"):
            raise fail(f"library '{library}' names a directory; give the .so file")
        if not _C_IDENT.match(function):
            raise fail(f"'{function}' is not a C function name (letters, digits, '_'); "
                       "declare the callback extern \"C\"")
        return Handler("callback", library=library, function=function)
    if h.endswith(".so") or ".so." in h or "/" in h:
        raise fail(f"callback library '{h}' needs a function; write {h}:FUNCTION")
    raise fail(f"unknown handler '{h}'; {_HANDLER_HINT}")


def _parse_trace(h: str, fail) -> Handler:
    rest = h[5:].strip()
    if not rest:
        return Handler("trace")
    if not rest.startswith("("):
        raise fail(f"unexpected '{rest}' after 'trace'; write trace(ARG,...)")
    close = rest.find(")")
    if close < 0:
        raise fail("missing ')' after the trace arguments; write trace(ARG,...)")
    trailing = rest[close + 1:].strip()
    if trailing:
        raise fail(f"unexpected '{trailing}' after 'trace(...)'")
    inner = rest[1:close]
    if not inner.strip():
        return Handler("trace")
    args: list[str] = []
    for raw in inner.split(","):
        arg = raw.strip().lower()
        if not arg:
            raise fail("empty argument in trace(...); separate argument names with single commas")
        if arg not in TRACE_ARGS:
            raise fail(f"unknown trace argument '{raw.strip()}'; use one of {', '.join(TRACE_REGISTERS)}, "
                       "arg1..arg6, or duration at a %return")
        if arg in args:
            raise fail(f"trace argument '{arg}' is listed twice")
        args.append(arg)
    return Handler("trace", args=tuple(args))
