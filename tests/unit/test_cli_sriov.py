"""SR-IOV in the CLI: `status` names a VF's PF and the network pool that gave it out;
`doctor` checks every hostdev network against the network hook.

The doctor's verdicts come from pure functions (tested without libvirt-python); the
end-to-end runs need libvirt-python and skip without it: libvirt's own test driver
where it can define the network, a fake connection where a network must misbehave.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.support.simhost import SimHost
from tests.unit.conftest import E1000, NIC
from vfio_libvirt import cli_common, cli_libvirt
from vfio_libvirt.cli import main
from vfio_libvirt.doctor_networks import NetworkXml, Pool, hostdev_pool, network_findings
from vfio_libvirt.errors import InputError
from vfio_libvirt.lifecycle import Host
from vfio_libvirt.settings import Settings

REPO = Path(__file__).resolve().parents[2]
QEMU_HOOK = str(REPO / "hooks" / "qemu")
VF = "0000:00:11.1"
VFPOOL = b"<network><name>vfpool</name><forward mode='hostdev'><pf dev='enp1s0'/></forward></network>"
MANAGED_POOL = (b"<network><name>vfm</name><forward mode='hostdev' managed='yes'>"
                b"<address type='pci' domain='0x0000' bus='0x00' slot='0x11' function='0x1'/>"
                b"</forward></network>")
NAT = b"<network><name>default</name><forward mode='nat'/><bridge name='virbr0'/></network>"
BILLION_LAUGHS = (b"<?xml version='1.0'?><!DOCTYPE network [<!ENTITY a 'aaaa'>"
                  b"<!ENTITY b '&a;&a;&a;&a;'>]><network><name>&b;</name></network>")


@pytest.fixture
def network_hook(tmp_path) -> Path:
    hook = tmp_path / "network.d" / "vfio-libvirt"
    hook.parent.mkdir()
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    return hook


# --- status ------------------------------------------------------------------------------
@pytest.fixture
def vf(sim, mocker) -> str:
    """A VF of the e1000e, bound by hand and recorded as given out by network vfpool."""
    SimHost(sim).sriov(E1000, [VF], first_group=40)
    mocker.patch("vfio_libvirt.virt.running_domains", return_value={})
    assert main(["bind", VF, "--owner", "vm1"]) == 0
    assert sim.driver_of(VF) == "vfio-pci"
    with Host(Settings.from_env()).journal.transaction() as entries:
        entries[VF].network = "vfpool"  # what the network hook writes
    return VF


def test_status_json_names_the_pf_and_the_pool_of_a_vf(vf, capsys):
    assert main(["bind", NIC, "--owner", "vm2"]) == 0  # not a VF, from the qemu hook's side
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    rows = {row["address"]: row for row in json.loads(capsys.readouterr().out)["devices"]}
    assert (rows[VF]["pf"], rows[VF]["network"], rows[VF]["domain"]) == (E1000, "vfpool", "vm1")
    assert (rows[NIC]["pf"], rows[NIC]["network"]) == (None, None)


def test_status_text_names_the_pf_and_the_pool_of_a_vf(vf, capsys):
    assert main(["bind", NIC, "--owner", "vm2"]) == 0
    capsys.readouterr()
    assert main(["status"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines[VF].endswith(f"domain=vm1  original=-  VF of {E1000}, pool vfpool")
    assert lines[NIC].endswith("domain=vm2  original=virtio-pci")


def test_status_names_the_pf_of_a_vf_on_vfio_outside_the_journal(sim, mocker, capsys):
    SimHost(sim).sriov(E1000, [VF], first_group=40)
    mocker.patch("vfio_libvirt.virt.running_domains", return_value={})
    assert main(["bind", VF]) == 0
    assert main(["restore", VF]) == 0  # out of the journal, back to no driver
    sim.write(sim.devices / VF / "driver_override", "vfio-pci")
    sim.write(sim.sys / "bus/pci/drivers_probe", VF)  # someone else put it on vfio-pci
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["devices"]
    assert (row["address"], row["status"], row["pf"], row["network"]) == (
        VF, "not in journal", E1000, None)


# --- doctor: what each network means ---------------------------------------------------------
@pytest.mark.parametrize(("xml", "pool"), [
    (VFPOOL, Pool(False, "PF enp1s0")),
    (VFPOOL.replace(b"'hostdev'", b"'hostdev' managed='no'"), Pool(False, "PF enp1s0")),
    (MANAGED_POOL, Pool(True, "1 VF(s) listed")),
    (b"<network><name>x</name><forward mode='hostdev'/></network>", Pool(False, "no PF or VF listed")),
    (NAT, None),
    (b"<network><name>x</name><forward/></network>", None),  # no mode: nat
    (b"<network><name>x</name><forward mode='passthrough'><pf dev='e'/></forward></network>", None),
    (b"<network><name>isolated</name></network>", None),
], ids=["pf", "managed-no", "managed-yes", "empty", "nat", "forward-no-mode", "passthrough",
        "no-forward"])
def test_hostdev_pool_reads_mode_and_managed(xml, pool):
    assert hostdev_pool(xml) == pool


@pytest.mark.parametrize(("xml", "why"), [
    (BILLION_LAUGHS, "DOCTYPE"),
    (b"<network><name>x</name><forward mode='hostdev'", "malformed XML"),
    (b"<domain><name>x</name></domain>", "not a network XML"),
    (b"<network><forward mode='hostdev' managed='maybe'/></network>", "managed='maybe'"),
    (b"<network>\xff</network>", "not valid UTF-8"),
], ids=["entities", "truncated", "domain", "managed-maybe", "not-utf8"])
def test_hostdev_pool_refuses_hostile_or_malformed_xml(xml, why):
    with pytest.raises(InputError, match=why):
        hostdev_pool(xml)


def levels(findings) -> list[tuple[str, str]]:
    return [(f.level, f.what) for f in findings]


def test_unmanaged_pool_without_the_network_hook_fails_with_the_fix(tmp_path):
    hook = tmp_path / "missing"
    (finding,) = network_findings([NetworkXml("vfpool", VFPOOL)], hook, {"virtnetworkd": 0.0})
    assert finding.level == "fail"
    assert finding.what.startswith(f"network vfpool: hostdev pool (PF enp1s0), managed='no', but the "
                                   f"network hook {hook} is not installed")
    assert finding.fix == "sudo ./install.sh, then: systemctl reload virtnetworkd"


@pytest.mark.parametrize(("daemons", "reload"), [
    ({"libvirtd": 0.0}, "libvirtd"), ({}, "virtnetworkd (or libvirtd)"),
    ({"libvirtd": 0.0, "virtnetworkd": 0.0}, "virtnetworkd")])
def test_the_fix_reloads_the_daemon_that_runs_network_hooks(tmp_path, daemons, reload):
    (finding,) = network_findings([NetworkXml("vfpool", VFPOOL)], tmp_path / "missing", daemons)
    assert finding.fix == f"sudo ./install.sh, then: systemctl reload {reload}"


def test_unmanaged_pool_with_a_hook_libvirt_cannot_run_fails(network_hook):
    network_hook.chmod(0o644)
    (finding,) = network_findings([NetworkXml("vfpool", VFPOOL)], network_hook, {})
    assert finding.level == "fail" and "is not executable" in finding.what
    network_hook.unlink()
    network_hook.mkdir()
    (finding,) = network_findings([NetworkXml("vfpool", VFPOOL)], network_hook, {})
    assert finding.level == "fail" and "is not a regular file" in finding.what


def test_unmanaged_pool_with_the_hook_is_ok_and_the_daemon_start_is_checked(network_hook):
    mtime = network_hook.stat().st_mtime
    assert levels(network_findings([NetworkXml("vfpool", VFPOOL)], network_hook,
                                   {"virtnetworkd": mtime + 5, "libvirtd": mtime - 5})) == [
        ("ok", "network vfpool: hostdev pool (PF enp1s0), managed='no': the network hook binds its VFs"),
        ("warn", "libvirtd started before the network hook was installed: it does not run it "
                 "unless reloaded since"),
        ("ok", "virtnetworkd started after the network hook: it runs it")]
    (_, none_running) = network_findings([NetworkXml("vfpool", VFPOOL)], network_hook, {})
    assert none_running.level == "ok" and "the next one started runs" in none_running.what


def test_a_daemon_an_installer_reloaded_since_the_network_hook_came_runs_it(network_hook):
    """install.sh and the package leave a mark of each reload (cli_common.reload_marks): a
    daemon older than the hook but reloaded since has looked for hooks again."""
    mtime = network_hook.stat().st_mtime
    found = network_findings([NetworkXml("vfpool", VFPOOL)], network_hook,
                             {"libvirtd": mtime - 50, "virtnetworkd": mtime - 50},
                             {"libvirtd": mtime + 1, "virtnetworkd": mtime - 10})
    assert levels(found)[1:] == [
        ("ok", "libvirtd reloaded since the network hook was installed: it runs it"),
        ("warn", "virtnetworkd started before the network hook was installed: it does not run it "
                 "unless reloaded since")]


def test_managed_pool_needs_no_hook(tmp_path):
    assert levels(network_findings([NetworkXml("vfm", MANAGED_POOL)], tmp_path / "missing", {})) == [
        ("ok", "network vfm: hostdev pool (1 VF(s) listed), managed='yes': "
               "libvirt binds its VFs to a VFIO driver itself")]


def test_other_networks_get_no_line_of_their_own(tmp_path):
    networks = [NetworkXml("default", NAT), NetworkXml("iso", b"<network><name>iso</name></network>")]
    assert levels(network_findings(networks, tmp_path / "missing", {})) == [
        ("ok", "networks: 2 defined, no SR-IOV hostdev pool")]


def test_unreadable_and_hostile_networks_are_warnings_and_the_rest_is_still_checked(tmp_path):
    networks = [NetworkXml("gone", None, "Network not found: no network with matching name 'gone'"),
                NetworkXml("evil\x1b[2J", BILLION_LAUGHS), NetworkXml("vfpool", VFPOOL)]
    found = network_findings(networks, tmp_path / "missing", {})
    assert [f.level for f in found] == ["warn", "warn", "fail"]
    assert found[0].what == "network gone: cannot read its XML: Network not found: no network with " \
                            "matching name 'gone'"
    assert found[1].what.startswith("network evil\\x1b[2J: not checked: XML with DOCTYPE")
    assert found[2].what.startswith("network vfpool:")


# --- doctor end to end ---------------------------------------------------------------------
def test_doctor_takes_the_network_hook_from_the_command_line(mocker):
    doctor = mocker.patch.object(cli_libvirt, "doctor", return_value=[])
    assert main(["doctor"]) == 0
    assert doctor.call_args.args[3] == Path("/etc/libvirt/hooks/network.d/vfio-libvirt")
    assert main(["doctor", "--network-hook", "/x/hook"]) == 0
    assert doctor.call_args.args[3] == Path("/x/hook")


@pytest.fixture
def libvirt(mocker):
    """libvirt-python (the test skips without it), with no daemon found running."""
    module = pytest.importorskip("libvirt")
    mocker.patch.object(cli_libvirt, "_daemon_start_times", return_value={})
    return module


@pytest.fixture
def test_driver(libvirt):
    """libvirt's in-memory test driver: the networks a test defines live while it runs."""
    conn = libvirt.open("test:///default")
    defined = []

    def define(xml: bytes) -> None:
        defined.append(conn.networkDefineXML(xml.decode()))

    yield define
    for network in defined:
        network.undefine()
    conn.close()


