"""Block devices below a PCI device: what is stacked on them, where they are mounted, swap.

A PCI device's own block devices are its disks and partitions (found by the reader
through `/sys/class/block`).  Anything built on them — device-mapper (LVM, dm-crypt),
md RAID, an NVMe multipath head — lists them in its `holders/` (or `multipath/`), and
dies with them, so it is followed recursively.  Mounts are matched by major:minor, and
by source path for filesystems whose mountinfo shows an anonymous device (btrfs);
swap by the device a swap area names, or, for a swap file, the filesystem it lies on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vfio_libvirt.holders_scan import Mount, Swap, majmin_of, printable, read_attr

if TYPE_CHECKING:
    from vfio_libvirt.holders import Holder

CRITICAL_MOUNTS = ("/", "/usr", "/var", "/etc", "/boot")
"""Mount points whose loss breaks the host itself (and anything below /boot/): without
/var go journald, libvirt's own state and dpkg; without /etc, every login and service."""


@dataclass
class Blocks:
    """A device's block devices: its own (disks, partitions) and those stacked on them."""

    own: dict[str, str]
    """name → major:minor ("" when its `dev` is unreadable)."""
    stacked: dict[str, tuple[str, str]]
    """name → (the device it sits on directly, the device of ours below it all)."""
    dev: dict[str, str]
    """major:minor of every one of them → label ("dm-0 (on nvme0n1p3)")."""
    sources: dict[str, str]
    """mount sources naming one of them ("/dev/mapper/vg-usr") → label."""


def multipath_heads(class_block: Path, links: dict[str, str]) -> dict[str, list[str]]:
    """NVMe path disk (nvme0c0n1, under the controller) → the multipath head disks using it.

    With native NVMe multipath the namespace a filesystem is on (nvme0n1) hangs below a
    virtual subsystem, not below the PCI device; only its hidden per-path disks do.
    """
    heads: dict[str, list[str]] = {}
    for name, target in links.items():
        if "nvme-subsys" in target:
            try:
                for path in os.listdir(class_block / name / "multipath"):
                    heads.setdefault(path, []).append(name)
            except OSError:
                continue
    return heads


def find_blocks(class_block: Path, own_names: list[str], heads: dict[str, list[str]]) -> Blocks:
    """The device's own block devices and, through `holders/` and multipath heads, every
    device stacked on them, however deep (dm on md on a partition)."""
    own = {name: majmin_of(class_block / name / "dev") for name in own_names}
    stacked: dict[str, tuple[str, str]] = {}
    frontier = [(name, name) for name in own]
    while frontier:
        lower, base = frontier.pop(0)
        try:
            uppers = sorted(os.listdir(class_block / lower / "holders"))
        except OSError:
            uppers = []
        for upper in uppers + heads.get(lower, []):
            if upper not in own and upper not in stacked and "/" not in upper:
                stacked[upper] = (lower, base)
                frontier.append((upper, base))
    dev, sources = {}, {}
    for name in [*own, *stacked]:
        label = f"{name} (on {stacked[name][1]})" if name in stacked else name
        if majmin := own.get(name) or majmin_of(class_block / name / "dev"):
            dev[majmin] = label
        sources[f"/dev/{name}"] = label
        if dm_name := read_attr(class_block / name / "dm" / "name"):
            sources[f"/dev/mapper/{dm_name}"] = label
    return Blocks(own, stacked, dev, sources)


def block_holders(class_block: Path, blocks: Blocks, mounts: tuple[list[Mount], str | None],
                  swaps: tuple[list[Swap], str | None]) -> list[Holder]:
    """Stacks, mounts and swap on the device's block devices; "unknown" where mountinfo,
    swaps or a `dev` file cannot be read, since then a root filesystem could hide."""
    from vfio_libvirt.holders import Holder

    if not blocks.own:
        return []
    holders = [Holder("unknown", name, "cannot be checked for mounts and swap: its dev file is "
                      "unreadable or not major:minor", "critical")
               for name, majmin in blocks.own.items() if not majmin]
    for name, (lower, _) in blocks.stacked.items():
        holders.append(Holder("stack", name, f"is stacked on {lower}{_stack_kind(class_block / name)}",
                              "in_use"))
    disks = ", ".join(n for n in blocks.own if not (class_block / n / "partition").exists())
    disks = disks or next(iter(blocks.own))
    mount_list, error = mounts
    if error:
        holders.append(Holder("unknown", disks, f"cannot be checked for mounts: {error}", "critical"))
    for mount in mount_list:
        if label := blocks.dev.get(mount.majmin) or blocks.sources.get(mount.source):
            holders.append(_mount_holder(label, mount.mountpoint))
    swap_list, error = swaps
    if error:
        holders.append(Holder("unknown", disks, f"cannot be checked for swap: {error}", "critical"))
    for swap in swap_list:
        if swap.kind == "file":  # held by the filesystem the file lies on
            best = max((m for m in mount_list if _under(swap.path, m.mountpoint)),
                       key=lambda m: len(m.mountpoint), default=None)
            label = best and (blocks.dev.get(best.majmin) or blocks.sources.get(best.source))
            if label:
                holders.append(Holder("swap", label, f"holds the active swap file {printable(swap.path)}",
                                      "critical"))
            continue
        name = swap.path.rsplit("/", 1)[-1]
        majmin = majmin_of(class_block / name / "dev") if name not in ("", ".", "..") else ""
        if label := blocks.dev.get(majmin) if majmin else blocks.sources.get(swap.path):
            holders.append(Holder("swap", label, "is active swap", "critical"))
    return holders


def _stack_kind(path: Path) -> str:
    if dm_name := read_attr(path / "dm" / "name"):
        return f" (device-mapper {printable(dm_name)})"
    if level := read_attr(path / "md" / "level"):
        return f" (md {printable(level)})"
    return ""


def _mount_holder(label: str, mountpoint: str) -> Holder:
    from vfio_libvirt.holders import Holder

    where = printable(mountpoint)
    if mountpoint == "/":
        return Holder("mount", label, "is mounted at / (root filesystem)", "critical")
    if mountpoint in CRITICAL_MOUNTS or mountpoint.startswith("/boot/"):
        return Holder("mount", label, f"is mounted at {where}", "critical")
    return Holder("mount", label, f"is mounted at {where}", "in_use")


def _under(path: str, mountpoint: str) -> bool:
    return mountpoint in ("/", path) or path.startswith(mountpoint.rstrip("/") + "/")
