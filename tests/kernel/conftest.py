"""Host side of the kernel tier (a real kernel in a QEMU guest).

tests/kernel/guest/ holds the tests that run INSIDE the guest and write to
its /sys.  On the host they are not collected at all (collect_ignore below):
they could only skip, and not importing them keeps their guest-only code
off the host.  Inside the guest (kernel cmdline marker present, checked by
in_guest()) they are collected normally.  As a second fence, the guest
conftest skips them whenever in_guest() is false, and every sysfs write
there calls require_guest().
"""

from __future__ import annotations

import pytest

from tests.vm import guest as H

collect_ignore = [] if H.in_guest() else ["guest"]


def pytest_configure(config):
    # also in pyproject.toml; kept here so the tier works with any ini
    config.addinivalue_line(
        "markers", "kernel: boots a real Linux kernel under QEMU (skips when not provisioned)")
    config.addinivalue_line(
        "markers", "real_sysfs: runs against the real /sys, only inside the kernel tier's guest")


@pytest.fixture(scope="session")
def guest_harness():
    """tests/vm/guest.py (check_provisioned(), run_in_guest(), device specs)."""
    return H
