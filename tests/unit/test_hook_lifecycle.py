"""The hook end to end on the simulated kernel: prepare, release, reconnect, failures."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from tests.unit.conftest import (
    AUDIO_BDF,
    E1000,
    GPU_BDF,
    NIC,
    domain_xml,
    pci,
    run_hook,
    write_config,
)
from vfio_libvirt.cli import main as cli_main
from vfio_libvirt.state import Journal


def journal() -> dict:
    path = Path(os.environ["VFIO_LIBVIRT_STATE_DIR"]) / "journal.json"
    return json.loads(path.read_text())["devices"] if path.exists() else {}


def test_prepare_binds_best_variant_and_release_restores(sim, capsys):
    xml = domain_xml("vm1", pci(NIC), pci(E1000))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert sim.driver_of(NIC) == "virtio-vfio-pci"  # driver name, not the module name
    assert sim.override_of(NIC) == "virtio-vfio-pci"
    assert sim.driver_of(E1000) == "vfio-pci"
    assert (sim.devices / NIC / "vfio-dev").is_dir()
    entries = journal()
    assert entries[NIC]["original_driver"] == "virtio-pci"
    assert entries[NIC]["target_module"] == "virtio_vfio_pci"
    assert entries[NIC]["status"] == "bound" and entries[NIC]["domain"] == "vm1"
    assert entries[E1000]["target_driver"] == "vfio-pci"

    assert run_hook("vm1", "release", "end", xml) == 0
    assert sim.driver_of(NIC) == "virtio-pci" and sim.override_of(NIC) is None
    assert sim.driver_of(E1000) == "e1000e" and sim.override_of(E1000) is None
    assert journal() == {}
    assert capsys.readouterr().err == ""


def test_release_with_reason_argument_and_idempotent(sim):
    xml = domain_xml("vm1", pci(NIC))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert run_hook("vm1", "release", "end", xml, "destroyed") == 0  # libvirt >= 10.5
    assert sim.driver_of(NIC) == "virtio-pci"
    writes = len(sim.writes)
    assert run_hook("vm1", "release", "end", xml, "shutdown") == 0
    assert len(sim.writes) == writes


@pytest.mark.parametrize(
    ("op", "subop"),
    [("start", "begin"), ("started", "begin"), ("stopped", "end"), ("migrate", "begin"),
     ("restore", "begin"), ("attach", "begin"), ("release", "end")],
)
def test_other_ops_exit_0_and_touch_nothing(sim, op, subop):
    assert run_hook("vm1", op, subop, domain_xml("vm1", pci(NIC))) == 0
    assert sim.writes == []
    assert sim.driver_of(NIC) == "virtio-pci"


def test_too_few_arguments_is_usage_error(capsys):
    from vfio_libvirt import hook
    assert hook.main(["qemu", "vm1"]) == 2
    assert "usage" in capsys.readouterr().err


def test_domain_without_hostdev_writes_nothing(sim):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1")) == 0
    assert sim.writes == [] and journal() == {}


def test_bad_xml_exits_2_before_any_write(sim, capsys):
    xml = domain_xml("vm1", pci(NIC), pci(E1000)).replace(b"function='0x0'/>", b"function='9'/>", 1)
    assert run_hook("vm1", "prepare", "begin", xml) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "function" in err
    assert sim.writes == [] and journal() == {}


def test_xml_for_another_domain_is_refused(sim, capsys):
    assert run_hook("vm2", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 2
    assert sim.writes == []


def test_missing_device_refused_before_writing(sim, capsys):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC), pci("0000:05:00.0"))) == 1
    assert "0000:05:00.0: no such PCI device" in capsys.readouterr().err
    assert sim.writes == []


def test_libvirt_9_gets_vfio_pci_for_managed_no(sim):
    write_config('[libvirt]\nversion = "9.0.0"\n')
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    assert sim.driver_of(NIC) == "vfio-pci"
    assert "libvirt 9.0.0 accepts only vfio-pci" in journal()[NIC]["reason"]


def test_driver_model_in_xml_beats_alias_rule(sim):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC, model="vfio_pci"))) == 0
    assert sim.driver_of(NIC) == "vfio-pci"


def test_host_config_override_beats_alias_rule(sim):
    write_config(f'[libvirt]\nversion = "11.3.0"\n[devices."{NIC}"]\ndriver = "vfio_pci"\n')
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    assert sim.driver_of(NIC) == "vfio-pci"
    assert journal()[NIC]["reason"] == "the host config asks for vfio_pci"


def test_never_touch_device_is_left_alone(sim):
    write_config(f'[libvirt]\nversion = "11.3.0"\n[devices."{NIC}"]\nnever_touch = true\n')
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    assert sim.writes == [] and sim.driver_of(NIC) == "virtio-pci"


@pytest.mark.parametrize("version", ["9.0.0", "11.3.0"])
def test_managed_yes_hook_records_and_leaves_binding_to_libvirt(sim, version):
    write_config(f'[libvirt]\nversion = "{version}"\n')
    xml = domain_xml("vm1", pci(NIC, managed="yes"))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert sim.writes == []
    assert journal()[NIC]["role"] == "watch" and journal()[NIC]["original_driver"] == "virtio-pci"
    # libvirt binds it and, at stop, gives it back: the hook has nothing to do
    sim.write(sim.devices / NIC / "driver_override", "vfio-pci")
    sim.write(sim.devices / NIC / "driver" / "unbind", NIC)
    assert run_hook("vm1", "start", "begin", xml) == 0
    sim.write(sim.devices / NIC / "driver_override", "\n")
    sim.write(sim.sys / "bus/pci/drivers_probe", NIC)
    assert sim.driver_of(NIC) == "virtio-pci"
    writes = len(sim.writes)
    assert run_hook("vm1", "release", "end", xml) == 0
    assert len(sim.writes) == writes and journal() == {}


def test_managed_yes_repaired_when_libvirt_left_it_on_vfio(sim):
    xml = domain_xml("vm1", pci(NIC, managed="yes"))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    # libvirt bound vfio-pci and its one re-attach at stop did not happen
    sim.add_module("vfio_pci", "vfio-pci", vfio=True, aliases=["vfio_pci:v*d*sv*sd*bc*sc*i*"],
                   loaded=True)
    sim.write(sim.devices / NIC / "driver_override", "vfio-pci")
    sim.write(sim.devices / NIC / "driver" / "unbind", NIC)
    sim.write(sim.sys / "bus/pci/drivers_probe", NIC)
    assert sim.driver_of(NIC) == "vfio-pci"
    assert run_hook("vm1", "release", "end", xml) == 0
    assert sim.driver_of(NIC) == "virtio-pci" and sim.override_of(NIC) is None
    assert journal() == {}


def test_a_module_that_cannot_be_loaded_stops_the_start_before_any_device_moves(sim, capsys):
    sim.fail_module("vfio_pci")  # the e1000e needs it; the NIC (first) uses its variant
    xml = domain_xml("vm1", pci(NIC), pci(E1000))
    assert run_hook("vm1", "prepare", "begin", xml) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{E1000}: cannot bind vfio_pci: modprobe vfio_pci failed" in err
    assert "nothing was switched" in err
    assert not [w for w in sim.writes if w[0].endswith(("unbind", "drivers_probe"))]
    assert sim.driver_of(NIC) == "virtio-pci" and sim.override_of(NIC) is None
    assert sim.driver_of(E1000) == "e1000e"
    assert journal() == {}
    # libvirt runs release after a failed prepare: nothing to do, nothing breaks
    assert run_hook("vm1", "release", "end", xml) == 0


def test_transient_ebusy_on_unbind_is_retried(sim):
    sim.faults.unbind_ebusy[NIC] = 3
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    assert sim.driver_of(NIC) == "virtio-vfio-pci"
    assert sim.faults.unbind_ebusy[NIC] == 0


def test_restore_waits_for_a_process_holding_the_group(sim):
    xml = domain_xml("vm1", pci(NIC))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    sim.hold_open(NIC, seconds=0.4)
    assert run_hook("vm1", "release", "end", xml) == 0
    assert sim.driver_of(NIC) == "virtio-pci" and journal() == {}


def test_restore_past_deadline_keeps_device_on_vfio_and_says_so(sim, capsys):
    xml = domain_xml("vm1", pci(NIC))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    sim.hold_open(NIC, seconds=None)
    assert run_hook("vm1", "release", "end", xml) == 1
    assert "still held open by 4242 (qemu-system-x86)" in capsys.readouterr().err
    assert sim.driver_of(NIC) == "virtio-vfio-pci"  # never silently driverless
    assert sim.override_of(NIC) == "virtio-vfio-pci"  # and pinned there
    entry = journal()[NIC]
    assert entry["status"] == "restore-failed" and "left on virtio-vfio-pci" in entry["error"]


def test_release_after_restore_failure_can_be_retried(sim):
    xml = domain_xml("vm1", pci(NIC))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    sim.faults.unbind_ebusy[NIC] = 10**6
    assert run_hook("vm1", "release", "end", xml) == 1
    sim.faults.unbind_ebusy[NIC] = 0
    assert cli_main(["restore", "--domain", "vm1"]) == 0
    assert sim.driver_of(NIC) == "virtio-pci" and journal() == {}


def test_device_held_by_another_domain_is_refused(sim, capsys):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    writes = len(sim.writes)
    assert run_hook("vm2", "prepare", "begin", domain_xml("vm2", pci(E1000), pci(NIC))) == 1
    assert f"{NIC} is in use by domain vm1" in capsys.readouterr().err
    assert len(sim.writes) == writes  # vm2 touched nothing, not even its free device
    assert run_hook("vm2", "release", "end", domain_xml("vm2")) == 0
    assert sim.driver_of(NIC) == "virtio-vfio-pci" and journal()[NIC]["domain"] == "vm1"


def test_two_hooks_racing_for_one_device(sim):
    results: dict[str, int] = {}
    barrier = threading.Barrier(2)

    def start(name: str) -> None:
        barrier.wait()
        results[name] = run_hook(name, "prepare", "begin", domain_xml(name, pci(NIC)))

    threads = [threading.Thread(target=start, args=(n,)) for n in ("vmA", "vmB")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [0, 1]
    winner = next(n for n, rc in results.items() if rc == 0)
    loser = next(n for n, rc in results.items() if rc == 1)
    assert journal()[NIC]["domain"] == winner
    assert sim.driver_of(NIC) == "virtio-vfio-pci"
    assert run_hook(loser, "release", "end", b"") == 0
    assert sim.driver_of(NIC) == "virtio-vfio-pci"
    assert run_hook(winner, "release", "end", b"") == 0
    assert sim.driver_of(NIC) == "virtio-pci" and journal() == {}


def test_group_companion_refused_by_default(sim, capsys):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(GPU_BDF))) == 1
    err = capsys.readouterr().err
    assert f"{AUDIO_BDF} (snd_hda_intel) shares IOMMU group 1 with {GPU_BDF}" in err
    assert "0000:00:01.0" not in err  # the bridge in the group is exempt
    assert sim.writes == []


def test_group_is_fine_when_domain_assigns_all_functions(sim):
    xml = domain_xml("vm1", pci(GPU_BDF), pci(AUDIO_BDF))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert sim.driver_of(GPU_BDF) == "vfio-pci" and sim.driver_of(AUDIO_BDF) == "vfio-pci"
    assert sim.driver_of("0000:00:01.0") == "pcieport"


@pytest.mark.parametrize("where", ["config", "metadata"])
def test_companions_bound_and_restored_when_allowed(sim, where):
    metadata = ""
    if where == "config":
        write_config('[libvirt]\nversion = "11.3.0"\n[policy]\ncompanions = "bind"\n')
    else:
        metadata = ("<metadata><vfio:policy xmlns:vfio='urn:vfio-libvirt:metadata:1' "
                    "companions='bind'/></metadata>")
    xml = domain_xml("vm1", pci(GPU_BDF), metadata=metadata)
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert sim.driver_of(AUDIO_BDF) == "vfio-pci"
    assert journal()[AUDIO_BDF]["role"] == "companion"
    assert run_hook("vm1", "release", "end", xml) == 0
    assert sim.driver_of(AUDIO_BDF) == "snd_hda_intel" and sim.driver_of(GPU_BDF) == "nouveau"


def test_device_already_on_vfio_is_kept_and_left_on_it(sim):
    sim.add_module("vfio_pci", "vfio-pci", vfio=True, aliases=["vfio_pci:v*d*sv*sd*bc*sc*i*"],
                   loaded=True)
    sim.write(sim.devices / E1000 / "driver_override", "vfio-pci")
    sim.write(sim.devices / E1000 / "driver" / "unbind", E1000)
    sim.write(sim.sys / "bus/pci/drivers_probe", E1000)
    sim.writes.clear()
    xml = domain_xml("vm1", pci(E1000))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert sim.writes == [] and journal()[E1000]["role"] == "keep"
    assert run_hook("vm1", "release", "end", xml) == 0
    assert sim.driver_of(E1000) == "vfio-pci" and journal() == {}


def test_reconnect_reports_drift_and_changes_nothing(sim, caplog):
    xml = domain_xml("vm1", pci(NIC))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    sim.write(sim.devices / NIC / "driver" / "unbind", NIC)  # someone else unbound it
    writes = len(sim.writes)
    assert run_hook("vm1", "reconnect", "begin", xml) == 0
    assert len(sim.writes) == writes
    assert Journal(Path(os.environ["VFIO_LIBVIRT_STATE_DIR"])).read().for_domain("vm1")
    from vfio_libvirt.lifecycle import Host
    from vfio_libvirt.settings import Settings
    from vfio_libvirt.views import drift
    assert drift(Host(Settings.from_env()), "vm1") == [
        f"{NIC}: journal says vm1 has it on virtio-vfio-pci, sysfs says no driver"
    ]
