"""libvirt tier: ONE guest boot running ONE inner pytest session (tests/libvirt/guest).

Inside the guest the inner session configures libvirtd, installs the hook with
install.sh, starts the daemon and drives domains with virsh and the CLI (see
guest/conftest.py).  This module asserts the guest booted, the session passed and it
ran tests.  Skips with a reason when the kernel tier or libvirt is not provisioned
(tests/vm/provision.sh --libvirt).  VFIO_LIBVIRT_TEST_CACHE selects the cache dir.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.libvirt

INNER_TIMEOUT = 900.0   # whole guest run; about 3-4 min on an idle 2-core machine


@pytest.fixture(scope="module")
def inner_session(guest_harness):
    info, reason = guest_harness.check_libvirt_provisioned()
    if info is None:
        pytest.skip(reason)
    result, report = guest_harness.run_pytest_in_guest(
        "tests/libvirt/guest", timeout=INNER_TIMEOUT, info=info, args=("-rs",))
    totals = guest_harness.junit_totals(report) if report is not None else None
    summary = "\n".join(result.stdout.rstrip().splitlines()[-3:])
    print(f"\nlibvirt tier: guest run {result.seconds:.1f}s, inner totals {totals}\n{summary}")
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
        f"inner session failed: {failed}\n{result.describe(tail=300)}")


def test_inner_session_ran_tests(inner_session, guest_harness):
    result, report = inner_session
    assert report is not None, result.describe()
    totals = guest_harness.junit_totals(report)
    assert totals["tests"] - totals["skipped"] > 0, f"no test ran in the guest: {totals}"
