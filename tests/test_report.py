"""The JSON report (SPEC §3): loading, the human table, merging per-process reports."""

import copy
import json

import pytest

from jprobe.errors import JprobeError
from jprobe.report import ReportError, format_report, load_report, merge_reports

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"


def probe(name="libc.so.6:malloc", module=LIBC, address="0xa50e0", mechanism="jump", handler="count",
          hits=0, lost=0, **extra):
    return dict(probe=name, module=module, address=address, mechanism=mechanism, handler=handler,
                hits=hits, lost=lost, **extra)


SAMPLE = {
    "pid": 1234,
    "executable": "/usr/bin/foo",
    "probes": [
        probe(hits=1523),
        probe("compute+0x1a", module="/usr/bin/foo", address="0x40114a", mechanism="trap",
              handler="./h.so:on_hit", hits=7),
    ],
    "errors": [],
}


# -- format_report -----------------------------------------------------------------------------

def test_format_sample():
    text = format_report(SAMPLE)
    lines = text.splitlines()
    assert text.endswith("\n")
    assert lines[0].split() == ["pid", "1234", "/usr/bin/foo"]
    assert lines[1].split() == ["probe", "module", "address", "mechanism", "handler", "hits"]
    assert lines[2].split() == ["libc.so.6:malloc", "libc.so.6", "0xa50e0", "jump", "count", "1523"]
    assert lines[3].split() == ["compute+0x1a", "foo", "0x40114a", "trap", "./h.so:on_hit", "7"]
    assert len(lines) == 4
    assert LIBC not in text  # modules by basename
    assert "lost" not in text  # all zero: no lost column


def test_format_columns_line_up():
    lines = format_report(SAMPLE).splitlines()
    header, first, second = lines[1], lines[2], lines[3]
    for col in ("module", "address", "mechanism", "handler"):
        at = header.index(col)
        assert first[at - 2:at] == "  " and first[at] != " "
        assert second[at - 2:at] == "  " and second[at] != " "
    # numbers are right-aligned under "hits"
    end = header.index("hits") + len("hits")
    assert first[:end].endswith("1523") and second[:end].endswith("7")


def test_format_lost_only_when_nonzero():
    report = copy.deepcopy(SAMPLE)
    report["probes"][1]["lost"] = 12
    lines = format_report(report).splitlines()
    assert lines[1].split()[-1] == "lost"
    assert lines[2].split()[-1] == "1523"  # zero lost: blank cell
    assert lines[3].split()[-2:] == ["7", "12"]


def test_format_callback_counts_only_when_nonzero():
    """missed and callback_skipped (SPEC §3): columns like lost's, after it."""
    report = copy.deepcopy(SAMPLE)
    report["probes"][1].update(missed=3, callback_skipped=0)
    lines = format_report(report).splitlines()
    assert lines[1].split()[-2:] == ["hits", "missed"]
    assert lines[3].split()[-2:] == ["7", "3"]
    report["probes"][1]["callback_skipped"] = 2
    lines = format_report(report).splitlines()
    assert lines[1].split()[-3:] == ["hits", "missed", "callback_skipped"]
    assert lines[3].split()[-3:] == ["7", "3", "2"]
    end = lines[1].index("callback_skipped") + len("callback_skipped")
    assert lines[3][:end].endswith("2") and lines[2].split()[-1] == "1523"


def test_format_unpatched_probe():
    report = copy.deepcopy(SAMPLE)
    report["probes"][0]["patched"] = False
    lines = format_report(report).splitlines()
    assert lines[2].split()[3] == "-"
    assert lines[3] == "  not patched: its site was left as it was (the errors say why)"


def test_format_by_pid_indented():
    report = copy.deepcopy(SAMPLE)
    report["probes"][0]["by_pid"] = {"1240": 23, "1234": 1500}
    lines = format_report(report).splitlines()
    assert lines[2].split()[0] == "libc.so.6:malloc"
    assert lines[3].startswith("  pid ") and lines[3].split() == ["pid", "1234", "1500"]
    assert lines[4].startswith("  pid ") and lines[4].split() == ["pid", "1240", "23"]
    assert lines[5].split()[0] == "compute+0x1a"
    end = lines[1].index("hits") + len("hits")
    assert lines[3][:end].endswith("1500") and len(lines[3]) == end


