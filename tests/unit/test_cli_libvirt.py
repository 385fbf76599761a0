"""doctor, adopt, attach, detach: libvirt's test driver where a connection is needed,
pytest-mock where the test driver cannot do it (PCI hotplug)."""

import json
import re
from pathlib import Path

import pytest

from tests.unit.conftest import E1000, NIC, domain_xml, pci, write_config
from vfio_libvirt.cli import main

libvirt = pytest.importorskip("libvirt")
REPO = Path(__file__).resolve().parents[2]


class FakeDomain:
    def __init__(self, name: str, xml: bytes, active: bool = True) -> None:
        self._name, self._xml, self.active = name, xml, active
        self.conn: FakeConn | None = None
        self.attached: list[tuple[str, int]] = []
        self.detached: list[tuple[str, int]] = []
        self.fail_attach = False

    def name(self): return self._name
    def isActive(self): return self.active
    def UUIDString(self): return "00000000-0000-0000-0000-000000000001"

    def XMLDesc(self, flags=0):
        """As libvirt: secrets only with VIR_DOMAIN_XML_SECURE, which a read-only connection may not ask."""
        if flags & libvirt.VIR_DOMAIN_XML_SECURE:
            if self.conn is not None and self.conn.read_only:
                raise libvirt.libvirtError("operation forbidden: virDomainGetXMLDesc with secure flag")
            return self._xml.decode()
        return re.sub(r" passwd='[^']*'", "", self._xml.decode())

    def attachDeviceFlags(self, xml, flags):
        if self.fail_attach:
            raise libvirt.libvirtError("internal error: no more PCI slots")
        self.attached.append((xml, flags))

    def detachDeviceFlags(self, xml, flags):
        self.detached.append((xml, flags))


class FakeConn:
    def __init__(self, *domains: FakeDomain) -> None:
        self.domains = {d.name(): d for d in domains}
        self.defined: list[str] = []
        self.read_only = False

    def lookupByName(self, name):
        if name not in self.domains:
            raise libvirt.libvirtError("no domain")
        self.domains[name].conn = self
        return self.domains[name]

    def listAllDomains(self):
        for dom in self.domains.values():
            dom.conn = self
        return list(self.domains.values())
    def listAllNetworks(self): return []
    def getURI(self): return "fake:///"
    def defineXML(self, xml): self.defined.append(xml)
    def close(self): pass


@pytest.fixture
def fake_libvirt(mocker):
    conn = FakeConn()

    def opener(read_only: bool):
        def open_(uri=None):
            conn.read_only = read_only
            return conn
        return open_

    mocker.patch.object(libvirt, "open", side_effect=opener(False))
    mocker.patch.object(libvirt, "openReadOnly", side_effect=opener(True))
    return conn


def test_attach_binds_then_hotplugs_unmanaged_and_detach_restores(sim, fake_libvirt, capsys):
    dom = FakeDomain("vm1", domain_xml("vm1"))
    fake_libvirt.domains["vm1"] = dom
    assert main(["attach", "vm1", NIC, "--persistent"]) == 0
    assert sim.driver_of(NIC) == "virtio-vfio-pci"
    (xml, flags), = dom.attached
    assert "managed='no'" in xml and "slot='0x10'" in xml
    assert flags == libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
    assert main(["detach", "vm1", NIC]) == 0
    assert dom.detached[0][1] == libvirt.VIR_DOMAIN_AFFECT_LIVE
    assert sim.driver_of(NIC) == "virtio-pci"


def test_attach_refused_by_libvirt_restores_the_device(sim, fake_libvirt, capsys):
    dom = FakeDomain("vm1", domain_xml("vm1"))
    dom.fail_attach = True
    fake_libvirt.domains["vm1"] = dom
    assert main(["attach", "vm1", NIC]) == 1
    assert "no more PCI slots; device restored" in capsys.readouterr().err
    assert sim.driver_of(NIC) == "virtio-pci"


def test_attach_to_stopped_domain_is_bad_input(sim, fake_libvirt):
    fake_libvirt.domains["vm1"] = FakeDomain("vm1", domain_xml("vm1"), active=False)
    assert main(["attach", "vm1", NIC]) == 2
    assert sim.writes == []


