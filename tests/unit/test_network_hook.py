"""The network hook on the simulated kernel: VFs of hostdev network pools.

libvirt runs `<network> port-created begin -` with `<hookData>` (network + networkport
XML) on stdin while it allocates a domain's port, and `port-deleted begin -` when the
port goes; the XML below has the shape libvirt 11.3 writes (bridge_driver.c,
virnetworkportdef.c).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.unit.conftest import NIC, SHORT_DEADLINE, domain_xml, pci, run_hook, write_config
from tests.unit.test_stuck import Background
from vfio_libvirt import network_hook
from vfio_libvirt.lifecycle import release
from vfio_libvirt.state import Journal

PF = "0000:02:00.0"
VF0 = "0000:02:10.0"
VF1 = "0000:02:10.2"
IGB = "pci:v00008086d000010C9sv00008086sd0000A03Cbc02sc00i00"
IGB_VF = "pci:v00008086d000010CAsv00008086sd00000000bc02sc00i00"
OWNER_UUID = "11111111-2222-3333-4444-555555555555"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def vfs(sim):
    """An igb PF on igb with two VFs on igbvf, each VF in an IOMMU group of its own."""
    sim.add_module("igb", "igb", ids=["pci:v00008086d000010C9*"], loaded=True)
    sim.add_module("igbvf", "igbvf", ids=["pci:v00008086d000010CA*"], loaded=True)
    sim.add_device(PF, IGB, group="20", driver="igb")
    for n, vf in enumerate((VF0, VF1)):
        sim.add_device(vf, IGB_VF, group=str(21 + n), driver="igbvf")
        os.symlink(sim.devices / vf, sim.devices / PF / f"virtfn{n}")
        os.symlink(sim.devices / PF, sim.devices / vf / "physfn")
    (sim.devices / PF / "sriov_numvfs").write_text("2\n")
    (sim.devices / PF / "sriov_totalvfs").write_text("7\n")
    sim.write_modules_alias(Path(os.environ["VFIO_LIBVIRT_MODULES_DIR"]))
    return sim


def hook_data(vf: str = VF0, *, network: str = "vfpool", owner: str = "vm1", managed: str | None = "no",
              plug: str | None = None, model: str | None = None) -> bytes:
    domain, bus, rest = vf.split(":")
    slot, function = rest.split(".")
    attr = f" managed='{managed}'" if managed is not None else ""
    driver = f"<driver model='{model}'/>" if model else ""
    plug = plug if plug is not None else (
        f"<plug type='hostdev-pci'{attr}>{driver}"
        f"<address type='pci' domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/>"
        "</plug>")
    return (
        "<hookData>\n"
        f"  <network><name>{network}</name><uuid>aaaaaaaa-2222-3333-4444-555555555555</uuid>"
        f"<forward mode='hostdev'{attr}><pf dev='enp2s0'/></forward></network>\n"
        "  <networkport><uuid>bbbbbbbb-2222-3333-4444-555555555555</uuid>"
        f"<owner><name>{owner}</name><uuid>{OWNER_UUID}</uuid></owner>"
        f"<mac address='52:54:00:aa:bb:01'/>{plug}</networkport>\n"
        "</hookData>"
    ).encode()


def net_hook(network: str, op: str, data: bytes, subop: str = "begin") -> int:
    return network_hook.main(["network", network, op, subop, "-"], stdin=io.BytesIO(data))


def journal() -> dict:
    path = Path(os.environ["VFIO_LIBVIRT_STATE_DIR"]) / "journal.json"
    return json.loads(path.read_text())["devices"] if path.exists() else {}


def pf_untouched(sim) -> bool:
    return sim.driver_of(PF) == "igb" and not any(PF in target for target, _ in sim.writes)


# --- the two port events ------------------------------------------------------------
def test_port_created_binds_the_vf_and_port_deleted_gives_it_back(vfs, capsys):
    assert net_hook("vfpool", "port-created", hook_data()) == 0
    assert vfs.driver_of(VF0) == "vfio-pci" and vfs.override_of(VF0) == "vfio-pci"
    entry = journal()[VF0]
    assert (entry["domain"], entry["uuid"], entry["network"]) == ("vm1", OWNER_UUID, "vfpool")
    assert (entry["original_driver"], entry["status"], entry["role"]) == ("igbvf", "bound", "bind")
    assert vfs.driver_of(VF1) == "igbvf" and pf_untouched(vfs)

    assert net_hook("vfpool", "port-deleted", hook_data()) == 0
    assert vfs.driver_of(VF0) == "igbvf" and vfs.override_of(VF0) is None
    assert journal() == {} and pf_untouched(vfs)
    assert capsys.readouterr().err == ""


def test_port_created_again_for_a_running_port_changes_nothing(vfs):
    """libvirt re-runs port-created for every port when the network driver restarts."""
    assert net_hook("vfpool", "port-created", hook_data()) == 0
    before, writes = journal()[VF0], len(vfs.writes)
    assert net_hook("vfpool", "port-created", hook_data()) == 0
    assert len(vfs.writes) == writes
    after = journal()[VF0]
    assert (after["original_driver"], after["role"], after["network"]) == ("igbvf", "bind", "vfpool")
    assert after["status"] == before["status"] == "bound"
    assert net_hook("vfpool", "port-deleted", hook_data()) == 0
    assert vfs.driver_of(VF0) == "igbvf"


def test_a_variant_driver_named_by_the_network_is_used(vfs):
    vfs.add_module("igbvf_vfio_pci", "igbvf-vfio-pci", vfio=True,
                   aliases=["vfio_pci:v00008086d000010CAsv*sd*bc*sc*i*"])
    vfs.write_modules_alias(Path(os.environ["VFIO_LIBVIRT_MODULES_DIR"]))
    assert net_hook("vfpool", "port-created", hook_data(model="vfio_pci")) == 0
    assert vfs.driver_of(VF0) == "vfio-pci"  # the network's <driver model> beats the alias
    assert "network vfpool" in journal()[VF0]["reason"]
    assert net_hook("vfpool", "port-deleted", hook_data()) == 0
    assert net_hook("vfpool", "port-created", hook_data()) == 0
    assert vfs.driver_of(VF0) == "igbvf-vfio-pci"  # no model: the best alias wins


def libvirt_binds_vfio(sim, bdf: str) -> None:
    """What libvirt does for a managed='yes' hostdev between port-created and start."""
    sim.add_module("vfio_pci", "vfio-pci", vfio=True, aliases=["vfio_pci:v*d*sv*sd*bc*sc*i*"],
                   loaded=True)
    sim.write(sim.devices / bdf / "driver_override", "vfio-pci")
    sim.write(sim.devices / bdf / "driver" / "unbind", bdf)
    sim.write(sim.sys / "bus/pci/drivers_probe", bdf)


def test_a_managed_yes_pool_is_libvirts_and_the_hook_only_watches(vfs):
    assert net_hook("vfpool", "port-created", hook_data(managed="yes")) == 0
    assert vfs.writes == []
    entry = journal()[VF0]
    assert (entry["role"], entry["status"], entry["network"]) == ("watch", "watching", "vfpool")
    assert entry["original_driver"] == "igbvf"
    libvirt_binds_vfio(vfs, VF0)
    # libvirt's reattach, before port-deleted
    vfs.write(vfs.devices / VF0 / "driver_override", "\n")
    vfs.write(vfs.devices / VF0 / "driver" / "unbind", VF0)
    vfs.write(vfs.sys / "bus/pci/drivers_probe", VF0)
    writes = len(vfs.writes)
    assert net_hook("vfpool", "port-deleted", hook_data(managed="yes")) == 0
    assert len(vfs.writes) == writes and journal() == {} and vfs.driver_of(VF0) == "igbvf"


def test_a_managed_yes_pool_vf_libvirt_left_on_vfio_is_given_back(vfs):
    """libvirt 11.3 skips the reattach of a VF it once saw managed='no' (the libvirt tier)."""
    assert net_hook("vfpool", "port-created", hook_data(managed="yes")) == 0
    libvirt_binds_vfio(vfs, VF0)
    assert vfs.driver_of(VF0) == "vfio-pci"
    assert net_hook("vfpool", "port-deleted", hook_data(managed="yes")) == 0
    assert vfs.driver_of(VF0) == "igbvf" and vfs.override_of(VF0) is None
    assert journal() == {} and pf_untouched(vfs)


def test_a_missing_managed_attribute_means_no(vfs):
    assert net_hook("vfpool", "port-created", hook_data(managed=None)) == 0
    assert vfs.driver_of(VF0) == "vfio-pci"
    assert net_hook("vfpool", "port-deleted", hook_data(managed=None)) == 0
    assert vfs.driver_of(VF0) == "igbvf"


@pytest.mark.parametrize("op", ["start", "started", "stopped", "updated", "port-created"])
def test_other_events_and_ports_return_at_once(vfs, op):
    """Network start/stop and bridge ports of every network run the hook too."""
    bridge = hook_data(plug="<plug type='network' bridge='virbr0'/>")
    assert net_hook("default", op, bridge.replace(b"vfpool", b"default")) == 0
    assert vfs.writes == [] and journal() == {}


def test_port_created_end_subop_and_short_argv(vfs, capsys):
    assert net_hook("vfpool", "port-created", hook_data(), subop="end") == 0
    assert vfs.writes == []
    assert network_hook.main(["network", "vfpool"], stdin=io.BytesIO(b"")) == 2
    assert "usage" in capsys.readouterr().err


# --- hostile or wrong input -------------------------------------------------------------
HOSTILE = {
    "doctype": b"<!DOCTYPE x [<!ENTITY a 'b'>]><hookData>&a;</hookData>",
    "billion laughs": (b"<?xml version='1.0'?><!DOCTYPE l [<!ENTITY l0 'hostdev-pci'>"
                       b"<!ENTITY l1 '&l0;&l0;&l0;&l0;&l0;&l0;&l0;&l0;'>]><hookData>&l1;</hookData>"),
    "malformed": b"<hookData><network><name>vfpool</name></network><networkport>hostdev-pci",
    "wrong root": b"<domain><name>vfpool</name><plug type='hostdev-pci'/></domain>",
    "other network": hook_data(network="evil"),
    "two ports": hook_data().replace(b"</hookData>", hook_data().split(b"\n")[2] + b"</hookData>"),
    "no owner": hook_data(owner=""),
    "impossible bus": hook_data().replace(b"bus='0x02'", b"bus='0x1ff'"),
    "function 8": hook_data().replace(b"function='0x0'", b"function='0x8'"),
    "managed maybe": hook_data(managed="maybe"),
    "two addresses": hook_data().replace(b"</plug>", b"<address type='pci' domain='0x0000' "
                                         b"bus='0x02' slot='0x10' function='0x2'/></plug>"),
    "odd driver model": hook_data(model="../../evil"),
    "a non-VFIO driver model": hook_data(model="igbvf"),
    "not UTF-8": hook_data().replace(b"vm1", b"vm\xff"),
}


BINDING_ONLY = {"a non-VFIO driver model"}  # a deletion binds nothing: the model is moot there


@pytest.mark.parametrize(("op", "case"), [("port-created", c) for c in sorted(HOSTILE)]
                         + [("port-deleted", c) for c in sorted(HOSTILE) if c not in BINDING_ONLY])
def test_hostile_input_is_one_line_exit_2_and_nothing_written(vfs, capsys, case, op):
    if op == "port-deleted":  # a journal exists, so port-deleted parses its input too
        assert net_hook("vfpool", "port-created", hook_data(VF1)) == 0
        vfs.writes.clear()
    before = journal()
    assert net_hook("vfpool", op, HOSTILE[case]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vfio-libvirt: network vfpool"), err
    assert vfs.writes == [] and journal() == before
    assert vfs.driver_of(VF0) == "igbvf" and pf_untouched(vfs)


# --- failures roll back ---------------------------------------------------------------
def test_a_failed_port_created_undoes_itself(vfs, capsys):
    """libvirt never sends port-deleted after a failed port-created."""
    vfs.faults.probe_fails[VF0] = {"vfio-pci"}  # vfio-pci's probe() fails for this VF
    assert net_hook("vfpool", "port-created", hook_data()) == 1
    assert "0000:02:10.0" in capsys.readouterr().err
    assert vfs.driver_of(VF0) == "igbvf" and vfs.override_of(VF0) is None
    assert journal() == {} and pf_untouched(vfs)


def test_the_pf_is_never_a_companion_of_its_vf(vfs, capsys):
    """Without ACS the VF shares the PF's group; companions='bind' must not take the PF."""
    write_config('[libvirt]\nversion = "11.3.0"\n[policy]\ncompanions = "bind"\n'
                 "[timeouts]\nbind_seconds = 2\nrestore_seconds = 2\n")
    group = vfs.sys / "kernel" / "iommu_groups" / "20" / "devices"
    os.unlink(vfs.devices / VF0 / "iommu_group")
    os.unlink(vfs.sys / "kernel" / "iommu_groups" / "21" / "devices" / VF0)
    os.symlink(vfs.devices / VF0, group / VF0)
    os.symlink(group.parent, vfs.devices / VF0 / "iommu_group")
    assert net_hook("vfpool", "port-created", hook_data()) == 1
    err = capsys.readouterr().err
    assert f"{PF} (igb) is the SR-IOV PF of {VF0}" in err and err.count("\n") == 1
    assert vfs.writes == [] and journal() == {}


