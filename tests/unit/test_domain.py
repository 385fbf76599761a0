import pytest

from vfio_libvirt.domain import MAX_XML_BYTES, Domain, parse_xml
from vfio_libvirt.errors import InputError
from vfio_libvirt.pci import PciAddress

DOMAIN = b"""<domain type='kvm'>
  <name>vm1</name>
  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>
  <devices>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x06' slot='0x12' function='0x5'/></source>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </hostdev>
    <hostdev mode='subsystem' type='usb'>
      <source><vendor id='0x1234'/><product id='0xbeef'/></source>
    </hostdev>
    <interface type='hostdev'>
      <source><address type='pci' domain='0x0002' bus='0x03' slot='0x00' function='0x1'/></source>
      <mac address='52:54:00:6d:90:02'/>
    </interface>
    <interface type='network'><source network='default'/></interface>
    <hostdev mode='subsystem' type='pci'>
      <driver model='mlx5_vfio_pci'/>
      <source><address bus='6' slot='18' function='6'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
      <source><address uuid='c2177883-f1bb-47f0-914d-32a22e3a8804'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='scsi'>
      <source><adapter name='scsi_host0'/><address bus='0' target='0' unit='0'/></source>
    </hostdev>
  </devices>
</domain>"""


def test_pci_hostdevs_in_document_order_with_defaults():
    dom = Domain.from_xml(DOMAIN)
    assert dom.name == "vm1"
    assert dom.uuid == "c7a5fdbd-edaf-9455-926a-d65c16db1809"
    assert [h.to_json() for h in dom.hostdevs] == [
        {"address": "0000:06:12.5", "managed": True, "driver_model": None, "origin": "hostdev"},
        {"address": "0002:03:00.1", "managed": False, "driver_model": None, "origin": "interface"},
        {"address": "0000:06:12.6", "managed": False, "driver_model": "mlx5_vfio_pci",
         "origin": "hostdev"},
    ]


def test_domain_without_hostdevs():
    dom = Domain.from_xml(b"<domain type='qemu'><name>plain</name><devices/></domain>")
    assert dom.hostdevs == ()
    assert dom.uuid is None


def _with_hostdev(inner: str, attrs: str = "mode='subsystem' type='pci'") -> bytes:
    return (
        f"<domain><name>x</name><devices><hostdev {attrs}>{inner}</hostdev></devices></domain>"
    ).encode()


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (_with_hostdev("<source><address bus='../..' slot='0' function='0'/></source>"), "bus"),
        (_with_hostdev("<source><address bus='0' slot='0' function='8'/></source>"), "function"),
        (_with_hostdev("<source/>"), "no <source><address>"),
        (_with_hostdev("<source><address bus='1' slot='0' function='0'/></source>",
                       "type='pci' managed='maybe'"), "managed"),
        (_with_hostdev("<driver model='../../x'/><source><address bus='1' slot='0' function='0'/>"
                       "</source>"), "driver name"),
        (b"<domain><devices/></domain>", "no <name>"),
        (b"<network><name>x</name></network>", "not a domain"),
        (b"<domain><name>x</name>", "malformed XML"),
        (b"", "malformed XML"),
        (b"<domain><name>x</name><devices>"
         b"<hostdev type='pci'><source><address bus='1' slot='0' function='0'/></source></hostdev>"
         b"<hostdev type='pci'><source><address bus='0x1' slot='0' function='0'/></source></hostdev>"
         b"</devices></domain>", "assigned twice"),
    ],
)
def test_bad_documents_raise_input_error(xml, message):
    with pytest.raises(InputError, match=message):
        Domain.from_xml(xml)


def test_guest_address_is_not_mistaken_for_host_address():
    dom = Domain.from_xml(DOMAIN)
    assert PciAddress(0, 0, 5, 0) not in {h.address for h in dom.hostdevs}


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<domain><name>&lol3;</name></domain>"""
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><domain><name>&xxe;</name></domain>"""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (BILLION_LAUGHS, "DOCTYPE"),
        (XXE, "DOCTYPE"),
        (b"<domain><name>\xff\xfe</name></domain>", "UTF-8"),
        ("<domain/>".encode("utf-16"), "UTF-8"),
        (b"<domain><name>x</name>" + b" " * MAX_XML_BYTES + b"</domain>", "too large"),
    ],
    ids=["billion-laughs", "xxe", "bad-utf8", "utf16", "too-large"],
)
def test_hostile_documents(data, message):
    with pytest.raises(InputError, match=message):
        parse_xml(data)


def test_doctype_text_inside_another_applications_cdata_metadata_is_accepted():
    """The parsed document decides: '<!DOCTYPE' as CDATA text is data, not a declaration."""
    xml = (b"<domain><name>vm1</name><metadata><app:notes xmlns:app='urn:example:app'>"
           b"<![CDATA[<!DOCTYPE lolz [<!ENTITY lol 'lol'>]> pasted by a user]]>"
           b"</app:notes></metadata><devices>"
           b"<hostdev mode='subsystem' type='pci'><source><address bus='0x06' slot='0x12' "
           b"function='0x5'/></source></hostdev></devices></domain>")
    assert [str(h.address) for h in Domain.from_xml(xml).hostdevs] == ["0000:06:12.5"]


@pytest.mark.parametrize("data", [
    b'<!DOCTYPE domain SYSTEM "http://example.invalid/x.dtd"><domain><name>x</name></domain>',
    b"<!DOCTYPE domain><domain><name>x</name></domain>",
    b"<domain><name>&undefined;</name></domain>",
], ids=["external-dtd", "bare-doctype", "undefined-entity"])
def test_any_declared_doctype_or_entity_is_refused(data):
    with pytest.raises(InputError, match="DOCTYPE or entity"):
        parse_xml(data)
