"""Block devices below a PCI device, and everything built on them that dies with them.

A PCI device's own block devices are its disks and partitions (found by the reader
through `/sys/class/block`).  What is built on them is found four ways, recursively
and however deep (a partition of an md array on a partition, a loop on a filesystem
on an LV):

- `holders/`: device-mapper (LVM, dm-crypt), md RAID, bcache list their lower devices;
- `multipath/`: with native NVMe multipath the namespace a filesystem is on (nvme0n1)
  hangs below a virtual subsystem, not below the PCI device; only its hidden per-path
  disk (nvme0c0n1) does, and the head names it in `multipath/`;
- partitions of a stacked disk (`md126p2`, `nvme0n1p1` of a multipath head) are child
  directories of that disk with a `partition` file — in no `holders/`;
- a loop device whose `loop/backing_file` lies on a filesystem mounted from one of
  them (a disk image, a swap file attached with losetup, a live system's squashfs).

Whether a mount is on one of them is `holders_mounts`' business; this module only
asks it through the `on` callable (a path → the block devices its filesystem is on).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vfio_libvirt.holders_scan import majmin_of, printable, read_attr


@dataclass(frozen=True)
class Stack:
    """How a stacked device sits on ours."""

    lower: str
    """The device it sits on directly."""
    base: str
    """The device of ours below it all."""
    how: str = ""
    """"" (it lists `lower` in `holders/` or `multipath/`), "partition", or "loop on PATH"."""


@dataclass
class Blocks:
    """A device's block devices: its own (disks, partitions) and those stacked on them."""

    own: dict[str, str]
    """name → major:minor ("" when its `dev` is unreadable)."""
    stacked: dict[str, Stack] = field(default_factory=dict)
    parent: dict[str, str] = field(default_factory=dict)
    """partition → the disk it is a partition of."""
    majmin: dict[str, str] = field(default_factory=dict)
    """Every one of them → major:minor ("" when unreadable)."""
    dev: dict[str, str] = field(default_factory=dict)
    """major:minor → name."""
    sources: dict[str, str] = field(default_factory=dict)
    """Paths a mount or swap may name one by ("/dev/dm-0", "/dev/mapper/vg-usr") → name."""

    def __contains__(self, name: object) -> bool:
        return name in self.own or name in self.stacked

    def names(self) -> list[str]:
        return [*self.own, *self.stacked]

    def label(self, name: str) -> str:
        """`dm-0 (on nvme0n1p3)`: a stacked device says which of ours it is built on."""
        stack = self.stacked.get(name)
        return f"{name} (on {stack.base})" if stack else name

    def disks(self) -> list[str]:
        return [n for n in self.own if n not in self.parent] or list(self.own)[:1]


_NVME_PATH = re.compile(r"nvme(\d+)c\d+n(\d+)")


def multipath_heads(class_block: Path, links: dict[str, str]) -> dict[str, list[str]]:
    """NVMe path disk (nvme0c0n1, under the controller) → the multipath head disks using it.

    The kernel names a path disk nvme<subsys>c<ctrl>n<ns> and its head nvme<subsys>n<ns>
    (nvme_set_disk_name), so the name alone finds the head; newer kernels also list the
    paths in the head's `multipath/` directory (Debian's 6.12 does not)."""
    heads: dict[str, list[str]] = {}
    for name, target in links.items():
        if "nvme-subsys" in target:
            try:
                for path in os.listdir(class_block / name / "multipath"):
                    heads.setdefault(path, []).append(name)
            except OSError:
                pass  # no such directory on this kernel, a partition of a head, or garbage
    for name in links:
        if (match := _NVME_PATH.fullmatch(name)) and "nvme-subsys" in links.get(
                head := f"nvme{match[1]}n{match[2]}", ""):
            heads.setdefault(name, [])
            if head not in heads[name]:
                heads[name].append(head)
    return heads


def read_loops(class_block: Path, links: dict[str, str]) -> dict[str, str]:
    """Bound loop device → its backing file's path (without the " (deleted)" the kernel
    appends to an unlinked one: its filesystem still holds it)."""
    loops = {}
    for name in links:
        if name.startswith("loop") and (backing := read_attr(class_block / name / "loop" / "backing_file")):
            loops[name] = backing.removesuffix(" (deleted)")
    return loops


