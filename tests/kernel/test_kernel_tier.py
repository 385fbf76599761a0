"""Kernel tier: ONE guest boot running ONE inner pytest session.

The inner session (tests/kernel/guest, see its conftest) runs against the
guest's real /sys and writes a JUnit XML report to a host-visible dir; this
module asserts the guest booted, the session passed and it ran tests.
Skips when the tier is not provisioned (tests/vm/provision.sh) or QEMU is
missing.  VFIO_LIBVIRT_TEST_CACHE selects the cache dir.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.kernel

INNER_TIMEOUT = 900.0   # whole guest run, boot retry included (TCG on 2 cores is slow)


@pytest.fixture(scope="module")
def inner_session(guest_harness):
    info, reason = guest_harness.check_provisioned()
    if info is None:
        pytest.skip(reason)
    result, report = guest_harness.run_pytest_in_guest(
        "tests/kernel/guest", timeout=INNER_TIMEOUT, info=info)
    totals = guest_harness.junit_totals(report) if report is not None else None
    print(f"\nkernel tier: guest run {result.seconds:.1f}s, inner totals {totals}")
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
