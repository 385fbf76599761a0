"""Host safety on a real kernel: the hook refuses what the host still needs.

Unbinding a driver takes the device away from the host at once (design §5): a mounted
NVMe fails every read, the default-route NIC takes the route with it, a PF's VFs are
destroyed.  So `prepare` must refuse such a device before it writes anything, with one
line saying why, and leave the device and the host working; once the admin stops using
it (unmount, route and address removed and the link down, VFs disabled), the same
start works.  An idle VF is an ordinary device.  `vfio-libvirt holders BDF --json`
shows what the guard sees.

Runs `hooks/qemu` as libvirtd does (argv + domain XML, managed='no') and the CLI via
`product`, against the guest's real /sys.  The kernel facts under these tests are in
test_guest_hardware.py.  Every test restores the guest (unmount, routes, VFs off,
boot drivers) whatever happens.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.guest.guest_sysfs import (
    PciDevice,
    SriovPf,
    addresses_of,
    default_routes,
    ip_json,
    mounts_of,
    netdev_names,
    run,
    udev_settle,
    wait_for,
)
from tests.kernel.guest.guest_xml import domain, hostdev
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs

NVME, E1000, PF = H.NVME.bdf, H.E1000E.bdf, H.IGB_PF.bdf
NAMESPACE = H.NVME_NAMESPACE
GATEWAY, ADDRESS = "192.0.2.1", "192.0.2.2/24"   # TEST-NET-1: never a real network


def refusal(proc: subprocess.CompletedProcess, bdf: str) -> str:
    """The one stderr line of a refused prepare, checked for its fixed parts."""
    assert proc.returncode == 1, f"prepare was not refused (rc {proc.returncode}): {proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"want exactly one stderr line, got {len(lines)}: {proc.stderr}"
    line = lines[0]
    assert line.startswith("vfio-libvirt: vm1: "), line
    assert f"{bdf}: refusing:" in line, line
    return line


def holders(product, bdf: str) -> dict:
    """`vfio-libvirt holders BDF --json`: the device's report ({"verdict", "holders": [...]}).

    A list of reports is accepted too (the one for `bdf` is taken).
    """
    proc = product("holders", bdf, "--json")
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"holders {bdf} --json gave no JSON (rc {proc.returncode}): "
                    f"stdout {proc.stdout!r}, stderr {proc.stderr!r}")
    if isinstance(data, list):
        reports = [r for r in data if isinstance(r, dict) and r.get("address") == bdf]
        assert len(reports) == 1, f"holders {bdf}: want one report for {bdf}: {data}"
        data = reports[0]
    assert isinstance(data, dict) and isinstance(data.get("holders"), list), data
    return data


def prepare_then_release(hook, dev: PciDevice, xml: str) -> None:
    """The device is usable: prepare puts it on vfio-pci, release gives it back."""
    proc = hook("vm1", "prepare", "begin", xml)
    assert proc.returncode == 0, proc.stderr
    assert dev.driver == "vfio-pci"
    assert dev.bdf in hook.journal()
    proc = hook("vm1", "release", "end", xml)
    assert proc.returncode == 0, proc.stderr
    assert dev.wait_driver(dev.spec.host_driver) == dev.spec.host_driver
    assert dev.override == "(null)"
    assert hook.journal() == {}


# ------------------------------------------------------------------ a. a mounted NVMe


@pytest.fixture
def mounted_nvme(nvme, tmp_path) -> Iterator[tuple[Path, Path]]:
    """(mount point, a file written there): the NVMe's ext4 mounted under /tmp."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-t", "ext4", f"/dev/{NAMESPACE}", str(mnt))
    try:
        data = mnt / "data.txt"
        data.write_text("the host's data\n")
        yield mnt, data
    finally:
        if str(mnt) in mounts_of(f"/dev/{NAMESPACE}"):
            run("umount", str(mnt))


def test_a_mounted_nvme_is_refused_and_stays_readable(nvme, hook, mounted_nvme):
    mnt, data = mounted_nvme
    xml = domain("vm1", hostdev(NVME))
    line = refusal(hook("vm1", "prepare", "begin", xml), NVME)
    assert NAMESPACE in line and str(mnt) in line, line
    assert nvme.driver == "nvme"
    assert mounts_of(f"/dev/{NAMESPACE}") == [str(mnt)]
    assert data.read_text() == "the host's data\n"
    assert NVME not in hook.journal()

    run("umount", str(mnt))
    prepare_then_release(hook, nvme, xml)


def test_holders_of_a_mounted_nvme_name_the_mount(nvme, product, mounted_nvme):
    mnt, _ = mounted_nvme
    report = holders(product, NVME)
    assert report["verdict"] == "in_use", report
    named = [h for h in report["holders"] if str(h.get("name", "")).startswith(NAMESPACE)]
    assert any(str(mnt) in str(h.get("detail", "")) for h in named), report


