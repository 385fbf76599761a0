"""The hook answers libvirt from a parent process while a detached child does the work.

Each case runs `detach.run` in a fresh interpreter, as libvirtd runs the hook: with
stdout and stderr on pipes, which `communicate()` reads until every writer has closed
them.  So a prompt return proves the child let go of libvirt's pipes, not only that
the parent exited.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_script(body: str, tmp_path: Path, timeout: float = 20) -> tuple[subprocess.CompletedProcess, float]:
    script = textwrap.dedent("""
        import os, sys, time
        from vfio_libvirt import detach
        marker = sys.argv[1]
    """) + textwrap.dedent(body)
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "marker")], capture_output=True, text=True, check=False,
        timeout=timeout, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    return proc, time.monotonic() - began


def wait_for(path: Path, seconds: float) -> str:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if path.exists():
            return path.read_text()
        time.sleep(0.02)
    return ""


def test_an_early_answer_returns_at_once_and_the_child_finishes_alone(tmp_path):
    proc, took = run_script("""
        def work(channel):
            channel.promise(time.monotonic() + 5)
            print("dev: unbind stuck", file=sys.stderr)
            channel.answer(1, final=False)
            time.sleep(2)  # the kernel, keeping a write
            with open(marker, "w") as f:
                f.write(f"finished in {os.getpid()} after its parent left")
            return 0
        sys.exit(detach.run(work, "p"))
    """, tmp_path)
    assert proc.returncode == 1 and proc.stderr == "dev: unbind stuck\n" and proc.stdout == ""
    assert took < 1.5  # not the child's 2 s: its stdio is not libvirt's pipes
    assert not (tmp_path / "marker").exists()
    assert wait_for(tmp_path / "marker", 5).startswith("finished in")


def test_a_final_answer_relays_output_and_exit_code(tmp_path):
    proc, _ = run_script("""
        def work(channel):
            channel.promise(time.monotonic() + 5)
            print("a plan line")
            print("vm: refused", file=sys.stderr)
            return 2
        sys.exit(detach.run(work, "p"))
    """, tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "a plan line\n", "vm: refused\n")


def test_a_child_past_its_promise_is_answered_for(tmp_path):
    proc, took = run_script("""
        detach.GRACE = 0.2
        def work(channel):
            channel.promise(time.monotonic() + 0.3)
            time.sleep(3)  # its main thread is stuck somewhere it should not be
            return 0
        sys.exit(detach.run(work, "p"))
    """, tmp_path)
    assert proc.returncode == 1 and "no answer from worker pid" in proc.stderr
    assert 0.4 < took < 2.0


def test_a_child_that_dies_without_answering_is_reported(tmp_path):
    proc, _ = run_script("""
        def work(channel):
            os._exit(3)
        sys.exit(detach.run(work, "p"))
    """, tmp_path)
    assert proc.returncode == 1 and proc.stderr == "p: worker pid " + proc.stderr.split()[3] + \
        " ended without an answer (status 3)\n"


def test_an_exception_in_the_child_is_one_line(tmp_path):
    proc, _ = run_script("""
        def work(channel):
            raise RuntimeError("boom")
        sys.exit(detach.run(work, "p"))
    """, tmp_path)
    assert (proc.returncode, proc.stderr) == (1, "p: internal error: RuntimeError: boom\n")
