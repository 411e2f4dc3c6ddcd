"""`trace(...)` probes placed by `jprobe attach` in a running process (issue 13).

The target (fixtures/attach_trace.c) runs trace.c's workload on command: thread t calls
mark(t, i, 3 * i), then twice(i), for i < N, in threads it starts after attach, at once or
one after another (on stacks glibc recycles, thread control block and all); a forked child
calls mark(100, i, 0) in its main thread (the thread control block of its parent's thread)
and mark(200, i, 0) in a thread of its own. Events are checked exactly: each thread's, in
order, with their values; hits = events + lost.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from jprobe.patcher import rings
from support.target import ANSWER_S, Target, bounded, running_target
from test_attach import attached, cli_attach
from test_attach_returns import variant  # noqa: F401  (the same build variants)

MARK = "mark=trace(arg1,arg2,arg3)"
RET = "twice%return=trace(rax,arg1,duration)"
LINE = re.compile(r"^ *\d+\.\d{6} (\d+) mark arg1=(\d+) arg2=(\d+) arg3=(\d+)$")


@pytest.fixture(scope="module")
def target_c(build, variant) -> Path:
    return build("attach_trace.c", [*variant.flags, "-Wall", "-Werror"])


class Collect:
    """A probe's events() iterated on a thread of its own, until it ends."""

    def __init__(self, probe):
        self.events: list = []
        self._thread = threading.Thread(target=lambda: self.events.extend(probe.events()), daemon=True)
        self._thread.start()

    def ended(self, timeout: float = ANSWER_S) -> list:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "events() did not end"
        return self.events


def check_marks(events, n: int, threads: list[int], who: int = 0) -> None:
    """Each thread's mark events, in its order: mark(t, i, 3 * i) for i < n (t's own)."""
    by_tid = defaultdict(list)
    for ev in events:
        by_tid[ev.tid].append(ev)
    assert sorted(evs[0].args["arg1"] for evs in by_tid.values()) == sorted(threads)
    for evs in by_tid.values():
        t = evs[0].args["arg1"]
        assert [(e.args["arg1"], e.args["arg2"], e.args["arg3"]) for e in evs] == \
            [(t, i, 3 * i if t < 100 else 0) for i in range(n)]
        assert [e.t_ns for e in evs] == sorted(e.t_ns for e in evs)
        assert {e.pid for e in evs} == {evs[0].pid} and {e.probe for e in evs} == {"mark"}


def test_events_exact_threads_started_after_attach_and_on_recycled_stacks(target_c):
    with running_target(target_c) as t, attached(t.pid) as proc:
        mark, ret = bounded(ANSWER_S, proc.probes, [MARK, RET])
        marks, returns = Collect(mark), Collect(ret)
        t.send("run 4 2000", "done")
        t.send("serial 6 300", "done")              # later threads on the first ones' stacks
        bounded(ANSWER_S, proc.remove, mark)
        got = marks.ended()
        check_marks(got[:8000], 2000, [0, 1, 2, 3])
        check_marks(got[8000:], 300, [0, 1, 2, 3, 4, 5])
        assert {e.pid for e in got} == {t.pid}
        assert (mark.hits, mark.lost, len(got)) == (9800, 0, 9800)
    evs = returns.ended()
    assert len(evs) == ret.hits == 9800 and ret.lost == 0
    assert all(e.args["rax"] == 2 * e.args["arg1"] and 0 <= e.args["duration"] < 10**9 for e in evs)
    entry = next(e for e in proc.report()["probes"] if e["probe"] == "twice%return")
    assert (entry["events_count"], entry["lost"], entry["events_to"]) == (9800, 0, "events()")


def test_forked_child_takes_rings_of_its_own(target_c):
    """The child's main thread inherits its parent's thread's ring word: the ring's tid says it
    is not the child's, which takes a ring of its own (shown with its pid), never writing the
    parent's (the parent's later events are all there, in order)."""
    with running_target(target_c) as t, attached(t.pid) as proc:
        mark = bounded(ANSWER_S, proc.probe, MARK)
        marks = Collect(mark)
        t.send("run 1 100", "done")
        child = int(t.send("fork 500", "child").split()[1])
        t.send("run 1 100", "done")
    got = marks.ended()
    assert (mark.hits, mark.lost, len(got)) == (1200, 0, 1200)
    ours = [e for e in got if e.pid == t.pid]
    theirs = [e for e in got if e.pid == child]
    check_marks(ours[:100], 100, [0])
    check_marks(ours[100:], 100, [0])
    check_marks(theirs, 500, [100, 200])
    assert proc.report()["errors"] == []


def test_events_end_when_the_process_exits(target_c):
    with running_target(target_c) as t, attached(t.pid) as proc:
        mark = bounded(ANSWER_S, proc.probe, MARK)
        marks = Collect(mark)
        t.send("run 2 1000", "done")
        t.quit()
        got = marks.ended()
        check_marks(got, 1000, [0, 1])
    assert mark.hits == 2000 and mark.lost == 0


