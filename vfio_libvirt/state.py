"""The journal: what the product changed, so it can always be undone.

One JSON file under the state dir (default /run/vfio-libvirt, which a reboot clears
together with every binding it describes).  Every read-modify-write holds an
exclusive `flock` on a lock file, and every write is tmp + fsync + rename + fsync of
the directory, so a crash leaves either the old or the new journal, never half of one.
Entries are written before a device is touched: after a crash the journal still
names the original driver, and `vfio-libvirt restore --domain` finishes the job.

What this version cannot read (a newer writer's journal, a damaged one) must neither
stop every VM nor be lost: it is kept verbatim and blocks only the devices it names.
An unreadable entry stays in the file; an unreadable file is set aside by the first
writer as `journal.unreadable.<UTC time>.json`, which every load scans until an admin
removes it.  Unknown fields are kept on rewrite, so a downgrade loses nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from vfio_libvirt.errors import InputError, OperationError
from vfio_libvirt.locks import flock_file
from vfio_libvirt.pci import PciAddress

Role = Literal["bind", "companion", "watch", "keep"]
"""bind/companion: the hook switched it and owns the restore; watch: libvirt switches it
(managed='yes') and the hook checks it came back; keep: it was on a VFIO driver before."""
Status = Literal["claimed", "switching", "bound", "watching", "restoring", "restore-failed", "stuck"]
"""stuck: a write for it was still in the kernel at the run's deadline; the run answered
libvirt and stayed behind to finish the job (its pid holds the domain lock meanwhile)."""

SCHEMA_VERSION = 1
JOURNAL = "journal.json"
LOCK = "journal.lock"
UNREADABLE_GLOB = "journal.unreadable.*.json"
_MAX_READ = 4 << 20  # no journal of ours comes near this; bounds what a hook reads
_TRANSIENT = frozenset({"claimed", "switching", "restoring", "stuck"})
_BDF_TEXT = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-9a-fA-F]")
# every field this version knows, with the JSON types it accepts; the first 7 are required
_FIELDS: dict[str, tuple[type, ...]] = {
    "address": (str,), "domain": (str,), "uuid": (str, type(None)), "role": (str,),
    "original_driver": (str, type(None)), "original_override": (str, type(None)),
    "status": (str,), "target_module": (str, type(None)), "target_driver": (str, type(None)),
    "reason": (str,), "error": (str,), "updated": (int, float), "pid": (int, type(None)),
    "network": (str, type(None)),
}
_REQUIRED = tuple(_FIELDS)[:7]

log = logging.getLogger("vfio_libvirt")


@dataclass
class Entry:
    address: str
    domain: str
    uuid: str | None
    role: Role
    original_driver: str | None
    original_override: str | None
    status: Status
    target_module: str | None = None
    target_driver: str | None = None
    reason: str = ""
    error: str = ""
    updated: float = field(default_factory=time.time)
    pid: int | None = field(default_factory=os.getpid)
    """The process that last wrote the entry, for the admin reading status; whether a run
    is still at work on it is told by the domain lock (locks.DomainLocks.busy), because
    a pid can be reused.  None when a writer older than the field made it."""
    network: str | None = None
    """The libvirt network whose port gave the device to the domain (the network hook
    switched it, and restores it when the port is deleted); None for the qemu hook's."""
    extra: dict[str, object] = field(default_factory=dict)
    """Fields a newer version wrote; written back as they were, beside the known ones."""

    def touch(self, status: Status, error: str = "") -> None:
        self.status = status
        self.error = error
        self.updated = time.time()
        self.pid = os.getpid()

    @property
    def in_flight(self) -> bool:
        """Claimed, switching, restoring or stuck: a run is (or was, if it died) at work on it."""
        return self.status in _TRANSIENT

    def to_json(self) -> dict[str, object]:
        known = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **known}


class Entries(dict[str, Entry]):
    """The entries a transaction changes, by BDF, plus what this version cannot read.

    `blocked` (BDF -> one-line reason) and `problems` (one line per unreadable file or
    entry) let code inside a transaction refuse devices an unreadable journal names.
    Entries this version cannot read are kept in `opaque` and written back verbatim;
    assigning a real Entry to such a BDF replaces the opaque one: that is the caller's
    explicit decision, so make it only for a device that is known to be safe.
    """

    def __init__(self) -> None:
        super().__init__()
        self.blocked: dict[str, str] = {}
        self.problems: tuple[str, ...] = ()
        self.opaque: dict[str, object] = {}
        self.unknown: dict[str, object] = {}  # unknown top-level keys of the journal

    def block_file(self, path: Path, why: str, names: list[str]) -> None:
        advice = "inspect it and remove it when its devices are safe"
        for bdf in names:
            self.blocked.setdefault(bdf, f"named by unreadable journal {path} ({why}); {advice}")
        self.problems += (f"unreadable journal {path} ({why}) blocks {', '.join(names) or 'no device'}; "
                          f"{advice}",)

    def block_entry(self, path: Path, key: str, why: str) -> None:
        if (bdf := _bdf(key)) is not None:
            self.blocked.setdefault(bdf, f"journal entry this version cannot read ({why})")
        self.problems += (f"journal {path}: entry {_short(key)} this version cannot read ({why}); "
                          + (f"kept as is, {bdf} stays blocked" if bdf else "kept as is, it blocks nothing"),)


