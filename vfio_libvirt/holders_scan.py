"""The holder reader's reading primitives: mounts, swaps, process names, sysfs attributes.

The procfs readings are host-wide: each is read once per `HolderReader` and shared by
every device of a plan (the dearest, the pass over every process, is `holders_procs`).
Everything here only reads, and tolerates a tree that changes under it: a process may
exit before its name is read; a missing, unreadable or garbled attribute reads as absent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_OCTAL = re.compile(r"\\([0-7]{3})")
_MAJMIN = re.compile(r"[0-9]+:[0-9]+")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def unescape(text: str) -> str:
    """Undo the kernel's octal escapes in mountinfo and swaps (`\\040` space, `\\011` tab,
    `\\012` newline, `\\134` backslash), so `/mnt/my disk` compares as itself."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def printable(text: str) -> str:
    """A path as one safe line: control characters (a mount point may hold a newline) are
    shown escaped instead of breaking the holder's one-line report."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


@dataclass(frozen=True)
class Mount:
    majmin: str
    mountpoint: str
    source: str
    fstype: str
    options: str = ""
    """The super options (`rw,lowerdir=…,upperdir=…` of an overlay), still escaped."""


@dataclass(frozen=True)
class Swap:
    path: str
    kind: str


def read_mounts(proc: Path) -> tuple[list[Mount], str | None]:
    """The mounts of init's namespace (the host's), else our own; (mounts, why unreadable).

    /proc/1 is preferred because the hook may run in a private mount namespace, while
    what matters is what the host has mounted.
    """
    errors = []
    for path in (proc / "1" / "mountinfo", proc / "self" / "mountinfo"):
        try:
            text = path.read_bytes().decode(errors="replace")
        except OSError as err:
            errors.append(f"{path}: {reason(err)}")
            continue
        return parse_mountinfo(text), None
    return [], "; ".join(errors)


def parse_mountinfo(text: str) -> list[Mount]:
    """`36 35 98:0 /root /mnt opts [optional…] - fstype source superopts`; lines that do not
    have that shape are skipped rather than trusted."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3 or not _MAJMIN.fullmatch(fields[2]):
            continue
        options = fields[sep + 3] if len(fields) > sep + 3 else ""
        mounts.append(Mount(fields[2], unescape(fields[4]), unescape(fields[sep + 2]), fields[sep + 1],
                            options))
    return mounts


def mount_at(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount a path lies on: the longest mount point above it, the last one listed
    when several share it (a mount over a mount hides the one below)."""
    best: Mount | None = None
    for mount in mounts:
        if under(path, mount.mountpoint) and (
                best is None or len(mount.mountpoint) >= len(best.mountpoint)):
            best = mount
    return best


def under(path: str, mountpoint: str) -> bool:
    return mountpoint in ("/", path) or path.startswith(mountpoint.rstrip("/") + "/")


def resolve_under(root: Path, path: str, limit: int = 40) -> str:
    """`path` with its symlinks resolved as if `root` were `/` (an absolute link target
    stays inside the root), e.g. `/dev/disk/by-uuid/…` → `/dev/nvme0n1p2`; the path as
    given when it is not absolute or links loop."""
    if not path.startswith("/"):
        return path
    parts = path.split("/")
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            done = done[:-1]
            continue
        try:
            target = os.readlink(root.joinpath(*done, part))
        except (OSError, ValueError):
            done.append(part)  # not a link, or absent: taken as it is
            continue
        hops += 1
        if hops > limit:
            return path
        if target.startswith("/"):
            done = []
        parts = target.split("/") + parts
    return "/" + "/".join(done)


def read_namespace_mounts(proc: Path, namespaces: dict[str, list[int]],
                          host: str | None) -> list[tuple[int, list[Mount]]]:
    """The mounts of every mount namespace but the host's, each read from its first
    process (by pid) whose mountinfo can still be read: all of a namespace's processes
    see the same mounts, so one read per namespace is enough."""
    found = []
    for ns in sorted(namespaces):
        if ns == host:
            continue
        for pid in sorted(namespaces[ns]):
            try:
                text = (proc / str(pid) / "mountinfo").read_bytes().decode(errors="replace")
            except OSError:
                continue  # exited, or not ours to read: the next one says it
            found.append((pid, parse_mountinfo(text)))
            break
    return found


def read_swaps(proc: Path) -> tuple[list[Swap], str | None]:
    """Active swap areas from /proc/swaps (`Filename Type Size Used Priority`)."""
    path = proc / "swaps"
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError as err:
        return [], f"{path}: {reason(err)}"
    swaps = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or not fields[0].startswith("/"):
            continue  # the header, or garbage
        swaps.append(Swap(unescape(fields[0]), fields[1]))
    return swaps, None


def process_name(proc: Path, pid: int) -> str | None:
    """`pid (comm)`, or None when the process has exited since the scan."""
    try:
        comm = (proc / str(pid) / "comm").read_bytes().decode(errors="replace").strip()
    except OSError:
        return None
    return f"{pid} ({printable(comm) or '?'})"


# --- sysfs primitives: every read tolerates absence, garbage and races ---------------
def read_links(directory: Path) -> dict[str, str]:
    """Entry → link target of every link in a sysfs directory (`class/block`, `dev/char`)."""
    links: dict[str, str] = {}
    try:
        dir_fd = os.open(directory, _DIR_FLAGS)
    except OSError:
        return links
    try:  # relative to the open directory: a host's dev/char holds hundreds of links
        for name in os.listdir(dir_fd):
            try:
                links[name] = os.readlink(name, dir_fd=dir_fd)
            except OSError:
                continue  # not a link (garbage), or gone
    except OSError:
        pass  # the directory went away under us
    finally:
        os.close(dir_fd)
    return links


def link_name(path: Path) -> str | None:
    """The last part of a link's target (a driver's or group's name); None if no link."""
    try:
        return os.readlink(path).rsplit("/", 1)[-1]
    except OSError:
        return None


def read_attr(path: Path) -> str | None:
    """A small sysfs attribute, stripped; None if absent or unreadable."""
    try:
        return path.read_bytes()[:4096].decode(errors="replace").strip()
    except OSError:
        return None


def majmin_of(path: Path) -> str:
    """A `dev` file's `major:minor`, or "" when it is missing or holds anything else."""
    text = read_attr(path) or ""
    return text if _MAJMIN.fullmatch(text) else ""
