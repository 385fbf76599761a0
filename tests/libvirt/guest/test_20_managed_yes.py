"""managed='yes' on a fresh daemon: libvirt binds (and picks the variant itself), the hook watches.

Runs before any managed='no' use of the devices in this daemon's life (libvirt 11.3
then does not give such a device back; test_40 covers that case).
"""

from __future__ import annotations

import pytest

from tests.libvirt.guest import guest_libvirt as G
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs


def test_libvirt_binds_and_the_hook_only_watches(lv, devices, domains):
    virtio, e1000e = devices.virtio_net, devices.e1000e
    name = domains.define("managed", [(virtio.bdf, True), (e1000e.bdf, True)])
    mark = lv.syslog.mark()
    domains.start(name)

    # libvirt >= 10 picks the best variant itself for managed='yes'
    assert virtio.driver == H.VARIANT_EXACT_DRIVER
    assert e1000e.driver == "vfio-pci"
    held = G.open_files(G.qemu_pid(name))
    for dev in (virtio, e1000e):
        assert f"/dev/vfio/{dev.iommu_group}" in held, sorted(held)
    entries = G.journal()
    assert sorted(entries) == [virtio.bdf, e1000e.bdf]
    for dev in (virtio, e1000e):
        entry = entries[dev.bdf]
        assert (entry["domain"], entry["role"], entry["status"]) == (name, "watch", "watching")
        assert entry["original_driver"] == dev.spec.host_driver
    for dev in (virtio, e1000e):
        assert lv.syslog.find(f"{name} {dev.bdf}: watch", mark), lv.syslog.hook_lines(mark)
    assert not [line for line in lv.syslog.hook_lines(mark) if "bound to" in line]

    domains.destroy(name)
    for dev in (virtio, e1000e):
        assert dev.wait_driver(dev.spec.host_driver, timeout=30) == dev.spec.host_driver
        assert dev.override == "(null)"
    assert G.journal() == {}
