"""The guard end to end on the simulated host: prepare, bind and plan refuse a device the
host needs, before any write, with one line naming the holder."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.support.simhost import SimHost
from tests.unit.conftest import E1000, GPU_BDF, NIC, domain_xml, pci, run_hook, write_config
from vfio_libvirt.cli import main as cli_main

NVME = "0000:03:00.0"
NVME_MODALIAS = "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02"
CONFIG = '[libvirt]\nversion = "11.3.0"\n[timeouts]\nbind_seconds = 2\nrestore_seconds = 2\n'


@pytest.fixture
def host_sim(sim, monkeypatch) -> SimHost:
    simhost = SimHost(sim)
    sim.add_module("nvme", "nvme", ids=["pci:v*d*sv*sd*bc01sc08*"], loaded=True)
    sim.add_device(NVME, NVME_MODALIAS, group="30", pci_class=0x010802, driver="nvme")
    simhost.nvme(NVME, partitions=("nvme0n1p1", "nvme0n1p2"))
    monkeypatch.setenv("VFIO_LIBVIRT_IP", " ".join(simhost.ip_command()))
    return simhost


def journal() -> dict:
    path = Path(os.environ["VFIO_LIBVIRT_STATE_DIR"]) / "journal.json"
    return json.loads(path.read_text())["devices"] if path.exists() else {}


def test_the_root_disk_is_refused_before_any_write(sim, host_sim, capsys):
    host_sim.mount("nvme0n1p2", "/")
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC), pci(NVME))) == 1
    err = capsys.readouterr().err
    assert err == f"vfio-libvirt: vm1: {NVME}: refusing: nvme0n1p2 is mounted at / (root filesystem)\n"
    assert sim.writes == [] and journal() == {}
    assert sim.driver_of(NVME) == "nvme" and sim.driver_of(NIC) == "virtio-pci"


def test_a_data_disk_is_refused_by_default_and_given_when_allowed(sim, host_sim, capsys):
    host_sim.mount("nvme0n1p1", "/srv/data dir")
    xml = domain_xml("vm1", pci(NVME))
    assert run_hook("vm1", "prepare", "begin", xml) == 1
    err = capsys.readouterr().err
    assert f"{NVME}: refusing: nvme0n1p1 is mounted at /srv/data dir (in use;" in err
    assert sim.writes == []
    write_config(CONFIG + f'[devices."{NVME}"]\nin_use = "allow"\n')
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert sim.driver_of(NVME) == "vfio-pci"
    assert "allowed by policy" in journal()[NVME]["reason"]
    assert run_hook("vm1", "release", "end", xml) == 0
    assert sim.driver_of(NVME) == "nvme"


def test_the_default_route_nic_is_refused_also_for_managed_yes(sim, host_sim, capsys):
    host_sim.netdev(NIC, "eth0", under="virtio0")
    host_sim.ip_link("eth0", addrs=("2001:db8::5/64",))
    host_sim.ip_route("eth0", "fe80::1")  # an IPv6-only default route
    for managed in ("no", "yes"):
        assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC, managed=managed))) == 1
        err = capsys.readouterr().err
        assert f"{NIC}: refusing: eth0 carries the IPv6 default route via fe80::1" in err, managed
    assert sim.writes == [] and journal() == {}


def test_a_companion_in_use_is_refused_like_the_device(sim, host_sim, capsys):
    write_config(CONFIG + '[policy]\ncompanions = "bind"\n')
    host_sim.drm(GPU_BDF)
    host_sim.process(1234, "Xorg", fds=("/dev/dri/card0",))
    from tests.unit.conftest import AUDIO_BDF
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(AUDIO_BDF))) == 1
    assert f"{GPU_BDF}: refusing: 1234 (Xorg) has /dev/dri/card0 open (in use;" in capsys.readouterr().err
    assert sim.writes == []


def test_a_pf_with_vfs_is_refused_and_bind_by_hand_too(sim, host_sim, capsys):
    host_sim.sriov(E1000, ["0000:00:11.1", "0000:00:11.2"], first_group=40, driver="e1000e")
    assert cli_main(["bind", E1000]) == 1
    err = capsys.readouterr().err
    assert f"{E1000}: refusing: {E1000} has 2 SR-IOV VFs; unbinding its driver destroys them all" in err
    assert sim.writes == [] and journal() == {}


def test_plan_shows_every_holder_and_the_decision(sim, host_sim, tmp_path, capsys):
    host_sim.mount("nvme0n1p1", "/data")
    host_sim.process(77, "dd", fds=("/dev/nvme0n1",))
    xml = tmp_path / "vm1.xml"
    xml.write_bytes(domain_xml("vm1", pci(NVME)))
    assert cli_main(["plan", "--xml", str(xml), "--json"]) == 1
    plan = json.loads(capsys.readouterr().out)
    (step,) = plan["steps"]
    assert "in_use: nvme0n1p1 is mounted at /data" in step["holders"]
    assert "in_use: 77 (dd) has /dev/nvme0n1 open" in step["holders"]
    assert plan["problems"][0].startswith(f"{NVME}: refusing: nvme0n1p1 is mounted at /data (and 1 more)")


def test_a_device_already_on_vfio_is_not_guarded(sim, host_sim):
    """A `keep` device is the VM's already: nothing of the host's is on it to protect."""
    host_sim.mount("nvme0n1p2", "/")  # stale: the disk was unbound long ago by the admin
    sim.add_module("vfio_pci", "vfio-pci", vfio=True, aliases=["vfio_pci:v*d*sv*sd*bc*sc*i*"], loaded=True)
    for path, value in (("driver_override", "vfio-pci"), ("driver/unbind", NVME)):
        sim.write(sim.devices / NVME / path, value)
    sim.write(sim.sys / "bus/pci/drivers_probe", NVME)
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NVME))) == 0
    assert journal()[NVME]["role"] == "keep"


def test_a_stuck_proc_read_is_bounded_by_the_start_budget(sim, host_sim, capsys):
    """Reading a process's maps blocks while it holds its mmap lock: a FIFO stands in."""
    proc_dir = host_sim.process(4321, "stuck")
    (proc_dir / "maps").unlink()
    os.mkfifo(proc_dir / "maps")
    started = time.monotonic()
    try:
        assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NVME))) == 1
        assert time.monotonic() - started < 3.5  # bind_seconds = 2, the stuck read never returns
    finally:
        os.close(os.open(proc_dir / "maps", os.O_RDWR))  # let the abandoned reader thread go
    err = capsys.readouterr().err
    assert f"{NVME}: refusing: {NVME} could not be checked within" in err
    assert sim.writes == [] and journal() == {}


