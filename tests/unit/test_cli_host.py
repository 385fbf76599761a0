"""plan / status / bind / restore / test-hook from the command line, on the simulator."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.conftest import AUDIO_BDF, E1000, GPU_BDF, NIC, domain_xml, pci, run_hook
from vfio_libvirt.cli import main

REPO = Path(__file__).resolve().parents[2]
HOOK = str(REPO / "hooks" / "qemu")


@pytest.fixture
def xml_file(tmp_path):
    def write(data: bytes) -> str:
        path = tmp_path / "domain.xml"
        path.write_bytes(data)
        return str(path)
    return write


def test_plan_json_shows_steps_and_writes_nothing(sim, xml_file, capsys):
    assert main(["plan", "--xml", xml_file(domain_xml("vm1", pci(NIC), pci(E1000, "yes"))),
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [(s["address"], s["action"], s["module"]) for s in plan["steps"]] == [
        (NIC, "bind", "virtio_vfio_pci"), (E1000, "watch", None)]
    assert plan["problems"] == []
    assert sim.writes == [] and sim.loaded_modules() == {
        "virtio_pci", "e1000e", "nouveau", "snd_hda_intel", "pcieport"}


def test_plan_refusal_exits_1_and_names_the_companion(sim, xml_file, capsys):
    assert main(["plan", "--xml", xml_file(domain_xml("vm1", pci(GPU_BDF)))]) == 1
    out = capsys.readouterr().out
    assert f"refused: {AUDIO_BDF} (snd_hda_intel) shares IOMMU group 1" in out


def test_bind_status_restore_by_hand(sim, capsys):
    assert main(["bind", E1000]) == 0
    assert sim.driver_of(E1000) == "vfio-pci"
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["drift"] == []
    assert 0 <= status["devices"][0].pop("age_seconds") < 5  # since the entry last changed
    assert status["devices"][0].pop("worked_on") is None  # asked only of entries in flight
    assert status["devices"] == [{
        "address": E1000, "driver": "vfio-pci", "driver_override": "vfio-pci",
        "original_driver": "e1000e", "domain": "manual", "libvirt_domain": None, "role": "bind",
        "status": "bound", "error": "", "pf": None, "network": None}]
    assert main(["restore", E1000]) == 0
    assert sim.driver_of(E1000) == "e1000e" and sim.override_of(E1000) is None
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["devices"] == []


def test_status_names_the_running_libvirt_domain(sim, mocker, capsys):
    mocker.patch("vfio_libvirt.virt.running_domains",
                 return_value={"vm9": domain_xml("vm9", pci(E1000))})
    assert main(["bind", E1000, "--owner", "vm9"]) == 0
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["devices"][0]["libvirt_domain"] == "vm9"
    assert status["libvirt"] == "1 running domain(s) scanned"


def test_bind_with_explicit_driver_and_status_shows_drift(sim, capsys):
    assert main(["bind", NIC, "--driver", "vfio-pci"]) == 0
    assert sim.driver_of(NIC) == "vfio-pci"
    sim.write(sim.devices / NIC / "driver" / "unbind", NIC)
    capsys.readouterr()
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"drift: {NIC}: journal says manual has it on vfio-pci, sysfs says no driver" in out


def test_restore_device_not_in_journal_returns_it_to_host_driver(sim, capsys):
    sim.add_module("vfio_pci", "vfio-pci", vfio=True, aliases=["vfio_pci:v*d*sv*sd*bc*sc*i*"],
                   loaded=True)
    sim.write(sim.devices / E1000 / "driver_override", "vfio-pci")
    sim.write(sim.devices / E1000 / "driver" / "unbind", E1000)
    sim.write(sim.sys / "bus/pci/drivers_probe", E1000)
    assert main(["restore", E1000]) == 0
    assert "not in the journal; now on e1000e (was vfio-pci)" in capsys.readouterr().out
    assert sim.driver_of(E1000) == "e1000e"


def test_restore_all(sim):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    assert run_hook("vm2", "prepare", "begin", domain_xml("vm2", pci(E1000))) == 0
    assert main(["restore", "--all"]) == 0
    assert sim.driver_of(NIC) == "virtio-pci" and sim.driver_of(E1000) == "e1000e"


@pytest.mark.parametrize("args", [["restore"], ["restore", NIC, "--all"], ["bind", "0000:00:99.0"],
                                  ["bind", NIC, "--driver=-r"]])
def test_manage_commands_bad_input_exit_2(sim, capsys, args):
    assert main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sim.writes == []


def test_test_hook_dry_run_runs_the_hook_and_writes_nothing(sim, xml_file, capsys):
    rc = main(["test-hook", "vm1", "prepare", "--hook", HOOK, "--dry-run",
               "--xml", xml_file(domain_xml("vm1", pci(NIC)))])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"$ {HOOK} vm1 prepare begin -" in out
    assert f"{NIC}: bind → virtio_vfio_pci" in out and "exit code 0" in out
    assert sim.writes == [] and not Path(os.environ["VFIO_LIBVIRT_STATE_DIR"], "journal.json").exists()


def test_test_hook_reports_the_hooks_failure(sim, xml_file, capsys):
    rc = main(["test-hook", "vm1", "prepare", "--hook", HOOK,
               "--xml", xml_file(domain_xml("vm1", pci(NIC)).replace(b"0x10", b"0x99"))])
    assert rc == 2
    assert "exit code 2" in capsys.readouterr().out


def test_plan_writes_nothing_not_even_the_version_cache(sim, xml_file, tmp_path, monkeypatch):
    from tests.unit.conftest import write_config
    from vfio_libvirt import libvirt_version

    daemon = tmp_path / "virtqemud"
    daemon.write_text("#!/bin/sh\necho 'virtqemud (libvirt) 11.3.0'\n")
    daemon.chmod(0o755)
    monkeypatch.setattr(libvirt_version, "daemon_candidates", lambda: [daemon])
    write_config("")
    assert main(["plan", "--xml", xml_file(domain_xml("vm1", pci(NIC)))]) == 0
    state = Path(os.environ["VFIO_LIBVIRT_STATE_DIR"])
    assert not state.exists() or list(state.iterdir()) == []


def test_test_hook_needs_an_installed_hook(sim, capsys):
    assert main(["test-hook", "vm1", "prepare", "--hook", "/nonexistent", "--xml", "-"]) == 1
    assert "not installed" in capsys.readouterr().err


def test_plan_by_domain_name_through_libvirt_test_driver(capsys):
    pytest.importorskip("libvirt")
    assert main(["plan", "test", "--connect", "test:///default"]) == 0
    assert "domain test assigns no host PCI devices" in capsys.readouterr().out
    assert main(["plan", "nosuch", "--connect", "test:///default"]) == 2


def test_hook_fast_path_does_not_import_lxml_or_typing():
    code = (
        "import io, sys; from vfio_libvirt.hook import main; "
        "rc = main(['qemu', 'vm', 'prepare', 'begin', '-'], "
        "io.BytesIO(b'<domain><name>vm</name><devices/></domain>')); "
        "rc2 = main(['qemu', 'vm', 'release', 'end', '-'], io.BytesIO(b'')); "
        "print(rc, rc2, 'lxml' in sys.modules, 'typing' in sys.modules, 'tenacity' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), cwd="/").stdout
    assert out.split() == ["0", "0", "False", "False", "False"]


def test_restore_domain_with_nothing_in_the_journal_says_so(sim, capsys):
    assert main(["restore", "--domain", "vm7"]) == 0
    assert capsys.readouterr().out == "nothing to restore: no device of domain vm7 in the journal\n"
    assert main(["bind", E1000, "--owner", "vm1"]) == 0
    capsys.readouterr()
    assert main(["restore", "--domain", "vm7"]) == 0
    assert capsys.readouterr().out == "nothing to restore: no device of domain vm7 in the journal\n"
    assert sim.driver_of(E1000) == "vfio-pci"  # vm1's device stays where it is


def test_restore_all_with_an_empty_journal_says_so(sim, capsys):
    assert main(["restore", "--all"]) == 0
    assert capsys.readouterr().out == "nothing to restore: the journal is empty\n"
    assert sim.writes == []


@pytest.mark.parametrize("owner", ["", " ", "\t", "vm1\n", "vm\nvm2", " vm1", "vm\x1b[2J", "vm\u2028"])
def test_bind_refuses_an_owner_no_domain_could_have(sim, capsys, owner):
    assert main(["bind", E1000, "--owner", owner]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid --owner" in err
    assert sim.writes == []
    assert not Path(os.environ["VFIO_LIBVIRT_STATE_DIR"], "journal.json").exists()


def test_bind_accepts_an_ordinary_owner(sim, capsys):
    assert main(["bind", E1000, "--owner", "my vm-1.ü"]) == 0
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["devices"][0]["domain"] == "my vm-1.ü"
