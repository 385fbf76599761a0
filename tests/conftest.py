"""Test-wide safety net: no test reaches the real /sys, /run or /lib/modules by accident.

Every entry point reads its paths from VFIO_LIBVIRT_* variables; this autouse fixture
points all of them into a temp dir for every test, so a test that forgets to set one
gets an empty sandbox instead of the host.  Only tests that run inside the QEMU guest
of the kernel tier opt out (marker `real_sysfs`), and only when they really are in
that guest.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _inside_test_guest() -> bool:
    try:
        return "vfio_libvirt_test_guest=1" in Path("/proc/cmdline").read_text().split()
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _sandbox_host_paths(request: pytest.FixtureRequest, tmp_path_factory, monkeypatch) -> None:
    if request.node.get_closest_marker("real_sysfs") and _inside_test_guest():
        return
    sandbox = tmp_path_factory.mktemp("sandbox")
    for name, sub in (
        ("VFIO_LIBVIRT_SYSFS_ROOT", "root"),
        ("VFIO_LIBVIRT_MODULES_DIR", "modules"),
        ("VFIO_LIBVIRT_STATE_DIR", "state"),
    ):
        (sandbox / sub).mkdir()
        monkeypatch.setenv(name, str(sandbox / sub))
    monkeypatch.setenv("VFIO_LIBVIRT_CONFIG", str(sandbox / "config.toml"))
    monkeypatch.setenv("VFIO_LIBVIRT_MODPROBE", "false")
    # libvirt-python, where a test reaches it, gets the in-memory test driver
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