def run_doctor(capsys, *args: str) -> tuple[int, dict[str, dict[str, str]]]:
    """doctor's exit code and its findings by what precedes the first colon."""
    code = main(["doctor", "--connect", "test:///default", "--hook", QEMU_HOOK, "--json", *args])
    findings = json.loads(capsys.readouterr().out)
    return code, {f["what"].split(":")[0]: f for f in findings}


def test_doctor_fails_for_an_unmanaged_pool_until_the_hook_is_installed(
        sim, test_driver, network_hook, tmp_path, capsys):
    test_driver(VFPOOL)
    test_driver(MANAGED_POOL)
    code, found = run_doctor(capsys, "--network-hook", str(tmp_path / "missing"))
    assert code == 1
    assert [f["level"] for f in found.values()].count("fail") == 1
    assert found["network vfpool"]["level"] == "fail"
    assert "sudo ./install.sh" in found["network vfpool"]["fix"]
    assert found["network vfm"]["level"] == "ok"
    assert "network default" not in found  # nat
    code, found = run_doctor(capsys, "--network-hook", str(network_hook))
    assert code == 0, [f for f in found.values() if f["level"] == "fail"]
    assert found["network vfpool"]["what"].endswith("the network hook binds its VFs")


def test_doctor_text_shows_the_failing_pool_and_its_fix(sim, test_driver, tmp_path, capsys):
    test_driver(VFPOOL)
    assert main(["doctor", "--connect", "test:///default", "--hook", QEMU_HOOK,
                 "--network-hook", str(tmp_path / "missing")]) == 1
    out = capsys.readouterr().out
    assert "[fail] network vfpool: hostdev pool (PF enp1s0), managed='no', but the network hook" in out
    assert "       fix: sudo ./install.sh, then: systemctl reload virtnetworkd (or libvirtd)" in out