def test_a_pf_named_by_address_is_refused(vfs, capsys):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(PF))) == 1
    assert "SR-IOV VF" in capsys.readouterr().err
    assert vfs.writes == [] and vfs.driver_of(VF0) == "igbvf"


# --- the qemu hook and the network hook share one journal -----------------------------
def test_port_deleted_gives_back_its_vf_only(vfs):
    xml = domain_xml("vm1", pci(NIC))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert net_hook("vfpool", "port-created", hook_data()) == 0
    assert set(journal()) == {NIC, VF0}
    assert net_hook("vfpool", "port-deleted", hook_data()) == 0
    assert vfs.driver_of(VF0) == "igbvf" and set(journal()) == {NIC}
    assert vfs.driver_of(NIC) == "virtio-vfio-pci"
    assert run_hook("vm1", "release", "end", xml) == 0
    assert journal() == {} and vfs.driver_of(NIC) == "virtio-pci"


def test_release_end_gives_back_a_vf_whose_port_deleted_never_ran(vfs):
    assert net_hook("vfpool", "port-created", hook_data()) == 0
    assert run_hook("vm1", "release", "end", domain_xml("vm1")) == 0
    assert vfs.driver_of(VF0) == "igbvf" and journal() == {}
    writes = len(vfs.writes)
    assert net_hook("vfpool", "port-deleted", hook_data()) == 0  # late: nothing left to do
    assert len(vfs.writes) == writes


