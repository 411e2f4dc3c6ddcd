"""Probes on a library the process loads after jprobe attached (issue 12, part 4): they wait,
and are placed when the library is loaded, before any of its code (its constructor included)
runs."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import jprobe
from support.run import child_env


class Host:
    def __init__(self, path):
        self.proc = subprocess.Popen([str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid

    def say(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()


@pytest.fixture
def host(build):
    h = Host(build("attach_host.c", ["-O2", "-g"], out_name="attach_host"))
    yield h
    h.proc.kill()
    h.proc.wait()


@pytest.fixture(params=["-O0", "-O2"])
def plugin(build, request) -> str:
    return str(build("attach_plugin.c", [request.param, "-g", "-shared", "-fPIC"],
                     out_name=f"libattach_plugin{request.param}.so"))


def plug_sum(n: int) -> int:
    return sum(5 * i - 1 for i in range(n))


def test_a_probe_waits_for_its_library_and_sees_its_constructor(host, plugin):
    with jprobe.attach(host.pid) as proc:
        p = proc.probe(f"{plugin.rsplit('/', 1)[1]}:plug")
        assert (p.pending, p.mechanism, p.hits) == (True, "pending", 0)
        assert proc.report()["probes"][0]["loaded"] is False
        started = time.monotonic()
        assert host.say(f"load {plugin}") == "loaded 1"
        assert time.monotonic() - started < 1.5           # answered, not timed out
        assert (p.pending, p.mechanism, p.hits) == (False, "jump", 2)      # the constructor's calls
        assert host.say("100") == f"done 100 {plug_sum(100)}"
        assert p.hits == 102
        assert "loaded" not in proc.report()["probes"][0]
    assert host.say("10") == f"done 10 {plug_sum(10)}" and p.hits == 102


def test_a_probe_removed_while_waiting_is_never_placed(host, plugin):
    with jprobe.attach(host.pid) as proc:
        p = proc.probe(f"{plugin.rsplit('/', 1)[1]}:plug")
        proc.remove(p)
        assert host.say(f"load {plugin}") == "loaded 1"
        assert host.say("10") == f"done 10 {plug_sum(10)}"
        assert p.hits == 0 and p.removed


def test_loads_after_detach_are_not_held_up(host, plugin):
    with jprobe.attach(host.pid) as proc:
        proc.probe(f"{plugin.rsplit('/', 1)[1]}:plug")
    started = time.monotonic()
    assert host.say(f"load {plugin}") == "loaded 1"
    assert time.monotonic() - started < 0.5
    assert host.say("10") == f"done 10 {plug_sum(10)}"


def test_jprobe_run_probes_a_plugin_the_program_loads_by_its_own_path(build, plugin, tmp_path):
    """`jprobe run -p libplugin.so:f`: the loader would not find the library (the program
    dlopen()s it by a path of its own), so the probe waits for it, as under attach."""
    program = build("attach_host.c", ["-O2", "-g"], out_name="attach_host")
    name = plugin.rsplit("/", 1)[1]
    cmd = [sys.executable, "-m", "jprobe", "run", "-p", f"{name}:plug", "-p", "libc.so.6:getenv",
           "--report", str(tmp_path / "r.json"), "--", str(program)]
    r = subprocess.run(cmd, input=f"load {plugin}\n100\n0\n", capture_output=True, text=True,
                       env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"ready\nloaded 1\ndone 100 {plug_sum(100)}\n"
    report = json.loads((tmp_path / "r.json").read_text())
    entry = next(p for p in report["probes"] if p["probe"] == f"{name}:plug")
    assert (entry["hits"], entry["mechanism"], entry["module"]) == (102, "jump", plugin)
    assert report["errors"] == []


def test_jprobe_run_says_when_the_plugin_never_loaded(build, plugin, tmp_path):
    program = build("attach_host.c", ["-O2", "-g"], out_name="attach_host")
    cmd = [sys.executable, "-m", "jprobe", "run", "-p", "libnever_there.so:plug", "--", str(program)]
    r = subprocess.run(cmd, input="0\n", capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 0 and "never loaded" in r.stderr, r.stderr
