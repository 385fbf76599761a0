"""What a host hangs below its PCI devices, added to a SimKernel root for the holder reader.

SimKernel simulates PCI binding; this adds what the host *uses* devices for, laid out
as the kernel lays it out, so `vfio_libvirt.holders` reads it with its ordinary calls:

- block devices below a device (`<bdf>/nvme/nvme0/nvme0n1/nvme0n1p1`,
  `<bdf>/virtio2/block/vda`, `<bdf>/host0/target0:0:0/0:0:0:0/block/sda`), each with
  `dev` and `uevent`, linked from `/sys/class/block/<name>` and `/sys/dev/block/<maj:min>`
  by relative links as the kernel's are; dm/md devices stacked on them through
  `holders/`; mounts in `/proc/1/mountinfo` (escaped as the kernel escapes them) and
  swap in `/proc/swaps`;
- network interfaces (`<bdf>/net/<if>`, `<bdf>/virtio0/net/<if>`), virtual masters and
  VLANs with `master`/`upper_*` links, and the JSON that `ip` prints, served by a small
  fake `ip` script (like SimKernel's fake modprobe) that also logs its calls;
- DRM cards and render nodes, framebuffers and the vtconsoles fbcon binds, `boot_vga`;
- SR-IOV: VFs as devices of their own, `virtfnN`/`physfn` links, `sriov_numvfs`;
- processes: `/proc/<pid>/{comm,fd/N,maps,ns/mnt}`, kernel threads (empty maps), and
  mounts that exist only in another mount namespace (`/proc/<pid>/mountinfo`);
- what else the kernel shows of block devices: partitions of stacked disks, NVMe
  multipath heads, loop devices and their backing files, btrfs members under
  `/sys/fs/btrfs`, `/dev` nodes and symlinks, and device nodes the kernel calls busy.

There is no /dev unless a test makes one (`dev_node`).  A node made `busy=True` is one
the kernel has claimed: `open_node`, patched over `holders_claim.open_node`, answers
EBUSY for it as the kernel answers an exclusive open, and opens every other path for real.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from tests.support.simkernel import SimKernel

VIRTIO_NET = "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00"
NVME = "pci:v0000144Dd0000A808sv0000144Dsd0000A801bc01sc08i02"
IGB_VF = "pci:v00008086d000010CAsv00008086sd00000000bc02sc00i00"

MAJOR = {"nvme": 259, "sd": 8, "vd": 252, "dm": 253, "md": 9, "nvme-char": 240, "drm": 226,
         "fb": 29, "loop": 7}
HOST_MNT_NS = "mnt:[4026531841]"


def _link(link: Path, target: Path) -> None:
    """A relative symlink, as sysfs makes them (`../../devices/…`)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, link.parent), link)


