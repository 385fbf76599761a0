"""Kernel facts about the real test hardware (QEMU >= 8), checked on a real 6.12 kernel.

The host-safety tests (test_guest_host_safety.py) refuse an SR-IOV PF with VFs, a
mounted NVMe and the default-route NIC; these tests show that the hardware under them
is what it claims to be, so a product test cannot pass for the wrong reason (a PF
whose VFs never appear, an NVMe whose namespace is not where the product looks).
They check the kernel, not the product: raw sysfs writes, mount, ip.  Every test
leaves the hardware as it found it (the `igb`/`nvme`/`pci` fixtures check it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.kernel.guest.guest_sysfs import (
    default_routes,
    mounts_of,
    netdev_names,
    nvme_block_devices,
    run,
    udev_settle,
    wait_for,
)
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs

NAMESPACE = H.NVME_NAMESPACE


def _parent(bdf: str) -> str:
    """The address of the bridge a PCI device sits behind (its sysfs parent)."""
    return Path(os.path.realpath(f"/sys/bus/pci/devices/{bdf}")).parent.name


def _group_members(group: str) -> list[str]:
    return sorted(os.listdir(f"/sys/kernel/iommu_groups/{group}/devices"))


@pytest.mark.parametrize("spec", H.HARDWARE_DEVICES, ids=lambda s: s.name)
def test_hardware_identity(request, spec):
    dev = request.getfixturevalue(spec.name)  # the igb / nvme fixture
    assert dev.attr("vendor") == spec.vendor
    assert dev.attr("device") == spec.device
    assert dev.attr("modalias") == spec.modalias_prefix
    assert dev.driver == spec.host_driver
    assert dev.override == "(null)"
    assert dev.group_members() == [spec.bdf]  # alone in its IOMMU group


def test_igb_pf_sits_behind_the_root_port(igb):
    assert _parent(igb.bdf) == H.IGB_ROOT_PORT_BDF
    assert igb.totalvfs >= 2
    assert igb.numvfs == 0 and igb.vf_bdfs() == []
    assert netdev_names(igb), f"{igb} has no network interface"


def test_sriov_numvfs_creates_vfs_on_igbvf_each_in_its_own_iommu_group(igb):
    vfs = igb.enable_vfs(2)
    assert igb.numvfs == 2
    groups = {igb.iommu_group}
    for vf in vfs:
        assert (vf.attr("vendor"), vf.attr("device")) == (H.IGB_VF_VENDOR, H.IGB_VF_DEVICE)
        assert vf.driver == H.IGB_VF_DRIVER
        assert os.path.basename(os.readlink(vf.path / "physfn")) == igb.bdf
        assert _parent(vf.bdf) == H.IGB_ROOT_PORT_BDF  # on the PF's bus
        assert vf.group_members() == [vf.bdf]
        groups.add(vf.iommu_group)
        wait_for(f"{vf}'s network interface", lambda vf=vf: netdev_names(vf))
    assert len(groups) == 3, "the PF and its two VFs share IOMMU groups"
    assert [vf.bdf for vf in vfs] == list(H.IGB_VF_BDFS)

    igb.set_numvfs(0)
    assert igb.numvfs == 0 and igb.vf_bdfs() == []
    for vf in vfs:
        assert not vf.path.exists(), f"{vf} still in sysfs after sriov_numvfs = 0"
    assert igb.driver == "igb"


def test_unbinding_the_pf_driver_destroys_its_vfs_for_good(igb):
    """Why a PF with VFs is host-critical: taking the PF from igb kills every VF, and
    binding igb again does not bring them back."""
    vfs = igb.enable_vfs(2)
    igb.unbind()
    assert igb.driver is None
    assert igb.vf_bdfs() == [] and not any(vf.path.exists() for vf in vfs)
    igb.probe()
    assert igb.wait_driver("igb") == "igb"
    assert igb.numvfs == 0 and igb.vf_bdfs() == []


def test_nvme_namespace_is_the_subsystems_not_below_the_pci_device(nvme):
    """Debian's kernel has native NVMe multipath on: the PCI device's controller holds
    only a hidden path disk without a /dev node; the disk that gets mounted, nvme0n1,
    lives under nvme-subsys0, which links back to the controller.  A holder check that
    looks for block devices below the PCI device alone finds nothing mounted."""
    assert Path("/sys/module/nvme_core/parameters/multipath").read_text().strip() == "Y"
    ctrl = nvme.path / "nvme" / "nvme0"
    assert (ctrl / H.NVME_PATH_DISK / "hidden").read_text().strip() == "1"
    assert not (ctrl / H.NVME_PATH_DISK / "dev").exists()
    assert not (ctrl / NAMESPACE).exists()
    disk = Path(os.path.realpath(f"/sys/class/block/{NAMESPACE}"))
    assert not str(disk).startswith(os.path.realpath(nvme.path) + "/")
    subsys = disk.parent
    assert subsys.name == "nvme-subsys0"
    assert (subsys / "nvme0").resolve() == ctrl.resolve()
    assert nvme_block_devices(nvme) == [NAMESPACE]
    assert Path(f"/dev/{NAMESPACE}").is_block_device()
    size_bytes = int((disk / "size").read_text()) * 512
    assert 1 << 20 <= size_bytes <= 64 << 20, size_bytes  # provision.sh's small image


def test_nvme_mounts_as_ext4_and_a_written_file_reads_back(nvme, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-t", "ext4", f"/dev/{NAMESPACE}", str(mnt))
    try:
        assert mounts_of(f"/dev/{NAMESPACE}") == [str(mnt)]
        name, text = H.NVME_KNOWN_FILE
        assert (mnt / name).read_text() == text  # what provision.sh put in the image
        (mnt / "written.txt").write_text("written in the guest\n")
        os.sync()
        assert (mnt / "written.txt").read_text() == "written in the guest\n"
    finally:
        run("umount", str(mnt))
    assert mounts_of(f"/dev/{NAMESPACE}") == []


def test_unbinding_the_default_route_nic_takes_the_route_with_it(pci):
    """Why the default-route NIC is host-critical: its route vanishes with the netdev,
    and binding the driver again gives a new interface without it."""
    dev = pci["e1000e"]
    (netdev,) = netdev_names(dev)
    assert default_routes() == [], f"the guest already has a default route: {default_routes()}"
    try:
        run("ip", "addr", "add", "192.0.2.2/24", "dev", netdev)
        run("ip", "link", "set", netdev, "up")
        run("ip", "route", "add", "default", "via", "192.0.2.1", "dev", netdev)
        assert [r["dev"] for r in default_routes()] == [netdev]
        dev.unbind()
        assert default_routes() == []
        dev.probe()
        assert dev.wait_driver("e1000e") == "e1000e"
        wait_for(f"{dev}'s new network interface", lambda: netdev_names(dev))
        assert default_routes() == []
    finally:
        udev_settle()  # the new netdev may still be renamed (eth0 -> enp0s17)
        for name in netdev_names(dev):
            run("ip", "route", "flush", "dev", name)
            run("ip", "addr", "flush", "dev", name)
            run("ip", "link", "set", name, "down")
