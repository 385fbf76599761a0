"""The console: which framebuffer fbcon draws on, and which one unbinding would take.

fbcon maps every console to the primary framebuffer unless told otherwise (`fbcon=map:`,
con2fbmap — neither visible in sysfs): fb0, the first registered, which on a PC is the
boot VGA device's.  So fb0 and any framebuffer of the boot VGA device are the console's
while fbcon is bound, and losing them blanks the console: critical.  A framebuffer of a
secondary GPU is only in use (fbcon could be mapped to it) — refusing a second GPU as
critical would make it impossible to give to a VM at all.

A boot VGA device without a driver of its own (or with one that leaves the firmware's
framebuffer in place) is drawn through a firmware framebuffer: a platform device
(`efi-framebuffer.0`, `vesa-framebuffer.0`, `simple-framebuffer.0`) that no link ties
to the PCI device.  vfio-pci removes conflicting firmware framebuffers when it binds a
VGA device (since Linux 6.1, like any GPU driver), so that framebuffer goes too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from vfio_libvirt.holders_scan import printable

if TYPE_CHECKING:
    from vfio_libvirt.holders import Holder

FB = re.compile(r"fb[0-9]+")
_FIRMWARE = re.compile(r"(efi|vesa|simple)-framebuffer(\.[0-9]+)?")
_SHORT = {"efi": "efifb", "vesa": "vesafb", "simple": "simplefb"}


def firmware_framebuffers(sys: Path, graphics: dict[str, str]) -> dict[str, tuple[str, str]]:
    """fbN → (its platform device, e.g. "efi-framebuffer.0", a short name, "efifb") for
    each framebuffer whose `device` resolves to a firmware one under /sys/devices/platform."""
    found = {}
    platform = os.path.realpath(sys / "devices" / "platform")
    for fb in sorted(n for n in graphics if FB.fullmatch(n)):
        device = os.path.realpath(sys / "class" / "graphics" / fb / "device")
        name = os.path.basename(device)
        if os.path.dirname(device) == platform and (match := _FIRMWARE.fullmatch(name)):
            found[fb] = (name, _SHORT[match.group(1)])
    return found


def display_holders(bdf: str, boot_vga: bool, own_fbs: list[str],
                    firmware: dict[str, tuple[str, str]], fbcon: bool | str) -> list[Holder]:
    """fbcon on the console's framebuffer takes the console with it; other framebuffers
    are in use; the boot VGA device is only said.  `fbcon` is whether fbcon is bound, or
    why that cannot be told."""
    from vfio_libvirt.holders import Holder

    holders = []
    for fb in own_fbs:
        console = fb == "fb0" or boot_vga
        if isinstance(fbcon, str):
            holders.append(Holder("unknown", fb, f"cannot be checked for the console: {fbcon}",
                                  "critical" if console else "in_use"))
        elif fbcon and console:
            holders.append(Holder("fbcon", fb, "drives the console (fbcon)", "critical"))
        elif fbcon:
            holders.append(Holder("fbcon", fb, "is a framebuffer (fbcon could use it)", "in_use"))
    if boot_vga:
        for fb, (_, short) in sorted(firmware.items()):
            name = f"{fb} ({short})"
            if isinstance(fbcon, str):
                holders.append(Holder("unknown", name, f"cannot be checked for the console: {fbcon}",
                                      "critical"))
            elif fbcon:
                holders.append(Holder("fbcon", name, "drives the console on this boot VGA device",
                                      "critical"))
            else:
                holders.append(Holder("fbcon", name, "is the firmware framebuffer on this boot VGA "
                                      "device; binding vfio-pci removes it", "info"))
        holders.append(Holder("drm", printable(bdf), "is the boot VGA device", "info"))
    return holders