def test_port_deleted_leaves_a_vf_the_qemu_hook_bound_alone(vfs):
    """The same VF named by address (<interface type='hostdev'>) is the qemu hook's."""
    xml = domain_xml("vm1", pci(VF0))
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert journal()[VF0]["network"] is None
    writes = len(vfs.writes)
    assert net_hook("vfpool", "port-deleted", hook_data()) == 0
    assert len(vfs.writes) == writes and vfs.driver_of(VF0) == "vfio-pci"
    assert run_hook("vm1", "release", "end", xml) == 0
    assert vfs.driver_of(VF0) == "igbvf"


def test_another_domain_cannot_take_a_pool_vf_by_address(short, vfs, capsys):
    assert net_hook("vfpool", "port-created", hook_data()) == 0
    assert run_hook("vm2", "prepare", "begin", domain_xml("vm2", pci(VF0))) == 1
    assert "in use by domain vm1" in capsys.readouterr().err
    assert journal()[VF0]["domain"] == "vm1" and vfs.driver_of(VF0) == "vfio-pci"


def test_a_port_of_another_owner_is_not_given_back(vfs):
    assert net_hook("vfpool", "port-created", hook_data()) == 0
    writes = len(vfs.writes)
    assert net_hook("vfpool", "port-deleted", hook_data(owner="vm2")) == 0
    assert len(vfs.writes) == writes and journal()[VF0]["domain"] == "vm1"


