"""Fixtures for the tests INSIDE the libvirt tier's guest: a real libvirtd running the hook.

These tests configure libvirt in the guest's throwaway /etc, install the product with
install.sh, start libvirtd and let it run the hook against the guest's real /sys.
They run only when in_guest() is true (kernel cmdline marker); anywhere else every
test here is skipped before it starts (and the host does not even collect this
directory, see tests/libvirt/conftest.py).  Mark every test `real_sysfs` (pytestmark)
or tests/conftest.py points the product at an empty sandbox.

One session, one daemon, in file order (pytest runs the files by name):
  test_10_install     install.sh ran (twice) before libvirtd started, as it must
  test_20_managed_yes managed='yes' on the fresh daemon first (libvirt 11.3 remembers
                      an earlier managed='no' use of a device), through install.sh's hook
  test_25_package     the admin moves to the Debian package the host built
                      (VFIO_LIBVIRT_TEST_DEB): install.sh --uninstall, then dpkg -i;
                      every later domain runs through the package's hooks
  test_30..test_60    domains: managed='no', mixed, conflicts, the CLI
  test_65_sriov       VFs of the igb PF: interface type='hostdev', hostdev networks
                      (the network hook), `sriov` fixture
  test_80_ansible     ansible/site.yml applied twice with -c local: the second changes nothing
  test_90_package_removal  dpkg -r leaves no hook, dpkg -P no config; last
Every domain test starts and ends with the test devices on their boot drivers, no
driver_override, an empty journal and no running domain (`devices` fixture); the
domains it defined are destroyed and undefined first (`domains` fixture).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.kernel.guest.guest_sysfs import (
    SYS_PCI,
    Pci,
    PciDevice,
    SriovPf,
    ip_json,
    run,
    udev_settle,
    wait_for,
)
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
        if report.when == "call":
            item.vlt_call_failed = True    # a fixture need not report the same again


@dataclass
class LibvirtHost:
    """What the session set up, and what it saw on the way (for test_10, test_25, test_90)."""

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
    if H.IGB_PF in H.guest_devices():     # no domain test may touch the PF (its VFs may)
        pf = PciDevice(H.IGB_PF)
        if (pf.driver, pf.override) != ("igb", "(null)"):
            problems.append(f"PF {pf.bdf}: driver {pf.driver}, driver_override {pf.override}")
    if entries := G.journal():
        problems.append(f"journal still lists {sorted(entries)}")
    if running := G.running_domains():
        problems.append(f"domains still running: {running}")
    return problems


def _recover(pci: Pci) -> None:
    """Best effort, so that one failure does not fail every later test too."""
    for name in G.running_domains():
        G.virsh("destroy", name, check=False)
    if G.CLI.exists() or G.PACKAGE_CLI.exists():
        G.vfio_libvirt("restore", "--all")
    for dev in pci:
        dev.restore()


@pytest.fixture
def domains(devices, tmp_path):
    """Define domains with domains.define(name, [(bdf, managed), …]); all removed afterwards."""
    made = G.Domains(tmp_path)
    yield made
    made.cleanup()


# ------------------------------------------------------- SR-IOV (igb PF, QEMU >= 8)

SRIOV_VFS = 2
SETTLE_SECONDS = 60.0   # a probe under TCG


@dataclass
class Sriov:
    """The igb PF with its netdev up and SRIOV_VFS VFs on igbvf; networks to define."""

    pf: SriovPf
    netdev: str                 # the PF's network interface (a hostdev pool's <pf dev=>)
    ifindex: int                # ... whose ifindex changes if anyone rebinds the PF
    vfs: list[PciDevice]        # in VF index order
    networks: G.Networks | None = None
    vf_ifindexes: dict[str, list[str]] = field(default_factory=dict)   # BDF -> its netdevs' ifindexes

    def pf_problems(self) -> list[str]:
        """What is wrong with the PF: it must stay on igb, up, with all its VFs."""
        problems = []
        if (self.pf.driver, self.pf.override) != ("igb", "(null)"):
            problems.append(f"PF {self.pf.bdf}: driver {self.pf.driver}, override {self.pf.override}")
        if self.pf.numvfs != SRIOV_VFS or self.pf.vf_bdfs() != [vf.bdf for vf in self.vfs]:
            problems.append(f"PF {self.pf.bdf}: sriov_numvfs {self.pf.numvfs}, VFs {self.pf.vf_bdfs()}")
        links = [link for link in ip_json("link", "show") if link.get("ifindex") == self.ifindex]
        if not links or links[0].get("ifname") != self.netdev or "UP" not in links[0].get("flags", []):
            problems.append(f"PF netdev {self.netdev} (ifindex {self.ifindex}) not up: {links}")
        return problems

    def untouched(self, vf: PciDevice) -> list[str]:
        """What is wrong with a VF no domain uses: on igbvf, no override, same netdev
        as when the test began (a rebind makes a new one; udev may rename it meanwhile)."""
        if (vf.driver, vf.override) != (H.IGB_VF_DRIVER, "(null)"):
            return [f"VF {vf.bdf}: driver {vf.driver}, override {vf.override}"]
        if sorted(vf.netdev_ifindexes().values()) != self.vf_ifindexes[vf.bdf]:
            return [f"VF {vf.bdf}: netdev ifindexes {self.vf_ifindexes[vf.bdf]} -> "
                    f"{vf.netdev_ifindexes()}"]
        return []

    def vf_macs(self) -> dict[int, str]:
        """VF index -> MAC as the PF reports it (`ip link show <pf>`: vf N ... link/ether)."""
        (link,) = ip_json("link", "show", "dev", self.netdev)
        return {vf["vf"]: vf.get("address") for vf in link.get("vfinfo_list", [])}

    def vf_index(self, bdf: str) -> int:
        return [vf.bdf for vf in self.vfs].index(bdf)

    def vf(self, bdf: str) -> PciDevice:
        return self.vfs[self.vf_index(bdf)]


def _igb_given() -> SriovPf:
    """Skip when the guest was booted without the igb; fail when given but missing."""
    if H.IGB_PF not in H.guest_devices():
        pytest.skip(f"this guest was booted without the {H.IGB_PF.name} test device "
                    f"({H.DEVICES_ENV}={os.environ.get(H.DEVICES_ENV, '')!r})")
    assert (SYS_PCI / "devices" / H.IGB_PF.bdf).exists(), (
        f"the guest was given the {H.IGB_PF.name} at {H.IGB_PF.bdf}, but sysfs has no such device")
    return SriovPf(H.IGB_PF)


def _vfs_home(pf: SriovPf) -> None:
    """Every VF a domain or the hook left elsewhere back on igbvf (none is held then:
    the domains are gone)."""
    for vf in pf.vfs():
        if (vf.driver, vf.override) != (H.IGB_VF_DRIVER, "(null)"):
            with contextlib.suppress(OSError):
                vf.restore()


def _settle_igb(pf: SriovPf) -> None:
    """Back to the boot state: the PF on igb with SR-IOV disabled (VFs gone)."""
    _vfs_home(pf)
    pf.restore()
    if pf.driver == pf.spec.host_driver:
        pf.disable_vfs()
    wait_for(f"{pf} without VFs", lambda: not pf.vf_bdfs(), SETTLE_SECONDS)


@pytest.fixture(scope="module")
def sriov_vfs(lv):
    """For a module: the igb PF on igb, its netdev up, SRIOV_VFS VFs on igbvf; after
    it, the PF as the boot left it (no VFs, netdev up or down as it was)."""
    H.require_guest()
    pf = _igb_given()
    _settle_igb(pf)
    assert (pf.driver, pf.numvfs) == ("igb", 0), f"{pf} not idle before the tests"
    udev_settle()
    (netdev, ifindex), = wait_for(f"{pf}'s network interface", lambda: pf.netdev_ifindexes().items())
    was_up = "UP" in ip_json("link", "show", "dev", netdev)[0].get("flags", [])
    try:
        run("ip", "link", "set", netdev, "up")
        yield Sriov(pf, netdev, int(ifindex), pf.enable_vfs(SRIOV_VFS))
    finally:
        for name in G.running_domains():    # normally `domains` destroyed them already
            G.virsh("destroy", name, check=False)
        _settle_igb(pf)
        if not was_up and pf.driver == "igb":
            for name in pf.netdev_ifindexes():
                run("ip", "link", "set", name, "down")
    assert (pf.driver, pf.numvfs) == ("igb", 0), (
        f"could not restore {pf} after the tests: driver {pf.driver}, {pf.numvfs} VFs")


@pytest.fixture
def sriov(sriov_vfs, tmp_path, request):
    """The VFs, each on igbvf with its netdev, and the PF intact, before and after the
    test; networks defined through .networks are removed after it.  Request it before
    `devices`/`domains` (argument order): the domains go before the networks."""
    state = sriov_vfs
    state.networks = G.Networks(tmp_path)
    state.vf_ifindexes = {
        vf.bdf: sorted(wait_for(f"{vf}'s network interface", vf.netdev_ifindexes).values())
        for vf in state.vfs}
    problems = state.pf_problems() + [p for vf in state.vfs for p in state.untouched(vf)]
    assert not problems, f"SR-IOV not ready: {problems}"
    try:
        yield state
    finally:
        for name in G.running_domains():    # normally `domains` destroyed them already
            G.virsh("destroy", name, check=False)
        state.networks.cleanup()
        problems = state.pf_problems() + [
            f"VF {vf.bdf}: driver {vf.driver}, override {vf.override}" for vf in state.vfs
            if (vf.driver, vf.override) != (H.IGB_VF_DRIVER, "(null)")]
        _vfs_home(state.pf)
    assert not G.leftover_networks(), f"networks left behind: {G.leftover_networks()}"
    if not getattr(request.node, "vlt_call_failed", False):
        assert not problems, f"SR-IOV not back at its start after the test: {problems}"
