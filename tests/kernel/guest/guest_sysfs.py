"""Raw sysfs helpers for the tests inside the kernel tier's guest.

Every write goes through write_sysfs(), which refuses to run unless
in_guest() (kernel cmdline marker): importing this on the host is harmless,
writing is not possible.
"""

from __future__ import annotations

import contextlib
import json
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


# ----------------------------------------------- real hardware: SR-IOV PF, NVMe, routes


def device_at(bdf: str, *, name: str = "", host_driver: str = "") -> PciDevice:
    """A PciDevice for an address that is no TestDevice (a VF, say)."""
    spec = H.TestDevice(name=name or bdf, bdf=bdf, vendor="", device="", modalias_prefix="",
                        host_driver=host_driver, iommu_group_own=True, qemu_opts=())
    return PciDevice(spec)


def wait_for(what: str, predicate, timeout: float = 30.0):
    """predicate()'s first truthy value; AssertionError naming `what` after `timeout` s.

    Probes in the guest are asynchronous (the NVMe scans its namespaces and udev
    renames netdevs after the driver link appears), and TCG makes them slow.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


class SriovPf(PciDevice):
    """An SR-IOV physical function: sriov_numvfs and its VFs (virtfnN links)."""

    @property
    def numvfs(self) -> int:
        return int(self.attr("sriov_numvfs"))

    @property
    def totalvfs(self) -> int:
        return int(self.attr("sriov_totalvfs"))

    def vf_bdfs(self) -> list[str]:
        """The VFs' addresses, in VF index order (virtfn0, virtfn1, ...)."""
        links = sorted(self.path.glob("virtfn*"), key=lambda p: int(p.name[len("virtfn"):]))
        return [os.path.basename(os.readlink(link)) for link in links]

    def vfs(self) -> list[PciDevice]:
        return [device_at(bdf, name=f"{self.spec.name}-vf{i}", host_driver=H.IGB_VF_DRIVER)
                for i, bdf in enumerate(self.vf_bdfs())]

    def set_numvfs(self, count: int) -> None:
        """echo count > sriov_numvfs (the kernel wants 0 in between two non-zero counts)."""
        if count and self.numvfs and self.numvfs != count:
            write_sysfs(self.path / "sriov_numvfs", "0")
        write_sysfs(self.path / "sriov_numvfs", str(count))

    def enable_vfs(self, count: int, timeout: float = 60.0) -> list[PciDevice]:
        """`count` VFs, each probed by its VF driver (igbvf); returns them."""
        self.set_numvfs(count)
        vfs = self.vfs()
        assert len(vfs) == count, f"{self}: asked for {count} VFs, sysfs has {self.vf_bdfs()}"
        for vf in vfs:
            wait_for(f"{vf} on {H.IGB_VF_DRIVER}", lambda vf=vf: vf.driver == H.IGB_VF_DRIVER, timeout)
        udev_settle()  # udev renames the VFs' netdevs (eth0 -> enp1s0v0) after the probe
        return vfs

    def disable_vfs(self) -> None:
        """sriov_numvfs = 0, first giving every VF back to its VF driver (a VF a test left
        on vfio-pci goes away with the others either way, but not while a process holds it)."""
        if not (self.path / "sriov_numvfs").exists() or self.numvfs == 0:
            return
        for vf in self.vfs():
            with contextlib.suppress(OSError):
                vf.set_override("\n")
        write_sysfs(self.path / "sriov_numvfs", "0")


def udev_settle(timeout: int = 60) -> None:
    """Wait until udev has handled every event so far (renames, /dev nodes)."""
    subprocess.run(["udevadm", "settle", f"--timeout={timeout}"], capture_output=True, check=False)


def netdev_names(dev: PciDevice) -> list[str]:
    return sorted(dev.netdev_ifindexes())


NVME_SUBSYSTEMS = Path("/sys/class/nvme-subsystem")


def _visible_disk(path: Path) -> bool:
    """A gendisk with a /dev node: has `dev`, is not a hidden multipath path disk."""
    hidden = path / "hidden"
    return (path / "dev").exists() and not (hidden.exists() and hidden.read_text().strip() == "1")


def nvme_block_devices(dev: PciDevice) -> list[str]:
    """The namespace block devices (with a /dev node) an NVMe PCI device serves.

    Without native multipath they sit below the controller (<bdf>/nvme/nvme0/nvme0n1).
    With it (Debian's default) the controller holds only hidden path disks
    (nvme0c0n1) and the real disk belongs to the subsystem, which links to each of
    its controllers (nvme-subsys0/nvme0 -> <bdf>/nvme/nvme0).
    """
    found: set[str] = set()
    for ctrl in dev.path.glob("nvme/nvme*"):
        found.update(p.name for p in ctrl.glob("nvme*n*") if _visible_disk(p))
        for subsys in NVME_SUBSYSTEMS.glob("*"):
            link = subsys / ctrl.name
            if link.is_symlink() and link.resolve() == ctrl.resolve():
                found.update(p.name for p in subsys.resolve().glob("nvme*n*") if _visible_disk(p))
    return sorted(found)


def mounts_of(device_node: str) -> list[str]:
    """Mount points of a block device node, from /proc/self/mountinfo."""
    try:
        st = os.stat(device_node)
    except FileNotFoundError:
        return []
    want = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[2] == want:
            found.append(fields[4].encode().decode("unicode_escape"))
    return found


def run(*argv: str) -> subprocess.CompletedProcess:
    """A command inside the guest that changes it (mount, ip); raises on failure."""
    H.require_guest()
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ip_json(*args: str) -> list[dict]:
    """`ip -j ARGS` parsed (iproute2 prints nothing at all for an empty table)."""
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True,
                         check=True, timeout=30).stdout.strip()
    return json.loads(out) if out else []


def default_routes() -> list[dict]:
    return ip_json("route", "show", "default")


def addresses_of(dev: PciDevice) -> list[str]:
    """Every address on the device's netdevs, looked up by ifindex (a name may change
    under us while udev renames a new netdev)."""
    ifindexes = {int(i) for i in dev.netdev_ifindexes().values()}
    return [f"{a['local']}/{a['prefixlen']}" for link in ip_json("addr", "show")
            if link.get("ifindex") in ifindexes for a in link.get("addr_info", [])]