class Journal:
    def __init__(self, state_dir: Path, lock_timeout: float = 30.0) -> None:
        self.dir = state_dir
        self.lock_timeout = lock_timeout

    @property
    def path(self) -> Path:
        return self.dir / JOURNAL

    def read(self) -> Snapshot:
        """A consistent copy, taken under the lock, for looking: it never renames or writes
        anything, so an unreadable journal is only reported.  Nothing to read: nothing is
        created either, not even the lock file (plans and dry runs write nothing)."""
        if not self.path.exists() and not any(self.dir.glob(UNREADABLE_GLOB)):
            return Snapshot({})
        with self._lock(exclusive=False):
            loaded = self._load(set_aside=False)
        return Snapshot(dict(loaded), dict(loaded.blocked), loaded.problems)

    @contextmanager
    def transaction(self, lock_timeout: float | None = None) -> Iterator[Entries]:
        """Yield the entries (by BDF) to change in place; saved atomically on a clean exit.

        An unreadable journal file is first set aside (never overwritten), and the
        transaction starts from an empty journal whose `blocked` names its devices.
        """
        with self._lock(exclusive=True, timeout=lock_timeout):
            entries = self._load(set_aside=True)
            before = _serialise(entries)
            yield entries
            if _serialise(entries) != before:
                self._save(entries)

    # --- internals ---------------------------------------------------------------
    @contextmanager
    def _lock(self, *, exclusive: bool, timeout: float | None = None) -> Iterator[None]:
        """Hold the journal lock, waiting at most `timeout` seconds: libvirt has no
        timeout on hooks, so a hook stuck here would hang the daemon's VM start."""
        path = self.dir / LOCK
        with flock_file(path, exclusive=exclusive, what=f"journal lock {path}",
                        timeout=self.lock_timeout if timeout is None else timeout):
            yield

    def _load(self, *, set_aside: bool) -> Entries:
        entries = Entries()
        data = _read(self.path)
        if data is not None:
            doc, why, names = _examine(data)
            if doc is None and set_aside:
                self._set_aside(why, names)  # picked up by the scan below
            elif doc is None:
                entries.block_file(self.path, why, names)
            else:
                entries.unknown = {k: v for k, v in doc.items() if k not in ("version", "devices")}
                for key, raw in doc["devices"].items():
                    try:
                        entries[key] = _parse_entry(key, raw)
                    except _Unreadable as err:
                        entries.opaque[key] = raw
                        entries.block_entry(self.path, key, str(err))
        for aside in sorted(self.dir.glob(UNREADABLE_GLOB)):
            try:
                data = _read(aside)
            except OperationError as err:
                entries.block_file(aside, str(err), [])
                continue
            if data is not None:  # else removed since the listing
                _, why, names = _examine(data)
                entries.block_file(aside, why or "set aside as unreadable", names)
        return entries

    def _set_aside(self, why: str, names: list[str]) -> Path:
        """Move an unreadable journal out of the way without overwriting anything."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(1000):
            target = self.dir / f"journal.unreadable.{stamp}{f'-{n}' if n else ''}.json"
            try:
                _move_no_replace(self.path, target)
                _fsync_dir(self.dir)
            except FileExistsError:
                continue
            except OSError as err:
                raise OperationError(f"cannot set aside {self.path}: {err.strerror}") from None
            log.error("journal %s is unreadable (%s); set aside as %s; it names %s, which stay "
                      "blocked until it is removed", self.path, why, target, ", ".join(names) or "nothing")
            return target
        raise OperationError(f"cannot set aside {self.path}: too many unreadable journals")

    def _save(self, entries: Entries) -> None:
        tmp = self.dir / f".{JOURNAL}.{os.getpid()}.tmp"
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(_serialise(entries).encode())  # a file object writes it all, a bare write may not
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not fill up further with our leftovers
            raise
        _fsync_dir(self.dir)


@dataclass(frozen=True)
class Snapshot:
    entries: dict[str, Entry]
    blocked: dict[str, str] = field(default_factory=dict)
    """BDF -> one-line reason: devices an unreadable journal or entry names."""
    problems: tuple[str, ...] = ()
    """One line per unreadable journal file or entry, for `status` and `doctor`."""

    def for_domain(self, domain: str) -> list[Entry]:
        return [e for e in self.entries.values() if e.domain == domain]


class _Unreadable(ValueError):
    """An entry this version cannot read; the message says why, in a few words."""


def _serialise(entries: Entries) -> str:
    # an opaque entry gives way to a real one the caller wrote for its BDF (Entries' docstring)
    opaque = {k: v for k, v in entries.opaque.items() if _bdf(k) not in entries}
    devices = {**opaque, **{bdf: e.to_json() for bdf, e in entries.items()}}
    return json.dumps({**entries.unknown, "version": SCHEMA_VERSION, "devices": devices},
                      indent=1, sort_keys=True)


def _parse_entry(key: str, raw: object) -> Entry:
    if not isinstance(raw, dict):
        raise _Unreadable(f"a JSON {_kind(raw)}, not an object")
    if missing := [name for name in _REQUIRED if name not in raw]:
        raise _Unreadable(f"missing field {missing[0]!r}")
    for name, value in raw.items():
        if name in _FIELDS and (not isinstance(value, _FIELDS[name]) or isinstance(value, bool)):
            raise _Unreadable(f"field {name!r} is a JSON {_kind(value)}")
    if raw["role"] not in get_args(Role):
        raise _Unreadable(f"unknown role {_short(raw['role'])}")
    if raw["status"] not in get_args(Status):
        raise _Unreadable(f"unknown status {_short(raw['status'])}")
    if _bdf(key) != key:
        raise _Unreadable(f"key {_short(key)} is not a PCI address as DDDD:BB:SS.F")
    if raw["address"] != key:
        raise _Unreadable(f"address {_short(raw['address'])} does not match its key")
    known = {"pid": None, "updated": 0.0}  # an older writer's entry: age and writer unknown
    known.update({k: v for k, v in raw.items() if k in _FIELDS})
    return Entry(**known, extra={k: v for k, v in raw.items() if k not in _FIELDS})  # type: ignore[arg-type]


def _examine(data: bytes) -> tuple[dict[str, Any] | None, str, list[str]]:
    """(the document, or None if this version cannot read it; why not; the BDFs it names).

    What an unreadable journal names is a best guess that errs towards naming too
    much: its device keys and "address" values anywhere, or any BDF-looking text.
    """
    try:
        doc: Any = json.loads(data[:_MAX_READ])
    except (ValueError, RecursionError) as err:
        why = (f"larger than {_MAX_READ >> 20} MiB" if len(data) > _MAX_READ
               else "not valid JSON: " + " ".join(str(err).split())[:120])
        found: list[object] = _BDF_TEXT.findall(data[:_MAX_READ].decode("utf-8", "replace"))
        return None, why, sorted({b for b in map(_bdf, found) if b})
    obj = isinstance(doc, dict)
    version, devices = (doc.get("version"), doc.get("devices")) if obj else (None, None)
    why = ""
    if not obj:
        why = f"a JSON {_kind(doc)}, not an object"
    elif not isinstance(version, int) or isinstance(version, bool):
        why = f"version {_short(version)} is not an integer" if "version" in doc else "it has no version"
    elif version > SCHEMA_VERSION:
        why = f"version {version} is newer than this vfio-libvirt reads, {SCHEMA_VERSION}"
    elif version < 1:
        why = f"version {version} was never written by vfio-libvirt"
    elif not isinstance(devices, dict):
        why = f"its devices are a JSON {_kind(devices)}, not an object"
    found = list(devices) if isinstance(devices, dict) else []
    stack: list[object] = [doc]
    while stack:  # iterative: a deeply nested document must not overflow the stack
        node = stack.pop()
        if isinstance(node, dict):
            found.append(node.get("address"))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return (None if why else doc), why, sorted({b for b in map(_bdf, found) if b})


def _bdf(text: object) -> str | None:
    try:
        return str(PciAddress.parse(text))  # type: ignore[arg-type]
    except (InputError, TypeError):
        return None


def _kind(value: object) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: object, limit: int = 60) -> str:
    text = " ".join(repr(value)[:limit * 2].split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read(path: Path) -> bytes | None:
    """At most a few MiB of `path`; None when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_READ + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise OperationError(f"journal {path}: {err.strerror}") from None


def _move_no_replace(src: Path, dst: Path) -> None:
    """A rename that raises FileExistsError rather than replace `dst`."""
    try:
        os.link(src, dst)  # EEXIST, a FileExistsError, when dst exists
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP):
            raise
        if dst.exists():  # no hard links on this filesystem; the exclusive lock excludes racers
            raise FileExistsError(dst) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