# --- the installed script, as libvirt runs it ----------------------------------------
def test_a_detached_run_answers_and_does_the_work(vfs):
    """As libvirt runs it: the work in a forked child that answers over a pipe."""
    assert network_hook.main(["network", "vfpool", "port-created", "begin", "-"],
                             stdin=io.BytesIO(hook_data()), detach=True) == 0
    assert vfs.driver_of(VF0) == "vfio-pci" and journal()[VF0]["network"] == "vfpool"
    assert network_hook.main(["network", "vfpool", "port-deleted", "begin", "-"],
                             stdin=io.BytesIO(hook_data()), detach=True) == 0
    assert vfs.driver_of(VF0) == "igbvf" and journal() == {}


def test_the_installed_script_runs_the_network_hook(vfs):
    """hooks/network in a real interpreter: a dry run plans the VF; a bridge port is the
    fast path, which loads neither lxml nor the planner."""
    script = REPO / "hooks" / "network"
    env = {**os.environ, "VFIO_LIBVIRT_DRY_RUN": "1"}
    dry = subprocess.run([sys.executable, str(script), "vfpool", "port-created", "begin", "-"],
                         input=hook_data(), capture_output=True, timeout=60, env=env, check=False)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.decode().startswith(f"{VF0}: bind → vfio_pci"), dry.stdout
    assert vfs.writes == [] and journal() == {}
    code = ("import sys; sys.argv = ['network', 'default', 'port-created', 'begin', '-']; "
            "from vfio_libvirt.network_hook import main; rc = main(); "
            "print(rc, 'lxml' in sys.modules, 'vfio_libvirt.lifecycle' in sys.modules)")
    bridge = hook_data(network="default", plug="<plug type='network' bridge='virbr0'/>")
    fast = subprocess.run([sys.executable, "-c", code], input=bridge,
                          capture_output=True, timeout=60, cwd=REPO, check=False)
    assert fast.stdout.split() == [b"0", b"False", b"False"], fast.stderr


