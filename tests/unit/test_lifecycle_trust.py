"""The lifecycle never loses track of a device: restarts, races, a second matching driver,
restores with nothing to do, and a crash after any write (sysfs or journal)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.support.simkernel import SimCrash, register_module
from tests.unit.conftest import E1000, NIC, domain_xml, pci, run_hook, write_config
from vfio_libvirt.cli import main as cli_main


def journal() -> dict:
    path = Path(os.environ["VFIO_LIBVIRT_STATE_DIR"]) / "journal.json"
    return json.loads(path.read_text())["devices"] if path.exists() else {}


def assert_home(sim, note: object = "") -> None:
    """Every test device on its boot driver with no override, and the journal empty."""
    assert (sim.driver_of(NIC), sim.override_of(NIC)) == ("virtio-pci", None), note
    assert (sim.driver_of(E1000), sim.override_of(E1000)) == ("e1000e", None), note
    assert journal() == {}, note


BOTH = domain_xml("vm1", pci(NIC), pci(E1000))


# --- 1. a second prepare without a release ------------------------------------------------
def test_prepare_again_without_release_keeps_the_recorded_originals(sim):
    """libvirtd restarted (or a restore failed) and the domain starts again: the journal
    entry stays the truth, so release still brings both devices home."""
    assert run_hook("vm1", "prepare", "begin", BOTH) == 0
    first = journal()
    writes = len(sim.writes)
    assert run_hook("vm1", "prepare", "begin", BOTH) == 0
    assert len(sim.writes) == writes  # both are already where they belong
    again = journal()
    for bdf, driver in ((NIC, "virtio-pci"), (E1000, "e1000e")):
        assert again[bdf]["role"] == "bind" and again[bdf]["status"] == "bound"
        assert again[bdf]["original_driver"] == driver
        assert again[bdf]["original_override"] is None
        assert again[bdf]["target_driver"] == first[bdf]["target_driver"]
    assert run_hook("vm1", "release", "end", BOTH) == 0
    assert_home(sim)


def test_bind_by_hand_twice_then_restore_domain_manual(sim, capsys):
    assert cli_main(["bind", E1000]) == 0
    assert cli_main(["bind", E1000]) == 0
    assert journal()[E1000]["role"] == "bind"
    assert cli_main(["restore", "--domain", "manual"]) == 0
    assert_home(sim)


def test_a_failed_second_prepare_rolls_back_only_its_own_run(sim, capsys):
    nic_only = domain_xml("vm1", pci(NIC))
    assert run_hook("vm1", "prepare", "begin", nic_only) == 0
    older = journal()[NIC]
    sim.fail_module("vfio_pci")  # the e1000e cannot be bound this time
    assert run_hook("vm1", "prepare", "begin", BOTH) == 1
    assert "cannot bind vfio_pci" in capsys.readouterr().err
    # the NIC was switched by the first run, not this one: it stays, and so does its entry
    assert sim.driver_of(NIC) == "virtio-vfio-pci"
    assert {k: v for k, v in journal()[NIC].items() if k not in ("updated", "pid")} == {
        k: v for k, v in older.items() if k not in ("updated", "pid")}
    assert sim.driver_of(E1000) == "e1000e" and E1000 not in journal()
    assert run_hook("vm1", "release", "end", BOTH) == 0  # libvirt runs it after a failed start
    assert_home(sim)


# --- 2. a start racing another domain's stop -----------------------------------------------
def _race(sim, *, vm2_first: bool) -> dict[str, int]:
    """vm1 gives the NIC back (slowly) while vm2 starts with it; real threads."""
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    sim.faults.write_delay = 0.15
    results: dict[str, int] = {}

    def release_vm1() -> None:
        results["vm1"] = run_hook("vm1", "release", "end", b"")

    def start_vm2() -> None:
        results["vm2"] = run_hook("vm2", "prepare", "begin", domain_xml("vm2", pci(NIC)))

    first, second = (start_vm2, release_vm1) if vm2_first else (release_vm1, start_vm2)
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    if vm2_first:
        time.sleep(0.2)  # vm2 is already looking when vm1's release begins
    else:
        deadline = time.monotonic() + 5
        while journal().get(NIC, {}).get("status") != "restoring" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert journal()[NIC]["status"] == "restoring"  # vm1 is mid-restore right now
    threads[1].start()
    for t in threads:
        t.join(timeout=30)
    sim.faults.write_delay = 0.0
    return results


@pytest.mark.parametrize("vm2_first", [False, True], ids=["vm1-mid-restore", "vm1-not-yet-releasing"])
def test_a_start_waits_for_another_domains_restore_and_records_the_host_driver(sim, vm2_first):
    results = _race(sim, vm2_first=vm2_first)
    assert results == {"vm1": 0, "vm2": 0}
    entry = journal()[NIC]
    assert entry["domain"] == "vm2" and entry["original_driver"] == "virtio-pci"
    assert sim.driver_of(NIC) == "virtio-vfio-pci"
    assert run_hook("vm2", "release", "end", b"") == 0
    assert_home(sim)


def test_a_device_another_domain_failed_to_restore_is_refused_at_once(sim, capsys):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    sim.hold_open(NIC, seconds=None)
    assert run_hook("vm1", "release", "end", b"") == 1
    assert journal()[NIC]["status"] == "restore-failed"
    capsys.readouterr()
    writes, started = len(sim.writes), time.monotonic()
    assert run_hook("vm2", "prepare", "begin", domain_xml("vm2", pci(NIC))) == 1
    assert time.monotonic() - started < 1.0  # not waited for: nothing will change by itself
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{NIC} is in use by domain vm1 (restore-failed" in err
    assert len(sim.writes) == writes


# --- 3. a second driver that matches the device ---------------------------------------------
def test_restore_binds_the_recorded_driver_when_another_matches_first(sim):
    """A uio driver (or vfio-pci.ids=, or nouveau beside nvidia) probes ahead of e1000e."""
    assert run_hook("vm1", "prepare", "begin", BOTH) == 0
    sim.add_module("uio_pci_generic", "uio_pci_generic", ids=["pci:v*"], loaded=True, probed_first=True)
    assert run_hook("vm1", "release", "end", BOTH) == 0
    assert_home(sim)


def test_restore_puts_the_original_override_back(sim):
    sim.write(sim.devices / E1000 / "driver_override", "e1000e")  # the admin pinned it
    sim.add_module("uio_pci_generic", "uio_pci_generic", ids=["pci:v*"], loaded=True, probed_first=True)
    xml = domain_xml("vm1", pci(E1000))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert journal()[E1000]["original_override"] == "e1000e"
    assert run_hook("vm1", "release", "end", xml) == 0
    assert (sim.driver_of(E1000), sim.override_of(E1000)) == ("e1000e", "e1000e")


def test_restore_never_unbinds_towards_a_driver_that_is_not_loaded(sim, capsys):
    xml = domain_xml("vm1", pci(E1000))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    shutil.rmtree(sim.drivers / "e1000e")  # rmmod e1000e while the VM ran
    writes = len(sim.writes)
    assert run_hook("vm1", "release", "end", xml) == 1
    assert "its original driver e1000e is not loaded" in capsys.readouterr().err
    assert sim.driver_of(E1000) == "vfio-pci" and len(sim.writes) == writes
    assert journal()[E1000]["status"] == "restore-failed"
    register_module(sim.root, "e1000e")
    assert cli_main(["restore", "--domain", "vm1"]) == 0
    assert_home(sim)


# --- 4. restore BDF with nothing to do, or refused ------------------------------------------
def test_restore_bdf_of_a_device_on_its_host_driver_writes_nothing(sim, capsys):
    assert cli_main(["restore", E1000]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert sim.writes == [] and sim.driver_of(E1000) == "e1000e"


def test_restore_bdf_refused_for_a_held_device_writes_nothing(sim, capsys):
    sim.add_module("vfio_pci", "vfio-pci", vfio=True, aliases=["vfio_pci:v*d*sv*sd*bc*sc*i*"], loaded=True)
    for path, value in (("driver_override", "vfio-pci"), ("driver/unbind", E1000)):
        sim.write(sim.devices / E1000 / path, value)
    sim.write(sim.sys / "bus/pci/drivers_probe", E1000)
    sim.hold_open(E1000, seconds=None)
    sim.writes.clear()
    assert cli_main(["restore", E1000]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "still held open by 4242 (qemu-system-x86)" in err
    assert sim.writes == [] and sim.override_of(E1000) == "vfio-pci"


# --- the probe binds nothing ----------------------------------------------------------------
def test_probe_that_binds_nothing_fails_within_deadline_and_rolls_back(sim, capsys):
    sim.faults.probe_fails[E1000] = {"vfio-pci"}  # vfio-pci's probe() refuses this device
    assert run_hook("vm1", "prepare", "begin", BOTH) == 1
    assert "vfio-pci did not bind (driver now none)" in capsys.readouterr().err
    assert_home(sim)  # both back on their drivers: not merely "some driver or none"


def test_a_device_no_driver_will_take_is_reported_not_silently_driverless(sim, capsys):
    write_config('[libvirt]\nversion = "11.3.0"\n[timeouts]\nbind_seconds = 0.3\nrestore_seconds = 0.3\n')
    sim.faults.probe_binds_nothing[E1000] = -1  # nothing ever binds it again
    assert run_hook("vm1", "prepare", "begin", BOTH) == 1
    capsys.readouterr()
    assert sim.driver_of(E1000) is None
    entry = journal()[E1000]
    assert entry["status"] == "restore-failed" and entry["error"].endswith("no driver")
    assert cli_main(["status", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out)["devices"] if r["address"] == E1000)
    assert (row["driver"], row["status"]) == (None, "restore-failed")


# --- a crash after any write -----------------------------------------------------------------
def _prepare_both() -> int:
    return run_hook("vm1", "prepare", "begin", BOTH)


def _release() -> int:
    return run_hook("vm1", "release", "end", BOTH)


SIM_CONFIG = '[libvirt]\nversion = "11.3.0"\n[timeouts]\nbind_seconds = 2\nrestore_seconds = 2\n'


def _e1000e_refuses_vfio(sim) -> None:
    """vfio-pci's probe fails for the e1000e: the NIC is switched first, then rolled back.
    A short bind budget, so each crash point costs a fraction of a second."""
    write_config('[libvirt]\nversion = "11.3.0"\n[timeouts]\nbind_seconds = 0.3\nrestore_seconds = 2\n')
    sim.faults.probe_fails[E1000] = {"vfio-pci"}


def _e1000e_accepts_vfio(sim) -> None:
    sim.faults.probe_fails.pop(E1000, None)
    write_config(SIM_CONFIG)


PHASES = {
    # name: (setup, action that may be cut short, clean-up of the setup before recovery)
    "prepare": (lambda sim: None, _prepare_both, lambda sim: None),
    "release": (lambda sim: _prepare_both(), _release, lambda sim: None),
    "rollback": (_e1000e_refuses_vfio, _prepare_both, _e1000e_accepts_vfio),
}
RECOVERIES = {
    "release-end": _release,
    "restore-domain": lambda: cli_main(["restore", "--domain", "vm1"]),
    "prepare-again": lambda: _prepare_both() or _release(),
}


def _writes_in(sim, phase: str) -> int:
    setup, action, cleanup = PHASES[phase]
    setup(sim)
    before = sim.all_writes
    action()
    total = sim.all_writes - before
    cleanup(sim)
    _release()
    assert_home(sim, f"{phase}: clean run did not end at home")
    return total


@pytest.mark.parametrize("recovery", sorted(RECOVERIES))
@pytest.mark.parametrize("phase", sorted(PHASES))
def test_a_crash_after_any_write_is_recovered(sim, capsys, phase, recovery):
    total = _writes_in(sim, phase)
    assert total >= 8, total
    setup, action, cleanup = PHASES[phase]
    for crash_at in range(1, total + 1):
        setup(sim)
        sim.faults.crash_after_writes = sim.all_writes + crash_at
        with pytest.raises(SimCrash):
            action()
        sim.faults.crash_after_writes = None
        cleanup(sim)
        assert all(e["domain"] == "vm1" for e in journal().values()), crash_at
        assert RECOVERIES[recovery]() == 0, (crash_at, capsys.readouterr().err)
        assert_home(sim, f"{phase} crashed after write {crash_at}, recovered by {recovery}")


# --- a journal this version cannot read --------------------------------------------------
def test_an_unreadable_journal_blocks_only_the_devices_it_names(sim, capsys):
    state = Path(os.environ["VFIO_LIBVIRT_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    (state / "journal.json").write_text(json.dumps(
        {"version": 99, "devices": {NIC: {"address": NIC, "how": "a newer format"}}}))
    # managed='no' on the named device: refused, one line, nothing written
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{NIC}: named by unreadable journal" in err
    assert sim.writes == []
    # a device it does not name, and a managed='yes' one it does, still start
    assert run_hook("vm2", "prepare", "begin", domain_xml("vm2", pci(E1000))) == 0
    assert sim.driver_of(E1000) == "vfio-pci"
    assert run_hook("vm3", "prepare", "begin", domain_xml("vm3", pci(NIC, managed="yes"))) == 0
    assert NIC not in journal()
    assert cli_main(["status"]) == 0
    out = capsys.readouterr().out
    assert "version 99 is newer" in out
    # release gives back what it can, and says the journal may name more (libvirt logs it)
    assert run_hook("vm2", "release", "end", b"") == 1
    assert "could not restore journal: unreadable journal" in capsys.readouterr().err
    assert sim.driver_of(E1000) == "e1000e" and E1000 not in journal()
    # restore --domain with nothing of its own in the journal still says what is wrong
    assert cli_main(["restore", "--domain", "vm1"]) == 1
    err = capsys.readouterr().err
    assert "not restored: journal: unreadable journal" in err and "nothing to restore" not in err


def test_status_flags_an_entry_a_crashed_run_left_in_switching(sim, capsys):
    sim.faults.crash_after_writes = 3  # claimed, switching, then the override write
    with pytest.raises(SimCrash):
        run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC)))
    sim.faults.crash_after_writes = None
    entries = json.loads((Path(os.environ["VFIO_LIBVIRT_STATE_DIR"]) / "journal.json").read_text())
    entries["devices"][NIC]["pid"] = 2**22 + 1  # the crashed hook's pid: no such process now
    (Path(os.environ["VFIO_LIBVIRT_STATE_DIR"]) / "journal.json").write_text(json.dumps(entries))
    assert cli_main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"{NIC}: vm1's entry is stuck in switching since" in out
    assert "run: vfio-libvirt restore --domain vm1" in out
    assert cli_main(["doctor", "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)
    assert any(f["level"] == "fail" and "stuck in switching" in f["what"] for f in findings)


def test_doctor_flags_a_device_the_journal_puts_on_vfio_that_has_no_driver(sim, capsys):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    sim.write(sim.devices / NIC / "driver" / "unbind", NIC)  # someone unbound it behind our back
    assert cli_main(["doctor", "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)
    assert {"level": "fail", "what": f"drift: {NIC}: journal says vm1 has it on virtio-vfio-pci, "
            "sysfs says no driver", "fix": ""} in findings
