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
DISK2 = "0000:04:00.0"
NIC = "0000:00:03.0"
GPU2 = "0000:02:00.0"
GPU_ALIAS = "pci:v000010DEd00002204sv00001458sd00004043bc03sc00i00"


@pytest.fixture
def host() -> SimHost:
    kernel = SimKernel(Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"]))
    kernel.add_device(DISK, NVME, group="3", pci_class=0x010802, driver="nvme")
    kernel.add_device(DISK2, NVME, group="6", pci_class=0x010802, driver="nvme")
    kernel.add_device(NIC, VIRTIO_NET, group="4", driver="virtio-pci")
    kernel.add_device(GPU2, GPU_ALIAS, group="2", pci_class=0x030000, driver="nouveau")
    return SimHost(kernel)


def read(host: SimHost, bdf: str, reader: HolderReader | None = None) -> DeviceHolders:
    reader = reader or HolderReader(host.root, host.ip_command())
    return reader.read(PciAddress.parse(bdf))


def lines(found: DeviceHolders) -> list[tuple[str, str, str]]:
    return [(h.severity, h.kind, str(h)) for h in found.holders]


# --- 2. multi-device btrfs, symlink sources ------------------------------------------------
def test_every_member_of_a_multi_device_btrfs_holds_its_mounts(host):
    host.nvme(DISK, partitions=("nvme0n1p2",))
    host.virtio_blk(NIC, disk="vda", partitions=("vda2",))
    host.btrfs("c0ffee00-1111-2222-3333-444455556666", ["vda2", "nvme0n1p2"])
    host.mount(None, "/", fstype="btrfs", majmin="0:33", source="/dev/vda2")
    host.mount(None, "/home", fstype="btrfs", majmin="0:33", source="/dev/vda2")
    assert lines(read(host, DISK)) == [
        ("critical", "mount", "nvme0n1p2 is mounted at / (root filesystem)"),
        ("in_use", "mount", "nvme0n1p2 is mounted at /home"),
    ]


def test_a_btrfs_subvolume_mount_is_matched_by_the_filesystems_anonymous_device(host):
    host.nvme(DISK, partitions=("nvme0n1p2",))
    host.virtio_blk(NIC, disk="vda", partitions=("vda2",))
    host.btrfs("c0ffee00-1111-2222-3333-444455556666", ["vda2", "nvme0n1p2"])
    host.mount(None, "/", fstype="btrfs", majmin="0:33", source="/dev/vda2")
    # the same superblock (0:33) mounted again under a name that no longer resolves
    host.mount(None, "/var", fstype="btrfs", majmin="0:33", source="/dev/disk/by-label/gone")
    assert ("critical", "mount", "nvme0n1p2 is mounted at /var") in lines(read(host, DISK))


def test_a_mount_source_that_is_a_udev_symlink_is_resolved(host):
    host.nvme(DISK, partitions=("nvme0n1p1", "nvme0n1p2"))
    host.dev_link("/dev/disk/by-uuid/1b2c", "../../nvme0n1p2")
    host.dev_link("/dev/mapper/data", "/dev/nvme0n1p1")  # absolute: resolved under the root
    host.mount(None, "/", fstype="btrfs", majmin="0:40", source="/dev/disk/by-uuid/1b2c")
    host.mount(None, "/data", fstype="btrfs", majmin="0:41", source="/dev/mapper/data")
    assert lines(read(host, DISK)) == [
        ("critical", "mount", "nvme0n1p2 is mounted at / (root filesystem)"),
        ("in_use", "mount", "nvme0n1p1 is mounted at /data"),
    ]


# --- 3. partitions of stacked disks, NVMe multipath heads ---------------------------------
def test_a_partition_of_an_md_array_on_the_disk(host):
    host.nvme(DISK)
    host.virtio_blk(NIC, disk="vda")
    host.stack("md126", ["nvme0n1", "vda"], md_level="raid1")  # Intel RST: whole disks
    host.partition("md126", "md126p2", 2)
    host.mount("md126p2", "/")
    found = lines(read(host, DISK))
    assert ("critical", "mount", "md126p2 (on nvme0n1) is mounted at / (root filesystem)") in found
    assert ("in_use", "stack", "md126p2 is a partition of md126") in found


def test_a_partition_of_an_nvme_multipath_head(host):
    host.nvme_multipath(DISK, partitions=("nvme0n1p1", "nvme0n1p2"))
    host.mount("nvme0n1p2", "/")
    host.mount("nvme0n1", "/raw", majmin=host.majmin("nvme0n1"))
    found = lines(read(host, DISK))
    assert ("critical", "mount", "nvme0n1p2 (on nvme0c0n1) is mounted at / (root filesystem)") in found
    assert ("in_use", "mount", "nvme0n1 (on nvme0c0n1) is mounted at /raw") in found


def test_a_multipath_head_of_another_controller_is_not_ours(host):
    host.nvme_multipath(DISK2, ctrl="nvme1", subsys="nvme-subsys1", head="nvme1n1",
                        partitions=("nvme1n1p1",))
    host.nvme(DISK)
    host.mount("nvme1n1p1", "/")
    assert read(host, DISK).holders == ()


# --- 4. loop devices -------------------------------------------------------------------------
def test_loop_devices_backed_by_files_on_the_disk(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.mount("nvme0n1p1", "/data")
    host.loop("loop0", "/data/images/vm.img")
    host.mount("loop0", "/srv/img")
    host.loop("loop1", "/data/swap.img (deleted)")
    host.swap("/dev/loop1")
    host.loop("loop2", "/srv/img/inner.img")  # a loop on a loop: followed
    host.mount("loop2", "/usr")
    host.loop("loop3", "/elsewhere/x.img")
    host.loop("loop4", None)  # unbound
    found = set(lines(read(host, DISK)))
    assert found >= {
        ("in_use", "stack", "loop0 is stacked on nvme0n1p1 (loop on /data/images/vm.img)"),
        ("in_use", "mount", "loop0 (on nvme0n1p1) is mounted at /srv/img"),
        ("critical", "swap", "loop1 (on nvme0n1p1) is active swap"),
        ("critical", "mount", "loop2 (on nvme0n1p1) is mounted at /usr"),
        ("in_use", "stack", "loop2 is stacked on loop0 (loop on /srv/img/inner.img)"),
    }
    assert not any("loop3" in text or "loop4" in text for *_, text in found)


def test_a_loop_on_another_disks_filesystem_is_not_ours(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.virtio_blk(NIC, disk="vda")
    host.mount("vda", "/")
    host.mount("nvme0n1p1", "/data")
    host.loop("loop0", "/var/lib/vm.img")  # on /, which is vda
    host.mount("loop0", "/mnt")
    assert lines(read(host, DISK)) == [("in_use", "mount", "nvme0n1p1 is mounted at /data")]


# --- 5. critical mount points ----------------------------------------------------------------
@pytest.mark.parametrize(("mountpoint", "severity"), [
    ("/var", "critical"), ("/etc", "critical"), ("/boot/efi", "critical"),
    ("/var/lib/data", "in_use"), ("/etc2", "in_use"), ("/variable", "in_use")])
def test_var_and_etc_are_critical(host, mountpoint, severity):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.mount("nvme0n1p1", mountpoint)
    assert lines(read(host, DISK)) == [(severity, "mount", f"nvme0n1p1 is mounted at {mountpoint}")]


# --- 11. an overlay root ----------------------------------------------------------------------
def test_the_layers_of_an_overlay_root_are_critical(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.virtio_blk(NIC, disk="vda")
    host.mount("nvme0n1p1", "/run/live/medium")
    host.loop("loop0", "/run/live/medium/live/filesystem.squashfs")
    host.mount("loop0", "/run/live/rootfs/filesystem.squashfs", fstype="squashfs")
    host.mount("vda", "/run/live/overlay")
    host.mount(None, "/", fstype="overlay", majmin="0:50", source="overlay",
               options="rw,lowerdir=/run/live/rootfs/filesystem.squashfs/,"
                       "upperdir=/run/live/overlay/rw,workdir=/run/live/overlay/work")
    assert [line for line in lines(read(host, DISK)) if line[0] == "critical"] == [
        ("critical", "mount", "loop0 (on nvme0n1p1) holds the overlay root's lower dir")]
    assert [line for line in lines(read(host, NIC)) if line[0] == "critical"] == [
        ("critical", "mount", "vda holds the overlay root's upper dir")]
