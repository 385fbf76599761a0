"""What every `vfio-libvirt` command module shares: parser, input, output, warnings, config.

It lives apart from `cli.py` so that the dependency runs one way only — `cli` wires
`cli_host`, `cli_libvirt` and `cli_config`, and they all lean on this module — instead
of the command modules importing `cli` back while `cli` is still being imported.
Nothing here imports more than the standard library at module level: every CLI run
pays for this module, and most commands never need lxml or libvirt.
"""

from __future__ import annotations

import argparse
import json
import logging
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from vfio_libvirt.errors import InputError

if TYPE_CHECKING:
    from vfio_libvirt.config import Config
    from vfio_libvirt.settings import Settings

PROG = "vfio-libvirt"

Command = Callable[[str, Callable[..., int], str], argparse.ArgumentParser]
"""`command(name, func, help)` → the subparser; what each module's `register` receives."""


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@dataclass
class Finding:
    """One line of `doctor`.  Here, not in cli_libvirt, because the doctor's checks are
    spread over modules (doctor_networks) that cli_libvirt calls, not the other way."""

    level: str  # ok, warn, fail
    what: str
    fix: str = ""
    bad_input: bool = False
    """A fail that is the admin's input (the config): doctor then exits 2, not 1."""

    def to_json(self) -> dict[str, str]:
        return {"level": self.level, "what": self.what, "fix": self.fix}


def read_input(source: str, limit: int) -> bytes:
    """Read a file or `-` (stdin), refusing more than `limit` bytes before parsing."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(source, "rb") as handle:
                data = handle.read(limit + 1)
    except FileNotFoundError:
        raise InputError(f"no such file: {source}") from None
    except OSError as err:
        raise InputError(f"cannot read {source}: {err.strerror}") from None
    if len(data) > limit:
        raise InputError(f"{source}: document larger than {limit} bytes")
    return data


def emit_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def warn(message: str) -> None:
    """One line on stderr that does not change the exit code (scripts read stdout)."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


class _StderrHandler(logging.Handler):
    """The core's log records as the CLI's own stderr lines, `vfio-libvirt: warning: …`.

    The hook sends them to syslog; at a terminal the operator should see what the core
    warns about (a config problem it read around, a device that vanished), in the same
    one-line form as every other message, not Python's bare last-resort output.
    """

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno < logging.ERROR else "error"
        try:
            print(f"{PROG}: {level}: {record.getMessage()}", file=sys.stderr)
        except Exception:
            self.handleError(record)


@contextmanager
def core_logs_to_stderr() -> Iterator[None]:
    """For one command: attached and removed again, so the hook (which may run in the
    same process, in tests) keeps its own logging."""
    logger = logging.getLogger("vfio_libvirt")
    handler = _StderrHandler(logging.WARNING)
    saved_level = logger.level
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)


@contextmanager
def core_logs_silenced() -> Iterator[None]:
    """For commands whose own output already reports everything the core would warn about."""
    logger = logging.getLogger("vfio_libvirt")
    saved = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = saved


def require_valid_config(settings: Settings) -> Config:
    """Commands that change devices on purpose refuse a config with mistakes (exit 2).

    Read before the core reads it, so a bad config is the one line the user sees,
    not each problem as a warning followed by the refusal.
    """
    from vfio_libvirt.config import Config

    config = Config.load(settings.config_path)
    config.require_valid()
    return config


RELOADED_DIR = "reloaded"   # <state dir>/reloaded/<daemon>, touched by install.sh and the package


def reload_marks(state_dir: Path) -> dict[str, float]:
    """When install.sh or the package last reloaded each libvirt daemon (epoch seconds).

    libvirt looks for hooks when a daemon starts or reloads, and a reload leaves no trace
    in /proc: the installers leave one here.  The state dir is a tmpfs, so a mark never
    outlives the boot whose daemons it speaks of.
    """
    marks: dict[str, float] = {}
    try:
        for mark in (state_dir / RELOADED_DIR).iterdir():
            marks[mark.name] = mark.lstat().st_mtime
    except OSError:
        pass
    return marks


def hook_seen_by(start: float, reloaded: float, since: float) -> str:
    """How a running daemon came to run the hooks of a driver that has had one `since`
    (driver_hooks_since): "started" after that, "reloaded" since, or "" when it has not
    looked since (it runs none of them)."""
    if start >= since:
        return "started"
    return "reloaded" if reloaded >= since else ""


def driver_hooks_since(hook: Path) -> float:
    """Since when the driver of `hook` (e.g. qemu.d/) has had an executable hook.

    libvirt decides per driver, at start and reload, whether any hook exists (the main
    script /etc/libvirt/hooks/qemu, or any executable in qemu.d/), and then runs whatever
    qemu.d/ holds at each call: an upgrade that replaces our hook needs no reload, and
    another hook already there made the daemon run ours too.  ctime of the directory
    entry (lstat: the package's link, not its target) says when it appeared; unlike
    mtime, cp -a, tar or a backup restore cannot set it back.
    """
    if hook.parent.suffix == ".d":              # qemu.d/vfio-libvirt: hooks/qemu and qemu.d/
        main, hook_dir = hook.parent.with_suffix(""), hook.parent
    else:                                       # the main script itself: hooks/qemu
        main, hook_dir = hook, hook.with_name(hook.name + ".d")
    candidates = [main, hook]
    with suppress(OSError):
        candidates += list(hook_dir.iterdir())
    times = [t for t in map(_runnable_since, candidates) if t is not None]
    if times:
        return min(times)
    try:
        return hook.lstat().st_ctime
    except OSError:             # gone meanwhile (a removal in progress): never seen
        return float("inf")


def _runnable_since(path: Path) -> float | None:
    """The entry's ctime if libvirt would run it, else None."""
    if hook_problem(path):
        return None
    try:
        return path.lstat().st_ctime
    except OSError:
        return None


def hook_problem(hook: Path) -> str:
    """Why libvirt would not run the hook ('' when it would): as its virFileIsExecutable,
    a regular file (links followed) with any execute bit, since libvirt runs it as root."""
    try:
        mode = hook.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "not installed"
    except OSError as err:
        return f"not readable by this user ({err.strerror}; run doctor as root)"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return "" if mode & 0o111 else "not executable"
