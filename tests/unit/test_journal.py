"""The journal: round trips, atomic writes, and journals or entries this version cannot read."""

import errno
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vfio_libvirt import state
from vfio_libvirt.errors import OperationError
from vfio_libvirt.state import SCHEMA_VERSION, Entry, Journal

REPO = Path(__file__).resolve().parents[2]


def entry(address="0000:00:10.0", domain="vm1", **kw) -> Entry:
    return Entry(address=address, domain=domain, uuid=None, role="bind",
                 original_driver="e1000e", original_override=None, status=kw.pop("status", "claimed"), **kw)


def raw_entry(address: str, **changes) -> dict:
    """An entry as a version-1 writer stores it."""
    return {"address": address, "domain": "vm1", "uuid": None, "role": "bind",
            "original_driver": "e1000e", "original_override": None, "status": "claimed",
            "target_module": None, "target_driver": None, "reason": "", "error": "",
            "updated": 1700000000.5, "pid": os.getpid(), **changes}


def asides(directory: Path) -> list[Path]:
    return sorted(directory.glob("journal.unreadable.*.json"))


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


def test_journal_format_is_versioned_json(tmp_path):
    journal = Journal(tmp_path)
    with journal.transaction() as entries:
        entries["0000:00:10.0"] = entry()
    data = json.loads(journal.path.read_text())
    assert data["version"] == SCHEMA_VERSION == 1
    assert data["devices"]["0000:00:10.0"]["domain"] == "vm1"
    assert data["devices"]["0000:00:10.0"]["pid"] == os.getpid()
    assert "extra" not in data["devices"]["0000:00:10.0"]


def test_state_dir_that_cannot_be_created_raises(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OperationError, match="state dir"), Journal(tmp_path / "file" / "state").transaction():
        pass


def test_reading_an_absent_journal_creates_nothing(tmp_path):
    assert Journal(tmp_path / "state").read().entries == {}
    assert not (tmp_path / "state").exists()
    (tmp_path / "state").mkdir()
    assert Journal(tmp_path / "state").read().entries == {}
    assert list((tmp_path / "state").iterdir()) == []


# --- journals this version cannot read ------------------------------------------------
# 600 levels: json reads it, a recursive walk on top of pytest's stack would not
NESTED = '{"deeper": [' * 300 + '{"address": "0000:00:16.0"}' + "]}" * 300

UNREADABLE = {
    "newer-version": (
        json.dumps({"version": 7, "devices": {
            "0000:00:10.0": {"where": {"address": "0000:00:12.0"}},
            "0000:00:11.0": "anything"}, "lease": {"address": "not a bdf"}}).encode(),
        {"0000:00:10.0", "0000:00:11.0", "0000:00:12.0"},
        "version 7 is newer than this vfio-libvirt reads, 1",
    ),
    "devices-list": (b'{"version": 1, "devices": []}', set(), "devices are a JSON array"),
    "garbage": (b"\xff\xfe\x00garbage 0000:00:13.0 and 0000:00:ff.0 (slot too big) {",
                {"0000:00:13.0"}, "not valid JSON"),
    "not-an-object": (b'[{"address": "0000:00:14.0"}, "0000:00:15.0"]', {"0000:00:14.0"},
                      "JSON array, not an object"),
    "version-not-int": (b'{"version": "1", "devices": {"00:15.0": {}}}', {"0000:00:15.0"},
                        "is not an integer"),
    "deeply-nested": (f'{{"version": 2, "x": {NESTED}}}'.encode(), {"0000:00:16.0"}, "version 2"),
    "too-deep-for-json": (b"[" * 200_000 + b'"0000:00:17.0"', {"0000:00:17.0"}, "not valid JSON"),
}


