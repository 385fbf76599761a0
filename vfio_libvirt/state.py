"""The journal: what the product changed, so it can always be undone.

One JSON file under the state dir (default /run/vfio-libvirt, which a reboot clears
together with every binding it describes).  Every read-modify-write holds an
exclusive `flock` on a lock file, and every write is tmp + fsync + rename + fsync of
the directory, so a crash leaves either the old or the new journal, never half of one.
Entries are written before a device is touched: after a crash the journal still
names the original driver, and `vfio-libvirt restore --domain` finishes the job.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from vfio_libvirt.errors import OperationError

Role = Literal["bind", "companion", "watch", "keep"]
"""bind/companion: the hook switched it and owns the restore; watch: libvirt switches it
(managed='yes') and the hook checks it came back; keep: it was on a VFIO driver before."""
Status = Literal["claimed", "switching", "bound", "watching", "restoring", "restore-failed"]

JOURNAL = "journal.json"
LOCK = "journal.lock"


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

    def touch(self, status: Status, error: str = "") -> None:
        self.status = status
        self.error = error
        self.updated = time.time()


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    @property
    def path(self) -> Path:
        return self.dir / JOURNAL

    def read(self) -> Snapshot:
        """A consistent copy, taken under the lock; for looking, not for changing."""
        with self._lock(exclusive=False):
            return Snapshot(self._load())

    @contextmanager
    def transaction(self) -> Iterator[dict[str, Entry]]:
        """Yield the entries (by BDF) to change in place; saved atomically on a clean exit."""
        with self._lock(exclusive=True):
            entries = self._load()
            before = _serialise(entries)
            yield entries
            if _serialise(entries) != before:
                self._save(entries)

    # --- internals ---------------------------------------------------------------
    @contextmanager
    def _lock(self, *, exclusive: bool) -> Iterator[None]:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise OperationError(f"state dir {self.dir}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _load(self) -> dict[str, Entry]:
        try:
            raw = json.loads(self.path.read_text())
            return {bdf: Entry(**value) for bdf, value in raw["devices"].items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as err:
            raise OperationError(
                f"journal {self.path} is unreadable ({err}); it is kept as is for inspection"
            ) from None

    def _save(self, entries: dict[str, Entry]) -> None:
        tmp = self.dir / f".{JOURNAL}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _serialise(entries).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@dataclass(frozen=True)
class Snapshot:
    entries: dict[str, Entry]

    def for_domain(self, domain: str) -> list[Entry]:
        return [e for e in self.entries.values() if e.domain == domain]


def _serialise(entries: dict[str, Entry]) -> str:
    return json.dumps(
        {"version": 1, "devices": {bdf: asdict(e) for bdf, e in sorted(entries.items())}},
        indent=1,
        sort_keys=True,
    )
