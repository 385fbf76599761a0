"""Defects a hostile review found in the first trust fixes: an admin's restore racing the
hook, managed='yes' devices that change hands, unreadable journals, timeouts that add up,
and a plan that ignored the journal.  Each test failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from tests.support.simkernel import register_module
from tests.unit.conftest import E1000, E1000E, NIC, domain_xml, pci, run_hook, write_config
from vfio_libvirt.apply import Switcher
from vfio_libvirt.cli import main as cli_main

BOTH = domain_xml("vm1", pci(NIC), pci(E1000))


def journal() -> dict:
    path = Path(os.environ["VFIO_LIBVIRT_STATE_DIR"]) / "journal.json"
    return json.loads(path.read_text())["devices"] if path.exists() else {}


def libvirt_binds_vfio_pci(sim, bdf: str) -> None:
    """What libvirt does to a managed='yes' device at start."""
    register_module(sim.root, "vfio_pci")
    os.unlink(sim.devices / bdf / "driver")
    sim._bind(bdf, "vfio-pci")


def test_restore_domain_while_the_domain_starts_waits_for_the_start(sim, monkeypatch, capsys):
    """Between claim and bind (modprobe can take long) an admin's restore --domain used to
    remove the entries, and the start then bound the device with an empty journal."""
    real, said = Switcher.driver_for_module, []

    def slow_modprobe(self, module, seconds):
        if not said:
            said.append(cli_main(["restore", "--domain", "vm1"]))  # the admin, meanwhile
        return real(self, module, seconds)

    monkeypatch.setattr(Switcher, "driver_for_module", slow_modprobe)
    # the admin's restore waits restore_seconds for the domain lock: leave the start time
    write_config('[libvirt]\nversion = "11.3.0"\n[timeouts]\nbind_seconds = 6\nrestore_seconds = 2\n')
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    assert said == [1]
    assert "domain vm1 is being prepared or restored by another run" in capsys.readouterr().err
    assert sim.driver_of(NIC) == "virtio-vfio-pci" and journal()[NIC]["status"] == "bound"
    assert run_hook("vm1", "release", "end", b"") == 0
    assert sim.driver_of(NIC) == "virtio-pci" and journal() == {}


def test_an_admins_restore_and_the_hooks_release_and_a_new_start_take_turns(sim):
    """The admin's restore --domain, the hook's own release and a fresh start of the same
    domain, in real threads: the new start's devices must end bound and journaled."""
    assert run_hook("vm1", "prepare", "begin", BOTH) == 0
    sim.faults.write_delay = 0.05
    results: dict[str, int] = {}
    admin = threading.Thread(target=lambda: results.update(admin=cli_main(["restore", "--domain", "vm1"])))
    admin.start()
    deadline = time.monotonic() + 5
    while journal().get(NIC, {}).get("status") != "restoring" and time.monotonic() < deadline:
        time.sleep(0.005)
    results["release"] = run_hook("vm1", "release", "end", BOTH)
    results["start"] = run_hook("vm1", "prepare", "begin", BOTH)
    admin.join(timeout=30)
    sim.faults.write_delay = 0.0
    assert results == {"admin": 0, "release": 0, "start": 0}
    entries = journal()
    for bdf, original in ((NIC, "virtio-pci"), (E1000, "e1000e")):
        assert entries[bdf]["status"] == "bound" and entries[bdf]["original_driver"] == original
        assert sim.driver_of(bdf) in ("virtio-vfio-pci", "vfio-pci")
    assert run_hook("vm1", "release", "end", BOTH) == 0
    assert sim.driver_of(NIC) == "virtio-pci" and sim.driver_of(E1000) == "e1000e"


def test_a_watched_device_started_again_unmanaged_is_still_owed_its_way_home(sim):
    xml_yes = domain_xml("vm1", pci(E1000, managed="yes"))
    assert run_hook("vm1", "prepare", "begin", xml_yes) == 0
    libvirt_binds_vfio_pci(sim, E1000)
    shutil.rmtree(sim.drivers / "e1000e")  # e1000e unloaded while the VM ran
    assert run_hook("vm1", "release", "end", xml_yes) == 1
    register_module(sim.root, "e1000e")
    xml_no = domain_xml("vm1", pci(E1000, managed="no"))  # the admin adopted the domain
    assert run_hook("vm1", "prepare", "begin", xml_no) == 0
    assert journal()[E1000]["role"] == "bind" and journal()[E1000]["original_driver"] == "e1000e"
    assert run_hook("vm1", "release", "end", xml_no) == 0
    assert sim.driver_of(E1000) == "e1000e" and journal() == {}


