"""The claim probe: ask the kernel itself whether a block device is in use.

Mountinfo, swaps and `holders/` name most users of a disk, but not all: a ZFS pool's
mountinfo lines name datasets (`rpool/ROOT/pve-1`), not disks; bcache, a btrfs whose
sysfs entry is missing, an md array assembled from a whole disk, or anything this
reader does not know claim a device just as firmly.  Every one of them claims the block
device exclusively, and an exclusive open (`O_EXCL` without `O_CREAT`, on a block
device) fails with EBUSY while such a claim holds — whatever the claimant is.  A
claimed partition also makes its whole disk busy.

So for each block device of a PCI device, `<root>/dev/<name>` is opened read-only,
exclusively, non-blocking, and closed at once: nothing is written and no uevent
follows a read-only close.  (The claim lasts microseconds; something claiming the
device in that instant — a mount at boot — would see EBUSY itself, which a VM start
does not race with.)  EBUSY that no holder explains — a mount, swap or stack on the
device, or on one of its partitions — is a critical "unknown": the host uses the device
and the reader cannot say for what.  Only a block device node (or, in the simulated
tree, a plain file) is opened: never a character device, whose open can have effects
(a watchdog starts on open), and never through a symlink.  Without the node (no /dev,
as in the simulated tree unless a test makes one) the probe is skipped.  EACCES (not
root) is said as an in-use unknown, like processes that cannot be inspected; any other
error comes after the claim check in the kernel's open path (no medium, device gone),
so it means "not claimed".
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from vfio_libvirt.holders_block import Blocks
from vfio_libvirt.holders_scan import printable

if TYPE_CHECKING:
    from vfio_libvirt.holders import Holder

PROBE_FLAGS = os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
open_node = os.open
"""The one open of a device node; the simulated host replaces it (`SimHost.open_node`)
to make a node busy, as no unprivileged test can claim a real block device."""


def probe(node: Path, majmin: str) -> str | None:
    """"free", "busy", "denied", or None when not probed: no node, not a block device,
    or a block device with another major:minor than ours."""
    try:
        st = os.lstat(node)
    except (OSError, ValueError):
        return None
    if stat.S_ISBLK(st.st_mode):
        if not majmin or f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" != majmin:
            return None
    elif not stat.S_ISREG(st.st_mode):
        return None
    try:
        fd = open_node(node, PROBE_FLAGS)
    except OSError as err:
        if err.errno == errno.EBUSY:
            return "busy"
        return "denied" if err.errno in (errno.EACCES, errno.EPERM) else "free"
    os.close(fd)
    return "free"


def probe_all(root: Path, blocks: Blocks) -> dict[str, str | None]:
    """Each of the device's block devices → what `probe` says of `<root>/dev/<name>`."""
    return {name: probe(root / "dev" / name, blocks.majmin.get(name, ""))
            if name and "/" not in name else None for name in blocks.names()}


def unexplained(blocks: Blocks, answers: dict[str, str | None], explained: set[str]) -> list[str]:
    """Devices that may be in use for all the reader can tell — claimed or not probed —
    with no holder on them or on a partition of theirs to say so (a claimed partition
    makes its disk busy too, and is said itself)."""
    def covered(name: str) -> bool:
        return name in explained or any(
            disk == name and (part in explained or answers.get(part) == "busy")
            for part, disk in blocks.parent.items())

    return [name for name in blocks.names() if answers.get(name) != "free" and not covered(name)]


def claim_holders(blocks: Blocks, answers: dict[str, str | None], explained: set[str],
                  unnamed: str) -> list[Holder]:
    """A critical "unknown" for each claimed block device whose claim `explained` (the
    names a mount, swap or stack holder is on) does not account for; `unnamed` adds
    what the host mounts without naming a device (`; / is mounted from rpool/…`)."""
    from vfio_libvirt.holders import Holder

    holders = [Holder("unknown", printable(blocks.label(name)), "is claimed by the kernel (a mount, "
                      f"pool or array this reader cannot name{unnamed})", "critical")
               for name in unexplained(blocks, answers, explained) if answers[name] == "busy"]
    if denied := [name for name, answer in answers.items() if answer == "denied"]:
        holders.append(Holder("unknown", printable(", ".join(denied)), "cannot be probed for kernel "
                              "claims (permission denied; run as root to see all)", "in_use"))
    return holders
