"""What the host uses a PCI device for right now — read before any write touches it.

Unbinding a driver takes a device from the host at once: a mounted NVMe fails every
read with EIO, an interface vanishes with its routes, an SR-IOV PF destroys all its VFs
(design §5).  `HolderReader.read` tells, for one PCI device, everything that would break,
as `Holder`s with a severity the guard acts on:

- critical: the host itself breaks (/, /usr, /var, /etc or /boot mounted, an overlay
  root's layer, active swap, a default route in any routing table, the framebuffer
  console, live VFs) — or the reader could not decide (kind "unknown": mountinfo
  unreadable, a block device the kernel says is claimed by something unnamed), because
  a guard that cannot tell must refuse;
- in_use: something is using it (another mount, also in another mount namespace, an
  address, a bridge or bond, a secondary framebuffer, a process with its nodes open or
  its BARs mapped);
- info: worth saying, changes nothing (an interface that is down, the boot VGA device,
  each VF's driver).

It only reads: sysfs at `root/sys`, procfs at `root/proc`, iproute2's JSON (see
`holders_net`), and the exclusive read-only open of its block devices' nodes under
`root/dev` that asks the kernel whether they are claimed (see `holders_claim`).
Devices below the PCI device are found through `/sys/class/block`, `/sys/class/net`
and `/sys/dev/char`, whose links name each device's full path, so
NVMe namespaces, virtio disks and netdevs one level down, disks behind an HBA or a USB
controller are all found without walking the device's (large) sysfs subtree; anything
below a nested PCI device (behind a bridge) belongs to that device, not this one.
One reader caches everything host-wide, so the devices of one plan pay for it once.
Block devices are found in `holders_block`, their mounts and swap judged in
`holders_mounts`, probed in `holders_claim`; networks are read in `holders_net`, the
console in `holders_display`, what processes hold in `holders_procs`, the other procfs
and small sysfs primitives in `holders_scan`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from vfio_libvirt.errors import InputError
from vfio_libvirt.holders_block import Blocks, find_blocks, multipath_heads, read_loops
from vfio_libvirt.holders_claim import claim_holders, probe_all, unexplained
from vfio_libvirt.holders_display import FB, display_holders, firmware_framebuffers
from vfio_libvirt.holders_mounts import MountFacts, mount_holders
from vfio_libvirt.holders_net import IpState, interface_holders
from vfio_libvirt.holders_procs import ProcessScan
from vfio_libvirt.holders_scan import (
    Mount,
    Swap,
    link_name,
    printable,
    process_name,
    read_attr,
    read_links,
    read_mounts,
    read_namespace_mounts,
    read_swaps,
    reason,
)
from vfio_libvirt.pci import PciAddress
from vfio_libvirt.sysfs import Sysfs

Severity = Literal["critical", "in_use", "info"]
_ORDER = {"critical": 0, "in_use": 1, "info": 2}
_BDF = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


@dataclass(frozen=True)
class Holder:
    kind: str
    """mount | swap | stack | netdev | address | route | link | drm | fbcon | sriov | vf |
    process | unknown"""
    name: str
    """The thing that holds: "nvme0n1p2", "eth0", "1234 (Xorg)", "0000:03:10.0"."""
    detail: str
    """Completes a sentence after the name: "is mounted at / (root filesystem)"."""
    severity: Severity

    def __str__(self) -> str:
        return f"{self.name} {self.detail}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "detail": self.detail,
                "severity": self.severity, "text": str(self)}


@dataclass(frozen=True)
class DeviceHolders:
    address: PciAddress
    holders: tuple[Holder, ...]

    @property
    def critical(self) -> tuple[Holder, ...]:
        return tuple(h for h in self.holders if h.severity == "critical")

    @property
    def in_use(self) -> tuple[Holder, ...]:
        return tuple(h for h in self.holders if h.severity == "in_use")

    @property
    def verdict(self) -> Literal["critical", "in_use", "free"]:
        if self.critical:
            return "critical"
        return "in_use" if self.in_use else "free"

    def to_json(self) -> dict[str, object]:
        return {"address": str(self.address), "verdict": self.verdict,
                "holders": [h.to_json() for h in self.holders]}


class HolderReader:
    """Reads what holds PCI devices; one instance per plan, so host-wide facts are read once."""

    def __init__(self, root: Path, ip: Sequence[str] = ("ip",)) -> None:
        """`root` is `$VFIO_LIBVIRT_SYSFS_ROOT`: sysfs at root/sys, procfs at root/proc,
        device nodes at root/dev."""
        self.root = Path(root)
        self.sysfs = Sysfs(self.root)
        self.sys = self.sysfs.sys
        self.proc = self.sysfs.proc
        self._ip = IpState(ip)

    def read(self, address: PciAddress) -> DeviceHolders:
        """Everything holding `address` now, critical first; InputError if there is no such device."""
        device = self.sysfs.require(address)
        bdf = str(address)
        interfaces = self._below(self._links("class/net"), bdf)
        if interfaces:
            self._ip.start()  # runs while the rest is read
        own = self._below(self._links("class/block"), bdf)
        blocks = self._blocks(own) if own else Blocks({})
        holders = self._block_holders(blocks) if own else []
        chars = self._char_nodes(bdf)
        boot_vga = read_attr(device / "boot_vga") == "1"
        firmware = self._firmware_fbs if boot_vga else {}
        for platform_device, _ in firmware.values():  # its /dev/fbN, simpledrm's card
            chars |= self._char_nodes(platform_device)
        own_fbs = sorted(n for n in chars if FB.fullmatch(n) and n not in firmware)
        fbcon = self._fbcon if own_fbs or firmware else False
        holders += display_holders(bdf, boot_vga, own_fbs, firmware, fbcon)
        holders += self._sriov(device)
        nodes = {f"/dev/{n}" for n in blocks.names()} | set(chars.values())
        holders += self._process_holders(bdf, nodes | self._vfio_nodes(address))
        for ifname in interfaces:
            holders += interface_holders(ifname, self.sys / "class" / "net", self._ip)
        unique = list(dict.fromkeys(holders))
        return DeviceHolders(address, tuple(sorted(unique, key=lambda h: _ORDER[h.severity])))

    # --- host-wide, cached ---------------------------------------------------------
    def _links(self, where: str) -> dict[str, str]:
        """`sys/<where>` entry → its link target, e.g. class/block: nvme0n1 → ../../devices/…"""
        if where not in self._link_cache:
            self._link_cache[where] = read_links(self.sys / where)
        return self._link_cache[where]

    @cached_property
    def _link_cache(self) -> dict[str, dict[str, str]]:
        return {}

    @cached_property
    def _mounts(self) -> tuple[list[Mount], str | None]:
        return read_mounts(self.proc)

    @cached_property
    def _swaps(self) -> tuple[list[Swap], str | None]:
        return read_swaps(self.proc)

    @cached_property
    def _processes(self) -> ProcessScan:
        return ProcessScan(self.proc)

    @cached_property
    def _multipath_heads(self) -> dict[str, list[str]]:
        return multipath_heads(self.sys / "class" / "block", self._links("class/block"))

    @cached_property
    def _loops(self) -> dict[str, str]:
        return read_loops(self.sys / "class" / "block", self._links("class/block"))

    @cached_property
    def _mount_facts(self) -> MountFacts:
        return MountFacts(self.root, self.sys, self._mounts)

    @cached_property
    def _namespace_mounts(self) -> list[tuple[str, list[Mount]]]:
        """(`pid (comm)`, its mounts) for each mount namespace other than the host's
        (pid 1's, else our own), one process each."""
        host = None
        if not self._mounts[1]:
            for pid in ("1", "self"):
                try:
                    host = os.readlink(self.proc / pid / "ns" / "mnt")
                    break
                except OSError:
                    continue
        found = read_namespace_mounts(self.proc, self._processes.namespaces(), host)
        return [(process_name(self.proc, pid) or str(pid), mounts) for pid, mounts in found]

    @cached_property
    def _firmware_fbs(self) -> dict[str, tuple[str, str]]:
        return firmware_framebuffers(self.sys, self._links("class/graphics"))

    @cached_property
    def _fbcon(self) -> bool | str:
        """Whether fbcon is bound to the consoles; a string says why we cannot tell."""
        root = self.sys / "class" / "vtconsole"
        try:
            consoles = sorted(os.listdir(root))
        except OSError:
            consoles = []  # no virtual terminals at all
        for name in consoles:
            try:
                label = (root / name / "name").read_text(errors="replace")
                bound = (root / name / "bind").read_text(errors="replace").strip()
            except OSError as err:
                return f"{name} unreadable ({reason(err)})"
            if "frame buffer" in label:
                if bound not in ("0", "1"):
                    return f"{name}/bind reads {printable(bound)[:20]!r}"
                if bound == "1":
                    return True
        return False

    def _below(self, links: dict[str, str], bdf: str) -> list[str]:
        """Entries whose device lies below the device `bdf` (a PCI address, or a platform
        device's name), not below a nested PCI device."""
        marker = f"/{bdf}/"
        found = []
        for name, target in links.items():
            at = target.find(marker)
            if at >= 0 and not any(_BDF.fullmatch(p) for p in target[at + len(marker):].split("/")):
                found.append(name)
        return sorted(found)

    # --- block devices ----------------------------------------------------------------
    def _blocks(self, own: list[str]) -> Blocks:
        class_block = self.sys / "class" / "block"
        return find_blocks(class_block, self._links("class/block"), own, heads=self._multipath_heads,
                           loops=self._loops, on=self._mount_facts.on)

    def _block_holders(self, blocks: Blocks) -> list[Holder]:
        """Stacks, mounts, swap, and kernel claims that none of them explains.

        Other mount namespaces are read only when the host's own holders leave some
        device claimed or unprobed: a mount claims its device, so a device the probe
        finds free is mounted nowhere, and one a host mount explains needs no more.
        This spares the readlink of every process's `ns/mnt` for most devices."""
        facts, class_block = self._mount_facts, self.sys / "class" / "block"
        holders, explained = mount_holders(class_block, blocks, facts, [], self._swaps)
        answers = probe_all(self.root, blocks)
        if unexplained(blocks, answers, explained) and self._namespace_mounts:
            holders, explained = mount_holders(class_block, blocks, facts, self._namespace_mounts,
                                               self._swaps)
        return holders + claim_holders(blocks, answers, explained, facts.unnamed_system_mounts)

    # --- character devices ---------------------------------------------------------
    def _char_nodes(self, bdf: str) -> dict[str, str]:
        """Kernel name → /dev path of each char device below the device (DEVNAME in its
        uevent says where udev puts it: dri/card0, snd/controlC0)."""
        nodes = {}
        for majmin in self._below(self._links("dev/char"), bdf):
            path = self.sys / "dev" / "char" / majmin
            name = self._links("dev/char")[majmin].rsplit("/", 1)[-1]
            devname = name
            for line in (read_attr(path / "uevent") or "").splitlines():
                if line.startswith("DEVNAME="):
                    devname = line.removeprefix("DEVNAME=").strip() or name
            if ".." not in devname.split("/"):
                nodes[name] = f"/dev/{devname}"
        return nodes

    # --- SR-IOV ----------------------------------------------------------------------
    def _sriov(self, device: Path) -> list[Holder]:
        """Live VFs die with the PF's driver (and are not recreated when it returns); each
        VF is named with its driver and holders so the admin sees whose VM would lose it.
        The count is the larger of `sriov_numvfs` and the `virtfn*` links, so a garbled
        attribute cannot hide VFs that exist."""
        vfs = []
        try:
            entries = [e for e in os.listdir(device) if re.fullmatch(r"virtfn[0-9]+", e)]
        except OSError:
            entries = []
        for entry in sorted(entries, key=lambda e: int(e[6:])):
            try:
                vfs.append(os.readlink(device / entry).rsplit("/", 1)[-1])
            except OSError:
                continue
        numvfs = read_attr(device / "sriov_numvfs") or ""
        count = max(len(vfs), int(numvfs) if numvfs.isascii() and numvfs.isdecimal() else 0)
        if not count:
            return []
        them = "it" if count == 1 else "them all"
        holders = [Holder("sriov", device.name, f"has {count} SR-IOV VF{'s' * (count != 1)}; "
                          f"unbinding its driver destroys {them}", "critical")]
        for vf in vfs:
            holders.append(Holder("vf", printable(vf), self._vf_detail(vf), "info"))
        return holders

    def _vf_detail(self, vf: str) -> str:
        try:
            address = PciAddress.parse(vf)
        except InputError:
            return "(VF) is not a PCI address"
        driver = link_name(self.sysfs.device_dir(address) / "driver")
        text = f"(VF) is on {driver}" if driver else "(VF) has no driver"
        nodes = self._vfio_nodes(address) | set(self._char_nodes(vf).values())
        users = sorted({n for pids in self._pids_with(nodes).values() for n in pids})
        users += [n for n in self._mappers(vf) if n not in users]
        return text + (f", held by {', '.join(users)}" if users else "")

    # --- processes -------------------------------------------------------------------
    def _vfio_nodes(self, address: PciAddress) -> set[str]:
        """The VFIO cdev (`/dev/vfio/devices/vfio0`) and group (`/dev/vfio/12`, `noiommu-12`)
        through which a process can hold the device — the group only while it exists
        (`/sys/class/vfio/<group>`: some member is on a VFIO driver), so a device without
        VFIO does not make the reader look through every process's files for nothing."""
        device = self.sysfs.device_dir(address)
        try:
            nodes = {f"/dev/vfio/devices/{e}" for e in os.listdir(device / "vfio-dev")}
        except OSError:
            nodes = set()
        if (group := link_name(device / "iommu_group")) and group.isascii() and group.isdecimal():
            for name in (group, f"noiommu-{group}"):
                if nodes or os.path.lexists(self.sys / "class" / "vfio" / name):
                    nodes.add(f"/dev/vfio/{name}")
        return nodes

    def _pids_with(self, nodes: set[str]) -> dict[str, list[str]]:
        """/dev path → `pid (comm)` of each live process that has it open."""
        found: dict[str, list[str]] = {}
        if not nodes:
            return found
        index = self._processes.nodes()
        for node in sorted(nodes):
            names = [process_name(self.proc, pid) for pid in sorted(index.get(node, ()))]
            if names := [n for n in names if n]:
                found[node] = names
        return found

    def _mappers(self, bdf: str) -> dict[str, list[str]]:
        """`pid (comm)` → resource files of `bdf` it has mapped."""
        found = {}
        for pid, files in sorted(self._processes.resources().get(bdf, {}).items()):
            if name := process_name(self.proc, pid):
                found[name] = sorted(files)
        return found

    def _process_holders(self, bdf: str, nodes: set[str]) -> list[Holder]:
        scan = self._processes
        by_process: dict[str, list[str]] = {}
        for node, names in self._pids_with(nodes).items():
            for name in names:
                by_process.setdefault(name, []).append(node)
        holders = [Holder("process", name, f"has {', '.join(map(printable, sorted(held)))} open",
                          "in_use") for name, held in by_process.items()]
        holders += [Holder("process", name, f"maps {', '.join(files)}", "in_use")
                    for name, files in self._mappers(bdf).items()]
        if scan.error:
            return [Holder("unknown", "processes", f"cannot be checked: {scan.error}", "critical")]
        if denied := len(scan.denied):
            what = "1 process" if denied == 1 else f"{denied} processes"
            holders.append(Holder("unknown", what, "could not be inspected (permission denied; "
                                  "run as root to see all)", "in_use"))
        return holders