# ------------------------------------------------------------------ b. the default-route NIC


@pytest.fixture
def default_route_nic(pci) -> Iterator[PciDevice]:
    """The e1000e carries the guest's default route (address, link up, route).

    The guest has no default route of its own (checked); afterwards every route, address
    and link state is as before, on whatever netdev the device has by then.
    """
    dev = pci["e1000e"]
    (netdev,) = netdev_names(dev)
    routes_before = ip_json("route", "show")
    assert default_routes() == [], f"the guest already has a default route: {default_routes()}"
    try:
        run("ip", "addr", "add", ADDRESS, "dev", netdev)
        run("ip", "link", "set", netdev, "up")
        run("ip", "route", "add", "default", "via", GATEWAY, "dev", netdev)
        yield dev
    finally:
        stop_using(dev)
        assert ip_json("route", "show") == routes_before


def stop_using(dev: PciDevice) -> None:
    """What the admin does before giving the NIC away: route, addresses, link down.

    Only where there is something to undo, and by the names udev has settled on: after
    a release the device has a new netdev that udev may still be renaming.
    """
    udev_settle()
    ifindexes = {int(i) for i in dev.netdev_ifindexes().values()}
    for link in ip_json("addr", "show"):
        if link.get("ifindex") not in ifindexes:
            continue
        name = link["ifname"]
        if any(r.get("dev") == name for r in default_routes()):
            run("ip", "route", "del", "default", "dev", name)
        if link.get("addr_info"):
            run("ip", "addr", "flush", "dev", name)
        if "UP" in link.get("flags", []):
            run("ip", "link", "set", name, "down")


def test_the_default_route_nic_is_refused_and_the_route_stays(pci, hook, default_route_nic):
    dev = default_route_nic
    ifindexes = dev.netdev_ifindexes()
    xml = domain("vm1", hostdev(E1000))
    line = refusal(hook("vm1", "prepare", "begin", xml), E1000)
    assert "default route" in line, line
    assert dev.driver == "e1000e"
    assert dev.netdev_ifindexes() == ifindexes  # never unbound
    assert [(r.get("gateway"), r.get("dev")) for r in default_routes()] == [
        (GATEWAY, next(iter(ifindexes)))]
    assert E1000 not in hook.journal()

    stop_using(dev)
    prepare_then_release(hook, dev, xml)


def test_holders_of_the_default_route_nic_say_critical(pci, product, default_route_nic):
    report = holders(product, E1000)
    assert report["verdict"] == "critical", report
    assert any("default route" in json.dumps(h) for h in report["holders"]), report


# ------------------------------------------------------------------ c. a PF with VFs


def test_a_pf_with_vfs_is_refused_and_its_vfs_stay(igb, hook):
    vfs = igb.enable_vfs(2)
    xml = domain("vm1", hostdev(PF))
    line = refusal(hook("vm1", "prepare", "begin", xml), PF)
    assert "SR-IOV" in line or "VFs" in line, line
    assert igb.driver == "igb"
    assert igb.numvfs == 2 and igb.vf_bdfs() == [vf.bdf for vf in vfs]
    assert all(vf.driver == H.IGB_VF_DRIVER for vf in vfs)
    assert PF not in hook.journal()

    igb.set_numvfs(0)
    prepare_then_release(hook, igb, xml)
    assert igb.numvfs == 0


def test_holders_of_a_pf_with_vfs_list_the_vfs(igb, product):
    vfs = igb.enable_vfs(2)
    report = holders(product, PF)
    assert report["verdict"] == "critical", report
    text = json.dumps(report["holders"])
    missing = [vf.bdf for vf in vfs if vf.bdf not in text]
    assert not missing, f"VFs {missing} not among the holders: {report}"


# ------------------------------------------------------------------ d. an idle VF


def test_an_idle_vf_is_bound_and_restored_and_the_pf_keeps_its_vfs(igb: SriovPf, hook):
    vfs = igb.enable_vfs(2)
    vf, other = vfs
    assert netdev_names(vf) and addresses_of(vf) == []  # idle: igbvf leaves it down
    xml = domain("vm1", hostdev(vf.bdf))
    proc = hook("vm1", "prepare", "begin", xml)
    assert proc.returncode == 0, proc.stderr
    assert vf.driver == "vfio-pci"
    assert igb.driver == "igb" and igb.vf_bdfs() == [vf.bdf, other.bdf]
    assert other.driver == H.IGB_VF_DRIVER

    proc = hook("vm1", "release", "end", xml)
    assert proc.returncode == 0, proc.stderr
    assert vf.wait_driver(H.IGB_VF_DRIVER) == H.IGB_VF_DRIVER
    assert vf.override == "(null)"
    assert igb.numvfs == 2 and other.driver == H.IGB_VF_DRIVER
    assert hook.journal() == {}
    wait_for(f"{vf}'s network interface", lambda: netdev_names(vf))
