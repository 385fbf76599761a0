"""PCI addresses as a validated value type.

A `PciAddress` is the only way a BDF reaches a sysfs path, so anything that could
escape the PCI device directory (`../..`, `/`, stray characters) is rejected here,
once, rather than checked again at every use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vfio_libvirt.errors import InputError

_LIMITS = {"domain": 0xFFFF, "bus": 0xFF, "slot": 0x1F, "function": 0x7}
_BDF = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<slot>[0-9a-fA-F]{1,2})\.(?P<function>[0-9a-fA-F])"
)
# libvirt reads these attributes with strtol(base 0): 0x-prefixed hex, a leading 0
# for octal, decimal otherwise.  We accept exactly that and nothing looser.
_XML_NUMBER = re.compile(r"0[xX][0-9a-fA-F]{1,8}|0[0-7]{0,11}|[1-9][0-9]{0,9}")


def _xml_number(field: str, text: str) -> int:
    value = text.strip()
    if not _XML_NUMBER.fullmatch(value):
        raise InputError(f"invalid PCI {field} {text!r}: expected a number like 0x1f or 31")
    if value[:2].lower() == "0x":
        return int(value, 16)
    return int(value, 8) if value.startswith("0") else int(value)


@dataclass(frozen=True, order=True)
class PciAddress:
    domain: int
    bus: int
    slot: int
    function: int

    def __post_init__(self) -> None:
        for field, limit in _LIMITS.items():
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
                raise InputError(f"invalid PCI {field} {value!r}: must be 0..{limit:#x}")

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse `dddd:bb:ss.f` or `bb:ss.f` (domain 0), as lspci and sysfs print them."""
        match = _BDF.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise InputError(f"invalid PCI address {text!r}: expected DDDD:BB:SS.F")
        fields = {k: int(v, 16) for k, v in match.groupdict(default="0").items()}
        return cls(**fields)

    @classmethod
    def from_xml(
        cls, *, domain: str | None, bus: str | None, slot: str | None, function: str | None
    ) -> PciAddress:
        """Build from libvirt's `<address domain= bus= slot= function=>` attributes.

        libvirt (virPCIDeviceAddressParseXML) treats every attribute as optional, a
        missing one being 0, and reads each with strtoul base 0.
        """
        fields = (("domain", domain), ("bus", bus), ("slot", slot), ("function", function))
        return cls(**{f: 0 if text is None else _xml_number(f, text) for f, text in fields})

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"
