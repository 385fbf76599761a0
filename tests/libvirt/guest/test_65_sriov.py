"""SR-IOV VFs of the igb PF through libvirt (issue 11).

  * <interface type='hostdev' managed='no'> on a VF, with a MAC: the qemu hook binds
    the VF at prepare and restores it at release; libvirt sets the MAC through the PF.
  * <interface type='network'> on a managed='no' hostdev pool: libvirt picks the VF
    while it allocates the port, after the qemu hook's prepare, so the network hook
    (port-created / port-deleted) binds and restores it.
  * a managed='yes' pool: libvirt binds and gives back the VF itself; the network hook
    only records the VF's driver (a `watch`) and gives it back if libvirt does not.

The managed='yes' pool goes first, while the VFs are fresh in the daemon's life: libvirt
11.3 remembers a device's earlier managed='no' use and then does not give it back at
stop (see test_40); the last test is that case.  The `sriov` fixtures enable the VFs
with the PF's netdev up.  Every check also checks the PF (on igb, netdev up, same
ifindex, all its VFs: a PF that lost its driver would have destroyed every VF) and the
VF no domain uses (on igbvf, same netdev).
"""

from __future__ import annotations

import json

import pytest

from tests.kernel.guest.guest_sysfs import PciDevice
from tests.libvirt.guest import guest_libvirt as G
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs

# An igb VF (8086:10ca) matches no variant driver: its best VFIO driver is vfio-pci.
VFIO = "vfio-pci"
MAC = "52:54:00:76:6c:65"
RESTORE_SECONDS = 30


def _intact(sriov, *unused: PciDevice) -> None:
    problems = sriov.pf_problems() + [p for vf in unused for p in sriov.untouched(vf)]
    assert not problems, problems


def _assert_given_to(name: str, vf: PciDevice) -> None:
    """The VF is on a VFIO driver and the domain's QEMU has it open."""
    assert (vf.driver, vf.override) == (VFIO, VFIO), f"{vf}: {vf.driver}, override {vf.override}"
    assert (vf.path / "vfio-dev").is_dir(), f"{vf} on {vf.driver} has no vfio-dev/"
    pid = G.qemu_pid(name)
    assert G.holds_vfio(pid, vf), (
        f"QEMU {pid} does not hold {vf} (group {vf.iommu_group}): {sorted(G.open_files(pid))}")


def _assert_home(vf: PciDevice) -> None:
    assert vf.wait_driver(H.IGB_VF_DRIVER, timeout=RESTORE_SECONDS) == H.IGB_VF_DRIVER, (
        f"{vf} not back on {H.IGB_VF_DRIVER}")
    assert vf.override == "(null)"


def _status_rows() -> dict[str, dict]:
    proc = G.vfio_libvirt("status", "--json", "--connect", G.URI)
    assert proc.returncode == 0, G.describe(proc)
    return {row["address"]: row for row in json.loads(proc.stdout)["devices"]}


def _pool_vf(sriov, pool: str, name: str, managed: str) -> tuple[PciDevice, PciDevice]:
    """The VF the pool's one port gave the domain (net-port-dumpxml and the live domain
    XML must agree), and the other VF."""
    (port,) = G.network_ports(pool)
    assert (port["owner"], port["plug"], port["managed"]) == (name, "hostdev-pci", managed), port["xml"]
    (iface,) = G.live_interfaces(name)
    assert (iface["type"], iface["bdf"]) == ("hostdev", port["bdf"]), (iface, port["xml"])
    vf = sriov.vf(port["bdf"])
    (other,) = [v for v in sriov.vfs if v is not vf]
    return vf, other


def test_managed_yes_pool_is_libvirts_and_the_hook_only_watches(lv, sriov, devices, domains):
    pool = sriov.networks.hostdev_pool("vfpool-yes", sriov.netdev, managed=True)
    name = domains.define("sriov-pool-yes", [], [G.network_interface(pool)])
    mark = lv.syslog.mark()
    domains.start(name)

    vf, other = _pool_vf(sriov, pool, name, "yes")
    _assert_given_to(name, vf)     # libvirt bound it (vfio-pci, its override)
    _intact(sriov, other)
    # the network hook only watches: it recorded the VF's driver, libvirt bound it
    (entry,) = G.journal().values()
    assert (entry["address"], entry["role"], entry["network"]) == (vf.bdf, "watch", pool), entry
    assert entry["original_driver"] == H.IGB_VF_DRIVER

    domains.destroy(name)
    _assert_home(vf)
    assert G.journal() == {}
    _intact(sriov, other)
    assert not [line for line in lv.syslog.hook_lines(mark) if vf.bdf in line and "bound to" in line]