class FakeNetwork:
    def __init__(self, name: str, xml: str | Exception) -> None:
        self._name, self._xml = name, xml

    def name(self) -> str:
        return self._name

    def XMLDesc(self, flags: int = 0) -> str:
        if isinstance(self._xml, Exception):
            raise self._xml
        return self._xml


class FakeConn:
    def __init__(self, networks: list[FakeNetwork] | Exception) -> None:
        self.networks = networks

    def listAllDomains(self) -> list:
        return []

    def listAllNetworks(self) -> list[FakeNetwork]:
        if isinstance(self.networks, Exception):
            raise self.networks
        return self.networks

    def close(self) -> None:
        pass


def test_doctor_survives_networks_that_cannot_be_read_or_parsed(sim, libvirt, mocker, tmp_path, capsys):
    mocker.patch.object(libvirt, "openReadOnly", return_value=FakeConn([
        FakeNetwork("gone", libvirt.libvirtError("Network not found")),
        FakeNetwork("laughs", BILLION_LAUGHS.decode()),
        FakeNetwork("broken", "<network><forward mode='hostdev'"),
        # a str that cannot be UTF-8 (libvirt-python never gives one): read as '?'
        FakeNetwork("surrogate", "<network><name>s\udcff</name><forward mode='hostdev' managed='yes'/>"
                                 "</network>"),
        FakeNetwork("managed", MANAGED_POOL.decode())]))
    code, found = run_doctor(capsys, "--network-hook", str(tmp_path / "missing"))
    assert code == 0, found
    assert found["network gone"]["level"] == "warn"
    assert found["network gone"]["what"].endswith("cannot read its XML: Network not found")
    assert found["network laughs"]["level"] == "warn" and "DOCTYPE" in found["network laughs"]["what"]
    assert found["network broken"]["level"] == "warn" and "malformed XML" in found["network broken"]["what"]
    assert found["network surrogate"]["level"] == "ok"
    assert found["network managed"]["level"] == "ok"


