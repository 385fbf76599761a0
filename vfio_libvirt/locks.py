"""Bounded `flock`s: the journal's, and one per domain for a whole prepare or release.

The journal lock keeps each read-modify-write whole; it is held for milliseconds.  A
domain lock is held for a whole operation on that domain (prepare, release, `restore
--domain`), so the hook and an admin's restore never work on the same domain's devices
at once, and a run always sees the journal as the previous run left it.  Nobody holds
a domain lock while waiting for another: the journal lock is always taken inside it,
and waits for other domains poll without holding anything.

libvirt has no timeout on hooks, so every wait here has a deadline; the kernel drops
a dead process's locks, so a crash never leaves one behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from vfio_libvirt.errors import OperationError

POLL = 0.02


def make_private_dirs(path: Path) -> None:
    """mkdir -p where every directory created is 0700.

    Path.mkdir(parents=True) gives the parents it creates the default mode: the first
    domain lock (state dir/domains/) made /run/vfio-libvirt 0755, readable by others,
    and doctor warned about it on every host.
    """
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with suppress(FileExistsError):
            directory.mkdir(mode=0o700)


@contextmanager
def flock_file(path: Path, *, exclusive: bool, timeout: float, what: str) -> Iterator[None]:
    """Hold an flock on `path` (created 0600, its directories 0700), waiting at most `timeout`."""
    try:
        make_private_dirs(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise OperationError(f"state dir {path.parent}: {err.strerror}") from None
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OperationError(f"{what} held by another process for {timeout:g}s") from None
                time.sleep(POLL)
        yield
    finally:
        os.close(fd)


class DomainLocks:
    """One lock file per domain name under `<state dir>/domains/`."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "domains"

    def path(self, domain: str) -> Path:
        # names come from libvirt or `bind --owner`: hash them rather than trust them in a path
        return self.dir / (hashlib.sha256(domain.encode()).hexdigest()[:24] + ".lock")

    def side_path(self, domain: str) -> Path:
        return self.path(domain).with_suffix(".side.lock")

    @contextmanager
    def hold(self, domain: str, timeout: float, *, side: bool = False) -> Iterator[None]:
        """`side`: the lock of a release that runs beside a run stuck in the kernel (which
        keeps the domain's own lock until its write returns); such releases take turns."""
        what = f"domain {domain} is being prepared or restored by another run; its lock was"
        path = self.side_path(domain) if side else self.path(domain)
        with flock_file(path, exclusive=True, timeout=timeout, what=what):
            yield

    def busy(self, domain: str) -> bool:
        """True while some run holds one of `domain`'s locks (its entries are being worked on)."""
        return any(_held(path) for path in (self.path(domain), self.side_path(domain)))


def _held(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        with flock_file(path, exclusive=True, timeout=0, what=""):
            return False
    except OperationError:
        return True
