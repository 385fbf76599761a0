"""libvirt tier: ONE guest boot running ONE inner pytest session (tests/libvirt/guest).

Inside the guest the inner session configures libvirtd, installs the hooks with
install.sh, starts the daemon and drives domains with virsh and the CLI; half way it
moves to the Debian package this module builds on the host (the guest sees the host's
/tmp), applies the Ansible role over it and removes it (see guest/conftest.py).  The
guest gets guest.LIBVIRT_TIER_DEVICES: the two NICs and the igb SR-IOV PF behind its
root port, whose VFs the SR-IOV tests give to domains.  This module asserts the guest
booted, the session passed and it ran tests.  Skips with a reason when the kernel tier
or libvirt is not provisioned, or QEMU is older than 8 (tests/vm/provision.sh
--libvirt).  VFIO_LIBVIRT_TEST_CACHE selects the cache dir.
"""

from __future__ import annotations

import pytest

from tests.support import debbuild

pytestmark = pytest.mark.libvirt
TIER = "libvirt"   # its line in the terminal summary (tests/conftest.py)

INNER_TIMEOUT = 1800.0   # whole guest run; about 19 min on an idle 2-core machine
DEB_ENV = "VFIO_LIBVIRT_TEST_DEB"   # the package the guest installs (guest/test_25..test_90)


@pytest.fixture(scope="module")
def inner_session(guest_harness, record_tier_line, tmp_path_factory):
    """The one guest run; its outcome becomes the tier's line in the terminal summary."""
    devices = guest_harness.LIBVIRT_TIER_DEVICES
    info, reason = guest_harness.check_libvirt_provisioned(devices=devices)
    if info is None:
        record_tier_line(TIER, guest_harness.tier_not_run_line(TIER, reason))
        pytest.skip(reason)
    try:
        deb, _ = debbuild.build(tmp_path_factory.mktemp("libvirt-tier-deb"))
        result, report = guest_harness.run_pytest_in_guest(
            "tests/libvirt/guest", timeout=INNER_TIMEOUT, info=info, args=("-rs",),
            devices=devices, env={DEB_ENV: str(deb)})
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
        f"inner session failed: {failed}\n{result.describe(tail=300)}")


def test_inner_session_ran_tests(inner_session, guest_harness):
    result, report = inner_session
    assert report is not None, result.describe()
    totals = guest_harness.junit_totals(report)
    assert totals["tests"] - totals["skipped"] > 0, f"no test ran in the guest: {totals}"
