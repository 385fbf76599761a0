"""The holder reader against a hostile review, block devices: false negatives (a disk
the host needs read as free), each reproduced on the simulated host.  Networks, the
console and odd content are in test_holders_review_net.py.

Kernel claims are simulated by `SimHost.open_node`, patched over the reader's one real
`os.open` (`holders_claim.open_node`): a node made `busy=True` answers an exclusive
open with EBUSY, every other path is opened for real."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.support.simhost import NVME, VIRTIO_NET, SimHost, holder_lines, read_holders
from tests.support.simkernel import SimKernel
from vfio_libvirt import holders_claim, holders_procs, holders_scan
from vfio_libvirt.holders import HolderReader

DISK = "0000:03:00.0"
DISK2 = "0000:04:00.0"
NIC = "0000:00:03.0"
GPU2 = "0000:02:00.0"
GPU_ALIAS = "pci:v000010DEd00002204sv00001458sd00004043bc03sc00i00"
CLAIMED = "is claimed by the kernel (a mount, pool or array this reader cannot name"


@pytest.fixture
def host(monkeypatch) -> SimHost:
    kernel = SimKernel(Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"]))
    kernel.add_device(DISK, NVME, group="3", pci_class=0x010802, driver="nvme")
    kernel.add_device(DISK2, NVME, group="6", pci_class=0x010802, driver="nvme")
    kernel.add_device(NIC, VIRTIO_NET, group="4", driver="virtio-pci")
    kernel.add_device(GPU2, GPU_ALIAS, group="2", pci_class=0x030000, driver="nouveau")
    sim = SimHost(kernel)
    monkeypatch.setattr(holders_claim, "open_node", sim.open_node)
    return sim


read = read_holders
lines = holder_lines


def zfs_root(host: SimHost) -> None:
    """Proxmox on ZFS: / is a dataset, mountinfo names no block device at all."""
    with host.mountinfo.open("a") as out:
        out.write("30 1 0:45 / / rw,relatime shared:1 - zfs rpool/ROOT/pve-1 rw,xattr,noacl\n")


# --- 1. the claim probe ------------------------------------------------------------------
def test_a_zfs_pool_member_is_critical_through_the_claim_probe(host):
    host.nvme(DISK, partitions=("nvme0n1p1", "nvme0n1p2"))
    zfs_root(host)
    host.dev_node("nvme0n1", busy=True)  # a claimed partition makes the whole disk busy too
    host.dev_node("nvme0n1p1")
    host.dev_node("nvme0n1p2", busy=True)
    found = read(host, DISK)
    assert found.verdict == "critical"
    (unknown,) = found.holders
    assert (unknown.severity, unknown.kind, unknown.name) == ("critical", "unknown", "nvme0n1p2")
    assert unknown.detail.startswith(CLAIMED)
    assert "/ is mounted from rpool/ROOT/pve-1 (zfs)" in unknown.detail


def test_an_anonymous_root_without_dev_nodes_makes_nothing_critical(host):
    """The probe cannot run without /dev: the dataset alone names no device to refuse."""
    host.nvme(DISK, partitions=("nvme0n1p1", "nvme0n1p2"))
    zfs_root(host)
    assert read(host, DISK).verdict == "free"


def test_claims_a_mount_or_a_stack_explains_add_nothing(host):
    host.nvme(DISK, partitions=("nvme0n1p1", "nvme0n1p2", "nvme0n1p3"))
    host.stack("dm-0", ["nvme0n1p3"], dm_name="vg-usr")
    host.mount("nvme0n1p2", "/")
    host.mount("dm-0", "/usr")
    for name in ("nvme0n1", "nvme0n1p2", "nvme0n1p3", "dm-0"):
        host.dev_node(name, busy=True)
    host.dev_node("nvme0n1p1")
    assert [h.kind for h in read(host, DISK).holders] == ["mount", "mount", "stack"]


def test_a_claimed_stacked_device_is_named_with_what_it_is_on(host):
    host.nvme(DISK, partitions=("nvme0n1p3",))
    host.stack("dm-1", ["nvme0n1p3"], dm_name="crypt-pool")  # a pool on dm-crypt
    for name in ("nvme0n1", "nvme0n1p3", "dm-1"):
        host.dev_node(name, busy=True)
    found = read(host, DISK)
    assert [(h.severity, h.kind, h.name) for h in found.critical] == [
        ("critical", "unknown", "dm-1 (on nvme0n1p3)")]
    assert found.critical[0].detail.startswith(CLAIMED)


def test_a_claimed_whole_disk_without_partitions_is_critical(host):
    host.nvme(DISK)
    host.dev_node("nvme0n1", busy=True)  # e.g. a whole-disk md member, bcache, a zpool
    assert [(h.kind, h.name) for h in read(host, DISK).critical] == [("unknown", "nvme0n1")]


def test_the_probe_opens_exclusively_read_only_and_closes(host, monkeypatch):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.dev_node("nvme0n1")
    host.dev_link("/dev/nvme0n1p1", "nvme0n1")  # not the partition's node: never followed
    opened, closed = [], []
    real_close = os.close

    def spy(path, flags, mode=0o777):
        fd = host.open_node(path, flags, mode)
        opened.append((Path(path).name, flags))
        return fd

    monkeypatch.setattr(holders_claim, "open_node", spy)
    monkeypatch.setattr(holders_claim.os, "close", lambda fd: closed.append(fd) or real_close(fd))
    assert read(host, DISK).holders == ()
    flags = os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
    assert opened == [("nvme0n1", flags)]
    assert len(closed) >= 1


def test_a_node_we_may_not_open_is_an_in_use_unknown(host, monkeypatch):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.dev_node("nvme0n1")
    host.dev_node("nvme0n1p1")

    def denied(path, flags, mode=0o777):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(holders_claim, "open_node", denied)
    assert lines(read(host, DISK)) == [(
        "in_use", "unknown", "nvme0n1, nvme0n1p1 cannot be probed for kernel claims "
        "(permission denied; run as root to see all)")]


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


# --- 10. other mount namespaces -----------------------------------------------------------------
def test_a_mount_only_in_a_services_private_namespace(host):
    host.nvme(DISK, partitions=("nvme0n1p1", "nvme0n1p2"))
    host.mount("nvme0n1p2", "/srv")
    host.process(555, "postgres", mnt_ns="mnt:[4026532999]")
    host.process(556, "postgres", mnt_ns="mnt:[4026532999]")
    host.mount("nvme0n1p2", "/srv", pid=555)  # the host's mount, copied: said once
    host.mount("nvme0n1p1", "/var/lib/postgresql", pid=555)
    assert lines(read(host, DISK)) == [
        ("in_use", "mount", "nvme0n1p2 is mounted at /srv"),
        ("in_use", "mount", "nvme0n1p1 is mounted at /var/lib/postgresql "
         "(in the mount namespace of 555 (postgres))"),
    ]


def test_a_containers_root_is_in_use_not_critical(host, monkeypatch):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.process(700, "init", mnt_ns="mnt:[4026533000]")
    host.process(701, "sshd", mnt_ns="mnt:[4026533000]")
    host.process(702, "nginx", mnt_ns="mnt:[4026533001]")
    host.mount("nvme0n1p1", "/", pid=701)
    (host.proc / "700" / "mountinfo").mkdir()  # exited meanwhile: the next process says it
    reads = []
    parse = holders_scan.parse_mountinfo
    monkeypatch.setattr(holders_scan, "parse_mountinfo", lambda text: reads.append(1) or parse(text))
    assert lines(read(host, DISK)) == [(
        "in_use", "mount", "nvme0n1p1 is mounted at / (in the mount namespace of 701 (sshd), "
        "whose root it is; not this host's)")]
    assert len(reads) == 2  # the host's and one per other namespace (nginx has no mountinfo)


def test_namespaces_read_in_a_second_pass_after_a_gpu_came_first(host):
    host.drm(GPU2)
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.process(555, "postgres", mnt_ns="mnt:[4026532999]")
    host.mount("nvme0n1p1", "/srv/pg", pid=555)
    reader = HolderReader(host.root, host.ip_command())
    assert read(host, GPU2, reader).holders == ()  # open files indexed, namespaces not
    assert lines(read(host, DISK, reader)) == [
        ("in_use", "mount", "nvme0n1p1 is mounted at /srv/pg (in the mount namespace of 555 (postgres))")]


def test_a_claim_a_namespaces_mount_explains_is_not_critical(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.process(555, "postgres", mnt_ns="mnt:[4026532999]")
    host.mount("nvme0n1p1", "/var/lib/postgresql", pid=555)
    host.dev_node("nvme0n1", busy=True)
    host.dev_node("nvme0n1p1", busy=True)
    assert lines(read(host, DISK)) == [(
        "in_use", "mount", "nvme0n1p1 is mounted at /var/lib/postgresql "
        "(in the mount namespace of 555 (postgres))")]


def test_namespaces_are_not_read_when_the_probe_finds_every_device_free(host, monkeypatch):
    """A mount claims its device: a device free to an exclusive open is mounted nowhere."""
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.dev_node("nvme0n1")
    host.dev_node("nvme0n1p1")
    host.process(555, "postgres", mnt_ns="mnt:[4026532999]")
    asked = []
    namespaces = holders_procs.ProcessScan.namespaces
    monkeypatch.setattr(holders_procs.ProcessScan, "namespaces",
                        lambda scan: asked.append(1) or namespaces(scan))
    assert read(host, DISK).holders == ()
    assert asked == []


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