def test_a_watched_device_that_cannot_go_home_stays_on_the_vfio_driver_libvirt_gave_it(sim, capsys):
    xml = domain_xml("vm1", pci(E1000, managed="yes"))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    libvirt_binds_vfio_pci(sim, E1000)  # and libvirt's one re-attach failed
    sim.faults.probe_fails[E1000] = {"e1000e"}
    assert run_hook("vm1", "release", "end", xml) == 1
    assert sim.driver_of(E1000) == "vfio-pci"
    entry = journal()[E1000]
    assert entry["status"] == "restore-failed" and entry["error"].endswith("kept on vfio-pci")


def test_a_truncated_journal_is_never_nothing_to_restore(sim, capsys):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    path = Path(os.environ["VFIO_LIBVIRT_STATE_DIR"]) / "journal.json"
    path.write_text(path.read_text()[:-5])
    capsys.readouterr()
    for args in (["restore", "--domain", "vm1"], ["restore", "--all"]):
        assert cli_main(args) == 1, args
        out, err = capsys.readouterr()
        assert "nothing to restore" not in out and f"blocks {NIC}" in err, args
    assert run_hook("vm1", "release", "end", b"") == 1
    assert "unreadable journal" in capsys.readouterr().err


def test_one_deadline_covers_a_whole_release(sim, capsys):
    """Six devices of one IOMMU group, all held by one stuck QEMU: one wait, not six."""
    bdfs = [f"0000:02:00.{i}" for i in range(6)]
    for bdf in bdfs:
        sim.add_device(bdf, E1000E, group="20", driver="e1000e")
    write_config('[libvirt]\nversion = "11.3.0"\n[timeouts]\nbind_seconds = 2\nrestore_seconds = 1\n')
    xml = domain_xml("vm1", *[pci(bdf) for bdf in bdfs])
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    sim.hold_open(bdfs[0], None)
    started = time.monotonic()
    assert run_hook("vm1", "release", "end", xml) == 1
    assert time.monotonic() - started < 2.5
    assert all(sim.driver_of(bdf) == "vfio-pci" for bdf in bdfs)
    assert {e["status"] for e in journal().values()} == {"restore-failed"}


def test_plan_shows_what_the_journal_would_make_a_start_do(sim, tmp_path, capsys):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    vm2 = tmp_path / "vm2.xml"
    vm2.write_bytes(domain_xml("vm2", pci(NIC)))
    capsys.readouterr()
    assert cli_main(["plan", "--xml", str(vm2)]) == 1
    assert f"refused: {NIC} is in use by domain vm1 (bound)" in capsys.readouterr().out


def test_plan_exits_2_for_a_config_driver_that_is_no_vfio_driver(sim, tmp_path, capsys):
    write_config(f'[libvirt]\nversion = "11.3.0"\n[devices."{NIC}"]\ndriver = "e1000e"\n')
    vm1 = tmp_path / "vm1.xml"
    vm1.write_bytes(domain_xml("vm1", pci(NIC)))
    assert cli_main(["plan", "--xml", str(vm1)]) == 2
    assert "e1000e is not a VFIO driver" in capsys.readouterr().out


def test_bind_driver_names_the_command_line_as_its_source(sim, capsys):
    assert cli_main(["bind", E1000, "--driver", "e1000e"]) == 2
    err = capsys.readouterr().err
    assert "--driver e1000e on the command line: e1000e is not a VFIO driver" in err
    assert sim.writes == [] and journal() == {}


def test_restore_waits_for_a_holder_that_comes_while_it_waits_for_the_first(sim):
    """Waiting watches only the holders it knows (cheap); before unbinding it looks at all
    of /proc again, so a second process that opened the group meanwhile is waited for too."""
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    sim.hold_open(NIC, seconds=0.3, pid=4242)
    threading.Timer(0.15, sim.hold_open, (NIC,), {"seconds": 0.45, "pid": 4343}).start()
    started = time.monotonic()
    assert run_hook("vm1", "release", "end", b"") == 0
    assert time.monotonic() - started >= 0.55  # the second holder let go at about 0.6 s
    assert sim.driver_of(NIC) == "virtio-pci" and journal() == {}
