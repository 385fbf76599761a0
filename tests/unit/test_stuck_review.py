"""Regressions found by review of the bounded waits: what a full /run, a failing undo or a
write that merely spans the deadline must not do to a device or its journal entry."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from tests.unit.conftest import AUDIO_BDF, GPU_BDF, NIC, domain_xml, pci, run_hook
from tests.unit.test_stuck import DEADLINE, Background, journal
from vfio_libvirt import restore, state
from vfio_libvirt.domain import Domain
from vfio_libvirt.errors import OperationError
from vfio_libvirt.lifecycle import Host, prepare, release
from vfio_libvirt.settings import Settings


def test_a_full_run_at_the_deadline_still_sends_the_device_home(short, monkeypatch):
    """/run fills up while the unbind sleeps: no journal write succeeds any more, and the
    device must still end on its host driver, not driverless."""
    gate = short.faults.blocked[("unbind", NIC)] = threading.Event()
    run = Background(lambda host: prepare(host, Domain.from_xml(domain_xml("vm1", pci(NIC)))))
    until = time.monotonic() + 3
    while NIC not in run.host.switcher.in_kernel:  # the unbind is asleep in the "kernel"
        assert time.monotonic() < until, "the unbind never started"
        time.sleep(0.01)

    def full(self, entries):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state.Journal, "_save", full)
    run.first_answer(within=DEADLINE + 3)
    gate.set()
    run.finish()
    assert short.driver_of(NIC) == "virtio-pci" and short.override_of(NIC) is None


def test_an_undo_that_raises_does_not_lose_the_rest_of_its_group(short, monkeypatch):
    """The NIC's bind fails, so the GPU and its audio function are rolled back; one journal
    write failing for one of them must neither stop the other nor drop its entry."""
    short.faults.probe_fails[NIC] = {"virtio-vfio-pci"}
    real, hit = restore.save_entry, []

    def flaky(host, entry):
        if entry.status == "restoring" and not hit and entry.address in (GPU_BDF, AUDIO_BDF):
            hit.append(entry.address)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(host, entry)

    monkeypatch.setattr(restore, "save_entry", flaky)
    with pytest.raises(OperationError, match="rolled back 3 device"):
        prepare(Host(Settings.from_env()), Domain.from_xml(domain_xml("vm1", pci(GPU_BDF), pci(AUDIO_BDF),
                                                                      pci(NIC))))
    assert hit  # the fault did fire
    assert (short.driver_of(GPU_BDF), short.driver_of(AUDIO_BDF), short.driver_of(NIC)) == (
        "nouveau", "snd_hda_intel", "virtio-pci")
    assert journal() == {}


def test_a_release_whose_journal_fails_reports_it_and_tries_every_device(short, monkeypatch):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(GPU_BDF), pci(AUDIO_BDF))) == 0
    first, second = sorted([GPU_BDF, AUDIO_BDF])
    short.faults.probe_fails[first] = {"nouveau", "snd_hda_intel"}
    real = restore.save_entry

    def locked(host, entry):
        if entry.status == "restore-failed":
            raise OperationError("journal lock held by another process for 30s")
        return real(host, entry)

    monkeypatch.setattr(restore, "save_entry", locked)
    failures = release(Host(Settings.from_env()), "vm1")
    assert len(failures) == 1 and failures[0].startswith(f"{first}: ") and "did not bind" in failures[0]
    assert short.driver_of(first) == "vfio-pci"  # kept on its VFIO driver, never driverless
    assert short.driver_of(second) in ("nouveau", "snd_hda_intel")  # its group mate went home
    assert set(journal()) == {first}  # still owed: restore --domain finishes it


def test_a_write_that_merely_spans_the_deadline_is_not_called_stuck(short):
    """QEMU lets go just before the deadline, and the probe that follows takes a tenth of
    a second: it comes back within the grace, the release succeeds, and libvirt is not
    told anything failed."""
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    short.hold_open(NIC, seconds=DEADLINE - 0.05)
    gate = short.faults.blocked[("drivers_probe", NIC)] = threading.Event()
    run = Background(lambda host: release(host, "vm1"))
    threading.Timer(DEADLINE + 0.1, gate.set).start()
    assert run.finish() == []
    assert run.answers == [] and short.driver_of(NIC) == "virtio-pci" and journal() == {}


def test_a_start_whose_budget_went_on_waiting_switches_nothing(short, monkeypatch):
    from vfio_libvirt.apply import Switcher

    real = Switcher.driver_for_module

    def slow_modprobe(self, module, seconds):
        time.sleep(DEADLINE + 0.1)
        return real(self, module, seconds)

    monkeypatch.setattr(Switcher, "driver_for_module", slow_modprobe)
    writes = len(short.writes)
    with pytest.raises(OperationError, match=r"bind_seconds \(1 s\) used up before any device"):
        prepare(Host(Settings.from_env()), Domain.from_xml(domain_xml("vm1", pci(NIC))))
    assert len(short.writes) == writes and journal() == {}


def test_a_device_the_rollback_cannot_send_home_keeps_its_entry(short):
    """The start fails on the NIC; the GPU's own driver then refuses it: the GPU stays on
    vfio-pci, never driverless, and its entry stays (restore-failed) for restore --domain."""
    short.faults.probe_fails[NIC] = {"virtio-vfio-pci"}
    short.faults.probe_fails[GPU_BDF] = {"nouveau"}
    with pytest.raises(OperationError, match="rolled back 2 device"):
        prepare(Host(Settings.from_env()), Domain.from_xml(domain_xml("vm1", pci(GPU_BDF), pci(AUDIO_BDF),
                                                                      pci(NIC))))
    assert (short.driver_of(GPU_BDF), short.driver_of(AUDIO_BDF), short.driver_of(NIC)) == (
        "vfio-pci", "snd_hda_intel", "virtio-pci")
    entries = journal()
    assert set(entries) == {GPU_BDF} and entries[GPU_BDF]["status"] == "restore-failed"


def test_a_restore_that_raises_is_reported_and_its_group_goes_on(short, monkeypatch):
    """Whatever escapes one device's restore is that device's failure: the release says so
    (the hook exits 1) and still sends the rest of the IOMMU group home."""
    from vfio_libvirt import lifecycle

    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(GPU_BDF), pci(AUDIO_BDF))) == 0
    first, second = sorted([GPU_BDF, AUDIO_BDF])
    real = lifecycle.restore_entry

    def broken(host, entry, *args, **kwargs):
        if entry.address == first:
            raise RuntimeError("an unforeseen bug")
        return real(host, entry, *args, **kwargs)

    monkeypatch.setattr(lifecycle, "restore_entry", broken)
    failures = release(Host(Settings.from_env()), "vm1")
    assert failures == [f"{first}: an unforeseen bug"]
    assert short.driver_of(second) in ("nouveau", "snd_hda_intel")
    assert set(journal()) == {first}