def find_blocks(class_block: Path, links: dict[str, str], own_names: list[str], *,
                heads: dict[str, list[str]], loops: dict[str, str],
                on: Callable[[str, Blocks], list[str]]) -> Blocks:
    """The device's own block devices (`links`: class/block's) and every device stacked
    on them.  Loops are added in rounds — a loop found to be ours may hold the
    filesystem the next loop's backing file lies on — until a round adds none.

    With native NVMe multipath (Debian's kernels) the PCI device has only a hidden path
    disk (nvme0c0n1: no `dev`, no /dev node); the namespace everyone mounts is its head
    (nvme0n1, under the virtual nvme-subsystem).  The head and its partitions are then
    the device's own disks, not something stacked on it (a stack is "in use"; this is
    the disk itself)."""
    names: list[str] = []
    for name in own_names:
        if name in heads and not (class_block / name / "dev").exists():
            for head in heads[name]:
                names += [head, *_partitions(class_block, head)]
        else:
            names.append(name)
    own_names = list(dict.fromkeys(names))
    blocks = Blocks({name: majmin_of(class_block / name / "dev") for name in own_names})
    for name in own_names:
        if (class_block / name / "partition").exists():
            parts = links.get(name, "").rsplit("/", 2)
            if len(parts) == 3:
                blocks.parent[name] = parts[1]
    frontier = list(own_names)
    while frontier:
        _expand(class_block, blocks, frontier, heads)
        frontier = []
        for loop, backing in sorted(loops.items()):
            if loop not in blocks and (lowers := on(backing, blocks)):
                lower = lowers[0]
                base = blocks.stacked[lower].base if lower in blocks.stacked else lower
                blocks.stacked[loop] = Stack(lower, base, f"loop on {backing}")
                frontier.append(loop)
    return blocks


def _expand(class_block: Path, blocks: Blocks, frontier: list[str],
            heads: dict[str, list[str]]) -> None:
    """Follow `holders/`, multipath heads and partitions of stacked disks from `frontier`,
    indexing every device found by major:minor and by the paths naming it."""
    for name in frontier:
        _index(class_block, blocks, name)
    while frontier:
        lower = frontier.pop(0)
        base = blocks.stacked[lower].base if lower in blocks.stacked else lower
        try:
            uppers = sorted(os.listdir(class_block / lower / "holders"))
        except OSError:
            uppers = []
        found = [(upper, "") for upper in [*uppers, *heads.get(lower, [])]]
        if lower in blocks.stacked:  # own partitions are own already
            found += [(part, "partition") for part in _partitions(class_block, lower)]
        for upper, how in found:
            if upper not in blocks and "/" not in upper:
                blocks.stacked[upper] = Stack(lower, base, how)
                if how == "partition":
                    blocks.parent[upper] = lower
                _index(class_block, blocks, upper)
                frontier.append(upper)


def _partitions(class_block: Path, disk: str) -> list[str]:
    """Partitions of a disk: its child directories holding a `partition` file."""
    try:
        entries = os.listdir(class_block / disk)
    except OSError:
        return []
    return sorted(e for e in entries
                  if e.startswith(disk) and (class_block / disk / e / "partition").exists())


def _index(class_block: Path, blocks: Blocks, name: str) -> None:
    majmin = blocks.own.get(name) or majmin_of(class_block / name / "dev")
    blocks.majmin[name] = majmin
    if majmin:
        blocks.dev.setdefault(majmin, name)
    blocks.sources.setdefault(f"/dev/{name}", name)
    if dm_name := read_attr(class_block / name / "dm" / "name"):
        blocks.sources.setdefault(f"/dev/mapper/{dm_name}", name)


def stack_detail(class_block: Path, name: str, stack: Stack) -> str:
    """`is stacked on nvme0n1p3 (device-mapper vg-usr)`, `is a partition of md126`."""
    if stack.how == "partition":
        return f"is a partition of {printable(stack.lower)}"
    if stack.how:
        return f"is stacked on {printable(stack.lower)} ({printable(stack.how)})"
    if dm_name := read_attr(class_block / name / "dm" / "name"):
        kind = f" (device-mapper {printable(dm_name)})"
    elif level := read_attr(class_block / name / "md" / "level"):
        kind = f" (md {printable(level)})"
    else:
        kind = ""
    return f"is stacked on {printable(stack.lower)}{kind}"