def test_format_trace_events_summarised():
    events = [{"t_ns": i, "tid": 1234, "args": {"arg1": 0xDEAD0000 + i, "arg3": 17}} for i in range(42)]
    report = {"pid": 1, "executable": "/bin/x",
              "probes": [probe("libc.so.6:write=trace(arg1,arg3)", handler="trace(arg1,arg3)", hits=42,
                               events=events)],
              "errors": []}
    text = format_report(report)
    lines = text.splitlines()
    assert lines[2].split()[-1] == "42"
    assert lines[3] == "  42 trace events recorded (see the JSON report)"
    assert "t_ns" not in text and "3735879680" not in text and "0xdead" not in text.lower()


def test_format_errors_at_the_end():
    report = copy.deepcopy(SAMPLE)
    report["errors"] = ["probe 'nosuch': unknown symbol", {"probe": "f+3", "message": "not an instruction"}]
    lines = format_report(report).splitlines()
    assert lines[-2:] == ["error: probe 'nosuch': unknown symbol", "error: f+3: not an instruction"]


def test_format_no_probes_and_missing_fields():
    assert format_report({"pid": 5, "probes": []}).splitlines() == ["pid 5", "no probes"]
    lines = format_report({"probes": [{"probe": "main", "hits": 3, "address": 0x401136}]}).splitlines()
    assert lines[1].split() == ["main", "-", "0x401136", "-", "-", "3"]


def test_format_merged_header():
    merged = merge_reports([dict(SAMPLE), dict(SAMPLE, pid=1240)])
    assert format_report(merged).splitlines()[0].split() == ["pids", "1234,", "1240", "/usr/bin/foo"]


def test_format_rejects_non_report():
    with pytest.raises(JprobeError, match='no "probes" list'):
        format_report({"pid": 1})


# -- merge_reports -----------------------------------------------------------------------------

def report(pid, *probes, errors=()):
    return {"pid": pid, "executable": "/usr/bin/foo", "probes": list(probes), "errors": list(errors)}


def test_merge_totals_and_by_pid():
    merged = merge_reports([
        report(100, probe(hits=10, lost=1), probe("main", module="/usr/bin/foo", address="0x401136", hits=1)),
        report(101, probe(hits=5, lost=2), probe("main", module="/usr/bin/foo", address="0x401136", hits=0)),
        report(102, probe(hits=0)),
    ])
    assert merged["pid"] == 100 and merged["executable"] == "/usr/bin/foo"
    assert merged["pids"] == [100, 101, 102]
    malloc, main = merged["probes"]
    assert (malloc["probe"], malloc["hits"], malloc["lost"]) == ("libc.so.6:malloc", 15, 3)
    assert malloc["by_pid"] == {"100": 10, "101": 5}  # only the processes that hit
    assert list(malloc["by_pid"]) == ["100", "101"]
    assert (main["probe"], main["hits"]) == ("main", 1)
    assert "by_pid" not in main  # one process hit: no breakdown
    assert merged["errors"] == []


def test_merge_sums_callback_counts():
    cb = dict(name="compute", handler="./h.so:on_hit")
    merged = merge_reports([report(100, probe(**cb, hits=10, missed=4, callback_skipped=1)),
                            report(101, probe(**cb, hits=5, missed=2, callback_skipped=0))])
    [e] = merged["probes"]
    assert (e["hits"], e["missed"], e["callback_skipped"]) == (15, 6, 1)
    assert "missed" not in merge_reports([report(100, probe(hits=1))])["probes"][0]


def test_merge_keeps_distinct_probes_apart():
    merged = merge_reports([
        report(1, probe(hits=1), probe(handler="./h.so:f", name="libc.so.6:malloc=./h.so:f", hits=2)),
        report(2, probe(hits=4), probe(address="0xa50e4", name="libc.so.6:malloc+4", hits=8)),
    ])
    got = [(p["probe"], p["address"], p["handler"], p["hits"]) for p in merged["probes"]]
    assert got == [("libc.so.6:malloc", "0xa50e0", "count", 5),
                   ("libc.so.6:malloc=./h.so:f", "0xa50e0", "./h.so:f", 2),
                   ("libc.so.6:malloc+4", "0xa50e4", "count", 8)]


def test_merge_sorts_pids_numerically_and_sums_repeats():
    merged = merge_reports([report(1000, probe(hits=1)), report(999, probe(hits=2)), report(1000, probe(hits=3))])
    assert merged["pids"] == [999, 1000]
    assert merged["probes"][0]["hits"] == 6
    assert list(merged["probes"][0]["by_pid"].items()) == [("999", 2), ("1000", 4)]


