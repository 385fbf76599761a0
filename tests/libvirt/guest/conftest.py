"""Fixtures for the tests INSIDE the libvirt tier's guest: a real libvirtd running the hook.

These tests configure libvirt in the guest's throwaway /etc, install the product with
install.sh, start libvirtd and let it run the hook against the guest's real /sys.
They run only when in_guest() is true (kernel cmdline marker); anywhere else every
test here is skipped before it starts (and the host does not even collect this
directory, see tests/libvirt/conftest.py).  Mark every test `real_sysfs` (pytestmark)
or tests/conftest.py points the product at an empty sandbox.

One session, one daemon, in file order (pytest runs the files by name):
  test_10_install     install.sh ran (twice) before libvirtd started, as it must
  test_20..test_60    domains: managed='yes' on the fresh daemon first (libvirt 11.3
                      remembers an earlier managed='no' use of a device), then
                      managed='no', mixed, conflicts, the CLI
  test_70_uninstall   install.sh --uninstall, last
Every domain test starts and ends with the test devices on their boot drivers, no
driver_override, an empty journal and no running domain (`devices` fixture); the
domains it defined are destroyed and undefined first (`domains` fixture).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kernel.guest.guest_sysfs import Pci
from tests.libvirt.guest import guest_libvirt as G
from tests.vm import guest as H

IN_GUEST = H.in_guest()


def pytest_collection_modifyitems(config, items):
    if IN_GUEST:
        return
    skip = pytest.mark.skip(reason="needs the libvirt tier's QEMU guest "
                            f"({H.GUEST_MARKER} not on /proc/cmdline)")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_GUEST and report.failed:
        report.sections.append(("libvirt tier diagnostics", G.diagnostics()))


@dataclass
class LibvirtHost:
    """What the session set up, and what it saw on the way (for test_10 and test_70)."""

    hooks_before: list          # tree_listing(/etc/libvirt/hooks) before install.sh
    install_first: subprocess.CompletedProcess
    install_second: subprocess.CompletedProcess
    files_before_second: dict   # installed file -> (inode, mtime, mode, sha256)
    files_after_second: dict
    libvirtd_pid: int
    libvirt_version: str        # "11.3.0", from libvirtd --version
    syslog: G.SyslogCatcher


def installed_files() -> dict[str, tuple]:
    """Every file the install manifest lists, with what a rewrite would change."""
    manifest = G.INSTALLED_LIB / "MANIFEST"
    found: dict[str, tuple] = {}
    for line in manifest.read_text().splitlines():
        if not line or line.startswith("dir:"):
            continue
        st = os.stat(line)
        found[line] = (st.st_ino, st.st_mtime_ns, st.st_mode,
                       hashlib.sha256(Path(line).read_bytes()).hexdigest())
    return found


@pytest.fixture(scope="session")
def lv():
    """libvirtd running in the guest with the hook that install.sh put in place before it."""
    H.require_guest()
    syslog = G.SyslogCatcher().start()
    pid = None
    try:
        hooks_before = G.tree_listing(G.HOOKS_DIR)
        G.prepare_host()
        # libvirt looks for hooks when it starts: install first
        first = G.install_sh("--no-deps")
        if first.returncode != 0:
            pytest.fail(f"install.sh failed\n{G.describe(first)}")
        before = installed_files()
        second = G.install_sh("--no-deps")
        after = installed_files()
        version = G.run(["libvirtd", "--version"]).stdout
        match = re.search(r"(\d+\.\d+\.\d+)", version)
        assert match, f"libvirtd --version said {version!r}"
        pid = G.start_libvirtd()
        yield LibvirtHost(hooks_before, first, second, before, after, pid, match[1], syslog)
    finally:
        if pid is not None:
            for name in G.running_domains():
                G.virsh("destroy", name, check=False)
            G.stop_libvirtd(pid)
        syslog.stop()


@pytest.fixture
def devices(lv):
    """The test devices (guest_sysfs.Pci); each test starts and ends at the baseline."""
    pci = Pci(H.DEFAULT_TEST_DEVICES)
    problems = _off_baseline(pci)
    assert not problems, f"not at the baseline before the test: {problems}"
    yield pci
    problems = _off_baseline(pci)
    if problems:
        _recover(pci)
        pytest.fail(f"not back at the baseline after the test: {problems}\n"
                    f"after recovery: {_off_baseline(pci) or 'baseline'}")


def _off_baseline(pci: Pci) -> list[str]:
    problems = [f"{dev.bdf}: driver {dev.driver}, driver_override {dev.override}"
                for dev in pci if dev.driver != dev.spec.host_driver or dev.override != "(null)"]
    if entries := G.journal():
        problems.append(f"journal still lists {sorted(entries)}")
    if running := G.running_domains():
        problems.append(f"domains still running: {running}")
    return problems


def _recover(pci: Pci) -> None:
    """Best effort, so that one failure does not fail every later test too."""
    for name in G.running_domains():
        G.virsh("destroy", name, check=False)
    if G.CLI.exists():
        G.vfio_libvirt("restore", "--all")
    for dev in pci:
        dev.restore()


@pytest.fixture
def domains(devices, tmp_path):
    """Define domains with domains.define(name, [(bdf, managed), …]); all removed afterwards."""
    made = G.Domains(tmp_path)
    yield made
    made.cleanup()
