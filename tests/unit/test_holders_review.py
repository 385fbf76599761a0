"""The holder reader against a hostile review, block devices: false negatives (a disk
the host needs read as free), each reproduced on the simulated host.  Networks, the
console and odd content are in test_holders_review_net.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.simhost import NVME, VIRTIO_NET, SimHost
from tests.support.simkernel import SimKernel
from vfio_libvirt.holders import DeviceHolders, HolderReader
from vfio_libvirt.pci import PciAddress

DISK = "0000:03:00.0"
NIC = "0000:00:03.0"
GPU2 = "0000:02:00.0"
GPU_ALIAS = "pci:v000010DEd00002204sv00001458sd00004043bc03sc00i00"


@pytest.fixture
def host() -> SimHost:
    kernel = SimKernel(Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"]))
    kernel.add_device(DISK, NVME, group="3", pci_class=0x010802, driver="nvme")
    kernel.add_device(NIC, VIRTIO_NET, group="4", driver="virtio-pci")
    kernel.add_device(GPU2, GPU_ALIAS, group="2", pci_class=0x030000, driver="nouveau")
    return SimHost(kernel)


def read(host: SimHost, bdf: str, reader: HolderReader | None = None) -> DeviceHolders:
    reader = reader or HolderReader(host.root, host.ip_command())
    return reader.read(PciAddress.parse(bdf))


def lines(found: DeviceHolders) -> list[tuple[str, str, str]]:
    return [(h.severity, h.kind, str(h)) for h in found.holders]


# --- 5. critical mount points ----------------------------------------------------------------
@pytest.mark.parametrize(("mountpoint", "severity"), [
    ("/var", "critical"), ("/etc", "critical"), ("/boot/efi", "critical"),
    ("/var/lib/data", "in_use"), ("/etc2", "in_use"), ("/variable", "in_use")])
def test_var_and_etc_are_critical(host, mountpoint, severity):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.mount("nvme0n1p1", mountpoint)
    assert lines(read(host, DISK)) == [(severity, "mount", f"nvme0n1p1 is mounted at {mountpoint}")]
