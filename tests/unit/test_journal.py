import json
import os
import stat
from pathlib import Path

import pytest

from vfio_libvirt.errors import OperationError
from vfio_libvirt.state import Entry, Journal

REPO = Path(__file__).resolve().parents[2]


def entry(address="0000:00:10.0", domain="vm1") -> Entry:
    return Entry(address=address, domain=domain, uuid=None, role="bind",
                 original_driver="e1000e", original_override=None, status="claimed")


def test_journal_round_trip_permissions_and_atomic_file(tmp_path):
    journal = Journal(tmp_path / "state")
    with journal.transaction() as entries:
        entries["0000:00:10.0"] = entry()
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(journal.path).st_mode) == 0o600
    assert journal.read().for_domain("vm1")[0].original_driver == "e1000e"
    assert journal.read().for_domain("vm2") == []
    assert [p.name for p in (tmp_path / "state").iterdir() if p.name.endswith(".tmp")] == []


def test_journal_not_saved_when_transaction_raises(tmp_path):
    journal = Journal(tmp_path)
    with pytest.raises(RuntimeError), journal.transaction() as entries:
        entries["0000:00:10.0"] = entry()
        raise RuntimeError
    assert not journal.path.exists()


def test_corrupt_journal_is_reported_and_kept(tmp_path):
    journal = Journal(tmp_path)
    journal.path.write_text("{not json")
    with pytest.raises(OperationError, match="unreadable"):
        journal.read()
    with pytest.raises(OperationError), journal.transaction():
        pass
    assert journal.path.read_text() == "{not json"


def test_journal_format_is_versioned_json(tmp_path):
    journal = Journal(tmp_path)
    with journal.transaction() as entries:
        entries["0000:00:10.0"] = entry()
    data = json.loads(journal.path.read_text())
    assert data["version"] == 1 and data["devices"]["0000:00:10.0"]["domain"] == "vm1"
