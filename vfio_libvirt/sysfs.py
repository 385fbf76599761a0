"""The only code that reads or writes PCI sysfs.

Everything is rooted at `Settings.sys` (`$VFIO_LIBVIRT_SYSFS_ROOT/sys`), so tests point
it at a temp dir and the real /sys is never reached by accident.  Writes are single
`write(2)` calls so the kernel's errno (EBUSY, ENODEV, …) reaches the caller intact;
callers verify by reading back, because `drivers_probe` reports success even when no
driver attached.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from vfio_libvirt.errors import InputError
from vfio_libvirt.names import canonical_module, driver_name
from vfio_libvirt.pci import PciAddress

_BRIDGE_CLASSES = {0x0604, 0x0609}


class Sysfs:
    def __init__(self, root: Path) -> None:
        """`root` is `$VFIO_LIBVIRT_SYSFS_ROOT`: sysfs is `root/sys`, procfs `root/proc`."""
        self.sys = root / "sys"
        self.proc = root / "proc"
        self.pci_devices = self.sys / "bus" / "pci" / "devices"
        self.pci_drivers = self.sys / "bus" / "pci" / "drivers"

    # --- reading -----------------------------------------------------------------
    def device_dir(self, address: PciAddress) -> Path:
        return self.pci_devices / str(address)

    def exists(self, address: PciAddress) -> bool:
        return self.device_dir(address).is_dir()

    def require(self, address: PciAddress) -> Path:
        path = self.device_dir(address)
        if not path.is_dir():
            raise InputError(f"no PCI device {address} on this host ({self.pci_devices})")
        return path

    def modalias(self, address: PciAddress) -> str:
        return (self.require(address) / "modalias").read_text().strip()

    def driver(self, address: PciAddress) -> str | None:
        """Name of the driver bound now (the `driver` link), or None."""
        try:
            return os.readlink(self.device_dir(address) / "driver").rsplit("/", 1)[-1]
        except FileNotFoundError:
            return None

    def driver_override(self, address: PciAddress) -> str | None:
        try:
            text = (self.device_dir(address) / "driver_override").read_text().strip()
        except FileNotFoundError:
            return None
        return None if text in ("", "(null)") else text

    def pci_class(self, address: PciAddress) -> int:
        """The 24-bit class code (e.g. 0x020000 for Ethernet)."""
        return int((self.device_dir(address) / "class").read_text().strip(), 16)

    def is_bridge(self, address: PciAddress) -> bool:
        return self.pci_class(address) >> 8 in _BRIDGE_CLASSES

    def iommu_group(self, address: PciAddress) -> str | None:
        try:
            return os.readlink(self.device_dir(address) / "iommu_group").rsplit("/", 1)[-1]
        except FileNotFoundError:
            return None

    def iommu_group_members(self, group: str) -> list[PciAddress]:
        devices = self.sys / "kernel" / "iommu_groups" / group / "devices"
        try:
            names = sorted(os.listdir(devices))
        except FileNotFoundError:
            return []
        return [PciAddress.parse(name) for name in names]

    def physfn(self, address: PciAddress) -> PciAddress | None:
        """The SR-IOV PF of a VF (its `physfn` link); None for anything else."""
        try:
            return PciAddress.parse(os.readlink(self.device_dir(address) / "physfn").rsplit("/", 1)[-1])
        except (OSError, InputError):
            return None

    def has_vfio_dev(self, address: PciAddress) -> bool:
        """A VFIO driver that registered the device created `vfio-dev/vfioN` (5.19+ cdev)."""
        try:
            return any(os.scandir(self.device_dir(address) / "vfio-dev"))
        except (FileNotFoundError, NotADirectoryError):
            return False

    def vfio_dev_nodes(self, address: PciAddress) -> set[str]:
        """The /dev paths through which userspace holds this device open via VFIO."""
        nodes = set()
        if group := self.iommu_group(address):
            nodes.add(f"/dev/vfio/{group}")
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            vfio_dev = self.device_dir(address) / "vfio-dev"
            nodes.update(f"/dev/vfio/devices/{e.name}" for e in os.scandir(vfio_dev))
        return nodes

    def vfio_holders(self, address: PciAddress) -> list[str]:
        """Processes (`pid (comm)`) holding the device's VFIO group or cdev open.

        Unbinding a VFIO device that a process still uses blocks in the kernel until the
        process lets go, so callers wait (with a deadline) while this is non-empty.
        """
        return [f"{pid} ({comm})" for pid, comm in self.vfio_holder_pids(address).items()]

    def vfio_holder_pids(self, address: PciAddress, among: list[int] | None = None) -> dict[int, str]:
        """pid → comm of the processes holding the device open through VFIO.

        `among` limits the look to those pids: a few readlinks instead of all of /proc,
        cheap enough to ask every few milliseconds while waiting for a known holder.
        """
        nodes = self.vfio_dev_nodes(address)
        holders: dict[int, str] = {}
        if among is None:
            try:
                among = [int(p) for p in os.listdir(self.proc) if p.isdigit()]
            except FileNotFoundError:
                return {}
        for pid in among:
            fd_dir = self.proc / str(pid) / "fd"
            try:
                targets = {os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)}
            except OSError:
                continue  # gone, or not ours to read
            if targets & nodes:
                try:
                    comm = (self.proc / str(pid) / "comm").read_text().strip()
                except OSError:
                    comm = "?"
                holders[pid] = comm
        return holders

    def module_pci_drivers(self, module: str) -> list[str]:
        """PCI driver names a loaded module registered (`/sys/module/<mod>/drivers/pci:<name>`).

        The names can differ from the module's (`vfio_pci` registers `vfio-pci`).
        """
        drivers = self.sys / "module" / canonical_module(module) / "drivers"
        try:
            entries = sorted(os.listdir(drivers))
        except FileNotFoundError:
            return []
        return [driver_name(e.split(":", 1)[1]) for e in entries if e.startswith("pci:")]

    def driver_registered(self, driver: str) -> bool:
        return (self.pci_drivers / driver_name(driver)).is_dir()

    def devices(self) -> list[PciAddress]:
        try:
            names = sorted(os.listdir(self.pci_devices))
        except FileNotFoundError:
            return []
        return [PciAddress.parse(name) for name in names]

    # --- writing -----------------------------------------------------------------
    def set_driver_override(self, address: PciAddress, driver: str | None) -> None:
        """Let only `driver` bind the device; None clears it (the kernel wants a newline)."""
        value = "\n" if driver is None else driver_name(driver)
        _write(self.require(address) / "driver_override", value)

    def unbind(self, address: PciAddress) -> None:
        """Detach the bound driver; a no-op when none is bound."""
        path = self.device_dir(address) / "driver" / "unbind"
        try:
            _write(path, str(address))
        except OSError as err:
            # The link vanished between our look and the write: nothing is bound.
            if err.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    def probe(self, address: PciAddress) -> None:
        """Ask the PCI core to bind a driver (honouring driver_override)."""
        _write(self.sys / "bus" / "pci" / "drivers_probe", str(address))


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
