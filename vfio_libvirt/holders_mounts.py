"""Which mounts and swap areas lie on a device's block devices, and how bad losing them is.

A mount is tied to a block device three ways:

- by major:minor: mountinfo's third field is the superblock's device, the partition
  itself for ext4 or xfs on it;
- by source path, resolved under the root first (`/dev/disk/by-uuid/…` and
  `/dev/mapper/…` are symlinks), for superblocks with an anonymous device (`0:NN`);
- by btrfs membership: mountinfo names one device of a multi-device btrfs, while
  `/sys/fs/btrfs/<fsid>/devices/` (present while it is mounted) lists them all.
  Nothing in that directory names the superblock's anonymous device, so a filesystem
  is tied to its mounts through the mount whose source is a member; every other mount
  of the same superblock (subvolumes, bind mounts) shows the same `0:NN`.

Critical mount points are `/`, `/usr`, `/var`, `/etc`, `/boot` and anything below
`/boot/`: without /var go journald, libvirt's own state and dpkg.  The layers of an
overlay root are critical too.  Mounts that exist only in another mount namespace (a
container's, a service's PrivateMounts) are in use — never critical, even at that
namespace's `/`: it is not this host's root.  What no block device explains (a ZFS
dataset at /) is named in the claim probe's report (`holders_claim`), not refused on.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from vfio_libvirt.holders_block import Blocks, stack_detail
from vfio_libvirt.holders_scan import (
    Mount,
    Swap,
    majmin_of,
    mount_at,
    printable,
    read_attr,
    resolve_under,
    unescape,
)

if TYPE_CHECKING:
    from vfio_libvirt.holders import Holder, Severity

CRITICAL_MOUNTS = ("/", "/usr", "/var", "/etc", "/boot")
"""Mount points whose loss breaks the host itself (and anything below /boot/)."""
_NOT_A_DISK = {"tmpfs", "ramfs", "rootfs", "overlay", "aufs", "nfs", "nfs4", "cifs", "smb3", "9p",
               "virtiofs", "ceph", "glusterfs"}
_LAYERS = {"upperdir": "upper", "lowerdir": "lower", "lowerdir+": "lower", "datadir+": "lower"}


def critical_mount(mountpoint: str) -> bool:
    return mountpoint in CRITICAL_MOUNTS or mountpoint.startswith("/boot/")


class MountFacts:
    """The host's mounts with what ties them to block devices, read once per reader."""

    def __init__(self, root: Path, sys: Path, mounts: tuple[list[Mount], str | None]) -> None:
        self.root = root
        self.sys = sys
        self.mounts, self.error = mounts
        self._resolved: dict[str, str] = {}

    def resolve(self, path: str) -> str:
        """A `/dev/…` path with its symlinks resolved under the root (cached)."""
        if not path.startswith("/dev/"):
            return path
        if (resolved := self._resolved.get(path)) is None:
            resolved = self._resolved[path] = resolve_under(self.root, path)
        return resolved

    def sources(self, mount: Mount) -> list[str]:
        resolved = self.resolve(mount.source)
        return [mount.source] if resolved == mount.source else [mount.source, resolved]

    @cached_property
    def _btrfs(self) -> tuple[list[list[str]], dict[str, int], dict[str, int]]:
        """(members of each mounted btrfs, a path naming a member → its filesystem,
        a superblock's anonymous major:minor → its filesystem)."""
        base = self.sys / "fs" / "btrfs"
        try:
            fsids = sorted(os.listdir(base))
        except OSError:
            return [], {}, {}
        members: list[list[str]] = []
        aliases: dict[str, int] = {}
        for fsid in fsids:
            try:
                names = sorted(os.listdir(base / fsid / "devices"))
            except OSError:
                continue  # `features`, or unmounted meanwhile
            for name in names:
                aliases[f"/dev/{name}"] = len(members)
                if dm_name := read_attr(self.sys / "class" / "block" / name / "dm" / "name"):
                    aliases[f"/dev/mapper/{dm_name}"] = len(members)
            members.append(names)
        majmins: dict[str, int] = {}
        for mount in self.mounts if members else []:
            if mount.majmin.startswith("0:"):
                for source in self.sources(mount):
                    if source in aliases:
                        majmins.setdefault(mount.majmin, aliases[source])
        return members, aliases, majmins

    def names(self, mount: Mount, blocks: Blocks) -> list[str]:
        """Those of `blocks` the mount's filesystem lives on (several for a btrfs RAID)."""
        found = []
        if name := blocks.dev.get(mount.majmin):
            found.append(name)
        sources = self.sources(mount)
        found += [blocks.sources[s] for s in sources if s in blocks.sources]
        members, aliases, majmins = self._btrfs
        if members:
            fs = majmins.get(mount.majmin)
            if fs is None:
                fs = next((aliases[s] for s in sources if s in aliases), None)
            if fs is not None:
                found += [name for name in members[fs] if name in blocks]
        return list(dict.fromkeys(found))

    def on(self, path: str, blocks: Blocks) -> list[str]:
        """Those of `blocks` the file at `path` lies on, through the filesystem holding it."""
        mount = mount_at(path, self.mounts)
        return self.names(mount, blocks) if mount else []

    @cached_property
    def overlay_layers(self) -> list[tuple[str, Mount]]:
        """("upper" | "lower", the mount holding that directory) for an overlay root: its
        layers vanish with their disk while every file of the system reads through them."""
        roots = [m for m in self.mounts if m.mountpoint == "/"]
        if not roots or roots[-1].fstype != "overlay":
            return []
        others = [m for m in self.mounts if m is not roots[-1]]
        layers = []
        for option in roots[-1].options.split(","):
            key, _, value = option.partition("=")
            if what := _LAYERS.get(key):
                for directory in unescape(value).split(":"):
                    if directory.startswith("/") and (mount := mount_at(directory, others)):
                        layers.append((what, mount))
        return layers

    @cached_property
    def unnamed_system_mounts(self) -> str:
        """`; / is mounted from rpool/ROOT/pve-1 (zfs)`: system mounts on an anonymous
        device whose source is no device path — a pool or volume some disk serves
        without this reader being able to say which."""
        _, _, btrfs = self._btrfs
        said = [f"; {printable(m.mountpoint)} is mounted from {printable(m.source)} ({printable(m.fstype)})"
                for m in self.mounts
                if critical_mount(m.mountpoint) and m.majmin.startswith("0:")
                and not m.source.startswith("/dev/") and m.fstype not in _NOT_A_DISK
                and not m.fstype.startswith("fuse") and m.majmin not in btrfs]
        return "".join(dict.fromkeys(said))


