"""Domain XML for the guest tests that run hooks/qemu as libvirtd would.

Only what the hook reads: the domain's name and its PCI <hostdev> elements.
"""

from __future__ import annotations


def hostdev(bdf: str, managed: str = "no", model: str | None = None) -> str:
    """A PCI <hostdev> for `bdf` (domain 0000), with <driver model=...> when `model` is given."""
    _, bus, rest = bdf.split(":")
    slot, function = rest.split(".")
    driver = f"<driver model='{model}'/>" if model else ""
    return (f"<hostdev mode='subsystem' type='pci' managed='{managed}'>{driver}<source>"
            f"<address domain='0x0000' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/>"
            "</source></hostdev>")


def domain(name: str, *devices: str) -> str:
    """A QEMU domain named `name` holding `devices` (hostdev() strings)."""
    return f"<domain type='qemu'><name>{name}</name><devices>{''.join(devices)}</devices></domain>"