# --- found by review ----------------------------------------------------------------------
def as_another_run(address: str, pid: int = 2_000_000_000) -> None:
    """Each hook run is a process of its own; in these tests they share one, so give the
    entry the pid another run would have written."""
    from vfio_libvirt.settings import Settings

    with Journal(Settings.from_env().state_dir).transaction() as entries:
        entries[address].pid = pid


def test_a_port_stuck_in_the_kernel_leaves_the_other_ports_free_to_go_home(short, vfs):
    assert net_hook("vfpool", "port-created", hook_data(VF0)) == 0
    assert net_hook("vfpool", "port-created", hook_data(VF1)) == 0
    as_another_run(VF1)
    gate = vfs.faults.blocked[("drivers_probe", VF0)] = threading.Event()
    run = Background(lambda host: release(host, "vm1", only=lambda e: e.address == VF0))
    try:
        run.first_answer(within=SHORT_DEADLINE + 3)  # VF0's port-deleted: stuck, answered
        assert journal()[VF0]["status"] == "stuck"
        assert net_hook("vfpool", "port-deleted", hook_data(VF1)) == 0  # not held up by VF0
        assert vfs.driver_of(VF1) == "igbvf" and VF1 not in journal()
        assert run_hook("vm1", "release", "end", b"") == 1  # says VF0 is still in the kernel
        assert journal()[VF0]["status"] == "stuck"
    finally:
        gate.set()
    run.finish()
    assert vfs.driver_of(VF0) == "igbvf" and journal() == {}