def test_merge_of_merged_reports():
    a = merge_reports([report(1, probe(hits=1)), report(2, probe(hits=2))])
    b = merge_reports([report(3, probe(hits=4))])
    merged = merge_reports([a, b])
    assert merged["pids"] == [1, 2, 3]
    assert merged["probes"][0]["hits"] == 7
    assert merged["probes"][0]["by_pid"] == {"1": 1, "2": 2, "3": 4}


def test_merge_errors_once_each():
    merged = merge_reports([report(1, errors=["libh.so: not found"]),
                            report(2, errors=["libh.so: not found", "other"])])
    assert merged["errors"] == ["libh.so: not found", "other"]


def test_merge_events_in_time_order_with_pid():
    t = "trace(arg1)"
    merged = merge_reports([
        report(1, probe(handler=t, hits=2, events=[{"t_ns": 5, "tid": 1}, {"t_ns": 30, "tid": 1}])),
        report(2, probe(handler=t, hits=1, events=[{"t_ns": 10, "tid": 2}])),
    ])
    events = merged["probes"][0]["events"]
    assert [(e["t_ns"], e["pid"]) for e in events] == [(5, 1), (10, 2), (30, 1)]


def test_merge_does_not_touch_inputs_and_is_json():
    inputs = [report(1, probe(hits=1)), report(2, probe(hits=2))]
    before = copy.deepcopy(inputs)
    merged = merge_reports(inputs)
    assert inputs == before
    assert json.loads(json.dumps(merged)) == merged


def test_merge_single_and_empty():
    single = merge_reports([report(7, probe(hits=3))])
    assert single["pid"] == 7 and single["pids"] == [7]
    assert single["probes"] == [probe(hits=3)]
    empty = merge_reports([])
    assert empty["probes"] == [] and empty["errors"] == [] and empty["pids"] == []


def test_merge_rejects_non_report():
    with pytest.raises(JprobeError, match=r"report 2 of 2 is not a jprobe report"):
        merge_reports([report(1), {"pid": 2}])


# -- load_report -------------------------------------------------------------------------------

def test_load_round_trip(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(SAMPLE))
    assert load_report(str(path)) == SAMPLE


@pytest.mark.parametrize("content,message", [
    (None, "report '{p}': no such file; pass a file written by --report, --json or JPROBE_REPORT"),
    ("", "report '{p}' is empty; pass a file written by --report, --json or JPROBE_REPORT"),
    ("pid 1234\n", "report '{p}' is not JSON (Expecting value at line 1 column 1); pass a file written by "
                   "--report, --json or JPROBE_REPORT"),
    ('{"pid": 1, "probes": [', "report '{p}' is not JSON (Expecting value at line 1 column 23); pass a file "
                               "written by --report, --json or JPROBE_REPORT"),
    (b"\xff\xfe\x00", "report '{p}' is not JSON (not UTF-8 text); pass a file written by --report, --json "
                      "or JPROBE_REPORT"),
    ("[1, 2]", "report '{p}' is not a jprobe report (a JSON list, not an object); pass a file written by "
               "--report, --json or JPROBE_REPORT"),
    ('{"pid": 1}', "report '{p}' is not a jprobe report (no \"probes\" list); pass a file written by "
                   "--report, --json or JPROBE_REPORT"),
    ('{"probes": {}}', "report '{p}' is not a jprobe report (no \"probes\" list); pass a file written by "
                       "--report, --json or JPROBE_REPORT"),
    ('{"probes": [1]}', "report '{p}' is not a jprobe report (\"probes\"[0] is not an object); pass a file "
                        "written by --report, --json or JPROBE_REPORT"),
    ('{"probes": [], "errors": "x"}', "report '{p}' is not a jprobe report (\"errors\" is not a list); pass a "
                                      "file written by --report, --json or JPROBE_REPORT"),
])
def test_load_errors(tmp_path, content, message):
    path = tmp_path / "report.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ReportError) as info:
        load_report(str(path))
    assert str(info.value) == message.format(p=path)
    assert isinstance(info.value, JprobeError)


def test_load_directory(tmp_path):
    with pytest.raises(JprobeError) as info:
        load_report(str(tmp_path))
    assert str(info.value) == (f"report '{tmp_path}' is a directory; pass a file written by --report, --json "
                               "or JPROBE_REPORT")
