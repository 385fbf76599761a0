"""Example of driving the product inside the guest (extend here).

`product(...)` runs `/usr/bin/python3 -m vfio_libvirt ...` from the repo
against the guest's real /sys and /lib/modules/$(uname -r).
"""

from __future__ import annotations

import json

import pytest

from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs


@pytest.mark.parametrize("spec,module", [
    (H.VIRTIO_NET, H.VARIANT_EXACT_MODULE),
    (H.E1000E, "vfio_pci"),
], ids=["virtio-net", "e1000e"])
def test_resolve_by_bdf_on_real_sysfs(pci, product, spec, module):
    proc = product("resolve", spec.bdf, "--json")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["modalias"] == spec.modalias_prefix
    assert answer["module"] == module
    assert pci[spec.name].driver == spec.host_driver      # resolve changes nothing
