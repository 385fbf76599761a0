"""`vfio-libvirt holders BDF [--json]` on a simulated host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.simhost import NVME, VIRTIO_NET, SimHost
from tests.support.simkernel import SimKernel
from vfio_libvirt.cli import main
from vfio_libvirt.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DISK = "0000:03:00.0"
NIC = "0000:00:03.0"


@pytest.fixture
def host(monkeypatch) -> SimHost:
    kernel = SimKernel(Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"]))
    kernel.add_device(DISK, NVME, group="3", pci_class=0x010802, driver="nvme")
    kernel.add_device(NIC, VIRTIO_NET, group="4", driver="virtio-pci")
    sim = SimHost(kernel)
    monkeypatch.setenv("VFIO_LIBVIRT_IP", sim.ip_command()[0])
    return sim


def test_text_lists_the_verdict_then_each_holder(host, capsys):
    host.nvme(DISK, partitions=("nvme0n1p1", "nvme0n1p2"))
    host.mount("nvme0n1p2", "/")
    host.mount("nvme0n1p1", "/data")
    host.process(1234, "fio", fds=("/dev/nvme0n1",))
    assert main(["holders", DISK]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{DISK}: critical: unbinding its driver would break this host",
        "  critical  nvme0n1p2 is mounted at / (root filesystem)",
        "  in_use    nvme0n1p1 is mounted at /data",
        "  in_use    1234 (fio) has /dev/nvme0n1 open",
    ]


def test_json_is_the_readers_json(host, capsys):
    host.netdev(NIC, "eth0", under="virtio0")
    host.ip_link("eth0", addrs=("192.0.2.5/24",))
    host.ip_route("eth0", "192.0.2.1")
    assert main(["holders", NIC, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "address": NIC, "verdict": "critical", "holders": [
            {"kind": "route", "name": "eth0", "detail": "carries the default route via 192.0.2.1",
             "severity": "critical", "text": "eth0 carries the default route via 192.0.2.1"},
            {"kind": "address", "name": "eth0", "detail": "is up with 192.0.2.5/24",
             "severity": "in_use", "text": "eth0 is up with 192.0.2.5/24"},
        ]}


def test_a_free_device_is_still_exit_0(host, capsys):
    assert main(["holders", DISK]) == 0
    assert capsys.readouterr().out == f"{DISK}: free: nothing on this host holds it\n"
    assert main(["holders", "03:00.0", "--json"]) == 0  # the short form, as lspci prints it
    assert json.loads(capsys.readouterr().out) == {"address": DISK, "verdict": "free", "holders": []}


def test_the_ip_command_comes_from_the_environment(host, capsys, monkeypatch):
    host.netdev(NIC, "eth0")
    host.ip_link("eth0", addrs=("192.0.2.5/24",))
    monkeypatch.setenv("VFIO_LIBVIRT_IP", f"{host.root / 'no-such-ip'} --flag")
    assert Settings.from_env().ip == (str(host.root / "no-such-ip"), "--flag")
    assert main(["holders", NIC]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{NIC}: critical: unbinding its driver would break this host"
    assert out[1].startswith("  critical  eth0 cannot be checked for routes: cannot run `")


@pytest.mark.parametrize(("bdf", "message"), [
    ("0000:03:00.9", "invalid PCI function 9"),
    ("../../etc", "invalid PCI address '../../etc'"),
    ("0000:09:00.0", "no PCI device 0000:09:00.0 on this host"),
])
def test_bad_or_unknown_address_is_one_line_and_exit_2(host, capsys, bdf, message):
    assert main(["holders", bdf]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1
    assert captured.err.startswith(f"vfio-libvirt: error: {message}")


def test_missing_argument_is_usage_exit_2(capsys):
    assert main(["holders"]) == 2
    assert "the following arguments are required: bdf" in capsys.readouterr().err


def test_holders_is_listed_and_imports_neither_lxml_nor_libvirt(host):
    code = (f"import sys; from vfio_libvirt.cli import main; rc = main(['holders', {DISK!r}]); "
            "print(rc, 'lxml' in sys.modules, 'libvirt' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), cwd="/", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 False False"
    helped = subprocess.run([sys.executable, "-m", "vfio_libvirt", "--help"], capture_output=True,
                            text=True, check=False, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd="/")
    assert "holders" in helped.stdout
