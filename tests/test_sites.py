"""Site analysis decisions on functions of known shapes (tests/fixtures/shapes.S)."""
import subprocess
from pathlib import Path

import pytest

from jprobe.elf import ElfModule
from jprobe.errors import SiteError
from jprobe.planner import resolve_probes
from jprobe.sites import SiteAnalyzer
from jprobe.spec import parse_probes

FIXTURE = Path(__file__).parent / "fixtures" / "shapes.S"


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "shapes"
    subprocess.run(["gcc", "-no-pie", "-o", str(out), str(FIXTURE)], check=True)
    return SiteAnalyzer(ElfModule(str(out)))


def site(analyzer, name, offset=0, tactics=False):
    """The decision by the jump rules alone, or with puns and evictions (`tactics`)."""
    return analyzer.analyse(analyzer.module.resolve(name).address + offset, tactics=tactics)


def test_short_function_falls_back_to_trap_with_reason(analyzer):
    s = site(analyzer, "tiny")
    assert s.mechanism == "trap"
    assert s.reason == "only 4 bytes up to `ret`, which ends the straight-line code"


def test_branch_target_is_never_displaced(analyzer):
    s = site(analyzer, "looped")
    assert s.mechanism == "trap" and "branch target" in s.reason
    # from the target itself, the loop body (3+3 bytes, no other target) can move
    s = site(analyzer, "looped", 2)
    assert s.mechanism == "jump" and len(s.displaced) == 2


def test_branch_target_from_the_hot_part_is_never_displaced(analyzer):
    """`split` jumps 2 bytes into `split.cold`: probing the cold piece must not cover that."""
    s = site(analyzer, "split.cold")
    assert s.mechanism == "trap" and "branch target" in s.reason


def test_call_is_retargeted_not_displaced(analyzer):
    s = site(analyzer, "caller", 1)
    assert s.mechanism == "jump" and s.call_retarget and "call" in s.reason


def test_a_call_may_be_displaced_last_only(analyzer):
    s = site(analyzer, "caller")
    assert s.mechanism == "jump" and [i.mnemonic for i in s.displaced] == ["push", "call"]
    s = site(analyzer, "shortcall")
    assert s.mechanism == "trap" and "up to `call`" in s.reason


def test_indirect_jump_allows_one_instruction_only(analyzer):
    s = site(analyzer, "switcher")
    assert s.mechanism == "trap" and "indirect jump" in s.reason
    assert site(analyzer, "switcher", 5).mechanism == "jump"          # lea rdx,[rip+x]: 7 bytes


def test_long_instruction_gets_a_plain_jump(analyzer):
    s = site(analyzer, "longfirst")
    assert s.mechanism == "jump" and len(s.displaced) == 1 and s.length == 10


def test_flags_liveness(analyzer):
    assert not site(analyzer, "longfirst").flags_live                  # a function entry
    s = site(analyzer, "flagsuser", 4)                                  # between cmp and ja
    assert s.flags_live


def test_not_on_an_instruction_boundary(analyzer):
    with pytest.raises(SiteError, match="not on an instruction boundary of longfirst"):
        site(analyzer, "longfirst", 1)


def test_probes_whose_patches_overlap_are_refused(analyzer):
    """Without a symbol size no boundary check applies: 2 bytes into a 7-byte instruction
    is a valid-looking address, and both patches would write over each other."""
    at = analyzer.module.resolve("nosize").address
    assert analyzer.module.resolve("nosize").size == 0
    with pytest.raises(SiteError, match="is inside the instruction"):
        resolve_probes(analyzer.module, parse_probes([f"{at:#x}", f"{at + 2:#x}"]), strict=False)


def test_short_function_spills_into_the_padding_after_it(analyzer):
    s = site(analyzer, "padded")
    assert (s.mechanism, s.padding, s.length) == ("jump", 1, 5)
    assert "1 byte(s) of the padding after padded" in s.reason
    s = site(analyzer, "padded", 3)                                    # the ret alone
    assert (s.mechanism, s.padding, [i.mnemonic for i in s.displaced]) == ("jump", 4, ["ret"])


def test_sites_of_a_symbol_without_size_is_bad_input(analyzer):
    from jprobe.coverage import site_table
    from jprobe.errors import JprobeError
    with pytest.raises(JprobeError, match="nosize has no size"):
        site_table(analyzer.module.path, "nosize")


def test_short_function_gets_a_punned_or_evicting_jump(analyzer):
    """`lea eax,[rdi+1]; ret` and its 1-byte `ret` get a jump without any trap."""
    for offset in (0, 3):
        s = site(analyzer, "tiny", offset, tactics=True)
        assert s.mechanism in ("pun", "evict") and s.jump is not None, s.reason
        assert s.reason.startswith(("B2", "T1", "T2"))


def test_a_pun_next_to_a_branch_target_changes_only_its_own_bytes(analyzer):
    s = site(analyzer, "split.cold", tactics=True)
    assert s.mechanism == "pun" and s.length == s.displaced[0].size


def test_neighbour_eviction_when_nothing_else_fits(analyzer):
    s = site(analyzer, "t3shape", tactics=True)
    assert s.mechanism == "evict" and s.reason.startswith("T3"), s.reason
    assert s.length == 2 + 1 + 6 and s.jump.evicted.mnemonic == "mov"
