"""`vfio-libvirt config check`: find the mistakes in the host config before the hook does.

The hook reads the config leniently (a typo must not stop a VM or keep a device from
going home), so a mistake would otherwise only show up as a warning in syslog.  This
command is the strict reading an admin (or Ansible, after templating the file) runs:
every problem with its line, and an exit code to act on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vfio_libvirt.cli_common import Command, emit_json
from vfio_libvirt.errors import InputError
from vfio_libvirt.settings import Settings


def cmd_config_check(args: argparse.Namespace, settings: Settings) -> int:
    from vfio_libvirt.config import Config

    path = Path(args.file) if args.file else settings.config_path
    if args.file and not path.exists():
        raise InputError(f"no such file: {path}")  # the default path may be absent: defaults
    try:
        config = Config.load(path)
    except InputError as err:
        if not args.json:
            raise
        emit_json({"path": str(path), "ok": False, "error": str(err), "problems": []})
        return err.exit_code
    if args.json:
        emit_json({"path": str(path), "ok": not config.problems, "error": None,
                   "problems": [p.__dict__ for p in config.problems]})
    elif config.problems:
        for problem in config.problems:
            print(problem)
    else:
        print(f"config {path}: ok" + ("" if path.exists() else " (no such file: the defaults apply)"))
    return 2 if config.problems else 0


def register(command: Command) -> None:
    """`config` has one subcommand today; the nesting leaves room (e.g. `config show`)."""
    p = command("config", _usage, "check the host config (VFIO_LIBVIRT_CONFIG)")
    sub = p.add_subparsers(dest="config_command", metavar="check", required=True,
                           parser_class=type(p))
    check = sub.add_parser("check", help="report every mistake with its line; exit 2 if any",
                           description="report every mistake in the host config with its line; "
                                       "exit 2 if there is any")
    check.set_defaults(func=cmd_config_check)
    check.add_argument("--file", metavar="PATH", help="check this file instead of VFIO_LIBVIRT_CONFIG")
    check.add_argument("--json", action="store_true")


def _usage(args: argparse.Namespace, settings: Settings) -> int:  # pragma: no cover
    raise InputError("config: give a subcommand: check")  # argparse requires one first
