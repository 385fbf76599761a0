"""Kernel facts the product relies on, checked on a real 6.12 kernel.

Runs inside the test guest only (see conftest.py).  Each test leaves the
test devices on their boot drivers (the `pci` fixture checks it).  These
check the kernel, not the product: they use raw sysfs writes.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
from pathlib import Path

import pytest

from tests.kernel.guest.guest_sysfs import modprobe, write_sysfs
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs


def _vfio_aliases(modules_dir: Path) -> list[tuple[str, str]]:
    out = []
    for line in (modules_dir / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias" and parts[1].startswith("vfio_pci:"):
            out.append((parts[1], parts[2]))
    return out


def _pci_driver_of_module(module: str) -> str:
    """module (modules.alias name) -> PCI driver name, via /sys/module."""
    entries = [e for e in os.listdir(f"/sys/module/{module}/drivers") if e.startswith("pci:")]
    assert len(entries) == 1, entries
    return entries[0].split(":", 1)[1]


def test_marker_and_modules_dir(modules_dir):
    assert H.in_guest()
    assert (modules_dir / "modules.alias").is_file()
    # vng links /lib/modules/<kver> to the provisioned tree
    assert modules_dir.is_symlink()


@pytest.mark.parametrize("spec", H.DEFAULT_TEST_DEVICES, ids=lambda s: s.name)
def test_device_identity(pci, spec):
    dev = pci[spec.name]
    assert dev.attr("vendor") == spec.vendor
    assert dev.attr("device") == spec.device
    assert dev.attr("modalias") == spec.modalias_prefix
    assert dev.driver == spec.host_driver
    assert dev.override == "(null)"          # unset override reads back as "(null)"
    if spec.iommu_group_own:
        assert dev.group_members() == [spec.bdf]
    assert Path(f"/sys/kernel/iommu_groups/{dev.iommu_group}/devices/{spec.bdf}").exists()


def test_modules_alias_has_test_variants_and_catch_all(modules_dir):
    aliases = dict(_vfio_aliases(modules_dir))
    assert aliases["vfio_pci:v*d*sv*sd*bc*sc*i*"] == "vfio_pci"
    assert aliases["vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i*"] == H.VARIANT_EXACT_MODULE
    assert aliases["vfio_pci:v00001AF4d*sv*sd*bc*sc*i*"] == H.VARIANT_VENDOR_MODULE


@pytest.mark.parametrize("spec,winner,candidates", [
    (H.VIRTIO_NET, H.VARIANT_EXACT_MODULE,
     {"vfio_pci", H.VARIANT_EXACT_MODULE, H.VARIANT_VENDOR_MODULE}),
    (H.E1000E, "vfio_pci", {"vfio_pci"}),
], ids=["virtio-net", "e1000e"])
def test_fewest_wildcards_ranking_on_real_aliases(pci, modules_dir, spec, winner, candidates):
    vfio_modalias = "vfio_" + pci[spec.name].attr("modalias")
    matches = [(a.count("*"), m) for a, m in _vfio_aliases(modules_dir)
               if fnmatch.fnmatchcase(vfio_modalias, a)]
    assert {m for _, m in matches} == candidates
    assert min(matches)[1] == winner
    # kmod agrees on the candidate set
    resolved = modprobe("--resolve-alias", vfio_modalias).stdout.split()
    assert set(resolved) == candidates


@pytest.mark.parametrize("spec", H.DEFAULT_TEST_DEVICES, ids=lambda s: s.name)
def test_vfio_pci_binds_and_group_node_appears(pci, spec):
    dev = pci[spec.name]
    modprobe("vfio_pci")
    assert dev.bind_via_override("vfio-pci") == "vfio-pci"
    assert (dev.path / "vfio-dev").is_dir() and os.listdir(dev.path / "vfio-dev")
    assert Path(f"/dev/vfio/{dev.iommu_group}").exists()


def test_module_name_as_override_binds_nothing(pci):
    dev = pci.virtio_net
    modprobe(H.VARIANT_EXACT_MODULE)
    assert H.VARIANT_EXACT_MODULE != H.VARIANT_EXACT_DRIVER
    assert dev.bind_via_override(H.VARIANT_EXACT_MODULE) is None
    assert dev.override == H.VARIANT_EXACT_MODULE


@pytest.mark.parametrize("module,driver", [
    (H.VARIANT_EXACT_MODULE, H.VARIANT_EXACT_DRIVER),
    (H.VARIANT_VENDOR_MODULE, H.VARIANT_VENDOR_DRIVER),
])
def test_variant_binds_virtio_net_by_driver_name(pci, module, driver):
    dev = pci.virtio_net
    modprobe(module)
    assert _pci_driver_of_module(module) == driver
    assert Path(f"/sys/bus/pci/drivers/{driver}/module").resolve().name == module
    assert dev.bind_via_override(driver) == driver
    assert os.listdir(dev.path / "vfio-dev")
    assert Path(f"/dev/vfio/{dev.iommu_group}").exists()


def test_override_bypasses_the_id_table(pci):
    """driver_override binds the named driver even if its id table does not
    match (pci_match_device falls back to pci_device_id_any): the kernel
    does NOT stop a wrong variant; choosing by modules.alias is on us."""
    dev = pci.e1000e
    modprobe(H.VARIANT_VENDOR_MODULE)
    vfio_modalias = "vfio_" + dev.attr("modalias")
    assert not fnmatch.fnmatchcase(vfio_modalias, "vfio_pci:v00001AF4d*sv*sd*bc*sc*i*")
    assert dev.bind_via_override(H.VARIANT_VENDOR_DRIVER) == H.VARIANT_VENDOR_DRIVER


def test_loading_variants_steals_nothing(pci):
    """PCI_DRIVER_OVERRIDE_DEVICE_VFIO ids match only with driver_override."""
    for module in ("vfio_pci", H.VARIANT_EXACT_MODULE, H.VARIANT_VENDOR_MODULE):
        modprobe(module)
    for dev in pci:
        dev.probe()
        assert dev.driver == dev.spec.host_driver


@pytest.mark.parametrize("spec", H.DEFAULT_TEST_DEVICES, ids=lambda s: s.name)
def test_restore_returns_boot_driver(pci, spec):
    dev = pci[spec.name]
    modprobe("vfio_pci")
    assert dev.bind_via_override("vfio-pci") == "vfio-pci"
    dev.set_override("\n")
    assert dev.override == "(null)"
    assert dev.driver == "vfio-pci"          # clearing the override unbinds nothing
    dev.unbind()
    assert dev.driver is None
    dev.probe()
    assert dev.driver == spec.host_driver


def test_override_alone_changes_nothing(pci):
    dev = pci.virtio_net
    modprobe("vfio_pci")
    dev.set_override("vfio-pci")
    assert dev.driver == dev.spec.host_driver     # no unbind happened
    dev.probe()                                   # already bound: probe is a no-op
    assert dev.driver == dev.spec.host_driver


def test_drivers_probe_succeeds_when_nothing_binds(pci):
    dev = pci.e1000e
    dev.set_override("no-such-driver-vlt")
    dev.unbind()
    assert dev.driver is None
    write_sysfs(Path("/sys/bus/pci/drivers_probe"), dev.bdf)   # no OSError
    assert dev.driver is None
    # and with the shell, as a hook might do it
    rc = subprocess.run(["sh", "-c", f"echo {dev.bdf} > /sys/bus/pci/drivers_probe"],
                        check=False).returncode
    assert rc == 0 and dev.driver is None
