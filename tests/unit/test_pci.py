import pytest

from vfio_libvirt.errors import InputError
from vfio_libvirt.pci import PciAddress


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0000:06:12.5", PciAddress(0, 6, 0x12, 5)),
        ("06:12.5", PciAddress(0, 6, 0x12, 5)),
        ("ABCD:FF:1F.7", PciAddress(0xABCD, 0xFF, 0x1F, 7)),
        ("1:2:3.4", PciAddress(1, 2, 3, 4)),
        (" 0000:00:1f.0\n", PciAddress(0, 0, 0x1F, 0)),
    ],
)
def test_parse_accepts_sysfs_and_lspci_forms(text, expected):
    assert PciAddress.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "0000:06:12", "0000:06:20.0", "0000:06:12.8", "10000:00:00.0", "000:006:12.5",
     "../..", "0000:06:12.5/../../x", "0000:06:12.5 ", "0x0:06:12.5", "g0:00.0", "00:00.0\0"],
)
def test_parse_rejects_malformed_or_out_of_range(text):
    if text == "0000:06:12.5 ":
        # trailing whitespace is stripped (sysfs reads end in a newline); still valid
        assert str(PciAddress.parse(text)) == "0000:06:12.5"
        return
    with pytest.raises(InputError, match="invalid PCI"):
        PciAddress.parse(text)


def test_string_form_is_canonical_lowercase():
    assert str(PciAddress.parse("ABCD:0A:1F.7")) == "abcd:0a:1f.7"
    assert str(PciAddress(0, 0, 0, 0)) == "0000:00:00.0"


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"domain": "0x0000", "bus": "0x06", "slot": "0x12", "function": "0x5"}, "0000:06:12.5"),
        ({"domain": None, "bus": "6", "slot": "18", "function": "5"}, "0000:06:12.5"),
        ({"domain": "0x1", "bus": "0XfF", "slot": "0x1F", "function": "7"}, "0001:ff:1f.7"),
        ({"domain": "0", "bus": "010", "slot": "0", "function": "0"}, "0000:08:00.0"),  # octal
        ({"domain": "65535", "bus": "255", "slot": "31", "function": "0"}, "ffff:ff:1f.0"),
        # libvirt: every attribute optional, a missing one is 0
        ({"domain": None, "bus": None, "slot": "0x1", "function": None}, "0000:00:01.0"),
    ],
)
def test_from_xml_accepts_libvirt_number_forms(attrs, expected):
    assert str(PciAddress.from_xml(**attrs)) == expected


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"domain": "0", "bus": "../..", "slot": "0", "function": "0"}, "bus"),
        ({"domain": "0", "bus": "0", "slot": "0", "function": "8"}, "function"),
        ({"domain": "0", "bus": "0", "slot": "0x20", "function": "0"}, "slot"),
        ({"domain": "0x10000", "bus": "0", "slot": "0", "function": "0"}, "domain"),
        ({"domain": "0", "bus": "256", "slot": "0", "function": "0"}, "bus"),
        ({"domain": "0", "bus": "-1", "slot": "0", "function": "0"}, "bus"),
        ({"domain": "0", "bus": "08", "slot": "0", "function": "0"}, "bus"),  # bad octal
        ({"domain": "0", "bus": "1" * 5000, "slot": "0", "function": "0"}, "bus"),
        ({"domain": "0", "bus": "0", "slot": "0", "function": ""}, "function"),
    ],
)
def test_from_xml_rejects_impossible_values(attrs, message):
    with pytest.raises(InputError, match=message):
        PciAddress.from_xml(**attrs)


def test_constructor_validates_ranges_too():
    with pytest.raises(InputError):
        PciAddress(0, 0, 32, 0)
    with pytest.raises(InputError):
        PciAddress(0, 0, 0, True)
