"""Host side of the libvirt tier (a real libvirtd inside a QEMU guest).

tests/libvirt/guest/ holds the tests that run INSIDE the guest: they configure and
start libvirtd there, install the hook with install.sh and write to the guest's /sys.
On the host they are not collected at all (collect_ignore below); inside the guest
(kernel cmdline marker, checked by in_guest()) they are.  As a second fence the guest
conftest skips them whenever in_guest() is false, and every step that changes the
system calls require_guest() first.

This directory is a package (tests.libvirt) and tests/ is not on sys.path, so it can
never shadow libvirt-python.
"""

from __future__ import annotations

import pytest

from tests.vm import guest as H

collect_ignore = [] if H.in_guest() else ["guest"]


def pytest_configure(config):
    # also in pyproject.toml; kept here so the tier works with any ini
    config.addinivalue_line(
        "markers", "libvirt: runs a real libvirtd inside a QEMU guest (skips when not provisioned)")
    config.addinivalue_line(
        "markers", "real_sysfs: runs against the real /sys, only inside the kernel tier's guest")


@pytest.fixture(scope="session")
def guest_harness():
    """tests/vm/guest.py (check_libvirt_provisioned(), run_pytest_in_guest(), device specs)."""
    return H