def test_a_stuck_port_created_does_not_keep_the_qemu_hooks_devices(short, vfs, capsys):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    as_another_run(NIC)
    gate = vfs.faults.blocked[("unbind", VF0)] = threading.Event()
    from vfio_libvirt.domain import Domain
    from vfio_libvirt.lifecycle import prepare
    from vfio_libvirt.netport import NetworkPort

    hostdev = NetworkPort.from_hook_xml(hook_data(VF0), "vfpool").hostdev()
    run = Background(lambda host: prepare(host, Domain("vm1", OWNER_UUID, (hostdev,)), "vfpool"))
    try:
        run.first_answer(within=SHORT_DEADLINE + 3)
        assert run_hook("vm1", "release", "end", b"") == 1  # VF0 still in the kernel
        assert vfs.driver_of(NIC) == "virtio-pci" and NIC not in journal()
    finally:
        gate.set()
    run.finish()
    assert vfs.driver_of(VF0) == "igbvf" and journal() == {}


def test_names_are_taken_exactly_as_libvirt_wrote_them(vfs):
    """libvirt allows 'pool ' and 'vm1 ': they are not 'pool' and 'vm1'."""
    assert net_hook("pool ", "port-created", hook_data(network="pool ", owner="vm1 ")) == 0
    entry = journal()[VF0]
    assert (entry["domain"], entry["network"]) == ("vm1 ", "pool ")
    assert run_hook("vm1", "release", "end", b"") == 0
    assert vfs.driver_of(VF0) == "vfio-pci"  # not vm1's
    assert run_hook("vm1 ", "release", "end", b"") == 0
    assert vfs.driver_of(VF0) == "igbvf" and journal() == {}


def test_a_huge_bridge_network_with_entities_stays_on_the_fast_path(vfs):
    hosts = "".join(f"<host mac='52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}' "
                    f"ip='10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}'/>" for i in range(90_000))
    data = hook_data(network="default", plug="<plug type='network' bridge='virbr0'/>").replace(
        b"</network>", f"<description>R&amp;D</description><ip><dhcp>{hosts}</dhcp></ip></network>".encode())
    assert len(data) > 4 << 20
    assert net_hook("default", "port-created", data) == 0
    assert vfs.writes == []


def test_a_vf_the_qemu_hook_kept_becomes_the_ports_when_the_pool_hands_it_out(vfs):
    """libvirtd died without a release; the VF named by address is then given out by the
    pool: its entry now names the network, so the port's deletion gives it back."""
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(VF0))) == 0
    assert net_hook("vfpool", "port-created", hook_data()) == 0
    assert journal()[VF0]["network"] == "vfpool"
    assert net_hook("vfpool", "port-deleted", hook_data()) == 0
    assert vfs.driver_of(VF0) == "igbvf" and journal() == {}


def test_a_release_stuck_beside_a_stuck_run_stays_alive_after_that_run_ends(short, vfs, capsys):
    """The second release runs without the domain lock (the first keeps it); when it gets
    stuck too and the first finishes, its device must not look abandoned: a new start
    is refused until it returns, and it still brings the VF home."""
    assert net_hook("vfpool", "port-created", hook_data(VF0)) == 0
    assert net_hook("vfpool", "port-created", hook_data(VF1)) == 0
    as_another_run(VF1)
    gate0 = vfs.faults.blocked[("drivers_probe", VF0)] = threading.Event()
    gate1 = vfs.faults.blocked[("drivers_probe", VF1)] = threading.Event()
    first = Background(lambda host: release(host, "vm1", only=lambda e: e.address == VF0))
    try:
        first.first_answer(within=SHORT_DEADLINE + 3)
        second = Background(lambda host: release(host, "vm1", only=lambda e: e.address == VF1))
        second.first_answer(within=SHORT_DEADLINE + 3)
        gate0.set()
        first.finish()
        assert vfs.driver_of(VF0) == "igbvf"
        assert journal()[VF1]["status"] == "stuck"
        capsys.readouterr()
        assert net_hook("vfpool", "port-created", hook_data(VF1)) == 1  # the VM started again
        assert "stuck" in capsys.readouterr().err
        assert journal()[VF1]["status"] == "stuck"
    finally:
        gate0.set()
        gate1.set()
    second.finish()
    assert vfs.driver_of(VF1) == "igbvf" and journal() == {}
