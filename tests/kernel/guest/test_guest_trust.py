"""Lifecycle defects that only a real kernel shows for certain: can the journal be trusted?

Defect 1: a domain prepared again without a release in between (libvirtd restarted
mid-start) must keep what its first prepare recorded, the "bind" role and the
original drivers and overrides, or its release gives nothing back.
Defect 3: a restore must put the device back on the driver the journal RECORDED, even
when another loaded driver would win a plain re-probe (the bus probes drivers in
registration order, and a dynamic ID makes vfio-pci match a device it otherwise only
takes through driver_override).
Defect 4: `vfio-libvirt restore BDF` for a device the journal does not know must not
unbind a device that already sits on its host driver (that would destroy its netdev),
and must refuse a device a process holds before it writes anything.

The kernel facts these rest on are tested here as well (test_kernel_fact_*), so a
passing product test cannot pass for the wrong reason.  Every test starts and ends
with the devices on their boot drivers (the `pci` fixture checks it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests.kernel.guest.guest_sysfs import (
    SYS_PCI,
    PciDevice,
    add_dynamic_id,
    holding_vfio_group,
    modprobe,
    remove_dynamic_id,
)
from tests.kernel.guest.guest_xml import domain, hostdev
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs

NIC, E1000 = H.VIRTIO_NET.bdf, H.E1000E.bdf
DEVICES = [H.VIRTIO_NET.name, H.E1000E.name]


def shared(hook) -> dict[str, str]:
    """Environment for `product` so that the CLI and the hook share journal and config."""
    return {"VFIO_LIBVIRT_STATE_DIR": str(hook.state), "VFIO_LIBVIRT_CONFIG": str(hook.config)}


def wait_netdevs(dev: PciDevice, timeout: float = 10.0) -> dict[str, str]:
    """The device's netdevs once there is at least one (a probe registers them)."""
    deadline = time.monotonic() + timeout
    while not (found := dev.netdev_ifindexes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


# ------------------------------------------------ defect 1: prepared twice, no release


def test_prepare_again_without_release_keeps_the_role_and_the_originals(pci, hook):
    xml = domain("vm1", hostdev(NIC), hostdev(E1000))
    nic, e1000 = pci["virtio-net"], pci["e1000e"]
    proc = hook("vm1", "prepare", "begin", xml)
    assert proc.returncode == 0, proc.stderr
    first = hook.journal()

    # libvirtd restarted during the start: prepare again, no release in between
    proc = hook("vm1", "prepare", "begin", xml)
    assert proc.returncode == 0, proc.stderr
    assert nic.driver == H.VARIANT_EXACT_DRIVER and e1000.driver == "vfio-pci"
    journal = hook.journal()
    for bdf, original in ((NIC, "virtio-pci"), (E1000, "e1000e")):
        assert journal[bdf]["role"] == "bind", journal[bdf]
        assert journal[bdf]["original_driver"] == original, journal[bdf]
        assert first[bdf]["original_override"] is None  # the pci fixture cleared it
        assert journal[bdf]["original_override"] == first[bdf]["original_override"], journal[bdf]

    proc = hook("vm1", "release", "end", xml)
    assert proc.returncode == 0, proc.stderr
    assert nic.driver == "virtio-pci" and e1000.driver == "e1000e"
    assert nic.override == "(null)" and e1000.override == "(null)"
    assert hook.journal() == {}


def test_cli_bind_twice_then_restore_domain_gives_the_device_back(pci, hook, product):
    e1000 = pci["e1000e"]
    for _ in range(2):
        proc = product("bind", E1000, env=shared(hook))
        assert proc.returncode == 0, proc.stderr
        assert e1000.driver == "vfio-pci"
    assert hook.journal()[E1000]["original_driver"] == "e1000e"

    proc = product("restore", "--domain", "manual", env=shared(hook))
    assert proc.returncode == 0, proc.stderr
    assert e1000.driver == "e1000e", f"restore --domain manual said: {proc.stdout.strip()}"
    assert e1000.override == "(null)"
    assert hook.journal() == {}


# ------------------------------------- defect 3: a second driver matches ahead of the original


@pytest.fixture
def vfio_pci_also_matches_e1000e(pci) -> Iterator[Callable[[], None]]:
    """arm(): make vfio-pci win a plain re-probe of the e1000e device.

    Reloading e1000e puts it after vfio-pci in the bus's driver list, and a dynamic ID
    (new_id) makes vfio-pci match 8086:10d3 without driver_override.  Undone at
    teardown whatever happened: the ID removed, the override cleared, back on e1000e.
    """
    dev = pci["e1000e"]

    def arm() -> None:
        modprobe("vfio_pci")
        modprobe("-r", "e1000e")
        modprobe("e1000e")
        add_dynamic_id("vfio-pci", dev)

    try:
        yield arm
    finally:
        remove_dynamic_id("vfio-pci", dev)
        if not (SYS_PCI / "drivers" / "e1000e").is_dir():
            modprobe("e1000e")  # arm() stopped between its two modprobes
        assert dev.restore() == "e1000e", f"{dev} not back on e1000e: {dev.driver}"


def test_kernel_fact_a_plain_reprobe_hands_e1000e_to_vfio_pci(pci, vfio_pci_also_matches_e1000e):
    dev = pci["e1000e"]
    vfio_pci_also_matches_e1000e()
    assert dev.wait_driver("e1000e") == "e1000e"  # a new ID does not take a bound device
    assert dev.override == "(null)"
    dev.unbind()
    dev.probe()
    # what "clear the override and re-probe" does here: the device goes to vfio-pci
    assert dev.wait_driver("vfio-pci") == "vfio-pci"


def test_release_returns_the_recorded_driver_when_vfio_pci_matches_first(
        pci, hook, vfio_pci_also_matches_e1000e):
    dev = pci["e1000e"]
    xml = domain("vm1", hostdev(E1000))
    proc = hook("vm1", "prepare", "begin", xml)
    assert proc.returncode == 0, proc.stderr
    assert dev.driver == "vfio-pci"
    vfio_pci_also_matches_e1000e()
    assert dev.driver == "vfio-pci"  # the VM still has it

    proc = hook("vm1", "release", "end", xml)
    assert proc.returncode == 0, proc.stderr
    assert dev.driver == "e1000e"
    assert dev.override == "(null)"
    assert hook.journal() == {}


def test_release_restores_the_admins_driver_override_too(pci, hook, vfio_pci_also_matches_e1000e):
    dev = pci["e1000e"]
    dev.set_override("e1000e")  # the admin pinned the device to its driver before the start
    assert dev.driver == "e1000e"
    xml = domain("vm1", hostdev(E1000))
    proc = hook("vm1", "prepare", "begin", xml)
    assert proc.returncode == 0, proc.stderr
    assert dev.driver == "vfio-pci"
    assert hook.journal()[E1000]["original_override"] == "e1000e"
    vfio_pci_also_matches_e1000e()

    proc = hook("vm1", "release", "end", xml)
    assert proc.returncode == 0, proc.stderr
    assert dev.driver == "e1000e"
    assert dev.override == "e1000e"
    assert hook.journal() == {}


# ------------------------------- defect 4: `restore BDF` on a device the journal does not know


@pytest.mark.parametrize("name", DEVICES)
def test_kernel_fact_a_rebind_gives_the_netdev_a_new_ifindex(pci, name):
    dev = pci[name]
    before = dev.netdev_ifindexes()
    assert before, f"{dev} has no network interface to watch"
    dev.unbind()
    dev.probe()
    assert dev.wait_driver(dev.spec.host_driver) == dev.spec.host_driver
    after = wait_netdevs(dev)
    assert after and set(after.values()).isdisjoint(before.values()), (before, after)


@pytest.mark.parametrize("name", DEVICES)
def test_restore_of_a_device_on_its_host_driver_and_not_in_the_journal_touches_nothing(
        pci, hook, product, name):
    dev = pci[name]
    before = dev.netdev_ifindexes()
    assert before, f"{dev} has no network interface to watch"
    assert hook.journal() == {}

    proc = product("restore", dev.bdf, env=shared(hook))
    assert proc.returncode == 0, proc.stderr
    # an unbind/rebind would have replaced the netdev (see the kernel fact above); compare
    # ifindexes only: udev may still be renaming a netdev an earlier test created
    after = wait_netdevs(dev)
    assert sorted(after.values()) == sorted(before.values()), (
        f"the device was rebound ({before} -> {after}): {proc.stdout.strip()}")
    assert dev.driver == dev.spec.host_driver
    assert dev.override == "(null)"
    assert "nothing to do" in proc.stdout, proc.stdout
    assert hook.journal() == {}


def test_restore_of_a_held_vfio_device_not_in_the_journal_is_refused_untouched(pci, hook, product):
    dev = pci["e1000e"]
    modprobe("vfio_pci")
    assert dev.bind_via_override("vfio-pci") == "vfio-pci"  # by hand: not in the journal
    with holding_vfio_group(dev) as holder:
        proc = product("restore", E1000, env=shared(hook))
        assert dev.override == "vfio-pci", "restore changed driver_override of a held device"
        assert dev.driver == "vfio-pci"
        assert proc.returncode == 1, proc.stdout + proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and str(holder.pid) in lines[0], proc.stderr
    assert hook.journal() == {}
