"""The holder reader's reading primitives: mounts, swaps, processes, sysfs attributes.

The procfs readings are host-wide: each is read once per `HolderReader` and shared by
every device of a plan, because the expensive one — a walk over every process's open
files and memory maps — costs the same whether it looks for one device node or fifty.
Everything here only reads, and tolerates a tree that changes under it: a process may
exit between the listing of /proc and the reading of its files, and is then skipped
without a word; a missing, unreadable or garbled attribute reads as absent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_OCTAL = re.compile(r"\\([0-7]{3})")
_MAJMIN = re.compile(r"[0-9]+:[0-9]+")
_RESOURCE = re.compile(
    rb"/([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])/(resource\d+(?:_wc)?)$", re.MULTILINE)
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC
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


class ProcessScan:
    """What processes hold, indexed for any device, filled by at most two passes over /proc.

    Memory maps (`resource*` files of any BDF) are always needed; open files only when a
    device has nodes to look for (a plain NIC on its host driver has none), and reading
    every fd link is the dear part.  When a device with nodes comes first, one pass does
    both; a later pass for fds visits only the processes the first found to be userspace.
    The mount namespace of each userspace process (one readlink of `ns/mnt`) is read in
    the same pass when a device has block devices: a mount may exist only in a
    container's or a service's namespace.
    """

    def __init__(self, proc: Path) -> None:
        self.proc = proc
        self.error: str | None = None
        """Why /proc could not be listed at all."""
        self.denied: set[int] = set()
        """Processes whose files we may not read (not running as root)."""
        self._resources: dict[str, dict[int, set[str]]] | None = None
        self._nodes: dict[str, set[int]] | None = None
        self._namespaces: dict[str, list[int]] | None = None
        self._user_pids: list[int] = []

    def resources(self) -> dict[str, dict[int, set[str]]]:
        """BDF → pid → the device's resource files it maps (`resource0`, `resource2_wc`)."""
        if self._resources is None:
            self._scan(fds=False, ns=False)
        return self._resources or {}

    def nodes(self) -> dict[str, set[int]]:
        """/dev path, as readlink shows an open fd → pids."""
        if self._nodes is None:
            self._scan(fds=True, ns=False)
        return self._nodes or {}

    def namespaces(self) -> dict[str, list[int]]:
        """Mount namespace (`mnt:[4026531841]`) → the userspace pids in it.  Open files
        are indexed in the same pass: whoever asks has block devices, hence nodes."""
        if self._namespaces is None:
            self._scan(fds=True, ns=True)
        return self._namespaces or {}

    def _scan(self, fds: bool, ns: bool) -> None:
        fds, ns = fds and self._nodes is None, ns and self._namespaces is None
        if fds:
            self._nodes = {}
        if ns:
            self._namespaces = {}
        base = str(self.proc)
        if self._resources is not None:  # maps are read: only userspace remains
            for pid in self._user_pids:
                self._scan_user(f"{base}/{pid}", pid, fds, ns)
            return
        try:
            names = os.listdir(self.proc)
        except OSError as err:
            self.error = f"{self.proc}: {reason(err)}"
            self._resources, self._nodes, self._namespaces = {}, {}, {}
            return
        self._resources = {}
        for name in names:
            if name.isdigit() and name.isascii():
                pid = int(name)
                if self._scan_maps(f"{base}/{name}", pid):
                    self._user_pids.append(pid)
                    self._scan_user(f"{base}/{name}", pid, fds, ns)

    def _scan_user(self, pid_dir: str, pid: int, fds: bool, ns: bool) -> None:
        if fds:
            self._scan_fds(pid_dir, pid, ns)
        elif ns:
            self._note_namespace(pid, f"{pid_dir}/ns/mnt", None)

    def _note_namespace(self, pid: int, link: str, dir_fd: int | None) -> None:
        """Index the process by its mount namespace (the `ns/mnt` link's target)."""
        try:
            mnt = os.readlink(link, dir_fd=dir_fd)
        except OSError:
            return  # exited, or not ours to inspect (counted by the maps already)
        if self._namespaces is not None:
            pids = self._namespaces.get(mnt)
            if pids is None:
                self._namespaces[mnt] = [pid]
            else:
                pids.append(pid)

    def _scan_maps(self, pid_dir: str, pid: int) -> bool:
        """Index the process's resource mappings; False for a kernel thread (no memory map)."""
        try:
            fd = os.open(f"{pid_dir}/maps", _READ_FLAGS)
        except PermissionError:
            self.denied.add(pid)
            return True
        except OSError:
            return True  # gone (its fd directory will say so), or a tree without maps
        try:
            maps = _read_all(fd)
        except OSError:
            return True  # exited while we read
        finally:
            os.close(fd)
        if not maps:
            return False  # a kernel thread (or a zombie): no memory, no files
        if b"/resource" in maps and self._resources is not None:
            for bdf, resource in _RESOURCE.findall(maps):
                self._resources.setdefault(bdf.decode(), {}).setdefault(pid, set()).add(
                    resource.decode())
        return True

    def _scan_fds(self, pid_dir: str, pid: int, ns: bool) -> None:
        """Index the process's open /dev nodes; and its namespace (`ns`), read relative to
        the open fd directory, which costs a third of a walk from /proc."""
        try:
            dir_fd = os.open(f"{pid_dir}/fd", _DIR_FLAGS)
        except PermissionError:
            self.denied.add(pid)
            return
        except OSError:
            return  # exited since /proc was listed
        nodes = self._nodes if self._nodes is not None else {}
        try:
            for fd in os.listdir(dir_fd):
                try:
                    target = os.readlink(fd, dir_fd=dir_fd)
                except OSError:
                    continue  # closed meanwhile, or the process exited
                if target.startswith("/dev/"):
                    holders = nodes.get(target)
                    if holders is None:
                        nodes[target] = {pid}
                    else:
                        holders.add(pid)
            if ns:
                self._note_namespace(pid, "../ns/mnt", dir_fd)
        except OSError:
            pass  # the directory went away under us
        finally:
            os.close(dir_fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


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
