"""managed='no': the hook binds the best VFIO driver at prepare and restores at release."""

from __future__ import annotations

import json

import pytest

from tests.libvirt.guest import guest_libvirt as G
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs


def test_hook_binds_best_driver_and_restores(lv, devices, domains):
    virtio, e1000e = devices.virtio_net, devices.e1000e
    name = domains.define("unmanaged", [(virtio.bdf, False), (e1000e.bdf, False)])
    assert (virtio.driver, e1000e.driver) == ("virtio-pci", "e1000e")
    mark = lv.syslog.mark()
    domains.start(name)

    expected = {virtio.bdf: H.VARIANT_EXACT_DRIVER, e1000e.bdf: "vfio-pci"}
    for dev in (virtio, e1000e):
        assert dev.driver == expected[dev.bdf]
        assert dev.override == expected[dev.bdf]
    held = G.open_files(G.qemu_pid(name))
    for dev in (virtio, e1000e):
        assert f"/dev/vfio/{dev.iommu_group}" in held, sorted(held)

    entries = G.journal()
    assert sorted(entries) == [virtio.bdf, e1000e.bdf]
    for dev in (virtio, e1000e):
        entry = entries[dev.bdf]
        assert (entry["domain"], entry["role"], entry["status"]) == (name, "bind", "bound")
        assert entry["original_driver"] == dev.spec.host_driver
        assert entry["target_driver"] == expected[dev.bdf]
    # one log line per device, naming domain and device
    for dev in (virtio, e1000e):
        assert lv.syslog.find(f"{name} {dev.bdf}: bound to {expected[dev.bdf]}", mark), (
            lv.syslog.hook_lines(mark))

    status = G.vfio_libvirt("status", "--json", "--connect", G.URI)
    assert status.returncode == 0, G.describe(status)
    report = json.loads(status.stdout)
    rows = {row["address"]: row for row in report["devices"]}
    for dev in (virtio, e1000e):
        row = rows[dev.bdf]
        assert (row["driver"], row["status"]) == (expected[dev.bdf], "bound"), row
        assert (row["domain"], row["libvirt_domain"]) == (name, name), row
        assert row["original_driver"] == dev.spec.host_driver
    assert report["drift"] == []

    domains.destroy(name)
    for dev in (virtio, e1000e):
        assert dev.wait_driver(dev.spec.host_driver, timeout=30) == dev.spec.host_driver
        assert dev.override == "(null)"
    assert G.journal() == {}
    for dev in (virtio, e1000e):
        assert lv.syslog.find(f"{name} {dev.bdf}: restored to {dev.spec.host_driver}", mark)
