"""A simulated host for lifecycle tests: a few devices, their drivers, VFIO modules."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from tests.support.simkernel import SimKernel
from vfio_libvirt import hook
from vfio_libvirt.lifecycle import Host
from vfio_libvirt.settings import Settings

VIRTIO_NET = "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00"
E1000E = "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00"
GPU = "pci:v000010DEd00002204sv00001458sd00004043bc03sc00i00"
GPU_AUDIO = "pci:v000010DEd00001AEFsv00001458sd00004043bc04sc03i00"
BRIDGE = "pci:v00008086d0000A2EBsv00000000sd00000000bc06sc04i00"

NIC = "0000:00:10.0"
E1000 = "0000:00:11.0"
GPU_BDF = "0000:01:00.0"
AUDIO_BDF = "0000:01:00.1"


@pytest.fixture
def sim(monkeypatch) -> SimKernel:
    root = Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"])
    kernel = SimKernel(root).install(monkeypatch)
    kernel.add_module("virtio_pci", "virtio-pci", ids=["pci:v00001AF4d*"], loaded=True)
    kernel.add_module("e1000e", "e1000e", ids=["pci:v00008086d000010D3*"], loaded=True)
    kernel.add_module("nouveau", "nouveau", ids=["pci:v000010DEd*bc03*"], loaded=True)
    kernel.add_module("snd_hda_intel", "snd_hda_intel", ids=["pci:v*bc04sc03*"], loaded=True)
    kernel.add_module("pcieport", "pcieport", ids=["pci:v*bc06sc04*"], loaded=True)
    kernel.add_module(
        "virtio_vfio_pci", "virtio-vfio-pci", vfio=True,
        aliases=["vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i*"],
    )
    kernel.add_module("vfio_pci", "vfio-pci", vfio=True, aliases=["vfio_pci:v*d*sv*sd*bc*sc*i*"])
    kernel.add_device(NIC, VIRTIO_NET, group="10", driver="virtio-pci")
    kernel.add_device(E1000, E1000E, group="11", driver="e1000e")
    kernel.add_device("0000:00:01.0", BRIDGE, group="1", pci_class=0x060400, driver="pcieport")
    kernel.add_device(GPU_BDF, GPU, group="1", pci_class=0x030000, driver="nouveau")
    kernel.add_device(AUDIO_BDF, GPU_AUDIO, group="1", pci_class=0x040300, driver="snd_hda_intel")
    kernel.write_modules_alias(Path(os.environ["VFIO_LIBVIRT_MODULES_DIR"]))
    monkeypatch.setenv("VFIO_LIBVIRT_MODPROBE", str(kernel.modprobe_script()))
    write_config("[libvirt]\nversion = \"11.3.0\"\n[timeouts]\nbind_seconds = 2\nrestore_seconds = 2\n")
    return kernel


SHORT_DEADLINE = 1.0


@pytest.fixture
def short(sim):
    """bind_seconds = restore_seconds = SHORT_DEADLINE; releases every write the test left
    blocked (the simulator's `blocked` fault), so no worker sleeps past the test."""
    write_config(f'[libvirt]\nversion = "11.3.0"\n[timeouts]\nbind_seconds = {SHORT_DEADLINE}\n'
                 f"restore_seconds = {SHORT_DEADLINE}\n")
    yield sim
    for gate in sim.faults.blocked.values():
        gate.set()


def write_config(text: str) -> None:
    Path(os.environ["VFIO_LIBVIRT_CONFIG"]).write_text(text)


@pytest.fixture
def host(sim) -> Host:
    return Host(Settings.from_env())


def domain_xml(name: str = "vm1", *devices: str, metadata: str = "") -> bytes:
    return (
        f"<domain type='kvm'><name>{name}</name>"
        f"<uuid>00000000-0000-0000-0000-{abs(hash(name)) % 10**12:012d}</uuid>"
        f"{metadata}<devices>{''.join(devices)}</devices></domain>"
    ).encode()


def pci(bdf: str, managed: str = "no", model: str | None = None) -> str:
    domain, bus, rest = bdf.split(":")
    slot, function = rest.split(".")
    driver = f"<driver model='{model}'/>" if model else ""
    return (
        f"<hostdev mode='subsystem' type='pci' managed='{managed}'>{driver}<source>"
        f"<address domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/>"
        "</source></hostdev>"
    )


def run_hook(domain: str, op: str, subop: str, xml: bytes = b"", *extra: str, capsys=None) -> int:
    return hook.main(["qemu", domain, op, subop, "-", *extra], stdin=io.BytesIO(xml))
