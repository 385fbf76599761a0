"""The CLI against the real daemon: test-hook, doctor, attach/detach (hotplug)."""

from __future__ import annotations

import json

import pytest

from tests.libvirt.guest import guest_libvirt as G
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs


def _state(devices) -> list[tuple]:
    return [(dev.bdf, dev.driver, dev.override) for dev in devices]


def test_test_hook_dry_run_fetches_xml_and_changes_nothing(lv, devices, domains):
    name = domains.define("cli-plan", [(devices.virtio_net.bdf, False)])
    state_before = G.tree_listing(G.JOURNAL.parent, times=True)
    sysfs_before = _state(devices)

    proc = G.vfio_libvirt("test-hook", name, "prepare", "--dry-run", "--connect", G.URI)
    assert proc.returncode == 0, G.describe(proc)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"$ {G.HOOK} {name} prepare begin - < domain XML ("), lines
    assert any(line.startswith(f"{devices.virtio_net.bdf}: bind → {H.VARIANT_EXACT_MODULE}")
               for line in lines), proc.stdout
    assert lines[-1] == "exit code 0"

    assert _state(devices) == sysfs_before
    # journal, lock and libvirt version cache (warm: earlier hook runs made it)
    assert G.tree_listing(G.JOURNAL.parent, times=True) == state_before
    assert not G.is_running(name)


def test_doctor_on_the_real_daemon(lv, devices, domains):
    name = domains.define("cli-doctor", [(devices.virtio_net.bdf, False)])
    proc = G.vfio_libvirt("doctor", "--json", "--connect", G.URI)
    assert proc.returncode == 0, G.describe(proc)
    findings = {f["what"]: f["level"] for f in json.loads(proc.stdout)}

    def level(start: str) -> str:
        found = [lvl for what, lvl in findings.items() if what.startswith(start)]
        assert len(found) == 1, f"no single finding {start!r} in {findings}"
        return found[0]

    assert level(f"libvirt {lv.libvirt_version}: variant drivers usable") == "ok"
    assert level(f"hook installed: {G.HOOK}") == "ok"
    # test_25 installed the package into the running daemon: postinst's reload counts
    assert level("libvirtd reloaded since the hook was installed") == "ok"
    assert level("IOMMU enabled") == "ok"
    assert level(f"domain {name}: {devices.virtio_net.bdf} bind {H.VARIANT_EXACT_MODULE}") == "ok"
    assert not [w for w, lvl in findings.items() if lvl == "fail"], findings


def test_attach_and_detach_a_running_domain(lv, devices, domains):
    virtio, e1000e = devices.virtio_net, devices.e1000e
    name = domains.define("cli-hotplug", [(virtio.bdf, False)])
    domains.start(name)
    assert G.hostdev_sources(name) == [virtio.bdf]

    attach = G.vfio_libvirt("attach", name, e1000e.bdf, "--connect", G.URI)
    assert attach.returncode == 0, G.describe(attach)
    assert (e1000e.driver, e1000e.override) == ("vfio-pci", "vfio-pci")
    assert G.hostdev_sources(name) == [virtio.bdf, e1000e.bdf]
    assert f"/dev/vfio/{e1000e.iommu_group}" in G.open_files(G.qemu_pid(name))
    entry = G.journal()[e1000e.bdf]
    assert (entry["domain"], entry["role"], entry["status"]) == (name, "bind", "bound")

    detach = G.vfio_libvirt("detach", name, e1000e.bdf, "--connect", G.URI)
    assert detach.returncode == 0, G.describe(detach)
    assert (e1000e.driver, e1000e.override) == ("e1000e", "(null)")
    assert G.wait_for(lambda: G.hostdev_sources(name) == [virtio.bdf], 10), G.hostdev_sources(name)
    assert sorted(G.journal()) == [virtio.bdf]
    assert virtio.driver == H.VARIANT_EXACT_DRIVER      # the other device: untouched

    domains.destroy(name)
    assert virtio.wait_driver("virtio-pci", timeout=30) == "virtio-pci"
