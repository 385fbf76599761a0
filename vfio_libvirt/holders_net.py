"""What the host's network uses an interface for: routes, addresses, bridges and bonds.

The facts come from iproute2's JSON output (`ip -j -d addr show`, `ip -j -4 route show
table all`, `ip -j -6 route show table all`), not from pyroute2 or netlink of our own: the dependency list
is fixed (libvirt-python, lxml, tenacity) and iproute2 is on every Debian host.  The
three commands run once per reader, in parallel, and only when a device has network
interfaces at all.  Which interface sits on top of which (bridge, bond, team, VLAN)
comes from sysfs (`master`, `upper_*`), with `ip -d`'s link kind to name it.

A default route in any table is the host's: policy routing (`ip rule … table 100`) and
VRFs send traffic through tables other than main, so every table is read; routes that
carry nothing out through an interface (local, broadcast, multicast, anycast, and the
unreachable/prohibit/blackhole/throw kinds) are skipped.

An interface whose default route we cannot rule out — `ip` missing, failing, or
printing something that is not its JSON — is reported as a critical "unknown": a
guard that cannot tell must refuse.  JSON of an unexpected shape inside (a list where
a string belongs) is skipped field by field, never trusted and never a crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vfio_libvirt.holders_scan import printable

if TYPE_CHECKING:
    from vfio_libvirt.holders import Holder

IP_TIMEOUT = 10.0
"""Seconds for all three `ip` calls together; `ip` answers in milliseconds."""
_COMMANDS = (("-j", "-d", "addr", "show"), ("-j", "-4", "route", "show", "table", "all"),
             ("-j", "-6", "route", "show", "table", "all"))
"""`-4` is needed: without a family, `table all` lists IPv6 routes too (iproute2 only
defaults to IPv4 while a table filter is set)."""
_DEFAULT = {"default", "0.0.0.0/0", "::/0"}
_NOT_OUT = {"local", "broadcast", "multicast", "anycast", "unreachable", "prohibit", "blackhole",
            "throw", "nat"}
_MAIN = {"main", "254"}
_MAX_DEPTH = 8


@dataclass(frozen=True)
class IpFacts:
    links: dict[str, dict[str, Any]]
    """ifname → its `ip -j -d addr show` object."""
    defaults: dict[str, list[tuple[str, str | None, str | None]]]
    """ifname → default routes through it: (family "", "IPv6 ", gateway or None, table
    or None for main)."""


class IpState:
    """The three `ip` answers, fetched on first use and kept."""

    def __init__(self, ip: Sequence[str]) -> None:
        self.ip = tuple(ip)
        self._started: list[subprocess.Popen[bytes]] | str | None = None

    def start(self) -> None:
        """Launch the three commands now, so they run while the caller reads sysfs and /proc."""
        if self._started is None:
            self._started = _start_all(self._argvs)

    @property
    def _argvs(self) -> list[list[str]]:
        return [[*self.ip, *args] for args in _COMMANDS]

    @cached_property
    def facts(self) -> IpFacts | str:
        """The parsed answers, or a one-line reason why there are none."""
        self.start()
        assert self._started is not None
        outputs = _collect(self._argvs, self._started)
        if isinstance(outputs, str):
            return outputs
        command = printable(" ".join(self.ip))
        try:
            parsed = [json.loads(out or "[]") for out in outputs]
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than any ip prints
            return f"`{command}` printed something that is not JSON"
        if not all(isinstance(p, list) and all(isinstance(i, dict) for i in p) for p in parsed):
            return f"`{command}` printed JSON of an unexpected shape"
        addrs, routes4, routes6 = parsed
        links = {i["ifname"]: i for i in addrs if isinstance(i.get("ifname"), str)}
        defaults: dict[str, list[tuple[str, str | None, str | None]]] = {}
        for family, routes in (("", routes4), ("IPv6 ", routes6)):
            for route in routes:
                dst, kind, table = route.get("dst"), route.get("type", "unicast"), route.get("table")
                if not (isinstance(dst, str) and dst in _DEFAULT and isinstance(kind, str)
                        and kind not in _NOT_OUT):
                    continue
                table = str(table) if isinstance(table, str | int) and str(table) not in _MAIN else None
                nexthops = route.get("nexthops")
                for hop in nexthops if isinstance(nexthops, list) else [route]:
                    if isinstance(hop, dict) and isinstance(hop.get("dev"), str):
                        gateway = hop.get("gateway") or route.get("gateway")
                        defaults.setdefault(hop["dev"], []).append(
                            (family, gateway if isinstance(gateway, str) else None, table))
        return IpFacts(links, defaults)


def _start_all(argvs: list[list[str]]) -> list[subprocess.Popen[bytes]] | str:
    """Start the commands side by side; the processes, or why they could not start."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for argv in argvs:
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE))
    except OSError as err:
        _kill(procs)
        return f"cannot run `{argvs[0][0]}`: {err.strerror or err}"
    return procs


