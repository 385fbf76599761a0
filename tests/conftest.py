"""Test-wide safety net: no test reaches the real /sys, /run or /lib/modules by accident.

Every entry point reads its paths from VFIO_LIBVIRT_* variables; this autouse fixture
points all of them into a temp dir for every test, so a test that forgets to set one
gets an empty sandbox instead of the host.  Only tests that run inside the QEMU guest
of the kernel tier opt out (marker `real_sysfs`), and only when they really are in
that guest.

It also prints, in pytest's terminal summary, one line per QEMU tier saying what ran
inside its guest (the inner session's counts are otherwise invisible in a CI log
unless pytest runs with -s).  The tier fixtures feed it through `record_tier_line`.
And it joins the unit tier tests/run started in the background with libvirt-python
hidden (tests/support/beside.py): before the first guest boots, and at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support import beside
from tests.vm import guest as H

if TYPE_CHECKING:  # pytest 7.2 does not export it as pytest.TerminalReporter
    from _pytest.terminal import TerminalReporter

QEMU_TIERS = ("kernel", "libvirt")
"""The QEMU tiers, by the marker their host-side module carries, in summary order."""
_TIER_LINES = pytest.StashKey[dict[str, str]]()
_TIERS_SELECTED = pytest.StashKey[list[str]]()
_BESIDE = pytest.StashKey[beside.Outcome]()


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
    monkeypatch.setenv("VFIO_LIBVIRT_IP", "false")  # a sandbox never asks this host's iproute2
    # libvirt-python, where a test reaches it, gets the in-memory test driver
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")


@pytest.fixture(scope="session")
def record_tier_line(pytestconfig: pytest.Config) -> Callable[[str, str], None]:
    """record(tier, line): the line the terminal summary prints for that QEMU tier."""
    lines = pytestconfig.stash.setdefault(_TIER_LINES, {})

    def record(tier: str, line: str) -> None:
        lines[tier] = line

    return record


def pytest_collection_finish(session: pytest.Session) -> None:
    # remembered so that a selected tier whose fixture never ran still gets a line
    session.config.stash[_TIERS_SELECTED] = [
        tier for tier in QEMU_TIERS if any(item.get_closest_marker(tier) for item in session.items)]


def _join_beside(config: pytest.Config) -> beside.Outcome | None:
    """The background unit run's outcome, waited for once (not inside a test guest)."""
    where = beside.directory()
    if where is None or _inside_test_guest():
        return None
    if _BESIDE not in config.stash:
        def waiting() -> None:
            sys.stderr.write(f"\ntests/run: waiting for the {beside.TITLE} to finish…\n")
        config.stash[_BESIDE] = beside.join(where, waiting=waiting)
    return config.stash[_BESIDE]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # a guest under TCG wants both cores: the background run ends first
    if any(item.get_closest_marker(tier) for tier in QEMU_TIERS):
        _join_beside(item.config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    where = beside.directory()
    if where is not None and exitstatus in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.USAGE_ERROR):
        beside.stop(where)      # nothing ran worth its wait; tests/run removes its dir
        return
    outcome = _join_beside(session.config)
    if outcome is not None and not outcome.passed and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    outcome = config.stash.get(_BESIDE, None)
    if outcome is not None:
        terminalreporter.ensure_newline()
        if not outcome.passed:
            terminalreporter.section(beside.TITLE, sep="-")
            terminalreporter.write_line(outcome.log_tail)
        terminalreporter.write_line(outcome.line)
    lines = config.stash.get(_TIER_LINES, {})
    selected = config.stash.get(_TIERS_SELECTED, [])
    tiers = [tier for tier in QEMU_TIERS if tier in lines or tier in selected]
    if not tiers:
        return  # a run without the QEMU tiers (e.g. tests/unit, or inside a guest)
    terminalreporter.ensure_newline()
    terminalreporter.section("QEMU test tiers", sep="-")
    for tier in tiers:
        terminalreporter.write_line(lines.get(tier) or H.tier_not_run_line(
            tier, "the session ended before its tests started the guest"))
