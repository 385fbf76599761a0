"""managed='yes' on a daemon that used the devices with managed='no' before.

libvirt 11.3 does not give such a device back at stop (it stays on its VFIO driver);
the hook's release notices and restores it.  The test asserts the outcome only: the
devices are home after destroy, whoever brought them back.
"""

from __future__ import annotations

import pytest

from tests.libvirt.guest import guest_libvirt as G

pytestmark = pytest.mark.real_sysfs


def test_devices_come_home_after_mixed_use(lv, devices, domains):
    virtio, e1000e = devices.virtio_net, devices.e1000e
    unmanaged = domains.define("mixed-no", [(virtio.bdf, False), (e1000e.bdf, False)])
    managed = domains.define("mixed-yes", [(virtio.bdf, True), (e1000e.bdf, True)])
    domains.start(unmanaged)
    domains.destroy(unmanaged)
    assert (virtio.driver, e1000e.driver) == ("virtio-pci", "e1000e")

    mark = lv.syslog.mark()
    domains.start(managed)
    assert {e["role"] for e in G.journal().values()} == {"watch"}
    domains.destroy(managed)
    for dev in (virtio, e1000e):
        assert dev.wait_driver(dev.spec.host_driver, timeout=30) == dev.spec.host_driver, (
            lv.syslog.hook_lines(mark))
        assert dev.override == "(null)"
    assert G.journal() == {}
    print("hook at release:", *lv.syslog.hook_lines(mark), sep="\n  ")
