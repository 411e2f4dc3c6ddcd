"""CodeBuffer (trampolines/asm.py): displacements at the edges of their reach, labels,
bytes laid out elsewhere, and addresses placed later."""
import pytest

from jprobe.trampolines.asm import CodeBuffer, Later

AT = 0x40_0000


def _branch(size: int, target: int) -> bytes:
    """A `jmp rel32` (size 4) or a `jrcxz rel8` (size 1) at AT to `target`, finished."""
    buf = CodeBuffer(AT)
    if size == 4:
        buf.jmp(target)
    else:
        buf.jrcxz("there")
        buf.labels["there"] = target
    return buf.finish()


@pytest.mark.parametrize("size", [4, 1])
def test_a_displacement_reaches_exactly_its_signed_range(size):
    end = AT + (5 if size == 4 else 2)
    reach = 2 ** (8 * size - 1)
    for disp in (-reach, reach - 1):
        assert _branch(size, end + disp)[-size:] == disp.to_bytes(size, "little", signed=True)
    for target in (end - reach - 1, end + reach):
        with pytest.raises(ValueError) as error:
            _branch(size, target)
        assert str(error.value) == f"target {target:#x} is out of rel{8 * size} reach from {end:#x}"


def test_a_label_defined_twice_is_an_error():
    buf = CodeBuffer(AT)
    buf.label("a")
    with pytest.raises(ValueError, match="^label a defined twice$"):
        buf.label("a")


def test_fresh_labels_are_new_each_time():
    buf = CodeBuffer(AT)
    assert [buf.fresh("x"), buf.fresh("x"), buf.fresh("y")] == ["x.1", "x.2", "y.3"]


def test_raw_bytes_keep_their_references_where_they_land():
    buf = CodeBuffer(AT)
    buf.emit("nop; nop")
    buf.raw(b"\xe9\0\0\0\0", [(1, 0x1234)])
    buf.jmp(0x5678)
    assert buf.references == [(3, 0x1234), (8, 0x5678)]
    assert bytes(buf.code[:2]) == b"\x90\x90"


def test_a_later_address_resolves_at_its_offset_in_its_region():
    buf = CodeBuffer(AT)
    buf.rip("mov rax, qword ptr [rip]", Later("table") + 8 + 8)
    code = buf.finish({"table": AT + 0x1000})
    end = len(code)
    assert int.from_bytes(code[end - 4:], "little", signed=True) == AT + 0x1000 + 16 - (AT + end)
    assert buf.references == []            # a region placed later is not a numbered address
