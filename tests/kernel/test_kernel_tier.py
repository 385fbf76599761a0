"""Kernel tier: ONE guest boot running ONE inner pytest session.

The inner session (tests/kernel/guest, see its conftest) runs against the
guest's real /sys and writes a JUnit XML report to a host-visible dir; this
module asserts the guest booted, the session passed and it ran tests.
Skips when the tier is not provisioned (tests/vm/provision.sh) or QEMU is
missing.  VFIO_LIBVIRT_TEST_CACHE selects the cache dir.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.kernel

INNER_TIMEOUT = 900.0   # whole guest run, boot retry included (TCG on 2 cores is slow)


@pytest.fixture(scope="module")
def inner_session(guest_harness):
    info, reason = guest_harness.check_provisioned()
    if info is None:
        pytest.skip(reason)
    command = (
        f"{guest_harness.GUEST_PYTHON} -m pytest tests/kernel/guest "
        "-p no:cacheprovider -q -o console_output_style=classic "
        '--junitxml="$VFIO_LIBVIRT_TEST_OUT/junit.xml"'
    )
    result = guest_harness.run_in_guest(command, timeout=INNER_TIMEOUT, keep_out=True,
                                        info=info, echo=True)
    try:
        junit = result.out_dir / "junit.xml" if result.out_dir else None
        report = ET.parse(junit).getroot() if junit and junit.is_file() else None
    finally:
        if result.out_dir:
            shutil.rmtree(result.out_dir, ignore_errors=True)
    totals = _totals(report) if report is not None else None
    print(f"\nkernel tier: guest run {result.seconds:.1f}s, inner totals {totals}")
    return result, report


def _totals(report):
    suites = [report] if report.tag == "testsuite" else report.findall("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def test_guest_booted(inner_session):
    result, _ = inner_session
    assert result.started, result.describe()
    assert result.finished, result.describe()


def test_inner_session_passed(inner_session):
    result, report = inner_session
    assert report is not None, "no junit.xml from the guest\n" + result.describe()
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in report.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    assert not failed and result.rc == 0, (
        f"inner session failed: {failed}\n{result.describe(tail=200)}")


def test_inner_session_ran_tests(inner_session):
    result, report = inner_session
    assert report is not None, result.describe()
    totals = _totals(report)
    assert totals["tests"] - totals["skipped"] > 0, f"no test ran in the guest: {totals}"
