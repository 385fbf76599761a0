"""The admin moves from install.sh to the Debian package, with libvirtd running.

install.sh --uninstall leaves /etc/libvirt/hooks exactly as before the install; then
`dpkg -i` of the package the host built for this boot links the hooks and makes the
running daemon see them (postinst's reload, no restart).  Every later domain test
(test_30..test_65) runs through the package's hooks and CLI; test_80 applies the
Ansible role over it and test_90 removes it.
"""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from tests.libvirt.guest import guest_libvirt as G

pytestmark = pytest.mark.real_sysfs

PACKAGED_HOOKS = {G.HOOK: G.PACKAGE_LIBEXEC / "qemu-hook",
                  G.NETWORK_HOOK: G.PACKAGE_LIBEXEC / "network-hook"}


def test_uninstall_restores_the_hooks_dir(lv):
    assert G.running_domains() == []
    before = time.time()
    proc = G.install_sh("--uninstall")
    assert proc.returncode == 0, G.describe(proc)
    # install.sh sent libvirtd SIGHUP and left doctor its mark, in the 0700 state dir
    assert "install.sh: sent SIGHUP to libvirtd: it now runs the hook" in proc.stdout, G.describe(proc)
    assert (G.STATE_DIR / "reloaded" / "libvirtd").stat().st_mtime >= before - 1
    assert stat.S_IMODE(G.STATE_DIR.stat().st_mode) == 0o700
    for hook in (G.HOOK, G.NETWORK_HOOK):
        assert not hook.exists() and not hook.is_symlink(), f"{hook} left behind\n{G.describe(proc)}"
    assert G.tree_listing(G.HOOKS_DIR) == lv.hooks_before
    for path in (G.CLI, G.INSTALLED_LIB, G.CONFIG_DIR):
        assert not path.exists(), f"{path} left behind\n{G.describe(proc)}"
    # the daemon took the reload (SIGHUP) in its stride
    assert G.virsh("version", "--daemon").returncode == 0


def test_dpkg_install_links_the_hooks_into_the_running_daemon(lv):
    assert G.DEB.is_file(), f"the host built no package for this boot ({G.DEB})"
    assert not G.INSTALLED_LIB.exists(), "install.sh's copy is still there"
    proc = G.dpkg("-i", str(G.DEB))
    assert proc.returncode == 0, G.describe(proc)
    for hook, target in PACKAGED_HOOKS.items():
        assert hook.is_symlink() and hook.resolve() == target, f"{hook} -> {hook.resolve()}"
        assert os.access(hook, os.X_OK)
    assert G.installed_cli() == G.PACKAGE_CLI
    assert (G.CONFIG_DIR / "config.toml").is_file(), "the conffile"
    # a running libvirtd was told with SIGHUP (no systemd in the guest), not restarted
    assert "reloaded libvirtd" in proc.stdout, G.describe(proc)
    assert G.LIBVIRTD_PIDFILE.read_text().split()[0] == str(lv.libvirtd_pid)
    assert G.virsh("version", "--daemon").returncode == 0
    # doctor knows of the reload (postinst leaves a mark): no "started before" warning
    doctor = G.vfio_libvirt("doctor", "--json", "--connect", G.URI)
    assert doctor.returncode == 0, G.describe(doctor)
    findings = {f["what"]: f["level"] for f in json.loads(doctor.stdout)}
    assert findings.get(f"hook installed: {G.HOOK}") == "ok", findings
    assert findings.get("libvirtd reloaded since the hook was installed: it runs it") == "ok", findings

