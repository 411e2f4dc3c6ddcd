"""Probe spec grammar (SPEC §1): examples, edge cases, error messages, round trip."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jprobe.errors import JprobeError, SpecError
from jprobe.spec import (
    TRACE_ARGS,
    TRACE_REGISTERS,
    Handler,
    ProbeSpec,
    parse_probe,
    parse_probes,
)

COUNT = Handler("count")


def fields(spec: ProbeSpec) -> tuple:
    """Everything but the text the user wrote."""
    return (spec.module, spec.symbol, spec.offset, spec.address, spec.on_return, spec.handler)


# -- the examples of SPEC §1 -------------------------------------------------------------------

SPEC_EXAMPLES = [
    ("main", None, "main", 0, None, False, COUNT),
    ("compute+0x1a", None, "compute", 0x1A, None, False, COUNT),
    ("0x401136", None, None, 0, 0x401136, False, COUNT),
    ("libc.so.6:malloc", "libc.so.6", "malloc", 0, None, False, COUNT),
    ("libc.so.6:malloc%return", "libc.so.6", "malloc", 0, None, True, COUNT),
    ("parse=./handlers.so:on_parse", None, "parse", 0, None, False,
     Handler("callback", library="./handlers.so", function="on_parse")),
    ("libc.so.6:write=trace(arg1,arg3)", "libc.so.6", "write", 0, None, False,
     Handler("trace", args=("arg1", "arg3"))),
]


@pytest.mark.parametrize("text,module,symbol,offset,address,on_return,handler", SPEC_EXAMPLES)
def test_spec_examples(text, module, symbol, offset, address, on_return, handler):
    spec = parse_probe(text)
    assert spec.text == text
    assert fields(spec) == (module, symbol, offset, address, on_return, handler)
    assert str(spec) == text  # the examples are already canonical


def test_location_and_handler_str():
    assert parse_probe("compute+0x1a").location() == "compute+0x1a"
    assert parse_probe("compute+26").location() == "compute+0x1a"
    assert parse_probe("0x401136").location() == "0x401136"
    assert parse_probe("4198710").location() == "0x401136"
    assert parse_probe("libc.so.6:malloc").location() == "malloc"
    assert parse_probe("libc.so.6:malloc%return").target() == "libc.so.6:malloc%return"
    assert str(Handler("count")) == "count"
    assert str(Handler("trace")) == "trace"
    assert str(Handler("trace", args=("arg1", "rax"))) == "trace(arg1,rax)"
    assert str(Handler("callback", library="./h.so", function="on_hit")) == "./h.so:on_hit"


def test_text_is_stripped_and_kept():
    spec = parse_probe("  libc.so.6:malloc = count \n")
    assert spec.text == "libc.so.6:malloc = count"
    assert fields(spec) == ("libc.so.6", "malloc", 0, None, False, COUNT)
    assert str(spec) == "libc.so.6:malloc"


def test_dataclasses_are_frozen():
    spec = parse_probe("main")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.symbol = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.handler.kind = "trace"  # type: ignore[misc]


# -- more accepted forms -----------------------------------------------------------------------

@pytest.mark.parametrize("text,module,symbol,offset,address", [
    # numbers: decimal, 0x / 0X, upper-case digits; all-digit locations are addresses
    ("main+26", None, "main", 26, None),
    ("main+0X1A", None, "main", 0x1A, None),
    ("main+0x1A", None, "main", 0x1A, None),
    ("main+0", None, "main", 0, None),
    ("main+010", None, "main", 10, None),          # decimal, not octal
    ("4198710", None, None, 0, 4198710),
    ("0XDEADBEEF", None, None, 0, 0xDEADBEEF),
    ("0", None, None, 0, 0),
    ("0xffffffffffffffff", None, None, 0, 2**64 - 1),
    ("libc.so.6:0xa50e0", "libc.so.6", None, 0, 0xA50E0),
    # symbols with '.', '@', '$'
    ("memcpy@GLIBC_2.14", None, "memcpy@GLIBC_2.14", 0, None),
    ("libc.so.6:memcpy@@GLIBC_2.14+4", "libc.so.6", "memcpy@@GLIBC_2.14", 4, None),
    ("foo.cold", None, "foo.cold", 0, None),
    ("__x86.get_pc_thunk.bx", None, "__x86.get_pc_thunk.bx", 0, None),
    ("_ZN2ns5Klass3runEv+0x10", None, "_ZN2ns5Klass3runEv", 0x10, None),
    # C++ demangled names: '::' is scope, not the module separator
    ("ns::f", None, "ns::f", 0, None),
    ("libfoo.so:ns::Klass::run", "libfoo.so", "ns::Klass::run", 0, None),
    ("./libfoo.so:ns::Klass::run+0x8", "./libfoo.so", "ns::Klass::run", 8, None),
    ("foo(int, char const*)", None, "foo(int, char const*)", 0, None),
    ("libfoo.so:foo(int, char const*)+0x4", "libfoo.so", "foo(int, char const*)", 4, None),
    ("(anonymous namespace)::helper()", None, "(anonymous namespace)::helper()", 0, None),
    ("f[abi:cxx11]()", None, "f[abi:cxx11]()", 0, None),
    ("ns::Klass<std::pair<int, long> >::get() const", None,
     "ns::Klass<std::pair<int, long> >::get() const", 0, None),
    ("main::{lambda(int)#1}::operator()(int) const", None,
     "main::{lambda(int)#1}::operator()(int) const", 0, None),
    ("vtable for Foo", None, "vtable for Foo", 0, None),
    ("non-virtual thunk to Foo::bar()", None, "non-virtual thunk to Foo::bar()", 0, None),
    ("libstdc++.so.6:std::__cxx11::basic_string<char, std::char_traits<char>, "
     "std::allocator<char> >::_M_create(unsigned long&, unsigned long)+4", "libstdc++.so.6",
     "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >"
     "::_M_create(unsigned long&, unsigned long)", 4, None),
    # C++ operators whose punctuation looks like spec syntax
    ("operator<", None, "operator<", 0, None),
    ("ns::operator<(A const&, A const&)", None, "ns::operator<(A const&, A const&)", 0, None),
    ("A::operator==(A const&) const", None, "A::operator==(A const&) const", 0, None),
    ("A::operator=(A&&)", None, "A::operator=(A&&)", 0, None),
    ("A::operator+=(int)+0x3", None, "A::operator+=(int)", 3, None),
    ("A::operator++(int)+4", None, "A::operator++(int)", 4, None),
    ("A::operator%(int)", None, "A::operator%(int)", 0, None),
    ("operator+ +4", None, "operator+", 4, None),
    ("lib.so:A::operator<<(std::ostream&)", "lib.so", "A::operator<<(std::ostream&)", 0, None),
    ("./operator/libx.so:f", "./operator/libx.so", "f", 0, None),
    ("operator", None, "operator", 0, None),                # a C name
    ("operator_new+8", None, "operator_new", 8, None),
])
def test_locations(text, module, symbol, offset, address):
    spec = parse_probe(text)
    assert (spec.module, spec.symbol, spec.offset, spec.address) == (module, symbol, offset, address)
    assert spec.handler == COUNT and not spec.on_return


@pytest.mark.parametrize("text,handler", [
    ("main=count", COUNT),
    ("main=COUNT", COUNT),
    ("main = count", COUNT),
    ("main\t=\tcount", COUNT),
    ("main=trace", Handler("trace")),
    ("main=trace()", Handler("trace")),
    ("main=trace( )", Handler("trace")),
    ("main=trace(rdi)", Handler("trace", args=("rdi",))),
    ("main=TRACE( RDI , Arg2 ,r15,rip)", Handler("trace", args=("rdi", "arg2", "r15", "rip"))),
    ("main=trace(arg1,rdi)", Handler("trace", args=("arg1", "rdi"))),  # aliases are fine
    ("main=./handlers.so:on_parse", Handler("callback", library="./handlers.so", function="on_parse")),
    ("main=libh.so.1:_cb2", Handler("callback", library="libh.so.1", function="_cb2")),
    ("main=/opt/jp/handlers:on_hit", Handler("callback", library="/opt/jp/handlers", function="on_hit")),
    ("main=/opt/a=b/h.so:f", Handler("callback", library="/opt/a=b/h.so", function="f")),
    ("main=  ./h.so : f ", Handler("callback", library="./h.so", function="f")),
    ("A::operator< =./h.so:f", Handler("callback", library="./h.so", function="f")),
    ("A::operator+ =./h.so:f", Handler("callback", library="./h.so", function="f")),
    ("main=./operator/h.so:f", Handler("callback", library="./operator/h.so", function="f")),
])
def test_handlers(text, handler):
    assert parse_probe(text).handler == handler


def test_return_probe_on_cxx_name_with_handler():
    spec = parse_probe("libfoo.so:ns::run(int)%return=./h.so:on_ret")
    assert fields(spec) == ("libfoo.so", "ns::run(int)", 0, None, True,
                            Handler("callback", library="./h.so", function="on_ret"))


def test_every_trace_arg_accepted():
    assert len(TRACE_REGISTERS) == 17
    spec = parse_probe("f%return=trace(" + ",".join(TRACE_ARGS) + ")")
    assert spec.handler.args == TRACE_ARGS
    with pytest.raises(SpecError, match="'duration' is the time a call took"):
        parse_probe("f=trace(arg1,duration)")


# -- errors ------------------------------------------------------------------------------------

ERRORS = [
    ("", "bad probe '': empty spec; write e.g. 'main', 'compute+0x1a' or 'libc.so.6:malloc'"),
    ("   ", "bad probe '': empty spec; write e.g. 'main', 'compute+0x1a' or 'libc.so.6:malloc'"),
    ("main+", "bad probe 'main+': expected an offset after '+' (decimal or 0x-hex)"),
    ("main+x", "bad probe 'main+x': bad offset 'x': expected decimal or 0x-hex (e.g. +0x1a or +26)"),
    ("main+0x", "bad probe 'main+0x': bad offset '0x': expected decimal or 0x-hex (e.g. +0x1a or +26)"),
    ("main+-4", "bad probe 'main+-4': bad offset '-4': expected decimal or 0x-hex (e.g. +0x1a or +26)"),
    ("main+1_0", "bad probe 'main+1_0': bad offset '1_0': expected decimal or 0x-hex (e.g. +0x1a or +26)"),
    ("+4", "bad probe '+4': expected a symbol before '+OFFSET'"),
    ("main+1+2", "bad probe 'main+1+2': 'main+1' is not a symbol; give at most one '+OFFSET' (e.g. compute+0x1a)"),
    ("main-4", "bad probe 'main-4': negative offsets are not supported; write SYMBOL+OFFSET or an address"),
    ("main+99999999999999999999999",
     "bad probe 'main+99999999999999999999999': offset '99999999999999999999999' does not fit in 64 bits"),
    ("0x10000000000000000", "bad probe '0x10000000000000000': address '0x10000000000000000' does not fit in 64 bits"),
    ("0x", "bad probe '0x': bad address '0x'; expected 0x and hex digits (e.g. 0x401136) or decimal digits"),
    ("0x40113g", "bad probe '0x40113g': bad address '0x40113g'; expected 0x and hex digits (e.g. 0x401136) "
                 "or decimal digits"),
    ("12ab", "bad probe '12ab': '12ab' is not an address (decimal or 0x-hex) and a symbol cannot start with a digit"),
    ("0x401000+4", "bad probe '0x401000+4': an address takes no '+OFFSET'; write the sum (0x401004)"),
    ("0x401136 junk", "bad probe '0x401136 junk': bad address '0x401136 junk'; expected 0x and hex digits "
                      "(e.g. 0x401136) or decimal digits"),
    ("ma$in!", "bad probe 'ma$in!': bad symbol 'ma$in!'; expected a C name (foo.cold, memcpy@GLIBC_2.14), "
               "a C++ name (ns::f, foo(int)) or an address (0x401136)"),
    ("foo(int", "bad probe 'foo(int': unbalanced '(' in symbol 'foo(int'"),
    ("foo(int))", "bad probe 'foo(int))': unbalanced ')' in symbol 'foo(int))'"),
    ("f[abi:cxx11)", "bad probe 'f[abi:cxx11)': unbalanced ')' in symbol 'f[abi:cxx11)'"),
    ("A::operator<=count", "bad probe 'A::operator<=count': 'A::operator<=count' is ambiguous: end the operator "
                           "name with a space (e.g. 'operator< =count', 'operator+ +4') or write the demangled "
                           "name with its parameters"),
    ("operator+4", "bad probe 'operator+4': 'operator+4' is ambiguous: end the operator name with a space "
                   "(e.g. 'operator< =count', 'operator+ +4') or write the demangled name with its parameters"),
    ("A::operator+=./h.so:f", "bad probe 'A::operator+=./h.so:f': 'A::operator+=./h.so:f' is ambiguous: end the "
                              "operator name with a space (e.g. 'operator< =count', 'operator+ +4') or write the "
                              "demangled name with its parameters"),
    # module
    ("ns::f:malloc", "bad probe 'ns::f:malloc': module 'ns::f' contains '::'; write MODULE:SYMBOL with the C++ "
                     "name after the module"),
    (":main", "bad probe ':main': empty module before ':'; write MODULE:SYMBOL (e.g. libc.so.6:malloc) "
              "or drop the ':'"),
    ("libc.so.6:", "bad probe 'libc.so.6:': expected a symbol or address after 'libc.so.6:'"),
    ("libc.so.6: =count", "bad probe 'libc.so.6: =count': expected a symbol or address after 'libc.so.6:'"),
    ("a:b:c", "bad probe 'a:b:c': more than one ':' outside C++ '::'; write MODULE:SYMBOL"),
    ("lib.so:::f", "bad probe 'lib.so:::f': unexpected ':::'; write MODULE:SYMBOL, with '::' only inside C++ names"),
    ("libc.so.6%return:malloc", "bad probe 'libc.so.6%return:malloc': '%' in module 'libc.so.6%return'; "
                                "'%return' goes after the symbol (MODULE:SYMBOL%return)"),
    # %return
    ("main%ret", "bad probe 'main%ret': unknown suffix '%ret'; the only suffix is '%return'"),
    ("main%entry=count", "bad probe 'main%entry=count': unknown suffix '%entry'; the only suffix is '%return'"),
    ("main%return+4", "bad probe 'main%return+4': unexpected '+4' after '%return'; '%return' ends the location, "
                      "only '=HANDLER' may follow"),
    ("main%return%return", "bad probe 'main%return%return': unexpected '%return' after '%return'; '%return' "
                           "ends the location, only '=HANDLER' may follow"),
    ("%return", "bad probe '%return': expected a function symbol before '%return'"),
    ("libc.so.6:%return", "bad probe 'libc.so.6:%return': expected a function symbol before '%return'"),
    ("main+4%return", "bad probe 'main+4%return': %return needs a function symbol, not '+OFFSET'; "
                      "probe the function's entry symbol with %return"),
    ("main+0%return", "bad probe 'main+0%return': %return needs a function symbol, not '+OFFSET'; "
                      "probe the function's entry symbol with %return"),
    ("0x401136%return", "bad probe '0x401136%return': %return needs a function symbol, not an address; "
                        "probe the function's entry symbol with %return"),
    # handler
    ("=count", "bad probe '=count': expected a symbol or address before '='"),
    ("main=", "bad probe 'main=': empty handler after '='; use count, trace(ARG,...) or LIBRARY.so:FUNCTION, "
              "or drop the '=' for count"),
    ("main=  ", "bad probe 'main=': empty handler after '='; use count, trace(ARG,...) or LIBRARY.so:FUNCTION, "
                "or drop the '=' for count"),
    ("main=foo", "bad probe 'main=foo': unknown handler 'foo'; use count, trace(ARG,...) or LIBRARY.so:FUNCTION"),
    ("main=count=x", "bad probe 'main=count=x': unknown handler 'count=x'; use count, trace(ARG,...) "
                     "or LIBRARY.so:FUNCTION"),
    ("main=count()", "bad probe 'main=count()': unexpected '()' after 'count'; the count handler takes no arguments"),
    ("main=count x", "bad probe 'main=count x': unexpected 'x' after 'count'; the count handler takes no arguments"),
    ("main=trace(", "bad probe 'main=trace(': missing ')' after the trace arguments; write trace(ARG,...)"),
    ("main=trace rdi", "bad probe 'main=trace rdi': unexpected 'rdi' after 'trace'; write trace(ARG,...)"),
    ("main=trace(rdi) x", "bad probe 'main=trace(rdi) x': unexpected 'x' after 'trace(...)'"),
    ("main=trace(arg1,)", "bad probe 'main=trace(arg1,)': empty argument in trace(...); separate argument names "
                          "with single commas"),
    ("main=trace(arg7)", "bad probe 'main=trace(arg7)': unknown trace argument 'arg7'; use one of rax, rbx, rcx, "
                         "rdx, rsi, rdi, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15, rip, arg1..arg6, or duration at a %return"),
    ("main=trace(eax)", "bad probe 'main=trace(eax)': unknown trace argument 'eax'; use one of rax, rbx, rcx, "
                        "rdx, rsi, rdi, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15, rip, arg1..arg6, or duration at a %return"),
    ("main=trace(arg0)", "bad probe 'main=trace(arg0)': unknown trace argument 'arg0'; use one of rax, rbx, rcx, "
                         "rdx, rsi, rdi, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15, rip, arg1..arg6, or duration at a %return"),
    ("main=trace(rdi,RDI)", "bad probe 'main=trace(rdi,RDI)': trace argument 'rdi' is listed twice"),
    ("main=h.so", "bad probe 'main=h.so': callback library 'h.so' needs a function; write h.so:FUNCTION"),
    ("main=./h.so:", "bad probe 'main=./h.so:': expected a function name after './h.so:'; "
                     "write LIBRARY.so:FUNCTION"),
    ("main=:on_hit", "bad probe 'main=:on_hit': expected a library before ':on_hit'; write LIBRARY.so:FUNCTION"),
    ("main=libh:f", "bad probe 'main=libh:f': library 'libh' is not a shared object; write NAME.so, NAME.so.N "
                    "or a path (e.g. ./handlers.so)"),
    ("main=h.dll:f", "bad probe 'main=h.dll:f': library 'h.dll' is not a shared object; write NAME.so, NAME.so.N "
                     "or a path (e.g. ./handlers.so)"),
    ("main=./:f", "bad probe 'main=./:f': library './' names a directory; give the .so file"),
    ("main=h.so:on-hit", "bad probe 'main=h.so:on-hit': 'on-hit' is not a C function name (letters, digits, '_'); "
                         "declare the callback extern \"C\""),
    ("main=h.so:ns::cb", "bad probe 'main=h.so:ns::cb': 'ns::cb' is not a C function name (letters, digits, "
                         "'_'); declare the callback extern \"C\""),
    ("main=h.so:1cb", "bad probe 'main=h.so:1cb': '1cb' is not a C function name (letters, digits, '_'); "
                      "declare the callback extern \"C\""),
    ("ma\nin", "bad probe 'ma\\nin': contains control characters; write the spec on one line"),
]


@pytest.mark.parametrize("text,message", ERRORS, ids=[e[0] or "empty" for e in ERRORS])
def test_errors(text, message):
    with pytest.raises(SpecError) as info:
        parse_probe(text)
    got = str(info.value)
    assert "\n" not in got
    assert got == message
    assert isinstance(info.value, JprobeError)


def test_non_string_spec():
    with pytest.raises(SpecError, match="a probe spec is a string"):
        parse_probe(None)  # type: ignore[arg-type]


def test_handler_validates_kind():
    with pytest.raises(ValueError):
        Handler("bogus")
    with pytest.raises(ValueError):
        Handler("callback", library="./h.so")


# -- parse_probes -----------------------------------------------------------------------------

def test_parse_probes_keeps_order():
    specs = parse_probes(["main", "libc.so.6:malloc", "compute+0x1a=./h.so:on_hit"])
    assert [s.location() for s in specs] == ["main", "malloc", "compute+0x1a"]
    assert parse_probes(iter(["main"]))[0].symbol == "main"
    assert parse_probes([]) == []


def test_parse_probes_lone_string_is_one_spec():
    assert [s.symbol for s in parse_probes("main")] == ["main"]


def test_parse_probes_first_error_wins():
    with pytest.raises(SpecError, match=r"^bad probe 'main\+': "):
        parse_probes(["main", "main+", "=x"])


def test_parse_probes_rejects_duplicates():
    with pytest.raises(SpecError) as info:
        parse_probes(["main", "main=count"])
    assert str(info.value) == "probe 'main=count' is given twice (also as 'main'); drop one"
    # same site, different handlers or entry/return: distinct probes
    assert len(parse_probes(["main", "main=./h.so:f", "main%return", "main+0x0=trace"])) == 4


# -- round trip --------------------------------------------------------------------------------

ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True).filter(lambda s: s != "operator")
c_symbol = st.builds(
    lambda base, suffix: base + suffix,
    ident,
    st.sampled_from(["", ".cold", ".part.0", "@GLIBC_2.14", "@@GLIBC_2.2.5", "@plt"]),
)
OPERATORS = ["<", "<=", "==", "=", "+", "++", "+=", "%", "()", "[]", "<<", "->", "!", ",", "-", ">", ">>="]
cxx_operator = st.sampled_from(OPERATORS)
cxx_symbol = st.builds(
    lambda scopes, last, params, const: "::".join(scopes + [last]) + params + const,
    st.lists(st.one_of(ident, st.just("(anonymous namespace)"), st.builds("{}<int>".format, ident)),
             min_size=1, max_size=3),
    st.one_of(ident, st.builds("operator{}".format, cxx_operator), st.builds("~{}".format, ident)),
    st.sampled_from(["", "()", "(int)", "(int, char const*)", "(std::pair<int, long>&)"]),
    st.sampled_from(["", " const"]),
)
OPERATORS_ENDING_IN_PUNCT = [op for op in OPERATORS if op not in ("()", "[]")]
bare_operator = st.one_of(st.builds("operator{}".format, cxx_operator),
                          st.builds("{}::operator{}".format, ident, cxx_operator))
symbols = st.one_of(c_symbol, cxx_symbol, bare_operator)
modules = st.one_of(
    st.none(),
    st.builds("lib{}.so".format, ident),
    st.builds("lib{}.so.{}".format, ident, st.integers(0, 9)),
    st.builds("./lib{}.so".format, ident),
    st.builds("/usr/lib/x86_64-linux-gnu/{}.so.6".format, ident),
    st.just("libstdc++.so.6"),
)
trace_args = st.lists(st.sampled_from(TRACE_ARGS), unique=True, max_size=6)
handlers = st.one_of(
    st.just(COUNT),
    st.builds(lambda a: Handler("trace", args=tuple(a)), trace_args),
    st.builds(lambda lib, fn: Handler("callback", library=lib, function=fn),
              st.one_of(st.builds("./{}.so".format, ident), st.builds("lib{}.so.1".format, ident),
                        st.builds("/opt/{}/handlers".format, ident)),
              ident),
)
numbers = st.integers(0, 2**64 - 1)


def fmt_number(n: int, style: str) -> str:
    return {"dec": str(n), "hex": f"{n:#x}", "HEX": f"0X{n:X}", "Hex": f"0x{n:X}"}[style]


def write_handler(h: Handler, style: int) -> str:
    if h.kind == "trace":
        args = [a.upper() if style % 2 else a for a in h.args]
        return ("trace" if not args and style == 0 else "trace(" + ", ".join(args) + ")")
    return str(h)


@st.composite
def probe_parts(draw):
    module = draw(modules)
    if draw(st.booleans()):
        symbol, address, offset = None, draw(numbers), 0
    else:
        symbol, address, offset = draw(symbols), None, draw(st.one_of(st.just(0), numbers))
    on_return = symbol is not None and offset == 0 and draw(st.booleans())
    handler = draw(handlers)
    if not on_return and "duration" in handler.args:          # a %return's only
        handler = Handler("trace", args=tuple(a for a in handler.args if a != "duration"))
    return module, symbol, offset, address, on_return, handler


@st.composite
def written(draw):
    """Parts and a text a user could write for them (number styles, spacing, optional =count)."""
    module, symbol, offset, address, on_return, handler = parts = draw(probe_parts())
    style = draw(st.sampled_from(["dec", "hex", "HEX", "Hex"]))
    text = f"{module}:" if module is not None else ""
    if symbol is None:
        text += fmt_number(address, style)
    else:
        text += symbol
        if any(symbol.endswith("operator" + op) for op in OPERATORS_ENDING_IN_PUNCT):
            text += " "  # 'operator+ +4', 'operator< =count': see jprobe.spec's docstring
        if offset:
            text += "+" + fmt_number(offset, style)
    if on_return:
        text += "%return"
    if handler != COUNT or draw(st.booleans()):
        sep = draw(st.sampled_from(["=", " = "]))
        text += sep + write_handler(handler, draw(st.integers(0, 2)))
    return parts, text


@settings(max_examples=400)
@given(written())
def test_round_trip_from_parts(case):
    parts, text = case
    spec = parse_probe(text)
    assert fields(spec) == parts
    assert spec.text == text.strip()
    # canonical text parses back to the same probe, and is a fixed point
    again = parse_probe(str(spec))
    assert fields(again) == parts
    assert str(again) == str(spec)


@settings(max_examples=400)
@given(probe_parts())
def test_round_trip_canonical(parts):
    module, symbol, offset, address, on_return, handler = parts
    spec = ProbeSpec("", module, symbol, offset, address, on_return, handler)
    assert fields(parse_probe(str(spec))) == parts


@settings(max_examples=500)
@given(st.text(alphabet=st.sampled_from(list("main0x1f+%:=()., rdi@/_tracecountso<>returng\t")), max_size=30))
def test_garbage_never_crashes(text):
    try:
        spec = parse_probe(text)
    except SpecError as e:
        assert "\n" not in str(e)
        assert str(e).startswith("bad probe '")
    else:
        assert fields(parse_probe(str(spec))) == fields(spec)
