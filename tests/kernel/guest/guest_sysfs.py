"""Raw sysfs helpers for the tests inside the kernel tier's guest.

Every write goes through write_sysfs(), which refuses to run unless
in_guest() (kernel cmdline marker): importing this on the host is harmless,
writing is not possible.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.vm import guest as H

SYS_PCI = Path("/sys/bus/pci")


def write_sysfs(path: Path, value: str) -> None:
    """One write(2) of value, as `echo value > path` would do."""
    H.require_guest()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def modprobe(*args: str) -> subprocess.CompletedProcess:
    H.require_guest()
    return subprocess.run(["modprobe", *args], capture_output=True, text=True, check=True)


class PciDevice:
    """A test device in the guest, with the raw sysfs operations."""

    def __init__(self, spec):
        self.spec = spec
        self.bdf = spec.bdf
        self.path = SYS_PCI / "devices" / spec.bdf

    def __repr__(self) -> str:
        return f"PciDevice({self.spec.name} {self.bdf})"

    def attr(self, name: str) -> str:
        return (self.path / name).read_text().strip()

    @property
    def driver(self) -> str | None:
        link = self.path / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    @property
    def override(self) -> str:
        return self.attr("driver_override")

    @property
    def iommu_group(self) -> str:
        return os.path.basename(os.readlink(self.path / "iommu_group"))

    @property
    def pci_id(self) -> str:
        """Vendor and device ID as a driver's new_id/remove_id want them: "8086 10d3"."""
        return f"{self.attr('vendor')[2:]} {self.attr('device')[2:]}"

    def netdev_ifindexes(self) -> dict[str, str]:
        """Network interface name -> ifindex, for the device's netdevs.

        An unbind/rebind destroys the netdev and makes a new one with a new ifindex,
        so unchanged ifindexes prove nobody rebound the device (compare the values:
        udev renames a new netdev, eth0 -> enp0s16, without a new ifindex).  virtio
        devices have their netdev one level down (virtioN/net/).
        """
        found = {}
        for pattern in ("net/*/ifindex", "virtio*/net/*/ifindex"):
            for path in self.path.glob(pattern):
                found[path.parent.name] = path.read_text().strip()
        return found

    def group_members(self) -> list[str]:
        return sorted(os.listdir(self.path / "iommu_group" / "devices"))

    def set_override(self, value: str) -> None:
        write_sysfs(self.path / "driver_override", value)

    def unbind(self) -> None:
        if self.driver is not None:
            write_sysfs(self.path / "driver" / "unbind", self.bdf)

    def probe(self) -> None:
        write_sysfs(SYS_PCI / "drivers_probe", self.bdf)

    def wait_driver(self, expected: str | None, timeout: float = 10.0) -> str | None:
        deadline = time.monotonic() + timeout
        while self.driver != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.driver

    def bind_via_override(self, driver: str) -> str | None:
        """override, unbind, drivers_probe; returns the driver now bound."""
        self.set_override(driver)
        self.unbind()
        self.probe()
        return self.driver

    def restore(self) -> str | None:
        """Clear the override and re-probe: back to the boot driver."""
        self.set_override("\n")
        if self.driver != self.spec.host_driver:
            self.unbind()
            self.probe()
        return self.wait_driver(self.spec.host_driver)


class Pci:
    def __init__(self, specs):
        self.devices = {spec.name: PciDevice(spec) for spec in specs}

    def __getitem__(self, name: str) -> PciDevice:
        return self.devices[name]

    def __iter__(self):
        return iter(self.devices.values())

    @property
    def virtio_net(self) -> PciDevice:
        return self.devices[H.VIRTIO_NET.name]

    @property
    def e1000e(self) -> PciDevice:
        return self.devices[H.E1000E.name]


def add_dynamic_id(driver: str, dev: PciDevice) -> None:
    """Make `driver` match the device's vendor:device ID (its new_id file)."""
    write_sysfs(SYS_PCI / "drivers" / driver / "new_id", dev.pci_id)


def remove_dynamic_id(driver: str, dev: PciDevice) -> None:
    """Undo add_dynamic_id; harmless when the ID (or the driver) is not there."""
    with contextlib.suppress(OSError):
        write_sysfs(SYS_PCI / "drivers" / driver / "remove_id", dev.pci_id)


@contextlib.contextmanager
def holding_vfio_group(dev: PciDevice) -> Iterator[subprocess.Popen]:
    """A separate process holds /dev/vfio/<group> of `dev` open until the block ends.

    That is what a running QEMU does; the product must see it as the device's holder.
    """
    H.require_guest()
    group = f"/dev/vfio/{dev.iommu_group}"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import os, time; fd = os.open({group!r}, os.O_RDWR); "
         "print('open', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline().strip() if holder.stdout else ""
        if line != "open":
            raise RuntimeError(f"could not open {group} in a holder process (rc={holder.poll()})")
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)
        if holder.stdout:
            holder.stdout.close()
