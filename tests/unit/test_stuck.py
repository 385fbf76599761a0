"""A write that stays in the kernel past the deadline: the run answers on time, marks the
device stuck, and finishes the job itself when the write returns.

The simulator's `blocked` fault makes a write sleep until the test releases it, the way
a driver's remove() sleeps while its users hold it; nothing the product does can end it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.unit.conftest import AUDIO_BDF, E1000, GPU_BDF, NIC, SHORT_DEADLINE, domain_xml, pci, run_hook
from vfio_libvirt.cli import main as cli_main
from vfio_libvirt.domain import Domain
from vfio_libvirt.errors import OperationError
from vfio_libvirt.lifecycle import Host, prepare, release
from vfio_libvirt.settings import Settings

DEADLINE = SHORT_DEADLINE
SLACK = 0.6  # the straggler grace (0.25 s) and a loaded CI machine


def journal() -> dict:
    path = Path(os.environ["VFIO_LIBVIRT_STATE_DIR"]) / "journal.json"
    return json.loads(path.read_text())["devices"] if path.exists() else {}


class Background:
    """A lifecycle call in a thread, with the host's early answers recorded."""

    def __init__(self, call) -> None:
        self.host = Host(Settings.from_env())
        self.answers: list[tuple[float, int, str]] = []
        self.host.answer = lambda code, line: self.answers.append((time.monotonic(), code, line))
        self.result: object = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call) -> None:
        try:
            self.result = call(self.host)
        except Exception as err:  # kept for the test to look at
            self.result = err

    def first_answer(self, within: float) -> tuple[float, int, str]:
        until = time.monotonic() + within
        while not self.answers and time.monotonic() < until:
            time.sleep(0.01)
        assert self.answers, f"no answer within {within} s"
        at, code, line = self.answers[0]
        return at - self.started, code, line

    def finish(self, within: float = 5.0) -> object:
        self.thread.join(within)
        assert not self.thread.is_alive(), "the run did not finish after the write returned"
        return self.result


