"""Domain XMLs from libvirt's own test suite (tests/data/domains/SOURCES.md says where from).

The expected addresses are the `host=` values libvirt itself passes to QEMU in the
matching .args files, so these tests check that we read a domain as libvirt does.
"""

import json
from pathlib import Path

import pytest

from vfio_libvirt.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "domains"
EXPECTED = json.loads((DATA / "expected.json").read_text())


def test_corpus_is_complete():
    assert sorted(EXPECTED) == sorted(p.name for p in DATA.glob("*.xml"))
    origins = {d["origin"] for devices in EXPECTED.values() for d in devices}
    assert origins == {"hostdev", "interface"}
    assert any(devices == [] for devices in EXPECTED.values())  # non-PCI-only domains


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostdevs_json_matches_libvirt(name, capsys):
    assert main(["hostdevs", "--xml", str(DATA / name), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == EXPECTED[name]