def _collect(argvs: list[list[str]], procs: list[subprocess.Popen[bytes]] | str) -> list[str] | str:
    """Their stdouts, or why not (a failure, a timeout)."""
    if isinstance(procs, str):
        return procs
    outputs = []
    deadline = time.monotonic() + IP_TIMEOUT
    try:
        for argv, proc in zip(argvs, procs, strict=True):
            command = printable(" ".join(argv))
            try:
                out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return f"`{command}` did not answer within {IP_TIMEOUT:g} s"
            if proc.returncode != 0:
                lines = err.decode(errors="replace").strip().splitlines()
                return (f"`{command}` failed (exit {proc.returncode})"
                        + (f": {printable(lines[0])}" if lines else ""))
            outputs.append(out.decode(errors="replace"))
    finally:
        _kill(procs)
    return outputs


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def interface_holders(ifname: str, class_net: Path, state: IpState) -> list[Holder]:
    """Everything the host's network uses `ifname` for, most serious first."""
    from vfio_libvirt.holders import Holder

    shown = printable(ifname)  # an interface name may hold control characters
    facts = state.facts
    if isinstance(facts, str):
        return [Holder("unknown", shown, f"cannot be checked for routes: {facts}", "critical")]
    link = facts.links.get(ifname)
    if link is None:
        return [Holder("unknown", shown, "cannot be checked for routes: `ip addr` does not list it "
                       "(renamed meanwhile, or in another network namespace?)", "critical")]
    holders = []
    uppers = _uppers(ifname, class_net, facts)
    for name, path in [(ifname, []), *uppers]:
        for family, gateway, table in facts.defaults.get(name, []):
            via = f" via {printable(gateway)}" if gateway else ""
            where = f" (table {printable(table)})" if table else ""
            through = f" (through {', '.join(path)})" if path else ""
            holders.append(Holder("route", shown, f"carries the {family}default route{via}{where}"
                                  f"{through}", "critical"))
    for name, path in uppers:
        if len(path) == 1:  # a direct upper: the master, or a VLAN/macvlan on top
            if name == _master(ifname, class_net, link):
                holders.append(Holder("link", shown, f"is a member of {path[0]}", "in_use"))
            else:
                holders.append(Holder("link", shown, f"is the lower link of {path[0]}", "in_use"))
    flags = link.get("flags") if isinstance(link.get("flags"), list) else []
    info = link.get("addr_info")
    addrs = [a for a in info if isinstance(a, dict)] if isinstance(info, list) else []
    global_addrs = [_address(a) for a in addrs
                    if a.get("scope") in ("global", "site") and isinstance(a.get("local"), str)
                    and a["local"]]
    if "UP" not in flags:
        holders.append(Holder("netdev", shown, "is down", "info"))
    elif global_addrs:
        holders.append(Holder("address", shown, f"is up with {', '.join(global_addrs)}", "in_use"))
    elif addrs:
        holders.append(Holder("netdev", shown, "is up with only link-local addresses", "info"))
    else:
        holders.append(Holder("netdev", shown, "is up without addresses", "info"))
    return holders


def _address(addr: dict[str, Any]) -> str:
    """`192.0.2.5/24`, or the bare address when the prefix length is not a number."""
    prefix = addr.get("prefixlen")
    length = f"/{prefix}" if isinstance(prefix, int) and not isinstance(prefix, bool) else ""
    return printable(addr["local"]) + length


def _uppers(ifname: str, class_net: Path, facts: IpFacts) -> list[tuple[str, list[str]]]:
    """Interfaces stacked on `ifname` (master chain, VLANs), each with the path to it as
    words ("bond bond0", "bridge br0"): a bond's default route is its members' too."""
    found: list[tuple[str, list[str]]] = []
    seen = {ifname}
    frontier: list[tuple[str, list[str]]] = [(ifname, [])]
    while frontier:
        name, path = frontier.pop(0)
        if len(path) >= _MAX_DEPTH:
            continue
        for upper in _direct_uppers(name, class_net, facts.links.get(name, {})):
            if upper not in seen:
                seen.add(upper)
                step = [*path, _describe(upper, class_net, facts)]
                found.append((upper, step))
                frontier.append((upper, step))
    return found


def _direct_uppers(name: str, class_net: Path, link: dict[str, Any]) -> list[str]:
    uppers = []
    if master := _master(name, class_net, link):
        uppers.append(master)
    try:
        entries = sorted(os.listdir(class_net / name))
    except OSError:
        entries = []
    uppers += [e.removeprefix("upper_") for e in entries if e.startswith("upper_")]
    return list(dict.fromkeys(uppers))


def _master(name: str, class_net: Path, link: dict[str, Any]) -> str | None:
    try:
        return os.readlink(class_net / name / "master").rsplit("/", 1)[-1]
    except OSError:
        master = link.get("master")
        return master if isinstance(master, str) else None


def _describe(name: str, class_net: Path, facts: IpFacts) -> str:
    """`bridge br0`, `bond bond0`, `vlan eth0.100`; just the name when no kind is known."""
    info = facts.links.get(name, {}).get("linkinfo")
    kind = info.get("info_kind") if isinstance(info, dict) else None
    if not isinstance(kind, str):
        kind = _sysfs_kind(class_net / name)
    return printable(f"{kind} {name}" if kind else name)


def _sysfs_kind(path: Path) -> str | None:
    try:
        for line in (path / "uevent").read_text(errors="replace").splitlines():
            if line.startswith("DEVTYPE="):
                return line.removeprefix("DEVTYPE=").strip() or None
    except OSError:
        pass
    for sub, kind in (("bridge", "bridge"), ("bonding", "bond")):
        if (path / sub).is_dir():
            return kind
    return None
