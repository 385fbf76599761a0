"""A device one running domain holds cannot be started in another: refused, nothing touched."""

from __future__ import annotations

import pytest

from tests.libvirt.guest import guest_libvirt as G
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs


def test_second_domain_is_refused_cleanly(lv, devices, domains):
    virtio, e1000e = devices.virtio_net, devices.e1000e
    holder = domains.define("holder", [(virtio.bdf, False)])
    intruder = domains.define("intruder", [(e1000e.bdf, False), (virtio.bdf, False)])
    domains.start(holder)
    held_before = G.journal()[virtio.bdf]

    mark = lv.syslog.mark()
    refused = G.virsh("start", intruder, check=False)
    assert refused.returncode != 0, G.describe(refused)
    # the hook's one line, as libvirt passes it on
    said = [line for line in refused.stderr.splitlines() if "in use by domain" in line]
    assert len(said) == 1, G.describe(refused)
    assert f"vfio-libvirt: {intruder}: {virtio.bdf} is in use by domain {holder}" in said[0]
    assert "Traceback" not in refused.stderr

    assert not G.is_running(intruder)
    assert G.is_running(holder)
    # the holder's device: untouched, still open in its QEMU, still its in the journal
    assert virtio.driver == H.VARIANT_EXACT_DRIVER
    assert f"/dev/vfio/{virtio.iommu_group}" in G.open_files(G.qemu_pid(holder))
    assert G.journal() == {virtio.bdf: held_before}
    # refused before anything was switched: the intruder's other device never moved
    assert (e1000e.driver, e1000e.override) == ("e1000e", "(null)")
    assert not [line for line in lv.syslog.hook_lines(mark) if "bound to" in line]

    domains.destroy(holder)
    assert virtio.wait_driver("virtio-pci", timeout=30) == "virtio-pci"
    assert G.journal() == {}
