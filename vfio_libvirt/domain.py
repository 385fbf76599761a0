"""Domain XML → the host PCI devices a VM is given.

The XML comes from libvirtd on the hook's stdin or from a file an admin names, so it is
parsed defensively: size capped, UTF-8 only, no DOCTYPE (libvirt never writes one, and
it is the door for entity expansion and external entities), no network, no DTD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lxml import etree

from vfio_libvirt.config import VmPolicy
from vfio_libvirt.errors import InputError
from vfio_libvirt.limits import MAX_XML_BYTES
from vfio_libvirt.names import driver_name
from vfio_libvirt.pci import PciAddress

__all__ = ["MAX_XML_BYTES", "Domain", "HostDev", "parse_xml", "pci_hostdevs"]

_NO_DTD = "XML with DOCTYPE or entity declarations is not accepted"


Origin = Literal["hostdev", "interface", "network"]
"""network: a VF a hostdev network pool gave the domain (netport.py, the network hook)."""


@dataclass(frozen=True)
class HostDev:
    """One host PCI device assigned to the domain."""

    address: PciAddress
    managed: bool
    driver_model: str | None
    origin: Origin
    driver_source: str = "<driver model='{}'/> in the domain XML"
    """Where `driver_model` came from, for the reason a plan gives (the CLI's --driver too)."""

    def to_json(self) -> dict[str, object]:
        return {
            "address": str(self.address),
            "managed": self.managed,
            "driver_model": self.driver_model,
            "origin": self.origin,
        }


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str | None
    hostdevs: tuple[HostDev, ...]
    policy: VmPolicy = field(default_factory=VmPolicy)

    @classmethod
    def from_xml(cls, data: bytes) -> Domain:
        root = parse_xml(data)
        if root.tag != "domain":
            raise InputError(f"not a domain XML: root element is <{root.tag}>")
        name = (root.findtext("name") or "").strip()
        if not name:
            raise InputError("domain XML has no <name>")
        uuid = (root.findtext("uuid") or "").strip() or None
        return cls(
            name=name,
            uuid=uuid,
            hostdevs=tuple(pci_hostdevs(root)),
            policy=VmPolicy.from_domain(root),
        )


def parse_xml(data: bytes) -> etree._Element:
    """Parse untrusted XML bytes, or raise InputError with a one-line reason."""
    if len(data) > MAX_XML_BYTES:
        raise InputError(f"XML document too large ({len(data)} bytes, limit {MAX_XML_BYTES})")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"XML is not valid UTF-8 (byte {err.start})") from None
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as err:
        message = str(err).splitlines()[0] if str(err) else "syntax error"
        if "entity" in message.lower():  # libxml2 stopped an entity loop or an undefined one
            raise InputError(f"{_NO_DTD} ({message})") from None
        raise InputError(f"malformed XML: {message}") from None
    if root is None:
        raise InputError("malformed XML: empty document")
    # The parsed document decides, not its bytes: another application's <metadata>
    # may carry "<!DOCTYPE" as text in CDATA, which is harmless.
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None or any(
        isinstance(node, etree._Entity) for node in root.iter()
    ):
        raise InputError(_NO_DTD)
    return root


def pci_hostdevs(root: etree._Element) -> list[HostDev]:
    """The host PCI devices of a `<domain>`, in document order.

    `<hostdev mode='subsystem' type='pci'>` and `<interface type='hostdev'>` with a PCI
    source address; USB, SCSI, mdev and other hostdevs are not PCI and are skipped.
    Only the `<source>` address names a host device: a top-level `<address>` is where
    the device appears in the guest.
    """
    found: list[HostDev] = []
    seen: set[PciAddress] = set()
    for element in root.xpath("devices/hostdev | devices/interface"):
        hostdev = _hostdev_of(element)
        if hostdev is None:
            continue
        if hostdev.address in seen:
            raise InputError(f"PCI device {hostdev.address} is assigned twice")
        seen.add(hostdev.address)
        found.append(hostdev)
    return found


def _hostdev_of(element: etree._Element) -> HostDev | None:
    if element.tag == "hostdev":
        if element.get("mode", "subsystem") != "subsystem" or element.get("type") != "pci":
            return None
        origin: Origin = "hostdev"
        address = element.find("source/address")
    else:
        if element.get("type") != "hostdev":
            return None
        origin = "interface"
        address = element.find("source/address")
        if address is not None and address.get("type", "pci") != "pci":
            return None
    if address is None:
        raise InputError(f"<{element.tag}> of a PCI device has no <source><address>")
    pci = PciAddress.from_xml(
        domain=address.get("domain"),
        bus=address.get("bus"),
        slot=address.get("slot"),
        function=address.get("function"),
    )
    model = element.find("driver")
    driver_model = model.get("model") if model is not None else None
    return HostDev(
        address=pci,
        managed=managed_attribute(element.get("managed"), pci),
        driver_model=driver_name(driver_model) if driver_model is not None else None,
        origin=origin,
    )


def managed_attribute(value: str | None, address: PciAddress) -> bool:
    """managed='yes'/'no'; absent is 'no', libvirt's default for <hostdev>, <interface
    type='hostdev'> and a hostdev network's <forward> (which a port's <plug> copies)."""
    if value is None or value == "no":
        return False
    if value == "yes":
        return True
    raise InputError(f"device {address}: managed={value!r} is not 'yes' or 'no'")
