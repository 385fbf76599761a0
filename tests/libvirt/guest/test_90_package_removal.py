"""dpkg -r takes the hooks away and the running daemon is told; dpkg -P the config; last."""

from __future__ import annotations

import pytest

from tests.libvirt.guest import guest_libvirt as G

pytestmark = pytest.mark.real_sysfs


def test_dpkg_remove_leaves_no_hook_and_purge_no_config(lv):
    assert G.running_domains() == [] and G.journal() == {}
    proc = G.dpkg("-r", "vfio-libvirt")
    assert proc.returncode == 0, G.describe(proc)
    for hook in (G.HOOK, G.NETWORK_HOOK):
        assert not hook.exists() and not hook.is_symlink(), f"{hook} left behind\n{G.describe(proc)}"
    # not even an empty qemu.d/ or network.d/ the package made: as before any install
    assert G.tree_listing(G.HOOKS_DIR) == lv.hooks_before, G.describe(proc)
    assert not G.PACKAGE_CLI.exists() and not G.PACKAGE_LIBEXEC.exists()
    assert "reloaded libvirtd" in proc.stdout, G.describe(proc)
    assert (G.CONFIG_DIR / "config.toml").exists(), "a conffile stays until purge"
    proc = G.dpkg("-P", "vfio-libvirt")
    assert proc.returncode == 0, G.describe(proc)
    assert not G.CONFIG_DIR.exists(), G.describe(proc)
    assert G.virsh("version", "--daemon").returncode == 0
