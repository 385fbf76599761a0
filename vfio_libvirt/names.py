"""Validation of kernel module and driver names.

These names end up in a `modprobe` argv, in a sysfs path (`/sys/module/<mod>`,
`/sys/bus/pci/drivers/<drv>`) and in `driver_override`; a name that could carry a path
separator, an option (`-r`) or whitespace is refused before any of that happens.
"""

from __future__ import annotations

import re

from vfio_libvirt.errors import InputError

# Kernel module names are at most MODULE_NAME_LEN-1 (55) characters; be a bit generous.
_MODULE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
# PCI driver names are free-form in C but in practice use these characters.
_DRIVER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def is_module_name(text: str) -> bool:
    return bool(_MODULE.fullmatch(text))


def module_name(text: str) -> str:
    """Return `text` if it is a safe module name, else raise InputError."""
    if not is_module_name(text):
        raise InputError(f"invalid kernel module name {text!r}")
    return text


def driver_name(text: str) -> str:
    """Return `text` if it is a safe PCI driver name, else raise InputError."""
    if not _DRIVER.fullmatch(text):
        raise InputError(f"invalid PCI driver name {text!r}")
    return text


def canonical_module(name: str) -> str:
    """The kernel treats `-` and `_` in module names alike and shows `_` in /sys/module."""
    return name.replace("-", "_")