def test_adopt_switches_managed_yes_to_no_with_a_diff(sim, fake_libvirt, capsys):
    graphics = "<graphics type='vnc' port='-1' passwd='s3cret'/>"
    fake_libvirt.domains["vm1"] = FakeDomain(
        "vm1", domain_xml("vm1", graphics, pci(NIC, managed="yes"), pci(E1000, managed="no")),
        active=False)
    assert main(["adopt", "vm1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "-<domain" in out and 'managed="yes"' not in out.split("+<domain")[1]
    assert fake_libvirt.defined == []
    assert main(["adopt", "vm1"]) == 0
    (defined,) = fake_libvirt.defined
    assert "managed=\"yes\"" not in defined and "managed='yes'" not in defined
    assert 'passwd="s3cret"' in defined
    assert sim.writes == []


# What libvirt 11.3's test driver gives back for a defined domain: one element a
# line, single quotes, attributes everywhere, and a password only on request.
ADOPT_XML = f"""<domain type='test'>
  <name>vmpw</name>
  <memory unit='KiB'>1024</memory>
  <os><type>hvm</type></os>
  <devices>
    <graphics type='vnc' port='-1' autoport='yes' passwd='s3cret' keymap='de'/>
    <graphics type='spice' autoport='yes' passwd='sp1ce'/>
    {pci(NIC, managed="yes")}
    {pci(E1000, managed="no")}
  </devices>
</domain>"""


@pytest.fixture
def test_driver_domain():
    """A domain defined on libvirt's own in-memory test driver, kept while the test runs."""
    conn = libvirt.open("test:///default")
    dom = conn.defineXML(ADOPT_XML)
    yield dom
    dom.undefine()
    conn.close()


def test_adopt_keeps_graphics_passwords(sim, test_driver_domain, capsys):
    assert main(["adopt", "vmpw", "--connect", "test:///default"]) == 0, capsys.readouterr().err
    secure = test_driver_domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    assert "passwd='s3cret'" in secure and "passwd='sp1ce'" in secure
    assert "managed='yes'" not in secure


def test_adopt_diff_shows_only_the_flipped_element(sim, test_driver_domain, capsys):
    assert main(["adopt", "vmpw", "--connect", "test:///default", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    changed = [line for line in out if line[:1] in "-+" and line[:3] not in ("---", "+++")]
    assert changed == ['-    <hostdev mode="subsystem" type="pci" managed="yes">',
                       '+    <hostdev mode="subsystem" type="pci" managed="no">']
    assert "dry run: definition unchanged" in out


def test_adopt_on_libvirt_9_says_no_variant_is_possible(sim, fake_libvirt, capsys):
    write_config('[libvirt]\nversion = "9.0.0"\n')
    fake_libvirt.domains["vm1"] = FakeDomain("vm1", domain_xml("vm1", pci(NIC, managed="yes")))
    assert main(["adopt", "vm1", "--dry-run"]) == 0
    assert "a variant driver is not possible" in capsys.readouterr().out


def test_doctor_reports_findings_with_fixes(sim, tmp_path, capsys):
    assert main(["doctor", "--connect", "test:///default", "--hook", str(tmp_path / "none"),
                 "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)
    by_text = {f["what"]: f for f in findings}
    assert by_text["IOMMU enabled: 3 IOMMU groups"]["level"] == "ok"
    assert by_text["vfio_pci available; variant drivers: virtio_vfio_pci"]["level"] == "ok"
    assert by_text["libvirt 11.3.0: variant drivers usable for managed='no'"]["level"] == "ok"
    hook = by_text[f"hook {tmp_path / 'none'} not installed"]
    assert hook["level"] == "fail" and hook["fix"] == "sudo ./install.sh"


def test_doctor_checks_each_domains_hostdevs(sim, fake_libvirt, capsys):
    fake_libvirt.domains["gpu"] = FakeDomain("gpu", domain_xml("gpu", pci("0000:01:00.0")))
    fake_libvirt.domains["nic"] = FakeDomain("nic", domain_xml("nic", pci(NIC)))
    assert main(["doctor", "--hook", str(REPO / "hooks" / "qemu")]) == 1
    out = capsys.readouterr().out
    assert "[fail] domain gpu: 0000:01:00.1 (snd_hda_intel) shares IOMMU group 1" in out
    assert f"[  ok] domain nic: {NIC} bind virtio_vfio_pci" in out


def test_doctor_flags_a_domain_whose_device_the_host_needs(sim, fake_libvirt, capsys, monkeypatch):
    from tests.support.simhost import SimHost
    simhost = SimHost(sim)
    simhost.netdev(NIC, "eth0", under="virtio0")
    simhost.ip_link("eth0", addrs=("192.0.2.5/24",))
    simhost.ip_route("eth0", "192.0.2.1")
    monkeypatch.setenv("VFIO_LIBVIRT_IP", " ".join(simhost.ip_command()))
    fake_libvirt.domains["nic"] = FakeDomain("nic", domain_xml("nic", pci(NIC)), active=False)
    assert main(["doctor", "--hook", str(REPO / "hooks" / "qemu"), "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)
    (finding,) = [f for f in findings if f["what"].startswith("domain nic:")]
    assert finding["level"] == "fail"
    assert finding["what"] == f"domain nic: {NIC}: refusing: eth0 carries the default route via 192.0.2.1"
    assert "the host needs this device" in finding["fix"]
