"""The JSON probe report (SPEC §3): load it, print it as a table, merge per-process reports.

A report is ``{"pid": ..., "executable": ..., "probes": [PROBE, ...], "errors": [...]}`` where
each PROBE holds ``probe``, ``module``, ``address``, ``mechanism``, ``handler``, ``hits``,
``lost`` and optionally ``by_pid`` (``{"1234": N, ...}``), ``events`` (trace records),
``events_file`` or ``events_to`` (where the trace records went: a file, or "stderr"),
``events_count`` (how many went there), ``loaded: false`` (its module never
loaded), ``patched: false`` (its site was left as it was), and for a C callback ``missed``
and ``callback_skipped`` (hits whose callback did not run: the thread was already in a
callback, or the callback was not resolved yet), and for a ``%return`` probe ``returns_missed``
(calls whose return was not followed: the thread's return stack was full, or the runtime did
not start the thread).  A merged report (``jprobe run``) adds
``"pids"``: every process that wrote a report.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from .errors import JprobeError

__all__ = ["ReportError", "load_report", "format_report", "merge_reports"]

_HINT = "pass a file written by --report, --json or JPROBE_REPORT"
# A callback probe's hits whose callback did not run, and why (SPEC §3), and a %return probe's
# calls whose return it did not follow: summed like hits.
_CALLBACK_COUNTS = ("missed", "callback_skipped", "returns_missed")


class ReportError(JprobeError):
    """A report file is missing, unreadable or not a jprobe report."""


def load_report(path: str) -> dict:
    """Read and check a JSON report; raise ReportError with a one-line message if it is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ReportError(f"report '{path}': no such file; {_HINT}") from None
    except IsADirectoryError:
        raise ReportError(f"report '{path}' is a directory; {_HINT}") from None
    except PermissionError:
        raise ReportError(f"report '{path}': permission denied; make it readable or run as its owner") from None
    except OSError as e:
        raise ReportError(f"report '{path}': cannot read it ({e.strerror or e}); {_HINT}") from None
    if not data.strip():
        raise ReportError(f"report '{path}' is empty; {_HINT}")
    try:
        report = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ReportError(f"report '{path}' is not JSON (not UTF-8 text); {_HINT}") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"report '{path}' is not JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                          f"{_HINT}") from None
    problem = _check(report)
    if problem:
        raise ReportError(f"report '{path}' is not a jprobe report ({problem}); {_HINT}")
    return report