@pytest.mark.parametrize("name", UNREADABLE)
def test_unreadable_journal_blocks_only_what_it_names(tmp_path, name, caplog, monkeypatch):
    content, named, why = UNREADABLE[name]
    journal = Journal(tmp_path)
    journal.path.write_bytes(content)

    snapshot = journal.read()
    assert snapshot.entries == {}
    assert set(snapshot.blocked) == named
    assert len(snapshot.problems) == 1 and "\n" not in snapshot.problems[0]
    assert why in snapshot.problems[0] and str(journal.path) in snapshot.problems[0]
    assert all(why in reason and "\n" not in reason for reason in snapshot.blocked.values())
    assert journal.path.read_bytes() == content and asides(tmp_path) == []  # read() renames nothing

    # the hook's logging setup turns propagation off; the message must still be emitted
    monkeypatch.setattr(logging.getLogger("vfio_libvirt"), "propagate", True)
    with caplog.at_level(logging.ERROR, logger="vfio_libvirt"), journal.transaction() as entries:
        assert dict(entries) == {}
        (aside,) = asides(tmp_path)
        assert set(entries.blocked) == named
        assert all(str(aside) in reason for reason in entries.blocked.values())
        assert len(entries.problems) == 1 and str(aside) in entries.problems[0]
        entries["0000:00:1a.0"] = entry("0000:00:1a.0")  # a device it does not name still works
    assert aside.read_bytes() == content
    assert any(str(aside) in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)

    with journal.transaction() as entries:  # the fresh journal is readable: no second rename
        assert list(entries) == ["0000:00:1a.0"]
        assert set(entries.blocked) == named
    assert asides(tmp_path) == [aside] and aside.read_bytes() == content
    snapshot = journal.read()
    assert list(snapshot.entries) == ["0000:00:1a.0"] and set(snapshot.blocked) == named

    aside.unlink()  # the admin inspected it: nothing is blocked any more
    assert journal.read().blocked == {} and journal.read().problems == ()


def test_a_set_aside_journal_blocks_with_no_journal_left(tmp_path):
    journal = Journal(tmp_path)
    journal.path.write_text('{"version": 3, "devices": {"0000:00:10.0": {}}}')
    with journal.transaction() as entries:  # changes nothing, so writes no new journal
        assert list(entries.blocked) == ["0000:00:10.0"]
    assert not journal.path.exists() and len(asides(tmp_path)) == 1
    assert list(journal.read().blocked) == ["0000:00:10.0"]
    with journal.transaction() as entries:
        assert list(entries.blocked) == ["0000:00:10.0"] and len(entries.problems) == 1


def test_blocked_reason_is_one_readable_line(tmp_path):
    journal = Journal(tmp_path)
    journal.path.write_text(json.dumps({"version": 7, "devices": {"0000:00:10.0": {}}}))
    assert journal.read().blocked == {"0000:00:10.0": (
        f"named by unreadable journal {journal.path} (version 7 is newer than this vfio-libvirt "
        "reads, 1); inspect it and remove it when its devices are safe")}


def test_set_aside_never_clobbers_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(state.time, "strftime", lambda fmt, t=None: "20261121T070000Z")
    journal = Journal(tmp_path)
    earlier = tmp_path / "journal.unreadable.20261121T070000Z.json"
    earlier.write_text('{"version": 9, "devices": {"0000:00:01.0": {}}}')
    journal.path.write_text('{"version": 9, "devices": {"0000:00:02.0": {}}}')
    with journal.transaction() as entries:
        assert set(entries.blocked) == {"0000:00:01.0", "0000:00:02.0"}
        assert len(entries.problems) == 2
    assert earlier.read_text() == '{"version": 9, "devices": {"0000:00:01.0": {}}}'
    assert (tmp_path / "journal.unreadable.20261121T070000Z-1.json").read_text() == (
        '{"version": 9, "devices": {"0000:00:02.0": {}}}')
    assert not journal.path.exists()


