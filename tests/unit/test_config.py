"""The host config: lenient loading, its safe reading, problems with lines; VM metadata policy."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
from lxml import etree

from vfio_libvirt.config import Config, ConfigProblem, VmPolicy
from vfio_libvirt.domain import Domain
from vfio_libvirt.errors import InputError
from vfio_libvirt.pci import PciAddress

REPO = Path(__file__).resolve().parents[2]


def test_missing_config_means_defaults(tmp_path):
    assert Config.load(tmp_path / "none.toml") == Config()


def test_example_config_is_the_defaults_without_problems():
    assert Config.load(REPO / "xml" / "config.toml.example") == Config()


def test_full_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[timeouts]\nbind_seconds = 3\nrestore_seconds = 60.5\n'
                    '[policy]\ncompanions = "bind"\n[libvirt]\nversion = "10.5"\n'
                    '[devices."0000:01:00.0"]\ndriver = "vfio_pci"\n'
                    '[devices."01:00.1"]\nnever_touch = true\n')
    config = Config.load(path)
    assert (config.bind_timeout, config.restore_timeout) == (3.0, 60.5)
    assert config.companions == "bind" and config.libvirt_version == (10, 5)
    assert config.driver_overrides == {PciAddress(0, 1, 0, 0): "vfio_pci"}
    assert config.never_touch == {PciAddress(0, 1, 0, 1)}


@pytest.mark.parametrize("data", [b"[timeouts\n", b"x = \n", b"[policy]\ncompanions = \xff\n"],
                         ids=["unclosed-header", "no-value", "not-utf8"])
def test_a_file_that_is_not_toml_is_input_error_naming_the_file(tmp_path, data):
    path = tmp_path / "c.toml"
    path.write_bytes(data)
    with pytest.raises(InputError, match=f"^config {re.escape(str(path))}: "):
        Config.load(path)


def test_an_unreadable_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match=r"^config .*: Is a directory$"):
        Config.load(tmp_path)


def load(tmp_path, text: str) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return Config.load(path)


NIC = PciAddress(0, 0, 0x10, 0)


# text, what the safe reading must be (fields that differ from the defaults), problem key
SAFE_READINGS = [
    ('[devices."0000:00:10.0"]\nnever_touch = "true"\n', {"never_touch": {NIC}},
     'devices."0000:00:10.0".never_touch'),
    ('[devices."0000:00:10.0"]\nnever_touch = 1\n', {"never_touch": {NIC}},
     'devices."0000:00:10.0".never_touch'),
    ('[devices."0000:00:10.0"]\nnevr_touch = true\n', {"never_touch": {NIC}},
     'devices."0000:00:10.0".nevr_touch'),
    ('[devices."0000:00:10.0"]\ndriver = "../x"\n', {"never_touch": {NIC}},
     'devices."0000:00:10.0".driver'),
    ('[devices."0000:00:10.0"]\ndriver = 5\n', {"never_touch": {NIC}}, 'devices."0000:00:10.0".driver'),
    ('[devices]\n"0000:00:10.0" = true\n', {"never_touch": {NIC}}, 'devices."0000:00:10.0"'),
    ('[devices."0000:00:10.0"]\ndriver = "vfio_pci"\n[devices."00:10.0"]\n',
     {"never_touch": {NIC}, "driver_overrides": {NIC: "vfio_pci"}}, 'devices."00:10.0"'),
    ('[devices."0000:01:00.9"]\nnever_touch = true\n', {}, 'devices."0000:01:00.9"'),
    ("[timeouts]\nbind_second = 5\n", {}, "timeouts.bind_second"),
    ("[timeouts]\nbind_seconds = -1\n", {}, "timeouts.bind_seconds"),
    ("[timeouts]\nrestore_seconds = true\n", {}, "timeouts.restore_seconds"),
    ('[timeouts]\nbind_seconds = "5"\n', {}, "timeouts.bind_seconds"),
    ("[timeouts]\nrestore_seconds = nan\n", {}, "timeouts.restore_seconds"),
    ("timeouts = 5\n", {}, "timeouts"),
    ('[policy]\ncompanions = "yes"\n', {}, "policy.companions"),
    ('[policy]\ncompanion = "bind"\n', {}, "policy.companion"),
    ('[libvirt]\nversion = "eleven"\n', {}, "libvirt.version"),
    ("[libvirt]\nversion = 10.10\n", {}, "libvirt.version"),
    ("[other]\nx = 1\n", {}, "other"),
    ("bind_seconds = 5\n", {}, "bind_seconds"),
    ('[devices."0000:00:10.0"]\nin_use = "yes"\n', {}, 'devices."0000:00:10.0".in_use'),
    ('[devices."0000:00:10.0"]\nin_use = true\n', {}, 'devices."0000:00:10.0".in_use'),
]


@pytest.mark.parametrize(("text", "safe", "key"), SAFE_READINGS, ids=[k for _, _, k in SAFE_READINGS])
def test_a_mistake_is_a_problem_and_the_safe_reading_does_less(tmp_path, text, safe, key):
    config = load(tmp_path, text)
    assert [p.key for p in config.problems] == [key]
    assert replace(config, problems=()) == replace(Config(), **safe)
    where = re.escape(str(tmp_path / "config.toml"))
    with pytest.raises(InputError, match=f"^{where}:[0-9]+: {re.escape(key)}: "):
        config.require_valid()


def test_problems_carry_the_line_of_the_key_or_section_in_a_real_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        "# host config\n"                                  # 1
        "[timeouts]\n"                                     # 2
        "bind_seconds = 5\n"                               # 3
        "  bind_second = 5   # typo\n"                     # 4
        "notes = \"\"\"\n"                                  # 5
        "[devices.\"0000:00:10.0\"]\n"                     # 6: inside a string, not a header
        "never_touch = 'no'\n"                              # 7: inside a string, not a key
        "\"\"\"\n"                                          # 8
        "\n"                                               # 9
        "[ devices . \"0000:00:10.0\" ]\n"                 # 10
        "driver = \"vfio_pci\"\n"                          # 11
        "never_touch = \"true\"\n"                         # 12
        "[devices]\n"                                      # 13
        "'0000:00:11.0' = { never_touch = 'yes' }\n"       # 14
        "[extra]\n"                                        # 15
    )
    config = Config.load(path)
    assert [(p.line, p.key) for p in config.problems] == [
        (4, "timeouts.bind_second"),
        (5, "timeouts.notes"),
        (12, 'devices."0000:00:10.0".never_touch'),
        (14, 'devices."0000:00:11.0".never_touch'),
        (15, "extra"),
    ]
    assert str(config.problems[2]) == (
        f'{path}:12: devices."0000:00:10.0".never_touch: '
        "must be true or false, got 'true' (a string); the device is never touched")
    assert config.never_touch == {NIC, PciAddress(0, 0, 0x11, 0)}
    assert config.bind_timeout == 5.0
    with pytest.raises(InputError) as err:
        config.require_valid()
    assert str(err.value) == f"{config.problems[0]} (and 4 more)"


def test_from_dict_is_the_same_safe_reading_without_lines():
    config = Config.from_dict({"timeouts": {"bind_second": 5},
                               "devices": {"0000:00:10.0": {"never_touch": "true"}}}, "test")
    assert config.never_touch == {NIC}
    assert [str(p) for p in config.problems] == [
        "test: timeouts.bind_second: unknown key (known: bind_seconds, restore_seconds); ignored",
        "test: devices.\"0000:00:10.0\".never_touch: must be true or false, "
        "got 'true' (a string); the device is never touched",
    ]
    assert ConfigProblem("p", None, "k", "m").__str__() == "p: k: m"


def test_a_valid_config_has_no_problems_and_require_valid_passes(tmp_path):
    config = load(tmp_path, '[devices."0000:00:10.0"]\nnever_touch = false\ndriver = "vfio-pci"\n')
    assert config.problems == () and config.never_touch == frozenset()
    assert config.driver_overrides == {NIC: "vfio-pci"}
    config.require_valid()


def test_metadata_examples_validate_against_schema_and_parse():
    schema = etree.RelaxNG(etree.parse(str(REPO / "xml" / "metadata.rng")))
    examples = sorted((REPO / "xml" / "examples").glob("*.xml"))
    assert examples
    for example in examples:
        root = etree.parse(str(example)).getroot()
        policy = root.find("metadata/{urn:vfio-libvirt:metadata:1}policy")
        assert schema.validate(policy), (example, schema.error_log)
        Domain.from_xml(example.read_bytes())
    nic = Domain.from_xml((REPO / "xml/examples/nic-variant.xml").read_bytes())
    assert nic.policy == VmPolicy(drivers={PciAddress(0, 0, 0x11, 0): "vfio_pci"})


def test_in_use_allow_per_device_in_the_host_config(tmp_path):
    config = load(tmp_path, '[devices."0000:00:10.0"]\nin_use = "allow"\n[devices."0000:00:11.0"]\n'
                  'in_use = "refuse"\n')
    assert config.in_use_allowed == {NIC} and not config.problems


def test_in_use_in_the_metadata_for_the_domain_and_per_device():
    schema = etree.RelaxNG(etree.parse(str(REPO / "xml" / "metadata.rng")))
    xml = ('<vfio:policy xmlns:vfio="urn:vfio-libvirt:metadata:1" in_use="allow">'
           '<vfio:device address="0000:00:11.0" in_use="refuse"/></vfio:policy>')
    assert schema.validate(etree.fromstring(xml)), schema.error_log
    policy = VmPolicy.from_domain(etree.fromstring(f"<domain><metadata>{xml}</metadata></domain>"))
    assert policy.allows_in_use(NIC) and not policy.allows_in_use(PciAddress(0, 0, 0x11, 0))
    assert not VmPolicy().allows_in_use(NIC)


@pytest.mark.parametrize("bad", ['<vfio:device address="0000:00:20.0"/>',
                                 '<vfio:device address="0000:00:01.0" driver="a b"/>',
                                 '<vfio:device address="0000:00:01.0" in_use="yes"/>'])
def test_schema_rejects_what_the_parser_rejects(bad):
    schema = etree.RelaxNG(etree.parse(str(REPO / "xml" / "metadata.rng")))
    xml = f'<vfio:policy xmlns:vfio="urn:vfio-libvirt:metadata:1">{bad}</vfio:policy>'
    assert not schema.validate(etree.fromstring(xml))
    with pytest.raises(InputError):
        VmPolicy.from_domain(etree.fromstring(f"<domain><metadata>{xml}</metadata></domain>"))

