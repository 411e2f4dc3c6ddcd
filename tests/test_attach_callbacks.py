"""`jprobe attach` with C callbacks (issue 12, part 2): the library is loaded into the running
process by a thread of its own, started from a thread borrowed where it holds no lock, whose
registers (vector state included) go back as they were."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import jprobe
from jprobe.errors import HandlerError
from support.build import RUNTIME_INCLUDE

LIB_FLAGS = ["-O2", "-shared", "-fPIC", f"-I{RUNTIME_INCLUDE}"]


class Target:
    """attach_cb_target, driven through its stdin and stdout."""

    def __init__(self, path):
        self.proc = subprocess.Popen([str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid

    def run(self, n: int) -> int:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        done, count, total = self.proc.stdout.readline().split()
        assert (done, int(count)) == ("done", n)
        return int(total)

    def quit(self) -> str:
        out, _ = self.proc.communicate("quit\n", timeout=30)
        return out

    def maps(self) -> list[str]:
        with open(f"/proc/{self.pid}/maps") as f:
            return f.read().splitlines()


def expected(n: int, seven_as: int = 7) -> int:
    return sum(3 * (seven_as if i == 7 else i) + 1 for i in range(n))


@pytest.fixture
def target(build):
    t = Target(build("attach_cb_target.c", ["-O2", "-g", "-pthread"], out_name="attach_cb_target"))
    yield t
    if t.proc.poll() is None:
        t.proc.kill()
        t.proc.wait()


@pytest.fixture
def callback(build) -> str:
    return str(build("attach_cb.c", LIB_FLAGS, out_name="libattach_cb.so"))


def test_a_callback_runs_and_writes_a_register(target, callback):
    with jprobe.attach(target.pid) as proc:
        p = proc.probe(f"work={callback}:on_work")
        assert target.run(100) == expected(100, seven_as=8)
        assert (p.hits, p.missed) == (100, 0)
        assert proc.report()["probes"][0]["callback_skipped"] == 0
    assert target.run(100) == expected(100)
    assert target.quit() == "ok bad=0\n"


def test_the_library_is_loaded_once_across_attaches(target, callback):
    sizes = []
    for _ in range(5):
        with jprobe.attach(target.pid) as proc:
            p = proc.probe(f"work={callback}:on_work")
            assert target.run(50) == expected(50, seven_as=8) and p.hits == 50
        sizes.append(len(target.maps()))
        assert sum("jprobe-lib:" in line for line in target.maps()) >= 1
    assert len(set(sizes)) == 1, sizes                 # no mapping added after the first attach
    assert target.quit() == "ok bad=0\n"


def test_a_library_the_process_cannot_load_is_refused_with_its_reason(target, build):
    broken = str(build("attach_cb_broken.c", LIB_FLAGS, out_name="libattach_cb_broken.so"))
    with jprobe.attach(target.pid) as proc:
        with pytest.raises(HandlerError, match="jprobe_test_nowhere"):
            proc.probe(f"work={broken}:on_work")
    assert target.run(10) == expected(10)              # nothing was patched
    assert target.quit() == "ok bad=0\n"


def test_a_missing_library_or_function(target, callback, tmp_path):
    with jprobe.attach(target.pid) as proc:
        with pytest.raises(HandlerError, match="not found"):
            proc.probe(f"work={tmp_path}/nope.so:on_work")
        with pytest.raises(HandlerError, match="nope"):
            proc.probe(f"work={callback}:nope")
    assert target.quit() == "ok bad=0\n"


def test_a_process_in_another_mount_namespace(build, callback):
    """Its program is where jprobe cannot see it (a tmpfs of its own mount namespace, as in a
    container): jprobe reads it through /proc/PID/root, and the callback library reaches the
    process as a memfd, whatever paths it can see."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to make a mount namespace")
    program = build("attach_cb_target.c", ["-O2", "-g", "-pthread"], out_name="attach_cb_target")
    script = f"mount -t tmpfs tmpfs /mnt && cp {program} /mnt/target && exec /mnt/target"
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        assert not os.path.exists("/mnt/target") and os.readlink(f"/proc/{proc.pid}/exe") == "/mnt/target"
        target = Target.__new__(Target)
        target.proc, target.pid = proc, proc.pid
        with jprobe.attach(proc.pid) as attached:
            p = attached.probe(f"work={callback}:on_work")
            assert target.run(20) == expected(20, seven_as=8) and p.hits == 20
            assert p.module == "/mnt/target"
        assert target.quit() == "ok bad=0\n"
    finally:
        proc.kill()
        proc.wait()


def test_the_borrowed_thread_gets_its_vector_state_back(build, callback):
    """The process's only thread is busy in its own code with a sum kept in vector registers:
    it is the one borrowed to start the loader thread, and must resume with every register
    as it was (the resume pad's xrstor), in each of several processes."""
    program = build("attach_fp_target.c", ["-O2", "-g"], out_name="attach_fp_target")
    for _ in range(8):
        t = Target(program)
        try:
            with jprobe.attach(t.pid) as proc:
                p = proc.probe(f"work={callback}:on_work")
                assert t.run(20) == expected(20, seven_as=8) and p.hits == 20
            assert t.quit() == "ok bad=0\n"
        finally:
            t.proc.kill()
            t.proc.wait()
