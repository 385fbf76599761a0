"""The hook against the guest's real kernel: bind at prepare, restore at release.

Runs `hooks/qemu` exactly as libvirtd would (argv + domain XML on stdin) against the
guest's real /sys and /lib/modules, with our own variant driver built on the kernel's
vfio_pci_core standing in for upstream's virtio_vfio_pci.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.guest.guest_xml import domain, hostdev
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs

NIC, E1000 = H.VIRTIO_NET.bdf, H.E1000E.bdf


def test_prepare_binds_variant_and_vfio_pci_then_release_restores(pci, hook):
    xml = domain("vm1", hostdev(NIC), hostdev(E1000))
    proc = hook("vm1", "prepare", "begin", xml)
    assert proc.returncode == 0, proc.stderr
    nic, e1000 = pci["virtio-net"], pci["e1000e"]
    assert nic.driver == H.VARIANT_EXACT_DRIVER  # variant wins: 5 wildcards vs 6 and 7
    assert e1000.driver == "vfio-pci"
    for dev in (nic, e1000):
        assert Path(f"/dev/vfio/{dev.iommu_group}").exists()
        assert any((dev.path / "vfio-dev").iterdir())
    journal = hook.journal()
    assert journal[NIC]["original_driver"] == "virtio-pci"
    assert journal[NIC]["target_module"] == H.VARIANT_EXACT_MODULE
    assert journal[E1000]["target_driver"] == "vfio-pci"

    proc = hook("vm1", "release", "end", xml)
    assert proc.returncode == 0, proc.stderr
    assert nic.driver == "virtio-pci" and e1000.driver == "e1000e"
    assert nic.override == "(null)" and e1000.override == "(null)"
    assert hook.journal() == {}


def test_libvirt_9_policy_binds_vfio_pci_even_where_a_variant_matches(pci, hook):
    hook.config.write_text('[libvirt]\nversion = "9.0.0"\n')
    xml = domain("vm1", hostdev(NIC))
    assert hook("vm1", "prepare", "begin", xml).returncode == 0
    assert pci["virtio-net"].driver == "vfio-pci"
    assert "libvirt 9.0.0 accepts only vfio-pci" in hook.journal()[NIC]["reason"]
    assert hook("vm1", "release", "end", xml).returncode == 0
    assert pci["virtio-net"].driver == "virtio-pci"


def test_a_module_that_cannot_load_stops_the_start_before_any_device_moves(pci, hook):
    """The e1000e is given a VFIO variant whose module cannot be loaded: every module is
    loaded before any device is touched, so the NIC never moves and the journal is empty."""
    H.require_guest()
    subprocess.run(["modprobe", "-r", H.VARIANT_VENDOR_MODULE], capture_output=True, check=False)
    assert not Path(f"/sys/module/{H.VARIANT_VENDOR_MODULE}").exists()
    xml = domain("vm1", hostdev(NIC), hostdev(E1000, model=H.VARIANT_VENDOR_MODULE))
    proc = hook("vm1", "prepare", "begin", xml,
                env={"VFIO_LIBVIRT_MODPROBE": f"sh -c 'case $0 in {H.VARIANT_VENDOR_MODULE}) "
                     "echo \"modprobe: FATAL: no\" >&2; exit 1;; *) exec modprobe \"$0\";; esac'"})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert f"{E1000}: cannot bind {H.VARIANT_VENDOR_MODULE}: modprobe {H.VARIANT_VENDOR_MODULE} failed" \
        in proc.stderr
    assert "nothing was switched" in proc.stderr
    assert pci["virtio-net"].driver == "virtio-pci" and pci["virtio-net"].override == "(null)"
    assert pci["e1000e"].driver == "e1000e"
    assert hook.journal() == {}


@pytest.mark.parametrize("model", ["e1000e", "virtio-pci", "no_such_vfio_pci"])
def test_an_explicit_driver_that_is_no_vfio_driver_is_refused_before_any_write(pci, hook, model):
    xml = domain("vm1", hostdev(NIC), hostdev(E1000, model=model))
    proc = hook("vm1", "prepare", "begin", xml)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and f"{model} is not a VFIO driver" in proc.stderr
    assert pci["virtio-net"].driver == "virtio-pci" and pci["e1000e"].driver == "e1000e"
    assert not hook.state.exists() or hook.journal() == {}


def test_reconnect_reports_drift_and_changes_nothing(pci, hook, product):
    xml = domain("vm1", hostdev(E1000))
    assert hook("vm1", "prepare", "begin", xml).returncode == 0
    pci["e1000e"].unbind()  # someone else takes the device away
    assert hook("vm1", "reconnect", "begin", xml).returncode == 0
    assert pci["e1000e"].driver is None
    status = product("status", "--json", env={"VFIO_LIBVIRT_STATE_DIR": str(hook.state)})
    assert json.loads(status.stdout)["drift"] == [
        f"{E1000}: journal says vm1 has it on vfio-pci, sysfs says no driver"]
    assert hook("vm1", "release", "end", xml).returncode == 0
    assert pci["e1000e"].driver == "e1000e"


def test_restore_waits_while_a_process_holds_the_vfio_group(pci, hook):
    xml = domain("vm1", hostdev(E1000))
    assert hook("vm1", "prepare", "begin", xml).returncode == 0
    group = f"/dev/vfio/{pci['e1000e'].iommu_group}"
    hold = 3.0
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import os, time; fd = os.open({group!r}, os.O_RDWR); "
         f"print('open', flush=True); time.sleep({hold})"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "open"
    start = time.monotonic()
    proc = hook("vm1", "release", "end", xml)
    waited = time.monotonic() - start
    holder.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert pci["e1000e"].driver == "e1000e"
    assert waited >= hold * 0.5  # it waited for the holder rather than unbinding under it
    assert hook.journal() == {}


def test_real_alias_ranking_from_the_guest_kernel(pci, product):
    proc = product("resolve", NIC, "--json")
    answer = json.loads(proc.stdout)
    assert [(c["module"], c["wildcards"]) for c in answer["candidates"]] == [
        (H.VARIANT_EXACT_MODULE, 5), (H.VARIANT_VENDOR_MODULE, 6), ("vfio_pci", 7)]
