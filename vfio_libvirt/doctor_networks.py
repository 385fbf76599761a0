"""doctor's check of libvirt's SR-IOV hostdev networks against the network hook.

A domain that takes its VF from a `<forward mode='hostdev'>` network with managed='no'
(libvirt's default for networks) starts only if the VF is already on a VFIO driver.
libvirt picks the VF while it allocates the port, after the qemu hook's `prepare`, so
only the network hook (`port-created`) can bind it: without that hook every such start
fails, which is worth a `fail` before the first VM tries.  With managed='yes' libvirt
binds vfio-pci itself and the hook has nothing to do.

libvirt notices a hook only when its network daemon starts or reloads, so a hook
installed after the daemon started is not run yet.  Reading the networks needs libvirt;
what the lines say is decided by pure functions, so it is tested without a daemon.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vfio_libvirt.cli_common import Finding, driver_hooks_since, hook_problem, hook_seen_by
from vfio_libvirt.errors import InputError, OperationError

NETWORK_HOOK = "/etc/libvirt/hooks/network.d/vfio-libvirt"
NETWORK_DAEMONS = ("libvirtd", "virtnetworkd")
"""The daemons that run network hooks: libvirtd (monolithic) or virtnetworkd (modular)."""


@dataclass(frozen=True)
class NetworkXml:
    """One libvirt network as read over the connection; `xml` None when it could not be."""

    name: str
    xml: bytes | None
    error: str = ""


@dataclass(frozen=True)
class Pool:
    """A `<forward mode='hostdev'>` network: where its VFs come from, who binds them."""

    managed: bool
    source: str
    """'PF enp1s0' or '3 VF(s) listed', for the finding's text."""


def read_networks(conn) -> list[NetworkXml]:
    """Every network (active or not: an inactive one can be started) with its XML.

    One network that cannot be read is a warning about that network, not the end of the
    check-up: the rest are still checked.
    """
    from vfio_libvirt.virt import libvirt_module

    error = libvirt_module().libvirtError
    try:
        networks = conn.listAllNetworks()
    except error as err:
        raise OperationError(f"cannot list networks: {err}") from None
    found = []
    for network in networks:
        try:
            name = network.name()
        except error as err:  # gone since the listing
            found.append(NetworkXml("(unnamed)", None, str(err)))
            continue
        try:
            # replace: a str that is not UTF-8-encodable is malformed XML, found by the parser
            found.append(NetworkXml(name, network.XMLDesc(0).encode("utf-8", "replace")))
        except error as err:
            found.append(NetworkXml(name, None, str(err)))
    return found


def hostdev_pool(xml: bytes) -> Pool | None:
    """The pool a network XML defines, or None for any other network (nat, bridge, none…).

    Parsed as untrusted XML: a network definition is an admin's input, and libvirt
    returns it as written.
    """
    from vfio_libvirt.domain import parse_xml

    root = parse_xml(xml)
    if root.tag != "network":
        raise InputError(f"not a network XML: root element is <{root.tag}>")
    forward = root.find("forward")
    # <forward> without mode= is nat
    if forward is None or forward.get("mode") != "hostdev":
        return None
    managed = forward.get("managed", "no")
    if managed not in ("yes", "no"):
        raise InputError(f"<forward mode='hostdev'> has managed={managed!r}, not 'yes' or 'no'")
    pfs = [pf.get("dev") or "?" for pf in forward.findall("pf")]
    vfs = forward.findall("address")
    source = (f"PF {', '.join(pfs)}" if pfs else f"{len(vfs)} VF(s) listed" if vfs
              else "no PF or VF listed")
    return Pool(managed == "yes", source)


def network_findings(networks: Iterable[NetworkXml], hook: Path, daemons: dict[str, float],
                     reloaded: dict[str, float] | None = None) -> list[Finding]:
    """One line per hostdev network (and per network that could not be read).

    `daemons` maps each running network daemon to its start time and `reloaded` to when
    an installer last reloaded it (epoch seconds, cli_common.reload_marks), to tell
    whether it has seen the hook; other networks (nat, bridge…) get no line.
    """
    out: list[Finding] = []
    pools: list[tuple[str, Pool]] = []
    count = 0
    for network in networks:
        count += 1
        name = shown(network.name)
        if network.xml is None:
            out.append(Finding("warn", f"network {name}: cannot read its XML: {network.error}"))
            continue
        try:
            pool = hostdev_pool(network.xml)
        except InputError as err:
            out.append(Finding("warn", f"network {name}: not checked: {err}"))
            continue
        if pool is not None:
            pools.append((name, pool))
    missing = hook_problem(hook)
    reload = f"systemctl reload {_network_daemon(daemons)}"
    for name, pool in pools:
        what = f"network {name}: hostdev pool ({pool.source}), managed='{'yes' if pool.managed else 'no'}'"
        if pool.managed:
            out.append(Finding("ok", f"{what}: libvirt binds its VFs to a VFIO driver itself"))
        elif missing:
            out.append(Finding(
                "fail", f"{what}, but the network hook {hook} is {missing}: a domain using it fails "
                "to start unless its VF is on a VFIO driver already (libvirt binds none)",
                f"sudo ./install.sh, then: {reload}"))
        else:
            out.append(Finding("ok", f"{what}: the network hook binds its VFs"))
    if any(not pool.managed for _, pool in pools) and not missing:
        out += _daemon_findings(hook, daemons, reloaded or {})
    if not pools:
        out.append(Finding("ok", f"networks: {count} defined, no SR-IOV hostdev pool"))
    return out


def _network_daemon(daemons: dict[str, float]) -> str:
    """The daemon to reload: the one running, else virtnetworkd (modular daemons are the default)."""
    if "virtnetworkd" in daemons:
        return "virtnetworkd"
    return "libvirtd" if "libvirtd" in daemons else "virtnetworkd (or libvirtd)"


def _daemon_findings(hook: Path, daemons: dict[str, float], reloaded: dict[str, float]) -> list[Finding]:
    """Whether each running network daemon has seen the hook: started after it was
    installed, or reloaded since by install.sh or the package.

    An admin's own reload leaves no trace here: hence `warn`, not `fail`.
    None running is fine: virtnetworkd is socket-activated, and the next start reads hooks.
    """
    if not daemons:
        return [Finding("ok", "no libvirtd/virtnetworkd running: the next one started runs the "
                        "network hook")]
    out = []
    since = driver_hooks_since(hook)
    for daemon, start in sorted(daemons.items()):
        seen = hook_seen_by(start, reloaded.get(daemon, 0.0), since)
        if seen == "started":
            out.append(Finding("ok", f"{daemon} started after the network hook: it runs it"))
        elif seen == "reloaded":
            out.append(Finding("ok", f"{daemon} reloaded since the network hook was installed: "
                               "it runs it"))
        else:
            out.append(Finding("warn", f"{daemon} started before the network hook was installed: "
                               "it does not run it unless reloaded since", f"systemctl reload {daemon}"))
    return out


def shown(text: str) -> str:
    """A name from libvirt with control characters escaped: doctor prints it on a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
