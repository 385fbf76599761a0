from pathlib import Path

import pytest
from lxml import etree

from vfio_libvirt.config import Config, VmPolicy
from vfio_libvirt.domain import Domain
from vfio_libvirt.errors import InputError
from vfio_libvirt.pci import PciAddress

REPO = Path(__file__).resolve().parents[2]


def test_missing_config_means_defaults(tmp_path):
    assert Config.load(tmp_path / "none.toml") == Config()


def test_example_config_is_the_defaults():
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


@pytest.mark.parametrize("text", [
    "[timeouts\n", "[timeouts]\nbind_seconds = -1\n", "[timeouts]\nbind_seconds = true\n",
    '[policy]\ncompanions = "yes"\n', '[libvirt]\nversion = "eleven"\n', "[other]\n",
    '[devices."0000:01:00.9"]\ndriver = "vfio_pci"\n', '[devices."0000:01:00.0"]\ndriver = "../x"\n',
    '[devices."0000:01:00.0"]\nmodel = "x"\n',
])
def test_bad_config_is_input_error(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(InputError):
        Config.load(path)


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


@pytest.mark.parametrize("bad", ['<vfio:device address="0000:00:20.0"/>',
                                 '<vfio:device address="0000:00:01.0" driver="a b"/>'])
def test_schema_rejects_what_the_parser_rejects(bad):
    schema = etree.RelaxNG(etree.parse(str(REPO / "xml" / "metadata.rng")))
    xml = f'<vfio:policy xmlns:vfio="urn:vfio-libvirt:metadata:1">{bad}</vfio:policy>'
    assert not schema.validate(etree.fromstring(xml))
    with pytest.raises(InputError):
        VmPolicy.from_domain(etree.fromstring(f"<domain><metadata>{xml}</metadata></domain>"))

