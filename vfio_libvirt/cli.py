"""`vfio-libvirt` command line: inspect, plan, bind and restore by hand.

Only orchestration lives here; every decision is made by the core modules.  Errors
the product raises on purpose become one line on stderr and exit 2 (bad input) or 1
(failure); anything else becomes one line too, with the traceback behind
VFIO_LIBVIRT_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vfio_libvirt.cli_common import PROG, Parser, core_logs_to_stderr, emit_json, read_input
from vfio_libvirt.errors import InputError, OperationError, VfioLibvirtError
from vfio_libvirt.settings import Settings


# --- commands ----------------------------------------------------------------------
def cmd_resolve(args: argparse.Namespace, settings: Settings) -> int:
    from vfio_libvirt.aliases import AliasTable
    from vfio_libvirt.pci import PciAddress
    from vfio_libvirt.sysfs import Sysfs

    if (args.bdf is None) == (args.modalias is None):
        raise InputError("give either a PCI address or --modalias")
    if args.bdf is not None:
        modalias = Sysfs(settings.sysfs_root).modalias(PciAddress.parse(args.bdf))
    else:
        modalias = args.modalias
    alias_file = Path(args.alias_file) if args.alias_file else None
    resolution = AliasTable.load(settings.modules_dir, alias_file).resolve(modalias)
    if args.json:
        emit_json(resolution.to_json())
    else:
        print(f"modalias: {resolution.modalias}")
        for rank, cand in enumerate(resolution.candidates, 1):
            mark = "*" if rank == 1 else " "
            print(f"{mark} {rank:>2}. {cand.module:<24} {cand.wildcards} wildcards  {cand.pattern}")
    if resolution.best is None:
        raise OperationError(f"no VFIO driver alias matches {modalias} (is vfio_pci available?)")
    return 0


def cmd_hostdevs(args: argparse.Namespace, settings: Settings) -> int:
    from vfio_libvirt.domain import MAX_XML_BYTES, Domain

    domain = Domain.from_xml(read_input(args.xml, MAX_XML_BYTES))
    if args.json:
        emit_json([h.to_json() for h in domain.hostdevs])
        return 0
    for h in domain.hostdevs:
        managed = "managed" if h.managed else "unmanaged"
        model = f"  model={h.driver_model}" if h.driver_model else ""
        print(f"{h.address}  {h.origin:<9}  {managed}{model}")
    if not domain.hostdevs:
        print(f"domain {domain.name} assigns no host PCI devices")
    return 0


# --- wiring ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Bind libvirt hostdevs to their best VFIO driver.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name: str, func: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = command("resolve", cmd_resolve, "show the VFIO driver aliases that match a device, best first")
    p.add_argument("bdf", nargs="?", help="PCI address, e.g. 0000:06:12.5")
    p.add_argument("--modalias", help="a modalias string instead of a device (pci:v…)")
    p.add_argument("--alias-file", help="read this modules.alias instead of the running kernel's")
    p.add_argument("--json", action="store_true")

    p = command("hostdevs", cmd_hostdevs, "list the host PCI devices a domain XML assigns")
    p.add_argument("--xml", required=True, metavar="FILE", help="domain XML file, or - for stdin")
    p.add_argument("--json", action="store_true")

    # one-way: these modules lean on cli_common, never on this module
    from vfio_libvirt import cli_config, cli_holders, cli_host, cli_libvirt

    cli_host.register(command)
    cli_libvirt.register(command)
    cli_config.register(command)
    cli_holders.register(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with core_logs_to_stderr():
            return args.func(args, Settings.from_env())
    except VfioLibvirtError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if os.environ.get("VFIO_LIBVIRT_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
