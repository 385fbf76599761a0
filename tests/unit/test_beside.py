"""tests/support/beside.py: joining the unit tier tests/run runs in the background with
libvirt-python hidden.  A failed or hung background run must fail the session, never
pass unseen."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.support import beside


def _finished(where, rc: int, log: str):
    where.mkdir(exist_ok=True)
    (where / "log").write_text(log)
    (where / "rc").write_text(f"{rc}\n")
    return where


def test_a_passed_run_gives_its_counts_and_its_directory_goes(tmp_path):
    where = _finished(tmp_path / "run", 0, "....\n761 passed, 10 skipped in 151.20s (0:02:31)\n")
    waited = []
    outcome = beside.join(where, timeout=5, waiting=lambda: waited.append(1))
    assert outcome == beside.Outcome(True, f"{beside.TITLE}: 761 passed, 10 skipped", "")
    assert (where / "joined").exists() and waited == []    # tests/run: the session saw it


def test_a_failed_run_fails_with_its_log_kept(tmp_path):
    log = "F...\nFAILED tests/unit/test_x.py::test_y - assert 1 == 2\n1 failed, 760 passed in 150.00s\n"
    where = _finished(tmp_path / "run", 1, log)
    outcome = beside.join(where, timeout=5)
    assert not outcome.passed
    assert outcome.line == f"{beside.TITLE}: FAILED (exit 1): 1 failed, 760 passed"
    assert "FAILED tests/unit/test_x.py::test_y" in outcome.log_tail


def test_a_run_that_never_ends_is_stopped_and_fails(tmp_path):
    where = tmp_path / "run"
    where.mkdir()
    hung = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (where / "pid").write_text(f"{hung.pid}\n")
        started = time.monotonic()
        outcome = beside.join(where, timeout=1)
        assert time.monotonic() - started < 5
        assert not outcome.passed and "no result after 1 s" in outcome.line
        assert hung.wait(timeout=10) != 0      # its process group got SIGTERM
    finally:
        if hung.poll() is None:
            hung.kill()
            hung.wait()


def test_the_session_says_it_waits_for_a_run_still_going(tmp_path):
    where = tmp_path / "run"
    where.mkdir()
    writer = subprocess.Popen(["sh", "-c", f"sleep 1; echo '5 passed in 1s' > {where}/log; "
                               f"echo 0 > {where}/rc.new; mv {where}/rc.new {where}/rc"])
    try:
        waited = []
        outcome = beside.join(where, timeout=30, waiting=lambda: waited.append(1))
        assert outcome.passed and outcome.line.endswith(": 5 passed") and waited == [1]
    finally:
        writer.wait(timeout=10)


def test_an_interrupted_wait_stops_the_run(tmp_path):
    """Ctrl-C while the session waits: the run has its own session (the terminal's SIGINT
    never reaches it), so the wait must stop it before giving way."""
    where = tmp_path / "run"
    where.mkdir()
    run = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (where / "pid").write_text(f"{run.pid}\n")

        def interrupted() -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            beside.join(where, timeout=30, waiting=interrupted)
        assert run.wait(timeout=10) != 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def test_no_directory_named_means_no_background_run(monkeypatch):
    monkeypatch.delenv(beside.ENV, raising=False)
    assert beside.directory() is None
    monkeypatch.setenv(beside.ENV, "/tmp/somewhere")
    assert str(beside.directory()) == "/tmp/somewhere"
    assert os.environ[beside.ENV] == "/tmp/somewhere"