def test_prepare_answers_at_the_deadline_while_an_unbind_never_returns(short, capsys):
    gate = short.faults.blocked[("unbind", NIC)] = threading.Event()
    xml = domain_xml("vm1", pci(NIC))
    run = Background(lambda host: prepare(host, Domain.from_xml(xml)))
    took, code, line = run.first_answer(within=DEADLINE + 3)
    assert took <= DEADLINE + SLACK and code == 1
    assert line.startswith(f"{NIC}: unbind from virtio-pci still in the kernel after 1 s")
    assert "marked stuck, it is sent back to virtio-pci when the write returns" in line
    assert run.thread.is_alive()  # the write has not returned: the run is still waiting
    entry = journal()[NIC]
    assert entry["status"] == "stuck" and "unbind from virtio-pci" in entry["error"]
    assert entry["pid"] == os.getpid()

    # while it is stuck: status shows it with its age, and the domain's release and a
    # new start say so at once instead of waiting for the domain's lock
    capsys.readouterr()
    assert cli_main(["status"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^{NIC}  virtio-pci +stuck for [12] s +domain=vm1", out, re.M), out
    cli_main(["doctor"])  # its exit code is the uninstalled hook's; the stuck device is a warning
    out = capsys.readouterr().out
    assert re.search(rf"\[warn\] {NIC}: stuck for [12] s: unbind from virtio-pci", out), out
    began = time.monotonic()
    assert run_hook("vm1", "release", "end", b"") == 1
    assert run_hook("vm1", "prepare", "begin", xml) == 1
    assert time.monotonic() - began < 0.5
    err = capsys.readouterr().err
    assert err.count(f"{NIC}: unbind from virtio-pci still in the kernel") == 2
    assert f"pid {os.getpid()} finishes the job" in err

    time.sleep(max(0.0, run.started + DEADLINE + 0.5 - time.monotonic()))  # well past the grace
    gate.set()  # the driver's remove() returns at last
    result = run.finish()
    assert isinstance(result, OperationError) and "rolled back 1 device(s)" in str(result)
    assert short.driver_of(NIC) == "virtio-pci" and short.override_of(NIC) is None
    assert journal() == {}
    # the late unbind was not followed by a bind the start no longer wanted: the one
    # probe is the rollback's, and nothing was ever unbound from the VFIO driver
    assert ("sys/bus/pci/drivers_probe", NIC) in short.writes
    assert not any(w[1].strip() == "virtio-vfio-pci" and w[0].endswith("driver_override")
                   and i > short.writes.index(("sys/bus/pci/drivers_probe", NIC))
                   for i, w in enumerate(short.writes))
    assert short.writes.count(("sys/bus/pci/drivers_probe", NIC)) == 1
    assert not [w for w in short.writes if w[0].endswith("virtio-vfio-pci/unbind")]


def test_release_answers_at_the_deadline_while_a_probe_never_returns(short):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    assert short.driver_of(NIC) == "virtio-vfio-pci"
    gate = short.faults.blocked[("drivers_probe", NIC)] = threading.Event()
    run = Background(lambda host: release(host, "vm1"))
    took, code, line = run.first_answer(within=DEADLINE + 3)
    assert took <= DEADLINE + SLACK and code == 1
    assert line.startswith(f"{NIC}: drivers_probe for virtio-pci still in the kernel after 1 s")
    entry = journal()[NIC]
    assert entry["status"] == "stuck" and entry["original_driver"] == "virtio-pci"
    gate.set()
    assert run.finish() == []  # restored in the end: no failure left to report
    assert short.driver_of(NIC) == "virtio-pci" and journal() == {}


def test_a_stuck_group_answers_for_all_and_every_group_is_rolled_back(short):
    """NIC binds at once; the e1000e's unbind sleeps: both end on their host drivers."""
    gate = short.faults.blocked[("unbind", E1000)] = threading.Event()
    run = Background(lambda host: prepare(host, Domain.from_xml(domain_xml("vm1", pci(NIC), pci(E1000)))))
    took, code, line = run.first_answer(within=DEADLINE + 3)
    assert took <= DEADLINE + SLACK and code == 1 and line.startswith(f"{E1000}: unbind from e1000e")
    # the run as a whole never reached "bound": the NIC stays "switching" until undone
    assert {bdf: e["status"] for bdf, e in journal().items()} == {NIC: "switching", E1000: "stuck"}
    assert short.driver_of(NIC) == "virtio-vfio-pci"  # its group finished in time
    gate.set()
    run.finish()
    assert short.driver_of(NIC) == "virtio-pci" and short.driver_of(E1000) == "e1000e"
    assert journal() == {}


def test_a_modprobe_that_never_ends_is_not_waited_for(short, monkeypatch):
    """A module init asleep in the kernel ignores SIGKILL, so wait() would hang with it."""
    script = Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"]) / "modprobe-hangs"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    monkeypatch.setenv("VFIO_LIBVIRT_MODPROBE", str(script))

    def wait_forever(self, timeout=None):
        time.sleep(30)

    monkeypatch.setattr(subprocess.Popen, "wait", wait_forever)
    began = time.monotonic()
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 1
    assert time.monotonic() - began <= DEADLINE + SLACK
    assert short.driver_of(NIC) == "virtio-pci" and journal() == {}


def test_a_release_goes_on_with_the_group_behind_a_stuck_device(short):
    """The GPU's probe sleeps; its audio function, queued behind it in IOMMU group 1,
    still goes home once it returns: a stop leaves no device of the domain behind."""
    xml = domain_xml("vm1", pci(GPU_BDF), pci(AUDIO_BDF))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert short.driver_of(GPU_BDF) == short.driver_of(AUDIO_BDF) == "vfio-pci"
    first, second = sorted([GPU_BDF, AUDIO_BDF])  # a group's devices go home in journal order
    gate = short.faults.blocked[("drivers_probe", first)] = threading.Event()
    run = Background(lambda host: release(host, "vm1"))
    took, code, line = run.first_answer(within=DEADLINE + 3)
    assert took <= DEADLINE + SLACK and code == 1 and line.startswith(f"{first}: drivers_probe for")
    assert {bdf: e["status"] for bdf, e in journal().items()} == {first: "stuck", second: "restoring"}
    gate.set()
    assert run.finish() == []
    assert (short.driver_of(GPU_BDF), short.driver_of(AUDIO_BDF)) == ("nouveau", "snd_hda_intel")
    assert journal() == {}


def test_a_journal_that_cannot_be_written_at_the_deadline_still_gets_an_answer_and_a_restore(
        short, monkeypatch):
    """A full /run (or a held lock) when the device should be marked stuck: libvirt is still
    answered, and the run still waits for the write and puts the device back."""
    from vfio_libvirt import stuck

    def full_disk(host, found):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stuck, "mark_stuck", full_disk)
    gate = short.faults.blocked[("unbind", NIC)] = threading.Event()
    run = Background(lambda host: prepare(host, Domain.from_xml(domain_xml("vm1", pci(NIC)))))
    took, code, line = run.first_answer(within=DEADLINE + 3)
    assert took <= DEADLINE + SLACK and code == 1
    assert line.startswith(f"{NIC}: unbind from virtio-pci still in the kernel after 1 s")
    assert "marked stuck" not in line and "(and 1 more)" in line
    assert run.thread.is_alive()
    gate.set()
    run.finish()
    assert short.driver_of(NIC) == "virtio-pci" and journal() == {}


def test_marking_stuck_never_overwrites_a_worker_that_finished_meanwhile(short):
    """The worker owns its entry: one that came back and wrote restore-failed (or is done)
    keeps what it wrote; only a worker still inside its write is marked stuck."""
    from dataclasses import replace

    from vfio_libvirt.engine import Outcome
    from vfio_libvirt.stuck import mark_stuck

    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC), pci(E1000))) == 0
    host = Host(Settings.from_env())
    entries = host.journal.read().entries
    failed = replace(entries[NIC])
    failed.touch("restore-failed", "virtio-pci did not bind; kept on virtio-vfio-pci")
    with host.journal.transaction() as current:
        current[NIC] = failed
    busy, done = Outcome(entries[E1000]), Outcome(entries[NIC], attempted=True, done=True)
    busy.attempted = True
    mark_stuck(host, [(Outcome(entries[NIC], attempted=True), entries[NIC], "unbind …", time.time()),
                      (done, entries[NIC], "unbind …", time.time()),
                      (busy, entries[E1000], "unbind from vfio-pci …", time.time() - 5)])
    after = journal()
    assert after[NIC]["status"] == "restore-failed" and "kept on" in after[NIC]["error"]
    assert after[E1000]["status"] == "stuck" and time.time() - after[E1000]["updated"] >= 5
    assert entries[E1000].status == "bound"  # the worker's own object is left alone