def test_lost_exact_when_nobody_drains(target_c):
    """A stalled reader: a thread's ring (rings.WORDS words, 5 a record) holds what fits; every
    other record is counted lost, none is half written."""
    n, fit = 30000, rings.WORDS // 5
    with running_target(target_c) as t, attached(t.pid) as proc:
        mark = bounded(ANSWER_S, proc.probe, MARK)
        marks = Collect(mark)
        with proc._events._lock:                    # the drainer waits
            t.send(f"run 1 {n}", "done")
        proc.remove(mark)
        got = marks.ended()
    assert (mark.hits, len(got), mark.lost) == (n, fit, n - fit)
    check_marks(got, fit, [0])


def test_stream_full_counts_lost(target_c, monkeypatch):
    """Events nobody iterates wait in a bounded buffer; the rest count in lost."""
    from jprobe import live_events
    monkeypatch.setattr(live_events, "STREAM_MAX", 1000)
    with running_target(target_c) as t, attached(t.pid) as proc:
        mark = bounded(ANSWER_S, proc.probe, MARK)
        t.send("run 1 3000", "done")
        proc.remove(mark)
        got = list(mark.events())
    assert (mark.hits, len(got), mark.lost) == (3000, 1000, 2000)
    check_marks(got, 1000, [0])
    entry = proc.report()["probes"][0]
    assert (entry["events_count"], entry["lost"]) == (1000, 2000)


def test_sessions_while_threads_trace_at_full_speed(target_c):
    """Sessions attach and detach (the second and later finding the rings' pool of the first)
    while threads trace as fast as they can: each session's events of a thread are calls in
    order, none torn; hits = events + lost exactly; the program's results unchanged."""
    with running_target(target_c) as t:
        t.send("spin 2", "spinning")
        for _ in range(3):
            with attached(t.pid) as proc:
                mark = bounded(ANSWER_S, proc.probe, MARK)
                marks = Collect(mark)
                time.sleep(0.2)
            got = marks.ended()
            assert mark.hits == len(got) + mark.lost and len(got) > 0
            by_tid = defaultdict(list)
            for e in got:
                by_tid[e.tid].append((e.args["arg1"], e.args["arg2"], e.args["arg3"]))
            for calls in by_tid.values():
                t_ = calls[0][0]
                assert all(w == t_ and a3 == 3 * i for w, i, a3 in calls)
                assert [i for _, i, _ in calls] == sorted(i for _, i, _ in calls)
        assert int(t.send("stop", "stopped").split()[1]) > 0
        t.send("run 1 10", "done")                   # detached: the program runs on


def test_trace_refused_where_glibc_keeps_no_tid_at_its_offset():
    """A thread control block whose tid is not at glibc's offset (another C library)."""
    from jprobe.errors import HandlerError
    with pytest.raises(HandlerError, match="does not keep a thread's id"):
        rings._check_seen([(100, 100), (101, 0)], 100, "f=trace(arg1)")


def test_cli_text_events_on_stderr(target_c):
    with running_target(target_c) as t, cli_attach(t.pid, "-p", MARK, "--duration", "4") as cli:
        _live(cli, t)
        t.send("run 2 50", "done")
        out, err = cli.communicate(timeout=ANSWER_S)
    lines = [m.groups() for m in map(LINE.match, err.splitlines()) if m]
    assert len(lines) == 100
    for who in ("0", "1"):
        assert [(a2, a3) for _, a1, a2, a3 in lines if a1 == who] == [(str(i), str(3 * i)) for i in range(50)]
    assert "100 trace events written to stderr" in out


def test_cli_json_events_into_a_file(target_c, tmp_path):
    path = tmp_path / "ev.json"
    with running_target(target_c) as t, \
            cli_attach(t.pid, "-p", MARK, "-p", RET, "--duration", "4", "--json", "--events", path) as cli:
        _live(cli, t)
        t.send("run 2 50", "done")
        out, _ = cli.communicate(timeout=ANSWER_S)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(events) == 200 and {e["pid"] for e in events} == {t.pid}
    marks = [e for e in events if e["probe"] == "mark"]
    assert sorted((e["args"]["arg1"], e["args"]["arg2"]) for e in marks) == [(w, i) for w in (0, 1) for i in range(50)]
    report = json.loads(out)
    for entry in report["probes"]:
        assert (entry["hits"], entry["events_count"], entry["lost"], entry["events_file"]) == (100, 100, 0, str(path))


def _live(cli, t: Target) -> None:
    """The CLI's probes are in (its line on stderr would be read with the events, so by the code)."""
    t.wait_patched("mark", lambda: cli.poll() is None)
    time.sleep(0.2)                                  # the session's drainer and the report's view are set up by then