def test_doctor_without_a_network_listing_still_checks_the_rest(sim, libvirt, mocker, capsys):
    mocker.patch.object(libvirt, "openReadOnly", return_value=FakeConn(
        libvirt.libvirtError("this function is not supported by the connection driver")))
    code, found = run_doctor(capsys)
    assert code == 0, found
    assert found["cannot list networks"]["level"] == "warn"
    assert found["cannot list networks"]["what"].endswith("not supported by the connection driver")
    assert found["IOMMU enabled"]["level"] == "ok"


def _executable(path: Path, target: Path | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if target is None:
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    else:
        path.symlink_to(target)
    return path


def _hook_levels(mocker, hook: Path, started: float, marks: dict[str, float] | None = None) -> dict:
    mocker.patch.object(cli_libvirt, "_daemon_start_times", return_value={"libvirtd": started})
    return {f.what: f.level for f in cli_libvirt._hook_findings(hook, marks or {})
            if f.what.startswith("libvirtd ")}


STARTED_BEFORE = {"libvirtd started before the hook was installed": "warn"}
STARTED_AFTER = {"libvirtd started after the hook: it runs it": "ok"}


def test_a_packaged_hook_link_newer_than_the_daemon_is_not_taken_as_seen(tmp_path, mocker):
    """The Debian package links the hook to a file with the build's (old) mtime: the
    link's own appearance counts, so a daemon started before the install must reload."""
    target = _executable(tmp_path / "libexec" / "qemu-hook")
    os.utime(target, (1_000, 1_000))
    hook = _executable(tmp_path / "hooks" / "qemu.d" / "vfio-libvirt", target)
    linked = hook.lstat().st_ctime
    assert _hook_levels(mocker, hook, linked - 60) == STARTED_BEFORE
    # a reload by an installer before the link appeared does not count either
    assert _hook_levels(mocker, hook, linked - 60, {"libvirtd": linked - 30}) == STARTED_BEFORE
    assert _hook_levels(mocker, hook, linked + 1) == STARTED_AFTER


def test_a_hook_restored_with_an_old_mtime_is_not_taken_as_seen(tmp_path, mocker):
    """cp -a, tar or a backup restore set mtime back; the daemon has still never looked."""
    hook = _executable(tmp_path / "hooks" / "qemu.d" / "vfio-libvirt")
    os.utime(hook, (1_000, 1_000))
    assert _hook_levels(mocker, hook, hook.lstat().st_ctime - 60) == STARTED_BEFORE


def test_an_upgrade_that_replaces_the_links_target_needs_no_reload(tmp_path, mocker):
    """libvirt runs whatever qemu.d/ holds at each call once it found a hook at start:
    the package's upgrade replaces the target (a new mtime) and keeps the link."""
    target = _executable(tmp_path / "libexec" / "qemu-hook")
    hook = _executable(tmp_path / "hooks" / "qemu.d" / "vfio-libvirt", target)
    started = hook.lstat().st_ctime + 1
    time.sleep(0.05)
    target.unlink()
    _executable(target)
    os.utime(target, (started + 500, started + 500))
    assert _hook_levels(mocker, hook, started) == STARTED_AFTER


@pytest.mark.parametrize("other", ["qemu.d/00-other", "qemu"])
def test_another_hook_there_at_daemon_start_makes_it_run_ours(tmp_path, mocker, other):
    """libvirt's per-driver bit: any executable in qemu.d/ (or the main hooks/qemu script)
    when the daemon started makes it run everything qemu.d/ holds later, ours included."""
    _executable(tmp_path / "hooks" / other)
    started = (tmp_path / "hooks" / other).lstat().st_ctime + 0.01
    time.sleep(0.05)
    hook = _executable(tmp_path / "hooks" / "qemu.d" / "vfio-libvirt")
    assert hook.lstat().st_ctime > started
    assert _hook_levels(mocker, hook, started) == STARTED_AFTER
    # one that libvirt would not run (no x bit) does not count
    (tmp_path / "hooks" / other).chmod(0o644)
    assert _hook_levels(mocker, hook, started) == STARTED_BEFORE


def test_a_main_hook_script_counts_only_its_own_driver(tmp_path, mocker):
    """--hook /etc/libvirt/hooks/qemu (the main script): qemu.d/ is its directory; the
    network driver's hook beside it says nothing about qemu."""
    _executable(tmp_path / "hooks" / "network")
    started = (tmp_path / "hooks" / "network").lstat().st_ctime + 0.01
    time.sleep(0.05)
    hook = _executable(tmp_path / "hooks" / "qemu")
    assert _hook_levels(mocker, hook, started) == STARTED_BEFORE
    assert cli_common.driver_hooks_since(tmp_path / "hooks" / "gone") == float("inf")


def test_doctor_takes_an_installers_reload_mark_as_the_daemon_seeing_the_hook(tmp_path, mocker):
    """postinst and install.sh reload a running daemon (libvirt looks for hooks again) and
    touch <state dir>/reloaded/<daemon>: doctor reads that, not only the start time."""
    hook = _executable(tmp_path / "hooks" / "qemu.d" / "vfio-libvirt")
    since = hook.lstat().st_ctime
    state = tmp_path / "state"
    (state / "reloaded").mkdir(parents=True)
    for daemon, when in (("libvirtd", since + 100), ("virtqemud", since - 100)):
        (state / "reloaded" / daemon).touch()
        os.utime(state / "reloaded" / daemon, (when, when))
    marks = cli_common.reload_marks(state)
    assert marks == {"libvirtd": since + 100, "virtqemud": since - 100}
    assert cli_common.reload_marks(tmp_path / "none") == {}
    mocker.patch.object(cli_libvirt, "_daemon_start_times",
                        return_value={"libvirtd": since - 1_000, "virtqemud": since - 1_000})
    findings = {f.what: f.level for f in cli_libvirt._hook_findings(hook, marks)}
    assert findings["libvirtd reloaded since the hook was installed: it runs it"] == "ok"
    assert findings["virtqemud started before the hook was installed"] == "warn"