def test_set_aside_without_hard_links_still_never_clobbers(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(state.os, "link", no_links)
    monkeypatch.setattr(state.time, "strftime", lambda fmt, t=None: "20261121T070000Z")
    journal = Journal(tmp_path)
    earlier = tmp_path / "journal.unreadable.20261121T070000Z.json"
    earlier.write_text("first")
    journal.path.write_text("second 0000:00:02.0")
    with journal.transaction() as entries:
        assert list(entries.blocked) == ["0000:00:02.0"]
    assert earlier.read_text() == "first" and not journal.path.exists()
    assert (tmp_path / "journal.unreadable.20261121T070000Z-1.json").read_text() == "second 0000:00:02.0"


# --- unknown fields and entries -------------------------------------------------------
def test_unknown_top_level_keys_and_entry_fields_survive_a_rewrite(tmp_path):
    journal = Journal(tmp_path)
    future = {"nested": [1, 2.5, None, "x", {"deep": True}], "n": 12345678901234567890}
    quirk = {"a": [1, {"b": "c"}]}
    named_extra = "a field literally named extra"
    known = raw_entry("0000:00:10.0", quirk=quirk, lease=7, extra=named_extra)
    journal.path.write_text(json.dumps({"version": 1, "future": future, "devices": {"0000:00:10.0": known}}))

    read = journal.read().entries["0000:00:10.0"]
    assert read.extra == {"quirk": quirk, "lease": 7, "extra": named_extra} and read.domain == "vm1"
    with journal.transaction() as entries:
        entries["0000:00:10.0"].touch("bound")
        entries["0000:00:11.0"] = entry("0000:00:11.0", extra={"mine": [1]})
    data = json.loads(journal.path.read_text())
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731
    stored = data["devices"]["0000:00:10.0"]
    assert same(data["future"], future) and same(stored["quirk"], quirk) and stored["lease"] == 7
    assert stored["status"] == "bound" and stored["extra"] == named_extra
    assert data["devices"]["0000:00:11.0"]["mine"] == [1]
    assert "extra" not in data["devices"]["0000:00:11.0"]


OPAQUE = {
    "0000:00:10.0": (raw_entry("0000:00:10.0", status="parked"), "unknown status 'parked'"),
    "0000:00:11.0": ({k: v for k, v in raw_entry("0000:00:11.0").items() if k != "domain"},
                     "missing field 'domain'"),
    "0000:00:12.0": (raw_entry("0000:00:99.0"), "does not match its key"),
    "0000:00:13.0": (raw_entry("0000:00:13.0", domain=5), "field 'domain' is a JSON number"),
    "0000:00:14.0": (raw_entry("0000:00:14.0", role="borrow"), "unknown role 'borrow'"),
    "0000:00:15.0": (["not", "an", "object"], "not an object"),
    "0000:00:16.0": (raw_entry("0000:00:16.0", pid=True), "field 'pid' is a JSON boolean"),
    "00:17.0": (raw_entry("00:17.0"), "is not a PCI address as DDDD:BB:SS.F"),
    "bogus": (raw_entry("bogus"), "is not a PCI address"),
}


def test_entries_this_version_cannot_read_are_kept_verbatim_and_block_their_bdf(tmp_path):
    journal = Journal(tmp_path)
    devices = {key: raw for key, (raw, _) in OPAQUE.items()}
    devices["0000:00:1b.0"] = raw_entry("0000:00:1b.0")
    journal.path.write_text(json.dumps({"version": 1, "devices": devices}))

    snapshot = journal.read()
    assert list(snapshot.entries) == ["0000:00:1b.0"]  # the readable entry is still usable
    expected = {("0000:00:17.0" if key == "00:17.0" else key) for key in OPAQUE if key != "bogus"}
    assert set(snapshot.blocked) == expected
    assert snapshot.blocked["0000:00:10.0"] == (
        "journal entry this version cannot read (unknown status 'parked')")
    assert len(snapshot.problems) == len(OPAQUE)
    for key, (_, why) in OPAQUE.items():
        line = next(p for p in snapshot.problems if repr(key) in p)
        assert why in line and "\n" not in line
    assert "blocks nothing" in next(p for p in snapshot.problems if "'bogus'" in p)

    with journal.transaction() as entries:
        assert set(entries.blocked) == expected
        entries["0000:00:1c.0"] = entry("0000:00:1c.0")
    data = json.loads(journal.path.read_text())
    for key, (raw, _) in OPAQUE.items():
        assert json.dumps(data["devices"][key], sort_keys=True) == json.dumps(raw, sort_keys=True)
    assert set(journal.read().blocked) == expected and asides(tmp_path) == []


def test_a_real_entry_replaces_an_opaque_one_by_the_callers_decision(tmp_path):
    journal = Journal(tmp_path)
    journal.path.write_text(json.dumps({"version": 1, "devices": {
        "0000:00:10.0": raw_entry("0000:00:10.0", status="parked"),
        "00:11.0": raw_entry("00:11.0"),  # not the canonical key: opaque, blocks 0000:00:11.0
        "0000:00:12.0": raw_entry("0000:00:12.0", status="parked")}}))
    with journal.transaction() as entries:
        assert set(entries.blocked) == {"0000:00:10.0", "0000:00:11.0", "0000:00:12.0"}
        assert "0000:00:10.0" not in entries
        entries["0000:00:10.0"] = entry(status="bound")
        entries["0000:00:11.0"] = entry("0000:00:11.0", status="bound")
    devices = json.loads(journal.path.read_text())["devices"]
    assert sorted(devices) == ["0000:00:10.0", "0000:00:11.0", "0000:00:12.0"]
    assert devices["0000:00:10.0"]["status"] == "bound" and devices["0000:00:12.0"]["status"] == "parked"
    snapshot = journal.read()
    assert list(snapshot.blocked) == ["0000:00:12.0"] and snapshot.entries["0000:00:10.0"].status == "bound"


def test_entry_from_an_older_writer_has_no_pid_and_is_not_rewritten_for_it(tmp_path):
    journal = Journal(tmp_path)
    old = {k: v for k, v in raw_entry("0000:00:10.0").items() if k not in ("pid", "updated")}
    text = json.dumps({"version": 1, "devices": {"0000:00:10.0": old}})
    journal.path.write_text(text)
    read = journal.read().entries["0000:00:10.0"]
    assert read.pid is None
    with journal.transaction():
        pass
    assert journal.path.read_text() == text


# --- entries in flight -------------------------------------------------------------------
def test_in_flight_is_claimed_switching_or_restoring():
    for status in ("claimed", "switching", "restoring"):
        assert entry(status=status).in_flight
    for status in ("bound", "watching", "restore-failed"):
        assert not entry(status=status).in_flight


def test_touch_records_the_writer():
    e = entry(pid=None, updated=0.0)
    e.touch("bound")
    assert e.pid == os.getpid() and e.status == "bound" and time.time() - e.updated < 5


# --- locking and concurrency --------------------------------------------------------------
HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_wait_is_bounded(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "journal.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        journal = Journal(tmp_path, lock_timeout=0.3)
        journal.path.write_text('{"version": 1, "devices": {}}')  # something to read
        for use in (journal.read, lambda: journal.transaction().__enter__()):
            start = time.monotonic()
            with pytest.raises(OperationError, match=r"held by another process for 0.3s"):
                use()
            assert 0.3 <= time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()
    assert journal.read().entries == {}


def test_lock_released_during_the_wait_is_taken(tmp_path):
    journal = Journal(tmp_path, lock_timeout=10)
    holding = threading.Event()

    def hold() -> None:
        with journal._lock(exclusive=True):  # its own fd, so it excludes this thread too
            holding.set()
            time.sleep(0.3)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    start = time.monotonic()
    with journal.transaction() as entries:
        entries["0000:00:10.0"] = entry()
    assert time.monotonic() - start >= 0.2
    holder.join()


def add_entries(state_dir: Path, prefix: int, count: int) -> None:
    journal = Journal(state_dir)
    for n in range(count):
        with journal.transaction() as entries:
            snapshot = dict(entries)
            time.sleep(0.001)  # widen the read-modify-write window
            key = f"0000:{prefix:02x}:{n:02x}.0"
            assert key not in snapshot
            entries[key] = entry(key, domain=f"vm{prefix}")


ADD_ENTRIES = "import sys; from pathlib import Path; from tests.unit.test_journal import add_entries; " \
              "add_entries(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))"


def test_concurrent_transactions_lose_no_entry(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", ADD_ENTRIES, str(tmp_path), str(p), "15"], cwd=REPO)
             for p in range(1, 5)]
    errors: list[BaseException] = []

    def run(prefix: int) -> None:
        try:
            add_entries(tmp_path, prefix, 15)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(p,)) for p in range(0x10, 0x14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=60) for p in procs] == [0] * 4 and errors == []
    entries = Journal(tmp_path).read().entries
    assert len(entries) == 8 * 15
    assert {e.domain for e in entries.values()} == {f"vm{p}" for p in [1, 2, 3, 4, 16, 17, 18, 19]}


def test_the_state_dirs_a_domain_lock_creates_are_private(tmp_path):
    """The first thing a prepare creates is its domain lock (state dir/domains/…):
    Path.mkdir(parents=True) gave /run/vfio-libvirt itself the default 0755."""
    import stat

    from vfio_libvirt.locks import DomainLocks

    state = tmp_path / "run" / "vfio-libvirt"
    with DomainLocks(state).hold("vm1", timeout=1.0):
        pass
    for directory in (tmp_path / "run", state, state / "domains"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
