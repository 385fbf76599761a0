"""The holder reader on a simulated host: each holder kind, what it must not claim, and
odd or hostile sysfs/procfs content that must never crash it (and must refuse where it
cannot decide)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.support.simhost import (
    NVME,
    VIRTIO_NET,
    SimHost,
    holder_lines,
    maps_line,
    read_holders,
    resource_path,
)
from tests.support.simkernel import SimKernel
from vfio_libvirt import holders_net, holders_procs
from vfio_libvirt.errors import InputError
from vfio_libvirt.holders import DeviceHolders, Holder, HolderReader
from vfio_libvirt.holders_procs import Found
from vfio_libvirt.holders_scan import parse_mountinfo, unescape
from vfio_libvirt.pci import PciAddress

DISK = "0000:03:00.0"
NIC = "0000:00:03.0"
NIC2 = "0000:00:04.0"
GPU = "0000:01:00.0"
PF = "0000:05:00.0"
GPU_ALIAS = "pci:v000010DEd00002204sv00001458sd00004043bc03sc00i00"
IGB = "pci:v00008086d000010C9sv00008086sd0000A03Csc00i00"


@pytest.fixture
def host() -> SimHost:
    kernel = SimKernel(Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"]))
    kernel.add_module("vfio_pci", "vfio-pci", vfio=True, loaded=True)
    kernel.add_device(DISK, NVME, group="3", pci_class=0x010802, driver="nvme")
    kernel.add_device(NIC, VIRTIO_NET, group="4", driver="virtio-pci")
    kernel.add_device(NIC2, VIRTIO_NET, group="5", driver="virtio-pci")
    kernel.add_device(GPU, GPU_ALIAS, group="1", pci_class=0x030000, driver="nouveau")
    return SimHost(kernel)


read = read_holders
lines = holder_lines


# --- block devices ------------------------------------------------------------------------
def test_partitions_mounted_at_root_and_data(host):
    host.nvme(DISK, partitions=("nvme0n1p1", "nvme0n1p2"))
    host.mount("nvme0n1p2", "/")
    host.mount("nvme0n1p1", "/data", fstype="xfs")
    found = read(host, DISK)
    assert lines(found) == [
        ("critical", "mount", "nvme0n1p2 is mounted at / (root filesystem)"),
        ("in_use", "mount", "nvme0n1p1 is mounted at /data"),
    ]
    assert found.verdict == "critical"
    assert [str(h) for h in found.critical] == ["nvme0n1p2 is mounted at / (root filesystem)"]
    assert [str(h) for h in found.in_use] == ["nvme0n1p1 is mounted at /data"]


def test_a_mount_of_another_device_is_not_ours(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.virtio_blk(NIC2, disk="vda", partitions=("vda1",))
    host.mount("vda1", "/")
    found = read(host, DISK)
    assert found.holders == () and found.verdict == "free"
    assert read(host, NIC2).verdict == "critical"


@pytest.mark.parametrize(("mountpoint", "severity"), [
    ("/usr", "critical"), ("/boot", "critical"), ("/boot/efi", "critical"),
    ("/bootstrap", "in_use"), ("/usr2", "in_use"), ("/srv/usr", "in_use")])
def test_system_mount_points_are_critical_and_only_they(host, mountpoint, severity):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.mount("nvme0n1p1", mountpoint)
    assert lines(read(host, DISK)) == [(severity, "mount", f"nvme0n1p1 is mounted at {mountpoint}")]


def test_a_dm_stack_on_a_partition_mounted_at_usr(host):
    host.nvme(DISK, partitions=("nvme0n1p1", "nvme0n1p3"))
    host.stack("dm-0", ["nvme0n1p3"], dm_name="vg-usr")
    host.stack("dm-1", ["dm-0"], dm_name="usr-crypt")  # dm-crypt on the LV: two levels up
    host.mount("dm-1", "/usr")
    assert lines(read(host, DISK)) == [
        ("critical", "mount", "dm-1 (on nvme0n1p3) is mounted at /usr"),
        ("in_use", "stack", "dm-0 is stacked on nvme0n1p3 (device-mapper vg-usr)"),
        ("in_use", "stack", "dm-1 is stacked on dm-0 (device-mapper usr-crypt)"),
    ]


def test_an_md_array_across_two_devices_belongs_to_both(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.virtio_blk(NIC2, disk="vda", partitions=("vda1",))
    host.stack("md0", ["nvme0n1p1", "vda1"], md_level="raid1")
    host.mount("md0", "/")
    assert ("critical", "mount", "md0 (on nvme0n1p1) is mounted at / (root filesystem)") in lines(
        read(host, DISK))
    assert ("critical", "mount", "md0 (on vda1) is mounted at / (root filesystem)") in lines(
        read(host, NIC2))
    assert ("in_use", "stack", "md0 is stacked on vda1 (md raid1)") in lines(read(host, NIC2))


def test_a_btrfs_mount_is_matched_by_its_source_device(host):
    host.nvme(DISK, partitions=("nvme0n1p2",))
    host.mount(None, "/", fstype="btrfs", majmin="0:31", source="/dev/nvme0n1p2")
    assert lines(read(host, DISK)) == [
        ("critical", "mount", "nvme0n1p2 is mounted at / (root filesystem)")]


def test_an_lvm_mount_named_by_its_mapper_path(host):
    host.nvme(DISK, partitions=("nvme0n1p3",))
    host.stack("dm-0", ["nvme0n1p3"], dm_name="vg-root")
    host.mount(None, "/", fstype="btrfs", majmin="0:40", source="/dev/mapper/vg-root")
    assert ("critical", "mount", "dm-0 (on nvme0n1p3) is mounted at / (root filesystem)") in lines(
        read(host, DISK))


def test_disks_behind_virtio_and_an_hba(host):
    host.virtio_blk(NIC2, virtio="virtio2", disk="vda")
    host.scsi_disk(DISK, disk="sda", partitions=("sda1",))
    host.mount("vda", "/srv")
    host.mount("sda1", "/")
    assert lines(read(host, NIC2)) == [("in_use", "mount", "vda is mounted at /srv")]
    assert lines(read(host, DISK)) == [("critical", "mount", "sda1 is mounted at / (root filesystem)")]


def test_a_disk_below_a_nested_pci_device_belongs_to_that_device_not_the_bridge(host):
    bridge, child = "0000:00:1c.0", "0000:06:00.0"
    host.kernel.add_device(bridge, "pci:v00008086d0000A2EBsv0sd0bc06sc04i00", group="6",
                           pci_class=0x060400, driver="pcieport")
    host.kernel.add_device(child, NVME, group="7", pci_class=0x010802, driver="nvme")
    nested = host.sys / "devices" / "pci0000:00" / bridge / child / "nvme" / "nvme1" / "nvme1n1"
    host.block(nested, "nvme1n1", major=259)
    host.mount("nvme1n1", "/")
    assert read(host, bridge).holders == ()
    assert lines(read(host, child)) == [
        ("critical", "mount", "nvme1n1 is mounted at / (root filesystem)")]


def test_swap_partition_swap_on_dm_and_a_swap_file(host):
    host.nvme(DISK, partitions=("nvme0n1p1", "nvme0n1p3", "nvme0n1p4"))
    host.stack("dm-1", ["nvme0n1p3"], dm_name="vg-swap")
    host.mount("nvme0n1p1", "/data")
    host.swap("/dev/nvme0n1p4")
    host.swap("/dev/dm-1")
    host.swap("/data/swap file", kind="file")
    assert [line for line in lines(read(host, DISK)) if line[1] == "swap"] == [
        ("critical", "swap", "nvme0n1p4 is active swap"),
        ("critical", "swap", "dm-1 (on nvme0n1p3) is active swap"),
        ("critical", "swap", "nvme0n1p1 holds the active swap file /data/swap file"),
    ]


def test_swap_elsewhere_is_not_ours(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.virtio_blk(NIC2, disk="vda")
    host.mount("vda", "/")
    host.swap("/dev/vda")
    host.swap("/swapfile", kind="file")  # on / — which is vda, not our disk
    assert read(host, DISK).holders == ()


def test_mountinfo_escapes_are_decoded(host):
    host.nvme(DISK, partitions=("nvme0n1p1", "nvme0n1p2", "nvme0n1p3"))
    host.mount("nvme0n1p1", "/mnt/my data")
    host.mount("nvme0n1p2", "/mnt/back\\slash")
    host.mount("nvme0n1p3", "/mnt/new\nline")
    assert "/mnt/my\\040data" in host.mountinfo.read_text()
    assert [str(h) for h in read(host, DISK).holders] == [
        "nvme0n1p1 is mounted at /mnt/my data",
        "nvme0n1p2 is mounted at /mnt/back\\slash",
        "nvme0n1p3 is mounted at /mnt/new\\nline",  # one line per holder, always
    ]
    assert unescape("/a\\040b\\011c\\012d\\134e") == "/a b\tc\nd\\e"


def test_mountinfo_with_optional_fields_and_garbage_lines():
    text = ("36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\n"
            "garbage\n\n37 35 8:1 / /x rw - \n38 35 x:y / /y rw - ext4 /dev/sdb rw\n"
            "39 35 8:2 / /z rw - ext4 /dev/sdc rw\n")
    assert [(m.majmin, m.mountpoint, m.source, m.fstype) for m in parse_mountinfo(text)] == [
        ("98:0", "/mnt2", "/dev/root", "ext3"), ("8:2", "/z", "/dev/sdc", "ext4")]


def test_mountinfo_falls_back_to_self_when_pid_1_is_unreadable(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.mount("nvme0n1p1", "/")
    (host.proc / "self").mkdir()
    host.mountinfo.rename(host.proc / "self" / "mountinfo")
    host.mountinfo.mkdir()  # reading a directory fails, whoever we run as
    assert lines(read(host, DISK)) == [
        ("critical", "mount", "nvme0n1p1 is mounted at / (root filesystem)")]


def test_unreadable_mountinfo_is_a_critical_unknown(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.mountinfo.unlink()
    host.mountinfo.mkdir()
    found = read(host, DISK)
    assert found.verdict == "critical"
    (unknown,) = found.holders
    assert unknown.kind == "unknown" and unknown.name == "nvme0n1"
    assert unknown.detail.startswith("cannot be checked for mounts: ")
    assert "mountinfo: Is a directory" in unknown.detail


def test_unreadable_mountinfo_does_not_matter_to_a_device_without_disks(host):
    host.mountinfo.unlink()
    (host.proc / "swaps").unlink()
    assert read(host, GPU).holders == ()


def test_unreadable_swaps_is_a_critical_unknown(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    (host.proc / "swaps").unlink()
    (unknown,) = read(host, DISK).holders
    assert (unknown.severity, unknown.kind, unknown.name) == ("critical", "unknown", "nvme0n1")
    assert "cannot be checked for swap" in unknown.detail


def test_a_garbage_dev_file_is_a_critical_unknown(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    (host.sys / "class" / "block" / "nvme0n1p1" / "dev").write_text("\x00\xffgarbage\n")
    assert ("critical", "unknown", "nvme0n1p1 cannot be checked for mounts and swap: its dev file "
            "is unreadable or not major:minor") in lines(read(host, DISK))


# --- network --------------------------------------------------------------------------------
def test_an_ipv6_only_default_route(host):
    host.netdev(NIC, "eth0", under="virtio0")
    host.ip_link("eth0", addrs=("2001:db8::5/64", "fe80::5/64"))
    host.ip_route("eth0", "fe80::1")
    assert lines(read(host, NIC)) == [
        ("critical", "route", "eth0 carries the IPv6 default route via fe80::1"),
        ("in_use", "address", "eth0 is up with 2001:db8::5/64"),
    ]


def test_an_ipv4_default_route_without_gateway_and_a_multipath_one(host):
    host.netdev(NIC, "eth0")
    host.netdev(NIC2, "eth1")
    host.ip_link("eth0", addrs=("192.0.2.5/24",))
    host.ip_link("eth1", addrs=("198.51.100.5/24",))
    host._ip["route"] += [{"dst": "default", "dev": "eth0", "flags": []},
                          {"dst": "default", "nexthops": [
                              {"gateway": "198.51.100.1", "dev": "eth1", "weight": 1}]}]
    host._write_ip()
    reader = HolderReader(host.root, host.ip_command())
    assert lines(read(host, NIC, reader))[0] == ("critical", "route", "eth0 carries the default route")
    assert lines(read(host, NIC2, reader))[0] == (
        "critical", "route", "eth1 carries the default route via 198.51.100.1")


def test_a_bridge_member(host):
    host.netdev(NIC, "eth0")
    host.virtual_netdev("br0", "bridge")
    host.enslave("eth0", "br0")
    host.ip_link("eth0", master="br0")
    host.ip_link("br0", addrs=("10.0.0.1/24",), kind="bridge")
    host.ip_route("br0", None, dst="10.0.0.0/24")
    found = read(host, NIC)
    assert lines(found) == [
        ("in_use", "link", "eth0 is a member of bridge br0"),
        ("info", "netdev", "eth0 is up without addresses"),
    ]
    assert found.verdict == "in_use"


def test_a_bond_master_with_the_default_route(host):
    host.netdev(NIC, "eth0", under="virtio0")
    host.netdev(NIC2, "eth1")
    host.virtual_netdev("bond0", "bond")
    for member in ("eth0", "eth1"):
        host.enslave(member, "bond0")
        host.ip_link(member, master="bond0")
    host.ip_link("bond0", addrs=("192.0.2.5/24",), kind="bond")
    host.ip_route("bond0", "192.0.2.1")
    for bdf, member in ((NIC, "eth0"), (NIC2, "eth1")):
        assert lines(read(host, bdf)) == [
            ("critical", "route", f"{member} carries the default route via 192.0.2.1 (through bond bond0)"),
            ("in_use", "link", f"{member} is a member of bond bond0"),
            ("info", "netdev", f"{member} is up without addresses"),
        ]


def test_a_vlan_in_a_bridge_carrying_the_default_route(host):
    host.netdev(NIC, "eth0")
    host.vlan_on("eth0", "eth0.100")
    host.virtual_netdev("br100", "bridge")
    host.enslave("eth0.100", "br100")
    host.ip_link("eth0")
    host.ip_link("eth0.100", master="br100", kind="vlan")
    host.ip_link("br100", addrs=("192.0.2.5/24",))  # no linkinfo: the kind comes from sysfs
    host.ip_route("br100", "192.0.2.1")
    assert lines(read(host, NIC))[:2] == [
        ("critical", "route",
         "eth0 carries the default route via 192.0.2.1 (through vlan eth0.100, bridge br100)"),
        ("in_use", "link", "eth0 is the lower link of vlan eth0.100"),
    ]


def test_up_with_only_link_local_and_down_are_info(host):
    host.netdev(NIC, "eth0")
    host.netdev(NIC2, "eth1")
    host.ip_link("eth0", addrs=("fe80::5/64",))
    host.ip_link("eth1", up=False, addrs=("192.0.2.9/24",))
    reader = HolderReader(host.root, host.ip_command())
    first, second = read(host, NIC, reader), read(host, NIC2, reader)
    assert lines(first) == [("info", "netdev", "eth0 is up with only link-local addresses")]
    assert lines(second) == [("info", "netdev", "eth1 is down")]
    assert first.verdict == second.verdict == "free"


def test_up_with_a_global_address_is_in_use(host):
    host.netdev(NIC, "eth0")
    host.ip_link("eth0", addrs=("192.0.2.5/24", "fe80::5/64", "2001:db8::5/64"))
    assert lines(read(host, NIC)) == [("in_use", "address", "eth0 is up with 192.0.2.5/24, 2001:db8::5/64")]


def test_one_reader_runs_each_ip_command_once(host):
    host.netdev(NIC, "eth0")
    host.netdev(NIC2, "eth1")
    host.ip_link("eth0")
    host.ip_link("eth1")
    reader = HolderReader(host.root, host.ip_command())
    read(host, NIC, reader)
    read(host, NIC2, reader)
    read(host, DISK, reader)
    assert host.ip_calls() == ["-j -4 route show table all", "-j -6 route show table all",
                               "-j -d addr show"]


def test_failing_ip_is_a_critical_unknown_only_for_a_device_with_interfaces(host):
    host.netdev(NIC, "eth0")
    host.ip_fail("Cannot open netlink socket: Permission denied")
    reader = HolderReader(host.root, host.ip_command())
    assert read(host, DISK, reader).holders == ()
    assert host.ip_calls() == []  # a device without interfaces never asks
    found = read(host, NIC, reader)
    assert lines(found) == [("critical", "unknown", (
        "eth0 cannot be checked for routes: `" + host.ip_command()[0] + " -j -d addr show` failed "
        "(exit 1): Cannot open netlink socket: Permission denied"))]


@pytest.mark.parametrize("case", ["missing", "garbage", "shape"])
def test_missing_ip_or_garbage_json_is_a_critical_unknown(host, case):
    host.netdev(NIC, "eth0", under="virtio0")
    ip = host.ip_command()
    if case == "missing":
        ip = (str(host.root / "no-such-ip"),)
    elif case == "garbage":
        host.ip_garbage("\x00not json {")
    else:
        host.ip_garbage('{"ifname": "eth0"}')
    (unknown,) = read(host, NIC, HolderReader(host.root, ip)).holders
    assert (unknown.severity, unknown.kind, unknown.name) == ("critical", "unknown", "eth0")
    assert unknown.detail.startswith("cannot be checked for routes: ")


def test_an_ip_that_hangs_is_a_critical_unknown_within_the_timeout(host, monkeypatch):
    monkeypatch.setattr(holders_net, "IP_TIMEOUT", 0.3)
    host.netdev(NIC, "eth0")
    started = time.monotonic()
    (unknown,) = read(host, NIC, HolderReader(host.root, ("sh", "-c", "sleep 5", "ip"))).holders
    assert time.monotonic() - started < 3
    assert (unknown.severity, unknown.kind) == ("critical", "unknown")
    assert unknown.detail == ("cannot be checked for routes: `sh -c sleep 5 ip -j -d addr show` "
                              "did not answer within 0.3 s")


def test_an_interface_ip_does_not_list_is_a_critical_unknown(host):
    host.netdev(NIC, "eth0")
    host.ip_link("eth9")
    assert lines(read(host, NIC))[0][:2] == ("critical", "unknown")


# --- display ---------------------------------------------------------------------------------
def test_a_framebuffer_bound_to_fbcon_is_critical(host):
    host.drm(GPU)
    host.framebuffer(GPU, "fb0")
    host.vtconsoles(fbcon_bind="1")
    found = read(host, GPU)
    assert lines(found) == [("critical", "fbcon", "fb0 drives the console (fbcon)")]


def test_a_framebuffer_without_fbcon_is_nothing(host):
    host.framebuffer(GPU, "fb0")
    host.vtconsoles(fbcon_bind="0")
    assert read(host, GPU).holders == ()


def test_a_garbage_vtconsole_bind_is_a_critical_unknown(host):
    host.framebuffer(GPU, "fb0")
    host.vtconsoles(fbcon_bind="\x07maybe")
    (unknown,) = read(host, GPU).holders
    assert (unknown.severity, unknown.kind, unknown.name) == ("critical", "unknown", "fb0")
    assert "vtcon1/bind reads" in unknown.detail


def test_boot_vga_is_info(host):
    host.boot_vga(GPU, "1")
    host.boot_vga(DISK, "0")
    found = read(host, GPU)
    assert lines(found) == [("info", "drm", f"{GPU} is the boot VGA device")]
    assert found.verdict == "free"
    assert read(host, DISK).holders == ()


def test_a_process_with_the_drm_card_open(host):
    host.drm(GPU, card="card0", render="renderD128")
    host.process(1234, "Xorg", fds=("/dev/tty7", "/dev/dri/card0", "socket:[99]"))
    host.process(1300, "firefox", fds=("/dev/dri/renderD128", "/dev/dri/renderD129"))
    host.process(1400, "bash", fds=("/dev/pts/0",))
    assert lines(read(host, GPU)) == [
        ("in_use", "process", "1234 (Xorg) has /dev/dri/card0 open"),
        ("in_use", "process", "1300 (firefox) has /dev/dri/renderD128 open"),
    ]


# --- SR-IOV ----------------------------------------------------------------------------------
def test_a_pf_with_vfs_one_held_by_a_vm(host):
    host.kernel.add_device(PF, IGB, group="20", driver="igb")
    host.sriov(PF, ["0000:05:10.0", "0000:05:10.2"], first_group=21, driver="igbvf")
    host.kernel.devices.joinpath("0000:05:10.2", "driver").unlink()
    host.kernel._bind("0000:05:10.2", "vfio-pci")
    host.kernel.hold_open("0000:05:10.2", None, pid=4321, comm="qemu-system-x86")
    found = read(host, PF)
    assert lines(found) == [
        ("critical", "sriov", f"{PF} has 2 SR-IOV VFs; unbinding its driver destroys them all"),
        ("info", "vf", "0000:05:10.0 (VF) is on igbvf"),
        ("info", "vf", "0000:05:10.2 (VF) is on vfio-pci, held by 4321 (qemu-system-x86)"),
    ]


def test_one_vf_and_a_garbage_numvfs(host):
    host.kernel.add_device(PF, IGB, group="20", driver="igb")
    host.sriov(PF, ["0000:05:10.0"], first_group=21)
    (host.device(PF) / "sriov_numvfs").write_text("\xffjunk\n")
    assert lines(read(host, PF)) == [
        ("critical", "sriov", f"{PF} has 1 SR-IOV VF; unbinding its driver destroys it"),
        ("info", "vf", "0000:05:10.0 (VF) has no driver"),
    ]


def test_sriov_capable_without_vfs_is_nothing(host):
    host.kernel.add_device(PF, IGB, group="20", driver="igb")
    (host.device(PF) / "sriov_totalvfs").write_text("7\n")
    (host.device(PF) / "sriov_numvfs").write_text("0\n")
    assert read(host, PF).holders == ()


# --- processes -------------------------------------------------------------------------------
def test_a_process_with_the_vfio_group_or_cdev_open(host):
    host.kernel.devices.joinpath(NIC, "driver").unlink()
    host.kernel._bind(NIC, "vfio-pci")
    host.kernel.hold_open(NIC, None, pid=4242, comm="qemu-system-x86")
    host.process(5000, "qemu-iommufd", fds=("/dev/iommu", "/dev/vfio/devices/vfio0"))
    assert lines(read(host, NIC)) == [
        ("in_use", "process", "4242 (qemu-system-x86) has /dev/vfio/4 open"),
        ("in_use", "process", "5000 (qemu-iommufd) has /dev/vfio/devices/vfio0 open"),
    ]


def test_a_vfio_group_held_through_another_member(host):
    """The group node exists while any member is on VFIO (/sys/class/vfio/<group>)."""
    vfio = host.sys / "devices" / "virtual" / "vfio" / "3"
    vfio.mkdir(parents=True)
    (host.sys / "class" / "vfio").mkdir(parents=True)
    os.symlink(vfio, host.sys / "class" / "vfio" / "3")
    host.process(4242, "qemu-system-x86", fds=("/dev/vfio/3",))
    assert lines(read(host, DISK)) == [
        ("in_use", "process", "4242 (qemu-system-x86) has /dev/vfio/3 open")]


def test_a_process_mapping_resource0(host):
    host.process(77, "dpdk", maps=("/usr/bin/dpdk", resource_path(NIC, 0), resource_path(NIC, 2) + "_wc",
                                   resource_path(NIC2, 0)))
    host.process(78, "other", maps=(resource_path(NIC2, 0),))
    assert lines(read(host, NIC)) == [("in_use", "process", "77 (dpdk) maps resource0, resource2_wc")]


def test_kernel_threads_are_skipped_without_reading_their_files(host):
    host.drm(GPU)
    # an empty maps file says "kernel thread": its fd directory is never opened
    host.process(2, "kthreadd", fds=("/dev/dri/card0",), kernel_thread=True)
    assert read(host, GPU).holders == ()


def test_a_process_vanishing_between_listing_and_reading_is_skipped(host, monkeypatch):
    host.nvme(DISK)
    host.process(100, "gone", fds=("/dev/nvme0n1",), maps=(resource_path(DISK),))
    host.process(101, "stays", fds=("/dev/nvme0n1",))
    read_maps = Found.read_maps

    def exit_first(found, pid_dir, pid):
        if pid == 100:
            shutil.rmtree(pid_dir)  # exits after /proc was listed
        return read_maps(found, pid_dir, pid)

    monkeypatch.setattr(Found, "read_maps", exit_first)
    assert lines(read(host, DISK)) == [("in_use", "process", "101 (stays) has /dev/nvme0n1 open")]


def test_a_process_vanishing_between_its_fd_listing_and_readlink_is_skipped(host, monkeypatch):
    host.nvme(DISK)
    host.process(100, "gone", fds=("/dev/nvme0n1", "/dev/null"))
    host.process(101, "stays", fds=("/dev/nvme0n1",))
    readlink = os.readlink
    gone = str(host.proc / "100")

    def exit_midway(path, *, dir_fd=None):
        if dir_fd is not None and os.path.exists(gone) and os.readlink(f"/proc/self/fd/{dir_fd}") == (
                f"{gone}/fd"):
            shutil.rmtree(gone)
        return readlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(holders_procs.os, "readlink", exit_midway)
    assert lines(read(host, DISK)) == [("in_use", "process", "101 (stays) has /dev/nvme0n1 open")]
    assert not os.path.exists(gone)


def test_a_process_exiting_before_its_name_is_read_is_skipped(host, monkeypatch):
    host.nvme(DISK)
    host.process(100, "gone", fds=("/dev/nvme0n1",))
    reader = HolderReader(host.root, host.ip_command())
    reader._processes.nodes()
    shutil.rmtree(host.proc / "100")
    assert read(host, DISK, reader).holders == ()


def test_one_reader_scans_proc_once_for_many_devices(host, monkeypatch):
    host.nvme(DISK)
    host.drm(GPU)
    for pid in range(100, 110):
        host.process(pid, f"p{pid}", fds=("/dev/null",))
    calls = []
    read_maps = Found.read_maps
    monkeypatch.setattr(Found, "read_maps",
                        lambda found, d, pid: calls.append(pid) or read_maps(found, d, pid))
    reader = HolderReader(host.root, host.ip_command())
    for bdf in (DISK, GPU, NIC, DISK):
        read(host, bdf, reader)
    assert sorted(calls) == [1, *range(100, 110)]  # pid 1 holds the mountinfo


def test_processes_we_may_not_inspect_are_an_in_use_unknown(host, monkeypatch):
    host.nvme(DISK)
    host.process(100, "root-only", fds=("/dev/nvme0n1",))
    os_open = os.open

    def denied(path, flags, *args, **kwargs):
        if str(path).startswith(str(host.proc / "100")):
            raise PermissionError(13, "Permission denied", path)
        return os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(holders_procs.os, "open", denied)
    assert lines(read(host, DISK)) == [
        ("in_use", "unknown", "1 process could not be inspected (permission denied; run as root to see all)")]


def test_an_unlistable_proc_is_a_critical_unknown(host):
    shutil.rmtree(host.proc)
    host.proc.write_text("not a directory")
    found = read(host, GPU)
    assert [(h.severity, h.kind, h.name) for h in found.holders] == [("critical", "unknown", "processes")]


# --- hostile content ---------------------------------------------------------------------------
def test_garbage_everywhere_never_crashes(host):
    host.nvme(DISK, partitions=("nvme0n1p1",))
    host.mount("nvme0n1p1", "/data")
    host.drm(GPU)
    with host.mountinfo.open("a") as out:
        out.write("\x00\x01 garbage - - -\n" + "x" * 10000 + "\n1 2 3\n")
    (host.proc / "swaps").write_bytes(b"Filename Type\n\xff\xfe garbage\n/dev/nvme0n1p1\n")
    (host.proc / "self").write_text("not a dir")
    (host.proc / "notapid").mkdir()
    (host.proc / "١٢").mkdir()  # digits, but not ASCII ones
    (host.sys / "class" / "block" / "junkfile").write_text("not a link")
    os.symlink("/nowhere/0000:01:00.0/drm/card9", host.sys / "dev" / "char" / "99:99")  # dangling
    bad = host.process(300, "bad\x1b[31mname\n", fds=("/dev/dri/card0", "/dev/../etc/passwd"),
                       maps=("/usr/bin/x",))
    (bad / "maps").write_bytes(b"\xff\xfe\x00" * 1000 + maps_line(resource_path(GPU, 1)).encode() + b"\n")
    (bad / "fd" / "notalink").write_text("x")
    (host.device(GPU) / "boot_vga").write_bytes(b"\xff")
    (host.device(GPU) / "sriov_numvfs").write_text("-3\n")
    (host.device(GPU) / "iommu_group").unlink()
    (host.device(GPU) / "iommu_group").write_text("garbage")
    assert lines(read(host, DISK)) == [("in_use", "mount", "nvme0n1p1 is mounted at /data")]
    assert lines(read(host, GPU)) == [
        ("in_use", "process", "300 (bad\\x1b[31mname) has /dev/dri/card0 open"),
        ("in_use", "process", "300 (bad\\x1b[31mname) maps resource1"),
    ]


def test_no_such_device_is_input_error(host):
    with pytest.raises(InputError, match=r"no PCI device 0000:09:00\.0"):
        read(host, "0000:09:00.0")


# --- the API's shapes ---------------------------------------------------------------------------
def test_holder_text_and_json():
    holder = Holder("mount", "nvme0n1p2", "is mounted at / (root filesystem)", "critical")
    assert str(holder) == "nvme0n1p2 is mounted at / (root filesystem)"
    assert holder.to_json() == {"kind": "mount", "name": "nvme0n1p2",
                                "detail": "is mounted at / (root filesystem)", "severity": "critical",
                                "text": "nvme0n1p2 is mounted at / (root filesystem)"}


def test_device_holders_verdict_and_json(host):
    assert read(host, GPU).to_json() == {"address": GPU, "verdict": "free", "holders": []}
    info = Holder("netdev", "eth0", "is down", "info")
    used = Holder("address", "eth0", "is up with 192.0.2.5/24", "in_use")
    address = PciAddress.parse(NIC)
    assert DeviceHolders(address, (info,)).verdict == "free"
    assert DeviceHolders(address, (used, info)).verdict == "in_use"
    both = DeviceHolders(address, (Holder("route", "eth0", "carries the default route", "critical"), used))
    assert both.verdict == "critical"
    assert both.to_json()["holders"][1]["severity"] == "in_use"
