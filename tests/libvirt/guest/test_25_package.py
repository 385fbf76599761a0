"""install.sh --uninstall, last: /etc/libvirt/hooks exactly as before the install."""

from __future__ import annotations

import pytest

from tests.libvirt.guest import guest_libvirt as G

pytestmark = pytest.mark.real_sysfs


def test_uninstall_restores_the_hooks_dir(lv):
    assert G.running_domains() == []
    proc = G.install_sh("--uninstall")
    assert proc.returncode == 0, G.describe(proc)
    for hook in (G.HOOK, G.NETWORK_HOOK):
        assert not hook.exists() and not hook.is_symlink(), f"{hook} left behind\n{G.describe(proc)}"
    assert G.tree_listing(G.HOOKS_DIR) == lv.hooks_before
    for path in (G.CLI, G.INSTALLED_LIB, G.CONFIG_DIR):
        assert not path.exists(), f"{path} left behind\n{G.describe(proc)}"
    # the daemon took the reload (SIGHUP) in its stride
    assert G.virsh("version", "--daemon").returncode == 0
