"""The unit tier that tests/run starts in the background with libvirt-python hidden.

It runs beside provisioning and the session's own unit tier, one core each, instead of
before them: that saves its whole duration on a 2-core CI machine.  The session waits for
it before the first QEMU guest boots (a guest under TCG wants both cores), reports its
counts in the terminal summary and fails when it failed.  tests/run names its directory
in VFIO_LIBVIRT_UNIT_BESIDE: `pid` (its process group), `log`, and `rc` once it ended.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
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


def join(where: Path, timeout: float = WAIT_SECONDS) -> Outcome:
    """Wait for the background run to end; its outcome.  Its directory goes once it passed."""
    rc_file = where / "rc"
    deadline = time.monotonic() + timeout
    while not rc_file.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    log = where / "log"
    text = log.read_text(errors="replace") if log.exists() else ""
    if not rc_file.exists():
        stop(where)
        return Outcome(False, f"{TITLE}: no result after {timeout:.0f} s (stopped)", text[-4000:])
    rc = rc_file.read_text().strip()
    last = text.rstrip().splitlines()[-1] if text.strip() else "no output"
    counts = re.sub(r"\s*in [0-9.]+s.*$", "", last.strip("= "))
    if rc == "0":
        shutil.rmtree(where, ignore_errors=True)
        return Outcome(True, f"{TITLE}: {counts}", "")
    return Outcome(False, f"{TITLE}: FAILED (exit {rc}): {counts}; log {log}", text[-6000:])


def stop(where: Path) -> None:
    """Stop the background run and everything it started (its own process group)."""
    with contextlib.suppress(OSError, ValueError):
        os.killpg(int((where / "pid").read_text()), signal.SIGTERM)
