"""What both libvirt hooks (qemu and network) share: how a run answers libvirt.

libvirt waits for a hook with no timeout and shows its stderr to the user, so every
run turns any failure into one line and an exit code, logs details to syslog only,
and may do its work in a detached child that answers on time (detach.py).
Imports nothing beyond the standard library's basics: both hooks' fast paths load it.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

PREFIX = "vfio-libvirt"


def hook_words(argv: Sequence[str] | None, hook: str, subject: str) -> tuple[str, str, str] | None:
    """(subject, op, subop) from libvirt's `<hook> <subject> <op> <subop> <extra…>` (sys.argv
    when `argv` is None); None after a usage line on stderr when words are missing."""
    words = list(sys.argv if argv is None else argv)
    if len(words) < 4:
        print(f"{PREFIX}: usage: {words[0] if words else hook} {subject} OP SUBOP [EXTRA…]",
              file=sys.stderr)
        return None
    return words[1], words[2], words[3]


def journal_exists() -> bool:
    """A journal, or one set aside as unreadable (a restore must say so): work to do."""
    state_dir = os.environ.get("VFIO_LIBVIRT_STATE_DIR") or "/run/vfio-libvirt"
    try:
        names = os.listdir(state_dir)
    except OSError:
        return False
    return any(n == "journal.json" or n.startswith("journal.unreadable.") for n in names)


def run(label: str, action, detach: bool) -> int:
    """`action(channel)` in this process (channel None), or in a detached child (detach.py)."""
    if not detach:
        return guarded(label, lambda: action(None))
    from vfio_libvirt import detach as detached

    return detached.run(lambda channel: guarded(label, lambda: action(channel)), f"{PREFIX}: {label}")


def answer_early(host, channel, label: str, seconds: float) -> None:
    """Promise the parent an answer within `seconds`, and let the run answer before it ends."""
    if channel is None:
        return
    channel.promise(time.monotonic() + seconds)

    def answer(code: int, line: str) -> None:
        print(f"{PREFIX}: {label}: {line}", file=sys.stderr)
        channel.answer(code, final=False)

    host.answer = answer


def print_preview(host, domain) -> int:
    """A dry run's start: print the plan, and exit as the start would (2: bad input)."""
    from vfio_libvirt.views import preview

    plan = preview(host, domain)
    for step in plan.steps:
        print(step.describe())
    for problem in plan.problems:
        print(f"refused: {problem}")
    return (2 if plan.bad_input else 1) if plan.problems else 0


def guarded(label: str, action) -> int:
    """Run `action` with logging set up; turn every failure into one line and an exit code."""
    import logging

    from vfio_libvirt.errors import VfioLibvirtError

    setup_logging()
    try:
        return action()
    except VfioLibvirtError as err:
        logging.getLogger("vfio_libvirt").error("%s: %s", label, err)
        print(f"{PREFIX}: {label}: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        logging.getLogger("vfio_libvirt").exception("%s: internal error", label)
        print(f"{PREFIX}: {label}: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def setup_logging() -> None:
    """Log to the system journal/syslog, tagged, with domain and BDF in every message."""
    import logging
    import logging.handlers

    logger = logging.getLogger("vfio_libvirt")
    if logger.handlers:
        return
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # stderr is for the one line libvirt shows the user; details go to syslog only
    logger.addHandler(logging.NullHandler())
    address = os.environ.get("VFIO_LIBVIRT_SYSLOG", "/dev/log")
    if address and os.path.exists(address):
        try:
            handler = logging.handlers.SysLogHandler(address=address)
        except OSError:
            return
        handler.setFormatter(logging.Formatter(f"{PREFIX}[%(process)d]: %(message)s"))
        logger.addHandler(handler)
