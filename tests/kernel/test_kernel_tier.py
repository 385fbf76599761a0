"""Kernel tier: ONE guest boot running ONE inner pytest session.

The inner session (tests/kernel/guest, see its conftest) runs against the
guest's real /sys and writes a JUnit XML report to a host-visible dir; this
module asserts the guest booted, the session passed and it ran tests.
The guest gets every test device (guest.KERNEL_TIER_DEVICES): the two NICs,
an igb SR-IOV PF behind a root port and an NVMe over an ext4 image.
Skips when the tier is not provisioned (tests/vm/provision.sh), QEMU is
missing or older than 8 (no SR-IOV igb).  VFIO_LIBVIRT_TEST_CACHE selects
the cache dir.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.kernel
TIER = "kernel"   # its line in the terminal summary (tests/conftest.py)

INNER_TIMEOUT = 900.0   # whole guest run, boot retry included (TCG on 2 cores is slow)


@pytest.fixture(scope="module")
def inner_session(guest_harness, record_tier_line):
    """The one guest run; its outcome becomes the tier's line in the terminal summary."""
    devices = guest_harness.KERNEL_TIER_DEVICES
    info, reason = guest_harness.check_provisioned(devices=devices)
    if info is None:
        record_tier_line(TIER, guest_harness.tier_not_run_line(TIER, reason))
        pytest.skip(reason)
    try:
        result, report = guest_harness.run_pytest_in_guest(
            "tests/kernel/guest", timeout=INNER_TIMEOUT, info=info, devices=devices)
    except Exception as err:
        record_tier_line(TIER, guest_harness.tier_not_run_line(TIER, f"{type(err).__name__}: {err}"))
        raise
    record_tier_line(TIER, guest_harness.tier_summary_line(TIER, result, report))
    return result, report


def test_guest_booted(inner_session):
    result, _ = inner_session
    assert result.started, result.describe()
    assert result.finished, result.describe()


def test_inner_session_passed(inner_session, guest_harness):
    result, report = inner_session
    assert report is not None, "no junit.xml from the guest\n" + result.describe()
    failed = guest_harness.junit_failed(report)
    assert not failed and result.rc == 0, (
        f"inner session failed: {failed}\n{result.describe(tail=200)}")


def test_inner_session_ran_tests(inner_session, guest_harness):
    result, report = inner_session
    assert report is not None, result.describe()
    totals = guest_harness.junit_totals(report)
    assert totals["tests"] - totals["skipped"] > 0, f"no test ran in the guest: {totals}"
