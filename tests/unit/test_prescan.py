"""The hook's byte-level pre-check may send a domain down the slow path needlessly, but
must never skip one that assigns a PCI device."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vfio_libvirt.domain import Domain
from vfio_libvirt.prescan import may_assign_pci

REPO = Path(__file__).resolve().parents[2]
CORPUS = sorted((REPO / "tests" / "data" / "domains").glob("*.xml")) + sorted(
    (REPO / "xml" / "examples").glob("*.xml"))


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_never_a_false_negative_on_libvirts_own_domain_xmls(path):
    data = path.read_bytes()
    if Domain.from_xml(data).hostdevs:
        assert may_assign_pci(data)


@pytest.mark.parametrize("name", ["hostdev-usb-address.xml", "hostdev-scsi-lsi.xml",
                                  "hostdev-mdev-precreated.xml", "x86_64-q35-headless.xml"])
def test_usb_scsi_mdev_and_plain_domains_take_the_fast_path(name):
    data = (REPO / "tests" / "data" / "domains" / name).read_bytes()
    assert not Domain.from_xml(data).hostdevs
    assert not may_assign_pci(data)


def wrap(devices: str) -> bytes:
    return f"<domain type='kvm'><name>vm</name><devices>{devices}</devices></domain>".encode()


@pytest.mark.parametrize("devices", [
    "<hostdev mode='subsystem' type='pci'><source><address bus='1'/></source></hostdev>",
    "<hostdev type=\"pci\" mode=\"subsystem\">",
    "<hostdev\n  mode = 'subsystem'\n  type = 'pci' managed='yes'>",
    "<hostdev mode='subsystem' managed='no'>",                # no type: the parser decides
    "<hostdev mode='subsystem' type='&#112;ci'>",             # an entity: the parser decides
    "<hostdev mode='subsystem' type=pci>",                    # unquoted: the parser decides
    "<hostdev mode='subsystem' subtype='usb' type='pci'>",
    "<hostdev mode='other' type='usb'>",
    "<hostdev mode='subsystem' type='usb'/><hostdev type='pci'/>",
    "<interface type='hostdev' managed='no'><source><address type='pci' bus='1'/></source></interface>",
    "<interface managed='no'>",
    "<hostdev",                                               # cut short
])
def test_anything_that_may_be_pci_takes_the_slow_path(devices):
    assert may_assign_pci(wrap(devices))


@pytest.mark.parametrize("devices", [
    "<hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/></source></hostdev>",
    "<hostdev mode='subsystem' type='scsi'/><hostdev mode='subsystem' type='scsi_host'/>",
    "<hostdev mode='subsystem' type='mdev' model='vfio-pci'/>",
    "<hostdev mode='capabilities' type='storage'/>",
    "<interface type='network'><source network='default'/></interface>",
    "<interface type='bridge'/><hostdevices/>",
])
def test_devices_that_are_not_pci_take_the_fast_path(devices):
    assert not may_assign_pci(wrap(devices))


def test_a_usb_only_domain_loads_neither_lxml_nor_the_planner():
    usb = wrap("<hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>"
               "<interface type='network'><source network='default'/></interface>")
    code = (
        "import io, sys; from vfio_libvirt.hook import main; "
        f"rc = main(['qemu', 'vm', 'prepare', 'begin', '-'], io.BytesIO({usb!r})); "
        "rc2 = main(['qemu', 'vm', 'reconnect', 'begin', '-'], io.BytesIO(b'')); "
        "print(rc, rc2, 'lxml' in sys.modules, 'vfio_libvirt.plan' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), cwd="/").stdout
    assert out.split() == ["0", "0", "False", "False"]


def test_release_still_runs_when_only_a_set_aside_journal_is_left(sim, capsys):
    from vfio_libvirt import hook
    state = Path(os.environ["VFIO_LIBVIRT_STATE_DIR"])
    (state / "journal.unreadable.20260101T000000Z.json").write_text('{"version": 99}')
    assert hook.main(["qemu", "vm1", "release", "end", "-"], stdin=io.BytesIO(b"")) == 1
    assert "unreadable journal" in capsys.readouterr().err