def mount_holders(class_block: Path, blocks: Blocks, facts: MountFacts,
                  namespaces: list[tuple[str, list[Mount]]],
                  swaps: tuple[list[Swap], str | None]) -> tuple[list[Holder], set[str]]:
    """Stacks, mounts (the host's, an overlay root's layers, other namespaces') and swap on
    the device's block devices, and the names whose kernel claim they explain; "unknown"
    where mountinfo, swaps or a `dev` file cannot be read, since then a root filesystem
    could hide."""
    from vfio_libvirt.holders import Holder

    holders = [Holder("unknown", printable(name), "cannot be checked for mounts and swap: its dev "
                      "file is unreadable or not major:minor", "critical")
               for name, majmin in blocks.own.items() if not majmin]
    explained: set[str] = set()
    for name, stack in blocks.stacked.items():
        holders.append(Holder("stack", printable(name), stack_detail(class_block, name, stack), "in_use"))
        if not stack.how:
            explained.add(stack.lower)  # dm, md, bcache claim what they are built on
    disks = ", ".join(map(printable, blocks.disks()))
    if facts.error:
        holders.append(Holder("unknown", disks, f"cannot be checked for mounts: {facts.error}",
                              "critical"))

    def found(names: list[str], detail: str, severity: Severity, kind: str = "mount") -> None:
        for name in names:
            holders.append(Holder(kind, printable(blocks.label(name)), detail, severity))
            explained.add(name)

    for mount in facts.mounts:
        found(facts.names(mount, blocks), *_mount_detail(mount.mountpoint))
    for what, mount in facts.overlay_layers:
        found(facts.names(mount, blocks), f"holds the overlay root's {what} dir", "critical")
    host = {m.majmin for m in facts.mounts}
    for owner, mounts in namespaces:
        for mount in mounts:
            if mount.majmin not in host:  # a copy of the host's mount is said once, above
                found(facts.names(mount, blocks), _namespace_detail(mount.mountpoint, owner), "in_use")
    swap_list, error = swaps
    if error:
        holders.append(Holder("unknown", disks, f"cannot be checked for swap: {error}", "critical"))
    for swap in swap_list:
        if swap.kind == "file":  # held by the filesystem the file lies on
            found(facts.on(swap.path, blocks), f"holds the active swap file {printable(swap.path)}",
                  "critical", "swap")
            continue
        name = swap.path.rsplit("/", 1)[-1]
        majmin = majmin_of(class_block / name / "dev") if name not in ("", ".", "..") else ""
        hit = (blocks.dev.get(majmin) if majmin else
               blocks.sources.get(swap.path) or blocks.sources.get(facts.resolve(swap.path)))
        found([hit] if hit else [], "is active swap", "critical", "swap")
    return holders, explained


def _mount_detail(mountpoint: str) -> tuple[str, Severity]:
    where = printable(mountpoint)
    if mountpoint == "/":
        return "is mounted at / (root filesystem)", "critical"
    return f"is mounted at {where}", "critical" if critical_mount(mountpoint) else "in_use"


def _namespace_detail(mountpoint: str, owner: str) -> str:
    where = printable(mountpoint)
    if critical_mount(mountpoint):
        whose = "root" if mountpoint == "/" else where
        return (f"is mounted at {where} (in the mount namespace of {owner}, whose {whose} it is; "
                "not this host's)")
    return f"is mounted at {where} (in the mount namespace of {owner})"
