"""dpkg -r takes the hooks away (the daemon is told), dpkg -P the config; last."""

from __future__ import annotations

import pytest

from tests.libvirt.guest import guest_libvirt as G

pytestmark = pytest.mark.real_sysfs


def test_dpkg_remove_leaves_no_hook_and_purge_no_config(lv):
    assert G.running_domains() == [] and G.journal() == {}
    proc = G.run(["dpkg", "-r", "vfio-libvirt"], timeout=300)
    assert proc.returncode == 0, G.describe(proc)
    for hook in (G.HOOK, G.NETWORK_HOOK):
        assert not hook.exists() and not hook.is_symlink(), f"{hook} left behind\n{G.describe(proc)}"
    assert (G.CONFIG_DIR / "config.toml").exists(), "a conffile stays until purge"
    proc = G.run(["dpkg", "-P", "vfio-libvirt"], timeout=300)
    assert proc.returncode == 0, G.describe(proc)
    assert not G.CONFIG_DIR.exists(), G.describe(proc)
    assert G.virsh("version", "--daemon").returncode == 0
