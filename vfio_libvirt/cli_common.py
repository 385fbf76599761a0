"""What every `vfio-libvirt` command module shares: the parser, input, output, warnings.

It lives apart from `cli.py` so that the dependency runs one way only — `cli` wires
`cli_host`, `cli_libvirt` and `cli_config`, and they all lean on this module — instead
of the command modules importing `cli` back while `cli` is still being imported.
Nothing here imports more than the standard library at module level: every CLI run
pays for this module, and most commands never need lxml or libvirt.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from vfio_libvirt.errors import InputError

if TYPE_CHECKING:
    from vfio_libvirt.config import Config

PROG = "vfio-libvirt"

Command = Callable[[str, Callable[..., int], str], argparse.ArgumentParser]
"""`command(name, func, help)` → the subparser; what each module's `register` receives."""


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def warn_config_problems(config: Config) -> None:
    """For commands that must go on despite a mistyped config (restore, status).

    A typo in the host config must never keep a device from going home, so these
    commands use the config's safe reading and only say, once per problem, what they
    ignored.
    """
    for problem in config.problems:
        warn(f"config {problem} (using the safe reading)")
