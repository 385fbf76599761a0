"""Fixtures for the tests that run INSIDE the kernel tier's guest (real /sys).

These tests write to /sys.  They run only when in_guest() is true, i.e. when
/proc/cmdline carries the marker that tests/vm/guest.py gives the guest
kernel; anywhere else every test here is skipped before it starts (and on
the host, tests/kernel/conftest.py does not even collect this directory).

The inner session is started by tests/kernel/test_kernel_tier.py as
  /usr/bin/python3 -m pytest tests/kernel/guest ...   (cwd = repo root)
with the repo's pytest config, so tests/conftest.py's sandbox applies: mark
every test here `real_sysfs` (pytestmark) or it sees an empty fake /sys.

To add a test that drives the product against the real kernel, add a
test_guest_*.py here and use: `pci` (the test devices with sysfs helpers,
see guest_sysfs.py), `product` (runs `python3 -m vfio_libvirt` from the
repo), `hook` (runs hooks/qemu as libvirtd would), `harness`
(tests/vm/guest.py: BDFs, module and driver names), and for the real
hardware `igb` (the SR-IOV PF, VFs disabled) and `nvme` (unmounted); for the
bounded waits `slow` (the three slow devices, see guest_bounded.py).
Every test starts and ends with the test devices on their boot drivers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.kernel.guest.guest_bounded import ORIGINAL, SETTLE, STUCK_MS, Bounded, ours, set_param
from tests.kernel.guest.guest_sysfs import (
    SYS_PCI,
    Pci,
    PciDevice,
    SriovPf,
    modprobe,
    mounts_of,
    nvme_block_devices,
    run,
    wait_for,
)
from tests.vm import guest as H

IN_GUEST = H.in_guest()


def pytest_collection_modifyitems(config, items):
    if IN_GUEST:
        return
    skip = pytest.mark.skip(reason="needs the kernel tier's QEMU guest "
                            f"({H.GUEST_MARKER} not on /proc/cmdline)")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def harness():
    """tests/vm/guest.py: device specs, module and driver names."""
    return H


@pytest.fixture(scope="session")
def repo() -> Path:
    return Path(os.environ.get("VFIO_LIBVIRT_TEST_REPO") or Path(__file__).resolve().parents[3])


@pytest.fixture(scope="session")
def modules_dir() -> Path:
    return Path("/lib/modules") / os.uname().release


@pytest.fixture
def pci():
    """The test devices; each test starts and ends on the boot drivers."""
    H.require_guest()
    devices = Pci(H.DEFAULT_TEST_DEVICES)
    for dev in devices:
        assert dev.restore() == dev.spec.host_driver, f"{dev} not on its boot driver before the test"
    yield devices
    bad = [f"{dev}: {dev.driver}" for dev in devices if dev.restore() != dev.spec.host_driver]
    assert not bad, f"could not restore the boot drivers after the test: {bad}"


@pytest.fixture
def product(repo, tmp_path):
    """run(*args, env=..., input=...) -> CompletedProcess of `python3 -m vfio_libvirt`.

    Runs the product from the repo (PYTHONPATH) against the guest's real /sys
    and /lib/modules/$(uname -r) (the defaults), with a fresh state dir per
    test.  Needs the test to be marked real_sysfs (else tests/conftest.py
    points VFIO_LIBVIRT_* at an empty sandbox).
    """
    state = tmp_path / "state"

    def run(*args: str, env: dict | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        H.require_guest()
        full_env = {
            **os.environ,
            "PYTHONPATH": str(repo),
            "VFIO_LIBVIRT_STATE_DIR": str(state),
            **(env or {}),
        }
        return subprocess.run([H.GUEST_PYTHON, "-m", "vfio_libvirt", *args],
                              cwd=repo, env=full_env, input=input, capture_output=True,
                              text=True, timeout=timeout, check=False)

    return run


@pytest.fixture
def hook(repo, tmp_path):
    """run(name, op, subop, xml) -> CompletedProcess of hooks/qemu, as libvirtd runs it.

    Fresh state dir and config per test: libvirt 11.3 (variants allowed) and a 20 s
    restore deadline, so a restore that cannot succeed fails in bounded time.
    run.state / run.config are their paths (pass them to `product` to share them);
    run.journal() is the journal's devices ({} when there is no journal file).
    """
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text('[libvirt]\nversion = "11.3.0"\n[timeouts]\nrestore_seconds = 20\n')

    def run(name: str, op: str, subop: str, xml: str = "", *,
            env: dict | None = None) -> subprocess.CompletedProcess:
        H.require_guest()
        full_env = {**os.environ, "VFIO_LIBVIRT_STATE_DIR": str(state),
                    "VFIO_LIBVIRT_CONFIG": str(config), **(env or {})}
        return subprocess.run([H.GUEST_PYTHON, str(repo / "hooks" / "qemu"), name, op, subop, "-"],
                              input=xml, env=full_env, capture_output=True, text=True,
                              timeout=120, check=False)

    run.state = state
    run.config = config
    run.journal = lambda: (json.loads((state / "journal.json").read_text())["devices"]
                           if (state / "journal.json").exists() else {})
    return run


# ------------------------------------------------------- real hardware (QEMU >= 8)

# A probe under TCG: the NVMe scans its namespace after the driver link appears.
SETTLE_SECONDS = 60.0


def _given(spec: H.TestDevice) -> None:
    """Skip when the guest was booted without `spec`; fail when given but missing.

    run_in_guest tells the guest its devices (guest.DEVICES_ENV); the kernel tier
    gives them all, so there a missing device is a failure, never a skip.
    """
    if spec not in H.guest_devices():
        pytest.skip(f"this guest was booted without the {spec.name} test device "
                    f"({H.DEVICES_ENV}={os.environ.get(H.DEVICES_ENV, '')!r})")
    assert (SYS_PCI / "devices" / spec.bdf).exists(), (
        f"the guest was given the {spec.name} at {spec.bdf}, but sysfs has no such device: "
        f"{sorted(os.listdir(SYS_PCI / 'devices'))}")


def settle_igb(pf: SriovPf) -> None:
    """Back to the boot state: the PF on igb with SR-IOV disabled."""
    if pf.driver == pf.spec.host_driver:
        pf.disable_vfs()
    pf.restore()
    if pf.driver == pf.spec.host_driver:
        pf.disable_vfs()
    wait_for(f"{pf} without VFs", lambda: not pf.vf_bdfs(), SETTLE_SECONDS)


def settle_nvme(dev: PciDevice) -> None:
    """Back to the boot state: nothing mounted from it, on nvme, its namespace there."""
    for name in nvme_block_devices(dev):
        for mountpoint in reversed(mounts_of(f"/dev/{name}")):
            run("umount", mountpoint)
    dev.restore()
    wait_for(f"{dev}'s namespace {H.NVME_NAMESPACE}",
             lambda: H.NVME_NAMESPACE in nvme_block_devices(dev)
             and Path(f"/dev/{H.NVME_NAMESPACE}").exists(), SETTLE_SECONDS)


@pytest.fixture
def igb():
    """The igb SR-IOV PF on igb with no VFs, before and after the test."""
    H.require_guest()
    _given(H.IGB_PF)
    pf = SriovPf(H.IGB_PF)
    settle_igb(pf)
    assert pf.driver == "igb" and pf.numvfs == 0, f"{pf} not idle before the test"
    yield pf
    settle_igb(pf)
    assert pf.driver == "igb" and pf.numvfs == 0, (
        f"could not restore {pf} after the test: driver {pf.driver}, {pf.numvfs} VFs")


@pytest.fixture
def nvme():
    """The NVMe on nvme with its namespace unmounted, before and after the test."""
    H.require_guest()
    _given(H.NVME)
    dev = PciDevice(H.NVME)
    settle_nvme(dev)
    assert not mounts_of(f"/dev/{H.NVME_NAMESPACE}"), "the NVMe is mounted before the test"
    yield dev
    settle_nvme(dev)
    assert dev.driver == "nvme" and not mounts_of(f"/dev/{H.NVME_NAMESPACE}"), (
        f"could not restore {dev} after the test: driver {dev.driver}")


# ------------------------------------------- bounded waits (test_guest_bounded.py)


@pytest.fixture(scope="module")
def slow_given():
    """Skip when the guest was booted without the slow devices; fail when given but missing.
    Loads vlt_slow_host (udev normally has at boot) and vfio_pci (so no run pays for it)."""
    H.require_guest()
    for spec in H.SLOW_DEVICES:
        _given(spec)
    modprobe(H.SLOW_MODULE)
    modprobe("vfio_pci")
    for name in ("probe_ms", "remove_ms"):
        set_param(name, 0)


@pytest.fixture
def slow(tmp_path, repo, slow_given):
    """The three slow devices on vlt-slow-host with probe_ms = remove_ms = 0, before and
    after the test; after it, no process of the product is left at work on them."""
    for name in ("probe_ms", "remove_ms"):
        set_param(name, 0)
    bounded = Bounded(tmp_path, repo)
    for dev in bounded.devices:
        assert dev.restore() == ORIGINAL, f"{dev} not on {ORIGINAL} before the test: {dev.driver}"
        assert dev.group_members() == [dev.bdf], f"{dev} shares its IOMMU group"
    yield bounded
    for name in ("probe_ms", "remove_ms"):
        set_param(name, 0)  # a sleep already under way still runs to its end
    # a detached process may still be finishing a job: give it the time a write takes
    with contextlib.suppress(AssertionError):
        wait_for("the product's detached processes to finish",
                 lambda: not bounded.helpers() and bounded.settled(bounded.devices),
                 STUCK_MS / 1000 + SETTLE)
    leftover = sorted(p for p in bounded.helpers() if ours(p))
    for pid in leftover:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # dies once its write leaves the kernel
    for dev in bounded.devices:
        dev.restore()  # waits for any write still in the kernel (device lock)
    bad = [f"{dev}: {dev.driver}" for dev in bounded.devices if dev.driver != ORIGINAL]
    assert not bad, f"could not put the slow devices back on {ORIGINAL}: {bad}"
    assert not leftover, f"processes of the product still at work after the test: {leftover}"