def format_report(report: dict) -> str:
    """The report as a human table (like ``perf stat`` / bpftrace), ending with a newline."""
    problem = _check(report)
    if problem:
        raise ReportError(f"not a jprobe report ({problem})")
    header = _header(report)
    lines = [header] if header else []
    probes = report["probes"]
    # counts that are mostly zero: a column only when some probe has one
    extra = [name for name in ("lost", *_CALLBACK_COUNTS) if any(_int(p.get(name)) for p in probes)]

    columns = ["probe", "module", "address", "mechanism", "handler", "hits", *extra]
    numeric = {"hits", *extra}
    rows: list[list[str]] = []
    for p in probes:
        placed = p.get("loaded") is not False and p.get("patched") is not False
        row = [
            _text(p.get("probe")),
            _module_name(p.get("module")),
            _address(p.get("address")),
            _text(p.get("mechanism")) if placed else "-",
            _text(p.get("handler")),
            str(_int(p.get("hits"))),
        ]
        row += [str(_int(p.get(name))) if _int(p.get(name)) else "" for name in extra]
        rows.append(row)
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]

    def fmt(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if columns[i] in numeric else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    if probes:
        lines.append(fmt(columns))
    else:
        lines.append("no probes")
    hits_col = columns.index("hits")
    indent = sum(widths[:hits_col]) + 2 * hits_col  # where the hits column starts
    for p, row in zip(probes, rows):
        lines.append(fmt(row))
        for pid, n in _sorted_pids(p.get("by_pid")):
            label = f"  pid {pid}"
            lines.append(label.ljust(indent) + str(n).rjust(widths[hits_col]))
        if p.get("loaded") is False:
            lines.append("  never loaded: its module was not loaded, so the probe was not placed")
        elif p.get("patched") is False:
            lines.append("  not patched: its site was left as it was (the errors say why)")
        events = p.get("events")
        if isinstance(events, list):
            noun = "event" if len(events) == 1 else "events"
            lines.append(f"  {len(events)} trace {noun} recorded (see the JSON report)")
        if p.get("events_file") or p.get("events_to"):
            count = f"{_int(p['events_count'])} " if "events_count" in p else ""
            lines.append(f"  {count}trace events written to {p.get('events_file') or p['events_to']}")
    for err in report.get("errors") or []:
        lines.append(f"error: {_error_text(err)}")
    return "\n".join(lines) + "\n"


def merge_reports(reports: list[dict]) -> dict:
    """One report for a process tree: the counts summed per probe, ``by_pid`` when >1 pid hit.

    Probes are the same when probe, module, address and handler agree; the first report gives
    ``pid`` and ``executable``; ``pids`` lists every process; errors are kept once each.
    """
    merged: dict[str, Any] = {"pid": None, "executable": None}
    pids: list[Any] = []
    entries: dict[tuple, dict] = {}
    per_pid: dict[tuple, dict[str, int]] = {}
    mechanisms: dict[tuple, list[str]] = {}
    errors: list[Any] = []
    seen_errors: set[str] = set()

    for n, report in enumerate(reports):
        problem = _check(report)
        if problem:
            raise ReportError(f"report {n + 1} of {len(reports)} is not a jprobe report ({problem})")
        if n == 0:
            for k, v in report.items():
                if k not in ("probes", "errors", "pids"):
                    merged[k] = copy.deepcopy(v)
        pid = report.get("pid")
        for q in report.get("pids") or ([pid] if pid is not None else []):
            if q not in pids:
                pids.append(q)
        for p in report["probes"]:
            key = (p.get("probe"), p.get("module"), str(p.get("address")), p.get("handler"))
            hits = _int(p.get("hits"))
            entry = entries.get(key)
            if entry is None:
                entry = entries[key] = copy.deepcopy(p)
                entry.pop("by_pid", None)
                entry["hits"] = 0
                entry["lost"] = 0
                for name in _CALLBACK_COUNTS:
                    if name in entry:
                        entry[name] = 0
                if "events" in entry:
                    entry["events"] = []
                per_pid[key] = {}
                mechanisms[key] = []
            entry["hits"] += hits
            entry["lost"] += _int(p.get("lost"))
            for name in _CALLBACK_COUNTS:
                if name in p:
                    entry[name] = entry.get(name, 0) + _int(p[name])
            mech = p.get("mechanism")
            if mech and mech not in mechanisms[key]:
                mechanisms[key].append(mech)
            counts = per_pid[key]
            if isinstance(p.get("by_pid"), dict):
                for q, m in p["by_pid"].items():
                    counts[str(q)] = counts.get(str(q), 0) + _int(m)
            elif pid is not None:
                counts[str(pid)] = counts.get(str(pid), 0) + hits
            if isinstance(p.get("events"), list):
                for ev in p["events"]:
                    ev = copy.deepcopy(ev)
                    if isinstance(ev, dict) and pid is not None:
                        ev.setdefault("pid", pid)
                    entry.setdefault("events", []).append(ev)
        for err in report.get("errors") or []:
            tag = json.dumps(err, sort_keys=True, default=str)
            if tag not in seen_errors:
                seen_errors.add(tag)
                errors.append(copy.deepcopy(err))

    probes = []
    for key, entry in entries.items():
        if mechanisms[key]:
            entry["mechanism"] = "/".join(mechanisms[key])
        hit = {q: m for q, m in per_pid[key].items() if m}
        if len(hit) > 1:
            entry["by_pid"] = dict(_sorted_pids(hit))
        events = entry.get("events")
        if isinstance(events, list) and all(isinstance(e, dict) and "t_ns" in e for e in events):
            events.sort(key=lambda e: _int(e["t_ns"]))
        probes.append(entry)
    merged["pids"] = sorted(pids, key=_pid_order)
    merged["probes"] = probes
    merged["errors"] = errors
    return merged


# --------------------------------------------------------------------------------------------
# helpers


def _check(report: Any) -> str | None:
    """Why ``report`` is not a jprobe report, or None."""
    if not isinstance(report, dict):
        return f"a JSON {type(report).__name__ if report is not None else 'null'}, not an object"
    if not isinstance(report.get("probes"), list):
        return 'no "probes" list'
    for i, p in enumerate(report["probes"]):
        if not isinstance(p, dict):
            return f'"probes"[{i}] is not an object'
    errors = report.get("errors")
    if errors is not None and not isinstance(errors, list):
        return '"errors" is not a list'
    return None


def _header(report: dict) -> str:
    pids = report.get("pids")
    if isinstance(pids, list) and len(pids) > 1:
        who = "pids " + ", ".join(str(p) for p in pids)
    elif report.get("pid") is not None:
        who = f"pid {report['pid']}"
    elif isinstance(pids, list) and pids:
        who = f"pid {pids[0]}"
    else:
        who = ""
    exe = report.get("executable")
    return "  ".join(x for x in (who, str(exe) if exe else "") if x)


def _int(v: Any) -> int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def _text(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _module_name(module: Any) -> str:
    if not module:
        return "-"
    module = str(module)
    return os.path.basename(module.rstrip("/")) or module


def _address(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:#x}"
    return _text(v)


def _pid_order(pid: Any) -> tuple:
    try:
        return (0, int(pid), "")
    except (TypeError, ValueError):
        return (1, 0, str(pid))


def _sorted_pids(by_pid: Any) -> list[tuple[str, int]]:
    if not isinstance(by_pid, dict):
        return []
    return [(str(q), _int(n)) for q, n in sorted(by_pid.items(), key=lambda kv: _pid_order(kv[0]))]


def _error_text(err: Any) -> str:
    if isinstance(err, dict):
        message = err.get("message") or err.get("error") or json.dumps(err, sort_keys=True)
        where = err.get("probe")
        message = " ".join(str(message).split())
        return f"{where}: {message}" if where else message
    return " ".join(str(err).split())  # keep it to one line
