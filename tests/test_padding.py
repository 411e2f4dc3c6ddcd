"""A function shorter than a jump gets one when alignment padding follows it."""
import pytest
from support.build import ALL_VARIANTS
from support.report import hits_by_address
from support.run import patch, run_prog, run_with_report, sites

N = 12345


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=str)
def test_short_function_with_padding_runs_probed_with_exact_hits(variant, build, tmp_path):
    prog = build("padded.c", variant.flags)
    rows = sites(prog, "padded")["instructions"]
    assert [r["mechanism"] for r in rows] == ["jump", "jump"], rows
    entry, ret = (int(r["address"], 16) for r in rows)
    expected = run_prog([prog, str(N)])
    for site, spec in ((entry, "padded"), (ret, f"padded+{ret - entry}")):   # one at a time: each
        out = patch(prog, tmp_path / f"padded.{site:x}", [spec])         # spills over the other
        got, report = run_with_report([out, str(N)], tmp_path / f"r.{site:x}.json")
        assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout)
        [probe] = report["probes"]
        assert probe["mechanism"] == "jump" and hits_by_address(report) == {site: N}