def test_a_bind_past_its_deadline_writes_nothing(short):
    """A run already declared late must not unbind a host NIC for a start that failed."""
    from vfio_libvirt.apply import Switcher, TooLate
    from vfio_libvirt.pci import PciAddress
    from vfio_libvirt.sysfs import Sysfs

    switcher = Switcher(Sysfs(Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"])), [])
    writes = len(short.writes)
    with pytest.raises(TooLate, match="the deadline passed before driver_override; not written"):
        switcher.bind(PciAddress.parse(NIC), "virtio-vfio-pci", -1.0)  # a deadline a second gone
    assert len(short.writes) == writes and short.driver_of(NIC) == "virtio-pci"


def test_retries_that_run_out_of_time_report_what_kept_failing(short):
    from vfio_libvirt.apply import Switcher
    from vfio_libvirt.pci import PciAddress
    from vfio_libvirt.sysfs import Sysfs

    short.faults.probe_binds_nothing[E1000] = -1
    switcher = Switcher(Sysfs(Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"])), [])
    began = time.monotonic()
    with pytest.raises(Exception, match="vfio-pci did not bind") as caught:
        switcher.bind(PciAddress.parse(E1000), "vfio-pci", 0.5)
    assert time.monotonic() - began < 0.5 + 0.1  # no backoff sleep past the deadline
    assert type(caught.value).__name__ == "NotYet"


def test_a_retry_whose_unbind_comes_back_late_says_so(short, monkeypatch):
    """The first unbind is refused (EBUSY); the retry's unbind sleeps past the deadline and
    its grace: the bind stops there and says why, rather than repeating the old EBUSY."""
    import vfio_libvirt.sysfs
    from vfio_libvirt.apply import Switcher, TooLate
    from vfio_libvirt.pci import PciAddress
    from vfio_libvirt.sysfs import Sysfs

    short.faults.unbind_ebusy[E1000] = 1
    write, unbinds = short.write, []

    def slow_second_unbind(path, value):
        if Path(path).name == "unbind":
            unbinds.append(value)
            if len(unbinds) == 2:
                time.sleep(0.8)
        write(path, value)

    monkeypatch.setattr(vfio_libvirt.sysfs, "_write", slow_second_unbind)
    switcher = Switcher(Sysfs(Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"])), [])
    with pytest.raises(TooLate, match="the deadline passed before drivers_probe for vfio-pci"):
        switcher.bind(PciAddress.parse(E1000), "vfio-pci", 0.3)
    assert len(unbinds) == 2 and short.driver_of(E1000) is None  # the rollback's to send home


def test_a_stuck_entry_nobody_waits_on_shows_as_abandoned(short, capsys):
    """The process waiting for the kernel was killed: status must not look alive, and the
    domain's release takes the device over instead of deferring to a dead pid."""
    from dataclasses import replace

    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    host = Host(Settings.from_env())
    with host.journal.transaction() as entries:
        stuck = replace(entries[NIC])
        stuck.touch("stuck", "unbind from virtio-vfio-pci still in the kernel after 3 s")
        stuck.pid = 999999
        entries[NIC] = stuck
    capsys.readouterr()
    assert cli_main(["status"]) == 0
    assert re.search(rf"^{NIC}  virtio-vfio-pci +stuck for 0 s, abandoned", capsys.readouterr().out, re.M)
    assert run_hook("vm1", "release", "end", b"") == 0
    assert short.driver_of(NIC) == "virtio-pci" and journal() == {}


def test_a_journal_save_that_fails_leaves_no_temporary_file(short, monkeypatch):
    host = Host(Settings.from_env())

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"), host.journal.transaction() as entries:
        entries.unknown["x"] = 1  # any change makes the transaction save
    assert not list(host.journal.dir.glob(".journal.json.*.tmp"))