def test_a_hanging_ip_is_bounded_by_the_start_budget(sim, host_sim, monkeypatch, tmp_path, capsys):
    slow = tmp_path / "slow-ip"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setenv("VFIO_LIBVIRT_IP", str(slow))
    host_sim.netdev(NIC, "eth0", under="virtio0")
    started = time.monotonic()
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 1
    assert time.monotonic() - started < 3.5
    assert "refusing:" in capsys.readouterr().err
    assert sim.writes == []


def native_multipath(host_sim, *, listed: bool) -> None:
    """What Debian's 6.12 shows (nvme_core.multipath=Y): below the PCI device only the
    hidden path disk nvme0c0n1 (no dev file); the namespace nvme0n1 and its partitions
    hang below the virtual nvme-subsystem and name the path in multipath/."""
    from tests.support.simhost import _link
    ctrl = host_sim.device(NVME) / "nvme" / "nvme0"
    shutil.rmtree(ctrl / "nvme0n1")
    for name in ("nvme0n1", "nvme0n1p1", "nvme0n1p2"):
        (host_sim.sys / "class" / "block" / name).unlink()
    host_sim.block(ctrl / "nvme0c0n1", "nvme0c0n1", major=259)
    (ctrl / "nvme0c0n1" / "dev").unlink()
    head = host_sim.sys / "devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1"
    host_sim.block(head, "nvme0n1", major=259)
    host_sim.block(head / "nvme0n1p1", "nvme0n1p1", major=259, partition=1)
    if listed:  # newer kernels list the paths; Debian's 6.12 does not
        (head / "multipath").mkdir()
        _link(head / "multipath" / "nvme0c0n1", ctrl / "nvme0c0n1")


@pytest.mark.parametrize("listed", [False, True], ids=["paths-not-listed", "paths-listed"])
def test_an_nvme_under_native_multipath_is_judged_by_its_namespace(sim, host_sim, capsys, listed):
    native_multipath(host_sim, listed=listed)
    assert cli_main(["holders", NVME, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "free"
    host_sim.mount("nvme0n1p1", "/srv/data")
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NVME))) == 1
    assert f"{NVME}: refusing: nvme0n1p1 is mounted at /srv/data (in use;" in capsys.readouterr().err
    host_sim.mount("nvme0n1p1", "/")
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NVME))) == 1
    assert "nvme0n1p1 is mounted at / (root filesystem)" in capsys.readouterr().err
    assert sim.writes == []
