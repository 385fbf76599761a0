"""Answer libvirt on time even when the kernel does not: the hook's work runs in a child.

libvirtd waits for a hook until its stdout and stderr close and the process can be
reaped, with no timeout.  A thread asleep in an uninterruptible write(2) (a driver's
remove() waiting for its users) keeps its whole process alive and its files open, so
the process libvirt waits on must never be the one that writes to sysfs.  The hook
forks once, before any thread exists: the child does the work with stdio on /dev/null,
and sends the parent its answer (exit code and the lines for stdout/stderr) over a
pipe, either at the end or early, when the run gave up waiting for the kernel
(stuck.py).  The parent relays the answer and exits; a child still waiting for the
kernel carries on alone, holding the domain lock, and finishes the job.

The parent trusts nothing: the child promises a time by which it answers, and past
that (plus a grace) the parent answers for it.
"""

from __future__ import annotations

import io
import json
import os
import select
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

FIRST_PROMISE = 30.0
"""Seconds the child has to say by when it answers (it reads the config first)."""
GRACE = 2.0
"""Seconds past the child's promise before the parent answers for it."""


class Channel:
    """The child's end: one promise or more, then one answer; later answers are dropped."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def promise(self, by: float) -> None:
        """Answer by time.monotonic() `by` (the clock is shared with the parent)."""
        self._send({"by": by})

    def answer(self, code: int, *, final: bool = True) -> None:
        """`final` False: the work goes on after this answer (the parent need not reap)."""
        stdout, stderr = sys.stdout, sys.stderr
        self._send({
            "exit": code, "final": final,
            "stdout": stdout.getvalue() if isinstance(stdout, io.StringIO) else "",
            "stderr": stderr.getvalue() if isinstance(stderr, io.StringIO) else "",
        })
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _send(self, message: dict[str, object]) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, json.dumps(message).encode() + b"\n")
        except OSError:  # the parent is gone (killed): nobody left to tell
            os.close(self._fd)
            self._fd = None


def run(work: Callable[[Channel], int], prefix: str) -> int:
    """Run `work` in a detached child; return its answer's exit code (relaying its output)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child; tests run it through a real process
        os.close(read_end)
        _become_detached()
        channel = Channel(write_end)
        code = 1
        try:
            code = work(channel)
        except BaseException as err:  # the parent must always hear something
            print(f"{prefix}: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        finally:
            channel.answer(code)
            os._exit(code)
    os.close(write_end)
    try:
        return _await_answer(read_end, pid, prefix)
    finally:
        os.close(read_end)


def _become_detached() -> None:
    """Own session, stdio on /dev/null: libvirt's pipes close when the parent exits."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    sys.stdin = open(os.devnull)  # noqa: SIM115 -- lives as long as the process
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()


def _await_answer(fd: int, pid: int, prefix: str) -> int:
    by = time.monotonic() + FIRST_PROMISE
    buffer = b""
    while True:
        left = by + GRACE - time.monotonic()
        if left <= 0:
            print(f"{prefix}: no answer from worker pid {pid} in time; it goes on in the background "
                  "(see: vfio-libvirt status)", file=sys.stderr)
            return 1
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            code = _reap(pid)
            print(f"{prefix}: worker pid {pid} ended without an answer"
                  + (f" (status {code})" if code is not None else ""), file=sys.stderr)
            return 1
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            message = json.loads(line)
            if "by" in message:
                by = float(message["by"])
                continue
            sys.stdout.write(message.get("stdout", ""))
            sys.stderr.write(message.get("stderr", ""))
            if message.get("final", True):
                _reap(pid)
            return int(message["exit"])


def _reap(pid: int, seconds: float = 0.2) -> int | None:
    """Collect the child if it ends within `seconds`; one stuck in the kernel is left to init."""
    until = time.monotonic() + seconds
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= until:
            return None
        time.sleep(0.005)