def escape(path: str) -> str:
    """How mountinfo and /proc/swaps print a path (seq_file's octal escapes)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def maps_line(path: str, start: int = 0x7F0000000000) -> str:
    return f"{start:x}-{start + 0x1000:x} rw-s 00000000 00:15 4242                       {path}"


def resource_path(bdf: str, n: int = 0) -> str:
    """Where a process's maps show a mapped BAR (the device's real sysfs path)."""
    return f"/sys/devices/pci0000:00/0000:00:01.0/{bdf}/resource{n}"


class SimHost:
    def __init__(self, kernel: SimKernel) -> None:
        self.kernel = kernel
        self.root = kernel.root
        self.sys = kernel.sys
        self.proc = kernel.root / "proc"
        self.ip_dir = kernel.root / "sim-ip"
        self.ip_dir.mkdir(exist_ok=True)
        self._minors: dict[int, int] = {}
        self._ifindex = 1
        self._ip: dict[str, list[dict]] = {"addr": [], "route": [], "route6": []}
        self._write_ip()
        (self.proc / "1" / "ns").mkdir(parents=True, exist_ok=True)
        os.symlink(HOST_MNT_NS, self.proc / "1" / "ns" / "mnt")
        self.mountinfo = self.proc / "1" / "mountinfo"
        self.mountinfo.write_text(
            "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
            "23 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n")
        (self.proc / "swaps").write_text("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
        self._mount_id = 100
        self.busy: set[str] = set()

    def device(self, bdf: str) -> Path:
        return self.kernel.devices / bdf

    # --- device nodes ----------------------------------------------------------------
    def node(self, cls: str, directory: Path, name: str, *, major: int, block: bool,
             devname: str | None = None, extra: str = "") -> str:
        """A class device with a /dev node: `dev`, `uevent`, class and dev links; its maj:min."""
        minor = self._minors.get(major, 0)
        self._minors[major] = minor + 1
        majmin = f"{major}:{minor}"
        directory.mkdir(parents=True)
        (directory / "dev").write_text(majmin + "\n")
        (directory / "uevent").write_text(
            f"MAJOR={major}\nMINOR={minor}\nDEVNAME={devname or name}\n{extra}")
        _link(self.sys / "class" / cls / name, directory)
        _link(self.sys / "dev" / ("block" if block else "char") / majmin, directory)
        return majmin

    def block(self, directory: Path, name: str, *, major: int, partition: int | None = None) -> str:
        devtype = "disk" if partition is None else "partition"
        majmin = self.node("block", directory, name, major=major, block=True,
                           extra=f"DEVTYPE={devtype}\n")
        (directory / "holders").mkdir()
        if partition is not None:
            (directory / "partition").write_text(f"{partition}\n")
        return majmin

    def _disk(self, directory: Path, disk: str, partitions: tuple[str, ...], major: int) -> Path:
        self.block(directory, disk, major=major)
        for number, part in enumerate(partitions, 1):
            self.block(directory / part, part, major=major, partition=number)
        return directory

    def nvme(self, bdf: str, ctrl: str = "nvme0", namespace: str = "nvme0n1",
             partitions: tuple[str, ...] = ()) -> Path:
        """`<bdf>/nvme/nvme0` (char /dev/nvme0) with namespace `nvme0n1` and its partitions."""
        ctrl_dir = self.device(bdf) / "nvme" / ctrl
        self.node("nvme", ctrl_dir, ctrl, major=MAJOR["nvme-char"], block=False)
        return self._disk(ctrl_dir / namespace, namespace, partitions, MAJOR["nvme"])

    def virtio_blk(self, bdf: str, virtio: str = "virtio2", disk: str = "vda",
                   partitions: tuple[str, ...] = ()) -> Path:
        return self._disk(self.device(bdf) / virtio / "block" / disk, disk, partitions, MAJOR["vd"])

    def scsi_disk(self, bdf: str, disk: str = "sda", partitions: tuple[str, ...] = (),
                  host: int = 0) -> Path:
        """A disk behind an HBA: `<bdf>/host0/target0:0:0/0:0:0:0/block/sda`."""
        directory = (self.device(bdf) / f"host{host}" / f"target{host}:0:0" / f"{host}:0:0:0"
                     / "block" / disk)
        return self._disk(directory, disk, partitions, MAJOR["sd"])

    def stack(self, name: str, on: list[str], *, dm_name: str | None = None,
              md_level: str | None = None) -> Path:
        """A dm or md device on the block devices `on`, linked through their `holders/`."""
        directory = self.sys / "devices" / "virtual" / "block" / name
        self.block(directory, name, major=MAJOR["dm" if dm_name else "md"])
        if dm_name:
            (directory / "dm").mkdir()
            (directory / "dm" / "name").write_text(dm_name + "\n")
        if md_level:
            (directory / "md").mkdir()
            (directory / "md" / "level").write_text(md_level + "\n")
        for lower in on:
            lower_dir = (self.sys / "class" / "block" / lower).resolve()
            _link(lower_dir / "holders" / name, directory)
            _link(directory / "slaves" / lower, lower_dir)
        return directory

    def partition(self, disk: str, part: str, number: int = 1) -> str:
        """A partition of any block device (`md126p2` under md126), as a child directory."""
        disk_dir = (self.sys / "class" / "block" / disk).resolve()
        return self.block(disk_dir / part, part, major=259, partition=number)  # blkext

    def nvme_multipath(self, bdf: str, ctrl: str = "nvme0", subsys: str = "nvme-subsys0",
                       head: str = "nvme0n1", partitions: tuple[str, ...] = ()) -> Path:
        """Native NVMe multipath: the hidden path disk `nvme0c0n1` under the controller, the
        head `nvme0n1` (with its partitions) under the virtual subsystem, `multipath/` links."""
        ctrl_dir = self.device(bdf) / "nvme" / ctrl
        self.node("nvme", ctrl_dir, ctrl, major=MAJOR["nvme-char"], block=False)
        path_dev = f"{ctrl}c0{head.removeprefix(ctrl)}"
        self.block(ctrl_dir / path_dev, path_dev, major=MAJOR["nvme"])
        head_dir = self.sys / "devices" / "virtual" / "nvme-subsystem" / subsys / head
        self._disk(head_dir, head, partitions, MAJOR["nvme"])
        _link(head_dir / "multipath" / path_dev, ctrl_dir / path_dev)
        return head_dir

    def loop(self, name: str, backing_file: str | None) -> Path:
        """`/sys/devices/virtual/block/loopN`, with `loop/backing_file` while it is bound."""
        directory = self.sys / "devices" / "virtual" / "block" / name
        self.block(directory, name, major=MAJOR["loop"])
        if backing_file is not None:
            (directory / "loop").mkdir()
            (directory / "loop" / "backing_file").write_text(backing_file + "\n")
        return directory

    def btrfs(self, fsid: str, members: list[str]) -> None:
        """`/sys/fs/btrfs/<fsid>/devices/<name>`: the members of a mounted btrfs."""
        for member in members:
            _link(self.sys / "fs" / "btrfs" / fsid / "devices" / member,
                  (self.sys / "class" / "block" / member).resolve())

    def majmin(self, name: str) -> str:
        return (self.sys / "class" / "block" / name / "dev").read_text().strip()

    def mount(self, device: str | None, mountpoint: str, *, fstype: str = "ext4",
              majmin: str | None = None, source: str | None = None, options: str = "rw",
              pid: int = 1) -> None:
        """A mountinfo line for `device` (a block name) at `mountpoint`; btrfs-like mounts
        pass their anonymous `majmin` and the `source` device path, an overlay its super
        `options`.  `pid` other than 1: in that process's mountinfo (its mount namespace)."""
        majmin = majmin or self.majmin(device or "")
        source = source or f"/dev/{device}"
        self._mount_id += 1
        with (self.proc / str(pid) / "mountinfo").open("a") as out:
            out.write(f"{self._mount_id} 1 {majmin} / {escape(mountpoint)} rw,relatime shared:1 - "
                      f"{fstype} {escape(source)} {options}\n")

    # --- /dev ----------------------------------------------------------------------------
    def dev_node(self, name: str, *, busy: bool = False) -> Path:
        """`<root>/dev/<name>` (a plain file: the simulation has no real nodes); a busy one
        is claimed by the kernel (mounted, in a pool or array) as far as `open_node` says."""
        node = self.root / "dev" / name
        node.parent.mkdir(parents=True, exist_ok=True)
        node.touch()
        if busy:
            self.busy.add(str(node))
        return node

    def dev_link(self, path: str, target: str) -> None:
        """A udev symlink, e.g. `/dev/disk/by-uuid/…` → `../../nvme0n1p2`."""
        link = self.root / path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)

    def open_node(self, path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        """`os.open`, except that a busy node answers an exclusive open as the kernel does."""
        if str(path) in self.busy and flags & os.O_EXCL:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        return os.open(path, flags, mode)

    def swap(self, path: str, kind: str = "partition") -> None:
        with (self.proc / "swaps").open("a") as out:
            out.write(f"{escape(path)}\t\t\t\t{kind}\t\t8388604\t\t0\t\t-2\n")

    # --- network -----------------------------------------------------------------------
    def netdev(self, bdf: str, ifname: str, *, under: str = "") -> Path:
        """`<bdf>/net/<if>`, or `<bdf>/<under>/net/<if>` (virtio: under="virtio0")."""
        base = self.device(bdf) / under if under else self.device(bdf)
        return self._netdev(base / "net" / ifname, ifname, "")

    def virtual_netdev(self, ifname: str, kind: str) -> Path:
        """A bridge, bond, team or vlan interface under /sys/devices/virtual/net."""
        directory = self._netdev(self.sys / "devices" / "virtual" / "net" / ifname, ifname,
                                 f"DEVTYPE={kind}\n" if kind in ("bridge", "bond", "vlan") else "")
        if kind in ("bridge", "bond"):
            (directory / ("bridge" if kind == "bridge" else "bonding")).mkdir()
        return directory

    def _netdev(self, directory: Path, ifname: str, extra: str) -> Path:
        directory.mkdir(parents=True)
        (directory / "uevent").write_text(f"INTERFACE={ifname}\nIFINDEX={self._ifindex}\n{extra}")
        self._ifindex += 1
        _link(self.sys / "class" / "net" / ifname, directory)
        return directory

    def enslave(self, ifname: str, master: str) -> None:
        net = self.sys / "class" / "net"
        lower, upper = (net / ifname).resolve(), (net / master).resolve()
        _link(lower / "master", upper)
        _link(lower / f"upper_{master}", upper)
        _link(upper / f"lower_{ifname}", lower)

    def vlan_on(self, ifname: str, vlan: str) -> None:
        self.virtual_netdev(vlan, "vlan")
        net = self.sys / "class" / "net"
        lower, upper = (net / ifname).resolve(), (net / vlan).resolve()
        _link(lower / f"upper_{vlan}", upper)
        _link(upper / f"lower_{ifname}", lower)

    def ip_link(self, ifname: str, *, up: bool = True, addrs: tuple[str, ...] = (),
                master: str | None = None, kind: str | None = None) -> None:
        """What `ip -j -d addr show` says of `ifname`; addrs as "192.0.2.5/24" (fe80:: is link scope)."""
        info: list[dict] = []
        for addr in addrs:
            local, prefix = addr.split("/")
            scope = "link" if local.startswith("fe80:") else "global"
            info.append({"family": "inet6" if ":" in local else "inet", "local": local,
                         "prefixlen": int(prefix), "scope": scope})
        entry: dict = {"ifindex": len(self._ip["addr"]) + 1, "ifname": ifname,
                       "flags": ["BROADCAST", "MULTICAST", *(["UP", "LOWER_UP"] if up else [])],
                       "operstate": "UP" if up else "DOWN", "addr_info": info}
        if master:
            entry["master"] = master
        if kind:
            entry["linkinfo"] = {"info_kind": kind}
        self._ip["addr"].append(entry)
        self._write_ip()

    def ip_route(self, dev: str, gateway: str | None, *, dst: str = "default",
                 ipv6: bool = False, table: str | None = None, kind: str | None = None) -> None:
        """A route in `ip -j route show` (or `-6`, for an IPv6 gateway or ipv6=True); one
        in another `table` (or of a `kind` such as "local") only with `table all`, as ip
        prints them: without "table" for main, with "type" only when not unicast."""
        family = "route6" if ipv6 or (gateway and ":" in gateway) else "route"
        route: dict = {"type": kind} if kind else {}
        route |= {"dst": dst, "dev": dev, "flags": []}
        if gateway:
            route["gateway"] = gateway
        if table:
            route["table"] = table
        self._ip[family].append(route)
        self._write_ip()

    def ip_fail(self, message: str = "Cannot open netlink socket: Permission denied") -> None:
        (self.ip_dir / "fail").write_text(message + "\n")

    def ip_garbage(self, text: str = "not json {") -> None:
        (self.ip_dir / "addr.json").write_text(text)

    def _write_ip(self) -> None:
        for name, entries in self._ip.items():
            (self.ip_dir / f"{name}.json").write_text(json.dumps(entries))
            if name.startswith("route"):  # what `ip route show` (the main table) prints
                main = [r for r in entries if "table" not in r and "type" not in r]
                (self.ip_dir / f"{name}-main.json").write_text(json.dumps(main))
        both = self._ip["route"] + self._ip["route6"]
        (self.ip_dir / "route-both.json").write_text(json.dumps(both))

    def ip_command(self) -> tuple[str, ...]:
        """A fake `ip` printing the JSON above (a failure if `ip_fail` was called); like
        iproute2 6.1, `route show table all` without `-4` lists IPv6 routes too."""
        script = self.root / "fake-ip"
        d = self.ip_dir
        script.write_text(
            "#!/bin/sh\n"
            f"echo \"$*\" >> '{d}/calls'\n"
            f"if [ -f '{d}/fail' ]; then cat '{d}/fail' >&2; exit 1; fi\n"
            "case \" $* \" in\n"
            f"  *' addr '*) exec cat '{d}/addr.json' ;;\n"
            f"  *' -6 '*' table all '*) exec cat '{d}/route6.json' ;;\n"
            f"  *' -6 '*) exec cat '{d}/route6-main.json' ;;\n"
            f"  *' -4 '*' table all '*) exec cat '{d}/route.json' ;;\n"
            f"  *' table all '*) exec cat '{d}/route-both.json' ;;\n"  # no family: both
            f"  *) exec cat '{d}/route-main.json' ;;\n"
            "esac\n")
        script.chmod(0o755)
        return (str(script),)

    def ip_calls(self) -> list[str]:
        calls = self.ip_dir / "calls"
        return sorted(calls.read_text().splitlines()) if calls.exists() else []

    # --- display -------------------------------------------------------------------------
    def drm(self, bdf: str, card: str = "card0", render: str | None = "renderD128") -> None:
        drm = self.device(bdf) / "drm"
        self.node("drm", drm / card, card, major=MAJOR["drm"], block=False, devname=f"dri/{card}")
        if render:
            self.node("drm", drm / render, render, major=MAJOR["drm"], block=False,
                      devname=f"dri/{render}")

    def framebuffer(self, bdf: str, fb: str = "fb0") -> None:
        directory = self.device(bdf) / "graphics" / fb
        self.node("graphics", directory, fb, major=MAJOR["fb"], block=False)
        _link(directory / "device", self.device(bdf))

    def firmware_framebuffer(self, fb: str = "fb0", kind: str = "efi-framebuffer") -> Path:
        """A framebuffer the firmware set up (efifb, vesafb, simplefb): a platform device."""
        platform = self.sys / "devices" / "platform" / f"{kind}.0"
        self.node("graphics", platform / "graphics" / fb, fb, major=MAJOR["fb"], block=False)
        _link(platform / "graphics" / fb / "device", platform)
        return platform

    def vtconsoles(self, fbcon_bind: str = "1") -> None:
        """vtcon0 the dummy console (unbound), vtcon1 fbcon with `bind` = fbcon_bind."""
        for n, (name, bind) in enumerate((("(S) dummy device", "0"),
                                          ("(M) frame buffer device", fbcon_bind))):
            directory = self.sys / "devices" / "virtual" / "vtconsole" / f"vtcon{n}"
            directory.mkdir(parents=True)
            (directory / "name").write_text(name + "\n")
            (directory / "bind").write_text(bind + "\n")
            _link(self.sys / "class" / "vtconsole" / f"vtcon{n}", directory)

    def boot_vga(self, bdf: str, value: str = "1") -> None:
        (self.device(bdf) / "boot_vga").write_text(value + "\n")

    # --- SR-IOV --------------------------------------------------------------------------
    def sriov(self, pf: str, vfs: list[str], *, first_group: int, driver: str | None = None) -> None:
        """Enable VFs on `pf`: each a device of its own (own IOMMU group), linked both ways."""
        for n, vf in enumerate(vfs):
            self.kernel.add_device(vf, IGB_VF, group=str(first_group + n), driver=driver)
            _link(self.device(pf) / f"virtfn{n}", self.device(vf))
            _link(self.device(vf) / "physfn", self.device(pf))
        (self.device(pf) / "sriov_totalvfs").write_text("7\n")
        (self.device(pf) / "sriov_numvfs").write_text(f"{len(vfs)}\n")

    # --- processes -------------------------------------------------------------------------
    def process(self, pid: int, comm: str, *, fds: tuple[str, ...] = (),
                maps: tuple[str, ...] = ("/usr/bin/true",), kernel_thread: bool = False,
                mnt_ns: str = HOST_MNT_NS) -> Path:
        """/proc/<pid> with `fds` (link targets, e.g. "/dev/dri/card0", "socket:[1]"), a maps
        file naming `maps` (empty for a kernel thread), and its mount namespace's `ns/mnt`."""
        directory = self.proc / str(pid)
        (directory / "fd").mkdir(parents=True)
        (directory / "ns").mkdir()
        os.symlink(mnt_ns, directory / "ns" / "mnt")
        (directory / "comm").write_text(comm + "\n")
        for n, target in enumerate(fds):
            os.symlink(target, directory / "fd" / str(n))
        lines = [] if kernel_thread else [maps_line(p, 0x7F0000000000 + i * 0x10000)
                                          for i, p in enumerate(maps)]
        (directory / "maps").write_text("".join(line + "\n" for line in lines))
        return directory


def read_holders(host: SimHost, bdf: str, reader=None):
    """What a (fresh, unless given) HolderReader finds for `bdf` on the simulated host."""
    from vfio_libvirt.holders import HolderReader
    from vfio_libvirt.pci import PciAddress

    reader = reader or HolderReader(host.root, host.ip_command())
    return reader.read(PciAddress.parse(bdf))


def holder_lines(found) -> list[tuple[str, str, str]]:
    """(severity, kind, sentence) of each holder, for exact comparisons."""
    return [(h.severity, h.kind, str(h)) for h in found.holders]
