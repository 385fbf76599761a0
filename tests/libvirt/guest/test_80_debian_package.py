"""The Debian package, after install.sh is gone: dpkg -i makes the running daemon run its
hooks, and a domain goes through them.

The host builds the package before the guest boots (tests/libvirt/test_libvirt_tier.py)
and names it in VFIO_LIBVIRT_TEST_DEB.  test_85 applies the Ansible role over it, and
test_90 removes and purges it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.libvirt.guest import guest_libvirt as G
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs

DEB = Path(os.environ.get("VFIO_LIBVIRT_TEST_DEB", "/nonexistent.deb"))
PACKAGED_HOOKS = {G.HOOK: Path("/usr/libexec/vfio-libvirt/qemu-hook"),
                  G.NETWORK_HOOK: Path("/usr/libexec/vfio-libvirt/network-hook")}
PACKAGED_CLI = Path("/usr/sbin/vfio-libvirt")


def test_dpkg_install_links_the_hooks_and_the_daemon_runs_them(lv, devices, domains):
    assert DEB.is_file(), f"the host built no package for the guest ({DEB})"
    assert not G.INSTALLED_LIB.exists(), "install.sh's copy is still there (test_70 removes it)"
    proc = G.run(["dpkg", "-i", str(DEB)], timeout=300)
    assert proc.returncode == 0, G.describe(proc)
    for hook, target in PACKAGED_HOOKS.items():
        assert hook.is_symlink() and hook.resolve() == target, f"{hook} → {hook.resolve()}"
    assert os.access(PACKAGED_CLI, os.X_OK)

    virtio = devices.virtio_net
    name = domains.define("packaged", [(virtio.bdf, False)])
    mark = lv.syslog.mark()
    domains.start(name)     # postinst made libvirtd see the hooks: no restart here
    assert virtio.driver == H.VARIANT_EXACT_DRIVER
    assert f"/dev/vfio/{virtio.iommu_group}" in G.open_files(G.qemu_pid(name))
    status = G.run([str(PACKAGED_CLI), "status", "--json", "--connect", G.URI])
    assert status.returncode == 0, G.describe(status)
    rows = {row["address"]: row for row in json.loads(status.stdout)["devices"]}
    assert (rows[virtio.bdf]["domain"], rows[virtio.bdf]["status"]) == (name, "bound")
    domains.destroy(name)
    assert virtio.wait_driver(virtio.spec.host_driver, timeout=30) == virtio.spec.host_driver
    assert G.journal() == {}
    assert lv.syslog.find(f"{name} {virtio.bdf}: restored to {virtio.spec.host_driver}", mark), (
        lv.syslog.hook_lines(mark))
