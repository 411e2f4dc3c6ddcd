"""The `jprobe` command line (SPEC §2). Bad input: one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from .errors import JprobeError
from .mechanisms import Mechanism

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"jprobe: error: {message}; see `{self.prog} --help`\n")
        sys.exit(EXIT_BAD_INPUT)


def _cmd_patch(args: argparse.Namespace) -> int:
    from .patcher.static import patch_file
    from .spec import parse_probes

    plan = patch_file(args.input, args.output, parse_probes(args.probe), strict=args.strict)
    for p in plan.probes:
        for name in [p.spec, *p.target.split("\n")[1:]]:        # aliases: one site, each name
            print(f"{name:<32} {p.address:#10x}  {p.mechanism:<5}  {p.reason}")
    traps = [p.spec for p in plan.probes if p.mechanism is Mechanism.TRAP]
    if traps:
        sys.stderr.write(f"jprobe: {len(traps)} probe(s) use the int3 fallback (trap): {', '.join(traps)}\n")
    return 0


def _cmd_sites(args: argparse.Namespace) -> int:
    from .coverage import predicted_applier, site_table
    from .elf import STATIC_REASON

    module, rows = site_table(args.input, args.location, args.applier)
    applier = predicted_applier(module, args.applier)
    if module.is_static:
        sys.stderr.write(f"jprobe: note: {module.path}: {STATIC_REASON}: `jprobe patch` and `jprobe run` "
                         f"refuse it\n")
    summary = Counter(r["mechanism"] for r in rows)
    for mechanism in Mechanism:
        summary.setdefault(mechanism, 0)
    tactics = Counter(r["tactic"] for r in rows if r["tactic"])
    if args.json:
        json.dump({"module": os.path.abspath(module.path), "for": applier, "instructions": rows,
                   "summary": dict(summary), "tactics": dict(sorted(tactics.items()))}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    for r in rows:
        print(f"{r['address']:>12}  {r['mechanism']:<5}  {r['instruction']:<40}  {r['reason']}")
    total = len(rows) or 1
    shown = tuple(Mechanism) + (("none",) if summary.get("none") else ())   # none: refused
    print(f"{len(rows)} instructions, {_applier_note(applier, args.applier)}: " + ", ".join(
        f"{m} {summary[m]} ({100.0 * summary[m] / total:.2f}%)" for m in shown))
    if tactics:
        print("tactics: " + ", ".join(f"{t} {n} ({100.0 * n / total:.2f}%)" for t, n in sorted(tactics.items())))
    return 0


def _applier_note(applier: str, asked: str | None) -> str:
    """Which applier a site table predicts, and how to ask for another."""
    if applier == "patch and run":
        return "as `jprobe patch` and `jprobe run` both decide them; `--for attach` for `jprobe attach`"
    others = [a for a in ("patch", "run", "attach") if a != applier]
    how = "" if asked else "; " + ", ".join(f"`--for {a}` for `jprobe {a}`" for a in others)
    return f"as `jprobe {applier}` decides them{how}"


def _cmd_run(args: argparse.Namespace) -> int:
    from .report import format_report
    from .runner import run
    from .spec import parse_probes

    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    if not command:
        raise JprobeError("run: no command given; usage: jprobe run -p PROBE -- CMD [ARGS...]")
    if not args.probe:
        raise JprobeError("run: no probe given; add at least one -p PROBE (e.g. -p libc.so.6:malloc)")
    if args.report:
        from .output import check_writable
        check_writable(args.report, "--report")    # before the program's side effects, not after
    status, report = run(command, parse_probes(args.probe), strict=args.strict, events=args.events,
                         events_json=args.json)
    text = json.dumps(report, indent=1) + "\n" if args.json or args.report else format_report(report)
    if args.report:
        from .counters import never_loaded
        from .output import replacing
        with replacing(args.report, "--report") as tmp, open(tmp, "w") as f:
            f.write(text)
        for module, probes in never_loaded(report).items():
            sys.stderr.write(f"jprobe: note: {module} was never loaded, so its probes were not placed: "
                             f"{', '.join(probes)}\n")
    else:
        sys.stderr.write(text)
    return _strict_status(report, status) if args.strict else status


def _cmd_attach(args: argparse.Namespace) -> int:
    from .session import ENDING, held

    if not args.probe:
        raise JprobeError("attach: no probe given; add at least one -p PROBE (e.g. -p libc.so.6:malloc)")
    if args.duration is not None and args.duration <= 0:
        raise JprobeError(f"attach: --duration {args.duration}: give a number of seconds above 0")
    # Ctrl-C or SIGTERM from here on ends the session normally (SPEC §2): held while jprobe
    # loads and attaches, they end the wait as soon as it begins.
    with held(ENDING):
        return _attach_session(args)


def _attach_session(args: argparse.Namespace) -> int:
    from . import attach
    from .report import format_report
    from .session import wait_for_end

    from .runner import events_out

    with events_out(args.events) as out, attach(args.pid, strict=args.strict) as proc:
        proc.send_events(out, args.json, args.events)
        probes = proc.probes(args.probe)
        if not args.json:
            waiting = [p.spec for p in probes if p.pending]
            also = f", {len(waiting)} waiting for their library to load" if waiting else ""
            sys.stderr.write(f"jprobe: {len(probes) - len(waiting)} probe(s) live in process {args.pid}{also}; "
                             f"{'Ctrl-C to end' if args.duration is None else f'for {args.duration:g} s'}\n")
        why = wait_for_end(args.pid, args.duration, proc.ended)
    why = why or proc.exited
    if why:
        sys.stderr.write(f"jprobe: {why}; the report holds the hits until then\n")
    report = proc.report()
    sys.stdout.write(json.dumps(report, indent=1) + "\n" if args.json else format_report(report))
    return 0


def _strict_status(report: dict, status: int) -> int:
    """Under --strict, a probe the runtime left unpatched (it would have become a trap once
    the program ran: an island's page taken, a module loaded later) fails the run, after the
    program, whose own status is then only named."""
    from .counters import unpatched

    left = unpatched(report)
    if not left:
        return status
    sys.stderr.write(f"jprobe: error: --strict: {', '.join(left)} left unpatched (the report's errors say why; "
                     f"drop --strict to accept the int3 fallback); the program exited with status {status}\n")
    return EXIT_BAD_INPUT


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import format_report, load_report

    sys.stdout.write(format_report(load_report(args.file)))
    return 0


def _common_options(default: object) -> argparse.ArgumentParser:
    """--strict and -v, accepted before and after the command. A subcommand's own defaults
    would overwrite what was given before it (`jprobe --strict patch ...`), so there they
    default to SUPPRESS: not given, not set."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--strict", action="store_true", default=default,
                        help="refuse any probe that would need a trap")
    common.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="show tracebacks of internal errors")
    return common


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a process id; give a number (`pgrep NAME`)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(argparse.SUPPRESS)
    parser = _Parser(prog="jprobe", description="User-space jump probes for x86-64 ELF programs.",
                     parents=[_common_options(False)])
    parser.add_argument("--cflags", action="store_true", help="print the compiler flag for <jprobe.h>")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("patch", parents=[common], help="rewrite an ELF file with probes")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("-p", "--probe", action="append", default=[], metavar="PROBE")
    p.set_defaults(func=_cmd_patch)

    s = sub.add_parser("sites", parents=[common], help="the mechanism each instruction would get")
    s.add_argument("input")
    s.add_argument("location", nargs="?", metavar="LOCATION",
                   help="SYMBOL, SYMBOL+OFFSET or ADDRESS, as -p takes them: that function's instructions")
    s.add_argument("--for", dest="applier", choices=("patch", "run", "attach"),
                   help="decide as this applier would (they differ for short sites)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_sites)

    u = sub.add_parser("run", parents=[common], help="run a command with the probes applied as it loads")
    u.add_argument("-p", "--probe", action="append", default=[], metavar="PROBE")
    u.add_argument("--report", metavar="FILE", help="write the JSON report to FILE instead of stderr")
    u.add_argument("--json", action="store_true", help="print the report, and trace events, as JSON")
    u.add_argument("--events", metavar="FILE", help="write trace events to FILE instead of stderr")
    u.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    u.set_defaults(func=_cmd_run)

    a = sub.add_parser("attach", parents=[common], help="probe a running process, then detach")
    a.add_argument("pid", type=_pid, metavar="PID")
    a.add_argument("-p", "--probe", action="append", default=[], metavar="PROBE")
    a.add_argument("--duration", type=float, metavar="SECONDS", help="end after SECONDS (default: Ctrl-C)")
    a.add_argument("--json", action="store_true", help="print the report as JSON on stdout, and trace events as JSON")
    a.add_argument("--events", metavar="FILE", help="write trace events to FILE instead of stderr")
    a.set_defaults(func=_cmd_attach)

    r = sub.add_parser("report", parents=[common], help="pretty-print a JSON report")
    r.add_argument("file")
    r.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cflags:
        from .runtime import include_dir
        print(f"-I{include_dir()}")
        return 0
    if not args.command:
        parser.error("no command given (patch, run, attach, sites, report)")
    try:
        return args.func(args)
    except JprobeError as e:
        sys.stderr.write(f"jprobe: error: {e}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:           # a bug, not bad input: one line unless -v asks for more
        if args.verbose:
            raise
        sys.stderr.write(f"jprobe: internal error: {type(e).__name__}: {e}; "
                         f"rerun with -v for the traceback, and please report it\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
