"""install.sh in the guest: the hooks where libvirt looks for them, and a second run changes nothing.

The session fixture `lv` ran install.sh twice before starting libvirtd (libvirt
looks for hooks when it starts); these tests read what it saw.
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.libvirt.guest import guest_libvirt as G

pytestmark = pytest.mark.real_sysfs

# what a run that changes nothing may say (install.sh's say() lines)
_IDEMPOTENT = ("install.sh: unchanged ", "install.sh: keeping ", "install.sh: left ",
               "install.sh: no libvirt daemon is running", "install.sh: done: ")


def test_first_run_installs_the_hook(lv):
    out = lv.install_first.stdout
    assert f"install.sh: installing {G.HOOK}" in out.splitlines(), G.describe(lv.install_first)
    st = G.HOOK.stat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0
    assert os.access(G.HOOK, os.X_OK) and st.st_mode & 0o111 == 0o111, oct(st.st_mode)
    assert G.HOOK.read_text().startswith("#!/usr/bin/python3\n")
    assert os.access(G.CLI, os.X_OK)
    assert str(G.HOOK) in (G.INSTALLED_LIB / "MANIFEST").read_text().splitlines()


def test_first_run_installs_the_network_hook(lv):
    """libvirt runs network.d/ scripts for port-created/port-deleted (hostdev pools)."""
    out = lv.install_first.stdout
    assert f"install.sh: installing {G.NETWORK_HOOK}" in out.splitlines(), G.describe(lv.install_first)
    st = G.NETWORK_HOOK.stat()      # a link is fine: libvirt follows it
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0
    assert os.access(G.NETWORK_HOOK, os.X_OK) and st.st_mode & 0o111 == 0o111, oct(st.st_mode)
    assert G.NETWORK_HOOK.read_text().startswith("#!")
    assert str(G.NETWORK_HOOK) in (G.INSTALLED_LIB / "MANIFEST").read_text().splitlines()


def test_second_run_changes_nothing(lv):
    second = lv.install_second
    assert second.returncode == 0, G.describe(second)
    lines = second.stdout.splitlines()
    other = [line for line in lines if not line.startswith(_IDEMPOTENT)]
    assert not other, f"a second install.sh run did more than keep things:\n{G.describe(second)}"
    assert f"install.sh: unchanged {G.HOOK}" in lines
    assert f"install.sh: unchanged {G.NETWORK_HOOK}" in lines
    # not rewritten either: same inode, mtime, mode and content for every file
    assert lv.files_after_second == lv.files_before_second

