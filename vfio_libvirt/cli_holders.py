"""`vfio-libvirt holders BDF`: what this host uses a PCI device for right now.

The same reader the start guard uses, so an admin sees exactly why a device would be
refused (a mounted root filesystem, the default route, the console, live VFs) before
giving it to a VM.  It only reads; nothing holding the device is still a success.
"""

from __future__ import annotations

import argparse

from vfio_libvirt.cli_common import Command, emit_json
from vfio_libvirt.settings import Settings

VERDICTS = {
    "critical": "critical: unbinding its driver would break this host",
    "in_use": "in use: something on this host is using it",
    "free": "free: nothing on this host holds it",
}


def cmd_holders(args: argparse.Namespace, settings: Settings) -> int:
    from vfio_libvirt.holders import HolderReader
    from vfio_libvirt.pci import PciAddress

    address = PciAddress.parse(args.bdf)
    found = HolderReader(settings.sysfs_root, settings.ip).read(address)
    if args.json:
        emit_json(found.to_json())
        return 0
    print(f"{address}: {VERDICTS[found.verdict]}")
    for holder in found.holders:
        print(f"  {holder.severity:<8}  {holder}")
    return 0


def register(command: Command) -> None:
    """Add this module's command; `command(name, func, help)` returns a subparser."""
    p = command("holders", cmd_holders,
                "what this host uses a PCI device for now: mounts, routes, console, VFs, processes")
    p.add_argument("bdf", help="PCI address, e.g. 0000:03:00.0")
    p.add_argument("--json", action="store_true")
