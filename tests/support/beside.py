"""The unit tier that tests/run starts in the background with libvirt-python hidden.

It runs beside provisioning and the session's own unit tier, one core each, instead of
before them: that saves its whole duration on a 2-core CI machine.  The session waits for
it before the first QEMU guest boots (a guest under TCG wants both cores), reports its
counts in the terminal summary and fails when it failed.  tests/run names its directory
in VFIO_LIBVIRT_UNIT_BESIDE: `pid` (its process group), `log`, and `rc` once it ended;
tests/run stops it and removes the directory when it exits, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ENV = "VFIO_LIBVIRT_UNIT_BESIDE"
WAIT_SECONDS = 1800.0    # far beyond its ~3 min; a hung run fails the session, not CI's clock
TITLE = "unit tier without libvirt-python"


@dataclass(frozen=True)
class Outcome:
    passed: bool
    line: str        # "unit tier without libvirt-python: 761 passed, 10 skipped"
    log_tail: str    # the end of its log when it failed, else ""


def directory() -> Path | None:
    where = os.environ.get(ENV)
    return Path(where) if where else None


def join(where: Path, timeout: float = WAIT_SECONDS,
         waiting: Callable[[], None] = lambda: None) -> Outcome:
    """Wait for the background run to end (`waiting()` first, if it has not); its outcome.

    Marks the directory `joined` (tests/run reports a failure itself only where no session
    got this far).  Anything that interrupts the wait, Ctrl-C included, stops the run:
    it has its own session, so the terminal's signals never reach it.
    """
    rc_file = where / "rc"      # written by rename: it is complete once it exists
    try:
        if not rc_file.exists():
            waiting()
        deadline = time.monotonic() + timeout
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
    except BaseException:
        stop(where)
        raise
    with contextlib.suppress(OSError):
        (where / "joined").touch()
    log = where / "log"
    text = log.read_text(errors="replace") if log.exists() else ""
    if not rc_file.exists():
        stop(where)
        return Outcome(False, f"{TITLE}: no result after {timeout:.0f} s (stopped)", text[-4000:])
    rc = rc_file.read_text().strip()
    last = text.rstrip().splitlines()[-1] if text.strip() else "no output"
    counts = re.sub(r"\s*in [0-9.]+s.*$", "", last.strip("= "))
    if rc == "0":
        return Outcome(True, f"{TITLE}: {counts}", "")
    return Outcome(False, f"{TITLE}: FAILED (exit {rc}): {counts}", text[-6000:])


def stop(where: Path) -> None:
    """Stop the background run and everything it started (its own process group)."""
    with contextlib.suppress(OSError, ValueError):
        os.killpg(int((where / "pid").read_text()), signal.SIGTERM)
