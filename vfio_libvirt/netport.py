"""libvirt network hook stdin (`<hookData>`: network + networkport XML) → one port.

A VM on a hostdev network pool (`<interface type='network'>` on a network with
`<forward mode='hostdev'>`) gets its VF when libvirt allocates the port, after the
qemu `prepare` hook ran, so the qemu hook never sees it.  The network hook does:
libvirt (bridge_driver.c, networkRunHook) hands it the network's XML and the port's,
whose `<plug type='hostdev-pci' managed='yes|no'>` names the VF and whose `<owner>`
names the domain.  Parsed as defensively as a domain XML (domain.parse_xml).
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from vfio_libvirt.domain import HostDev, managed_attribute, parse_xml
from vfio_libvirt.errors import InputError
from vfio_libvirt.names import driver_name
from vfio_libvirt.pci import PciAddress

__all__ = ["NetworkPort"]

HOSTDEV_PLUG = "hostdev-pci"


@dataclass(frozen=True)
class NetworkPort:
    """One port of a libvirt network, as far as the hook needs it."""

    network: str
    owner: str
    """The domain the port belongs to: the journal entry's domain."""
    owner_uuid: str | None
    uuid: str | None
    plug: str | None
    """The plug type (`hostdev-pci`, `bridge`, `direct`, `network`), None if unplugged."""
    address: PciAddress | None
    """The VF, for a `hostdev-pci` plug."""
    managed: bool
    """managed='yes': libvirt binds vfio-pci and rebinds the VF itself."""
    driver_model: str | None
    """`<driver model=…/>` of the network's `<forward>`, copied into the port by libvirt."""

    def hostdev(self) -> HostDev:
        if self.address is None:
            raise InputError(f"port of network {self.network} has no PCI device")
        return HostDev(
            address=self.address, managed=self.managed, driver_model=self.driver_model,
            origin="network",
            driver_source=f"<driver model='{{}}'/> in network {self.network}'s <forward>",
        )

    @classmethod
    def from_hook_xml(cls, data: bytes, network: str) -> NetworkPort:
        """The port on stdin of `<network> port-created|port-deleted begin -`."""
        root = parse_xml(data)
        if root.tag != "hookData":
            raise InputError(f"not a network hook's input: root element is <{root.tag}>")
        ports = root.findall("networkport")
        if len(ports) != 1:
            raise InputError(f"network hook input has {len(ports)} <networkport> elements, not 1")
        port = ports[0]
        # names exactly as libvirt wrote them: 'vm1 ' is a domain other than 'vm1'
        name = root.findtext("network/name")
        owner = port.findtext("owner/name") or ""
        if name != network:
            raise InputError(f"XML on stdin is for network {name!r}, not {network!r}")
        if not owner.strip():
            raise InputError(f"port of network {network} has no <owner><name>")
        plug = port.find("plug")
        plug_type = plug.get("type") if plug is not None else None
        address = None
        managed = False
        model = None
        if plug is not None and plug_type == HOSTDEV_PLUG:
            address = _plug_address(plug, network)
            managed = managed_attribute(plug.get("managed"), address)
            driver = plug.find("driver")
            if driver is not None and driver.get("model") is not None:
                model = driver_name(driver.get("model") or "")
        return cls(
            network=network,
            owner=owner,
            owner_uuid=(port.findtext("owner/uuid") or "").strip() or None,
            uuid=(port.findtext("uuid") or "").strip() or None,
            plug=plug_type,
            address=address,
            managed=managed,
            driver_model=model,
        )


def _plug_address(plug: etree._Element, network: str) -> PciAddress:
    addresses = plug.findall("address")
    if len(addresses) != 1:
        raise InputError(f"hostdev-pci plug of network {network} has {len(addresses)} <address> "
                         "elements, not 1")
    address = addresses[0]
    if address.get("type", "pci") != "pci":
        raise InputError(f"hostdev-pci plug of network {network} has a non-PCI address")
    return PciAddress.from_xml(
        domain=address.get("domain"), bus=address.get("bus"),
        slot=address.get("slot"), function=address.get("function"),
    )
