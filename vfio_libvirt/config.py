"""Host configuration (`VFIO_LIBVIRT_CONFIG`, TOML) and per-VM policy from domain `<metadata>`.

Host config is the admin's standing policy; the per-VM `<metadata>` element lets one
domain ask for something different without touching the host file.  A missing config
file means the defaults; a malformed one is bad input, reported before anything is
written.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lxml import etree

from vfio_libvirt.errors import InputError
from vfio_libvirt.names import module_name
from vfio_libvirt.pci import PciAddress

METADATA_NS = "urn:vfio-libvirt:metadata:1"
CompanionPolicy = Literal["refuse", "bind"]
_COMPANION_POLICIES = ("refuse", "bind")


@dataclass(frozen=True)
class Config:
    bind_timeout: float = 10.0
    """Seconds a device may take to reach its VFIO driver before prepare gives up."""
    restore_timeout: float = 30.0
    """Seconds a device may take to get back to its host driver (a process may still hold it)."""
    companions: CompanionPolicy = "refuse"
    libvirt_version: tuple[int, ...] | None = None
    driver_overrides: dict[PciAddress, str] = field(default_factory=dict)
    never_touch: frozenset[PciAddress] = frozenset()

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"config {path}: {err}") from None
        except OSError as err:
            raise InputError(f"config {path}: {err.strerror}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> Config:
        known = {"timeouts", "policy", "devices", "libvirt"}
        if unknown := set(data) - known:
            raise InputError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}")
        timeouts = _table(data, "timeouts", where)
        policy = _table(data, "policy", where)
        libvirt = _table(data, "libvirt", where)
        devices = _table(data, "devices", where)
        overrides: dict[PciAddress, str] = {}
        never: set[PciAddress] = set()
        for bdf, settings in devices.items():
            address = PciAddress.parse(bdf)
            if not isinstance(settings, dict) or set(settings) - {"driver", "never_touch"}:
                raise InputError(f"{where}: [devices.\"{bdf}\"] takes driver and never_touch")
            if "driver" in settings:
                overrides[address] = module_name(str(settings["driver"]))
            if settings.get("never_touch") is True:
                never.add(address)
        return cls(
            bind_timeout=_seconds(timeouts, "bind_seconds", 10.0, where),
            restore_timeout=_seconds(timeouts, "restore_seconds", 30.0, where),
            companions=_companions(policy.get("companions", "refuse"), where),
            libvirt_version=parse_version(libvirt["version"]) if "version" in libvirt else None,
            driver_overrides=overrides,
            never_touch=frozenset(never),
        )


@dataclass(frozen=True)
class VmPolicy:
    """What one domain asks for in `<metadata><vfio:policy xmlns:vfio="urn:vfio-libvirt:metadata:1">`."""

    companions: CompanionPolicy | None = None
    drivers: dict[PciAddress, str] = field(default_factory=dict)

    @classmethod
    def from_domain(cls, root: etree._Element) -> VmPolicy:
        element = root.find(f"metadata/{{{METADATA_NS}}}policy")
        if element is None:
            return cls()
        companions = element.get("companions")
        drivers: dict[PciAddress, str] = {}
        for device in element.findall(f"{{{METADATA_NS}}}device"):
            address = PciAddress.parse(device.get("address") or "")
            if driver := device.get("driver"):
                drivers[address] = module_name(driver)
        return cls(
            companions=_companions(companions, "domain metadata") if companions else None,
            drivers=drivers,
        )


def parse_version(text: object) -> tuple[int, ...]:
    parts = str(text).strip().split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() and len(p) <= 6 for p in parts):
        raise InputError(f"invalid libvirt version {text!r}: expected like 10.0.0")
    return tuple(int(p) for p in parts)


def _table(data: dict, name: str, where: str) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise InputError(f"{where}: [{name}] must be a table")
    return value


def _seconds(table: dict, key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise InputError(f"{where}: {key} must be a number of seconds between 0 and 3600")
    return float(value)


def _companions(value: object, where: str) -> CompanionPolicy:
    if value not in _COMPANION_POLICIES:
        raise InputError(f"{where}: companions must be one of {', '.join(_COMPANION_POLICIES)}")
    return value  # type: ignore[return-value]