def test_hostdev_interface_on_a_vf_with_a_mac(lv, sriov, devices, domains):
    vf, other = sriov.vfs
    name = domains.define("sriov-iface", [], [G.hostdev_interface(vf.bdf, MAC)])
    mark = lv.syslog.mark()
    domains.start(name)

    _assert_given_to(name, vf)
    _intact(sriov, other)
    entries = G.journal()
    assert sorted(entries) == [vf.bdf], entries
    entry = entries[vf.bdf]
    assert (entry["domain"], entry["role"], entry["status"]) == (name, "bind", "bound"), entry
    assert (entry["original_driver"], entry["target_driver"]) == (H.IGB_VF_DRIVER, VFIO), entry
    assert entry.get("network") is None, entry
    assert lv.syslog.find(f"{name} {vf.bdf}: bound to {VFIO}", mark), lv.syslog.hook_lines(mark)
    # libvirt set the MAC on the VF through the PF before QEMU started
    (iface,) = G.live_interfaces(name)
    assert (iface["type"], iface["mac"], iface["bdf"]) == ("hostdev", MAC, vf.bdf), iface
    assert sriov.vf_macs().get(sriov.vf_index(vf.bdf)) == MAC, sriov.vf_macs()

    domains.destroy(name)
    _assert_home(vf)
    assert G.journal() == {}
    _intact(sriov, other)
    assert lv.syslog.find(f"{name} {vf.bdf}: restored to {H.IGB_VF_DRIVER}", mark)


def test_managed_no_pool_goes_through_the_network_hook(lv, sriov, devices, domains):
    pool = sriov.networks.hostdev_pool("vfpool-no", sriov.netdev, managed=False)
    name = domains.define("sriov-pool-no", [], [G.network_interface(pool)])
    _intact(sriov, *sriov.vfs)      # net-start alone changes nothing
    mark = lv.syslog.mark()
    domains.start(name)

    vf, other = _pool_vf(sriov, pool, name, "no")
    _assert_given_to(name, vf)
    _intact(sriov, other)
    entries = G.journal()
    assert sorted(entries) == [vf.bdf], entries
    entry = entries[vf.bdf]
    assert (entry["domain"], entry["network"]) == (name, pool), entry
    assert (entry["role"], entry["status"]) == ("bind", "bound"), entry
    assert (entry["original_driver"], entry["target_driver"]) == (H.IGB_VF_DRIVER, VFIO), entry
    row = _status_rows()[vf.bdf]     # status names the pool and the PF
    assert (row["driver"], row["domain"], row["original_driver"]) == (VFIO, name, H.IGB_VF_DRIVER), row
    assert (row["network"], row["pf"]) == (pool, sriov.pf.bdf), row

    domains.destroy(name)
    _assert_home(vf)
    assert G.journal() == {}
    assert G.network_ports(pool) == []
    _intact(sriov, other)
    print("hooks, start to stop:", *lv.syslog.hook_lines(mark), sep="\n  ")


def test_managed_yes_pool_after_managed_no_use_gives_the_vf_back(lv, sriov, devices, domains):
    """The VFs were used managed='no' above: libvirt 11.3 then leaves a managed='yes'
    VF on vfio-pci at stop (its stale inactive-device entry says unmanaged).  Whoever
    does it, the VF must be home after destroy."""
    pool = sriov.networks.hostdev_pool("vfpool-mixed", sriov.netdev, managed=True)
    name = domains.define("sriov-pool-mixed", [], [G.network_interface(pool)])
    mark = lv.syslog.mark()
    domains.start(name)
    vf, other = _pool_vf(sriov, pool, name, "yes")
    _assert_given_to(name, vf)
    _intact(sriov, other)

    domains.destroy(name)
    assert vf.wait_driver(H.IGB_VF_DRIVER, timeout=RESTORE_SECONDS) == H.IGB_VF_DRIVER, (
        f"{vf} left on {vf.driver} (override {vf.override}); hooks: {lv.syslog.hook_lines(mark)}")
    assert vf.override == "(null)"
    assert G.journal() == {}
    _intact(sriov, other)
    print("hooks, start to stop:", *lv.syslog.hook_lines(mark), sep="\n  ")
