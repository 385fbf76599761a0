"""libvirt network hook: `<hook> <network> <op> <subop> -`, hookData XML on stdin.

A VM on a `managed='no'` hostdev network pool gets its VF when libvirt allocates the
network port, after the qemu `prepare` hook ran and before libvirt checks the VF is on
a VFIO driver.  So the VF is switched here, at `port-created begin`, and given back at
`port-deleted begin` (at stop, before the qemu `release end`, and at hot-unplug), with
the same planner, guard, journal and deadlines as the qemu hook.  The journal entry
belongs to the port's owner domain and names the network, so the qemu hook's `release`
only finds what `port-deleted` could not give back, and a start that names the VF by
address while the pool has it is refused like any other conflict.

libvirt facts this rests on (libvirt 11.3 source, bridge_driver.c and virhook.c):
- every network's start/stop and every port of every network runs the hook, so anything
  but a hostdev-pci port returns before lxml is imported;
- a managed='yes' pool's VF is libvirt's to bind: the hook records its driver at
  `port-created` and at `port-deleted` (after libvirt's own reattach) gives it back only
  if libvirt did not;
- a failed `port-created` is never followed by `port-deleted`: prepare() rolls back;
- `port-created` fires again for existing ports when the network driver restarts: a VF
  already on its VFIO driver for the same domain is kept as it is;
- `port-deleted`'s exit status is ignored: a failure stays in the journal (and syslog),
  and the qemu hook's `release end` tries again.
"""

from __future__ import annotations

import os
import sys

from vfio_libvirt.hookrun import PREFIX, answer_early, hook_words, journal_exists, print_preview, run

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import BinaryIO

PORT_OPS = ("port-created", "port-deleted")


def main(
    argv: Sequence[str] | None = None, stdin: BinaryIO | None = None, *, detach: bool | None = None,
) -> int:
    """`detach` as in hook.main: a child answers libvirt on time, whatever the kernel does."""
    detach = argv is None if detach is None else detach
    if (words := hook_words(argv, "network", "NETWORK")) is None:
        return 2
    network, op, subop = words
    if op not in PORT_OPS or subop != "begin":
        return 0  # network start/stop/update: nothing of ours
    if op == "port-deleted" and not journal_exists():
        return 0  # nothing was ever switched
    from vfio_libvirt.limits import MAX_XML_BYTES

    data = _read_keeping_the_end(stdin or sys.stdin.buffer, MAX_XML_BYTES + 1)
    if not _may_be_hostdev_port(data):
        return 0  # a bridge, macvtap or NAT port: most ports of most hosts
    dry_run = os.environ.get("VFIO_LIBVIRT_DRY_RUN") == "1"
    label = f"network {network}"
    action = _port_created if op == "port-created" else _port_deleted
    return run(label, lambda channel: action(network, data, dry_run, channel), detach and not dry_run)


def _read_keeping_the_end(stream: BinaryIO, limit: int) -> bytes:
    """All of `stream`, or its last `limit` bytes: the port comes last, after a network
    XML that may be larger than the parser accepts (a bridge port there must not fail)."""
    data = b""
    while chunk := stream.read(1 << 20):
        data = (data + chunk)[-limit:]
    return data


def _may_be_hostdev_port(data: bytes) -> bool:
    """False only when the `<networkport>` (libvirt writes it last, after the network,
    which may be megabytes of DHCP hosts) certainly has no hostdev-pci plug: no such
    word and no entity reference that could expand to it.  Anything else is parsed."""
    start = data.rfind(b"<networkport")
    if start == -1:
        return True
    port = data[start:]
    return b"hostdev-pci" in port or b"&" in port


def _port_created(network: str, data: bytes, dry_run: bool, channel) -> int:
    from vfio_libvirt.domain import Domain
    from vfio_libvirt.lifecycle import Host, prepare
    from vfio_libvirt.netport import NetworkPort
    from vfio_libvirt.settings import Settings

    port = NetworkPort.from_hook_xml(data, network)
    if port.address is None:
        return 0
    # managed='yes': libvirt binds vfio-pci itself; the plan only records the VF's driver
    # (a `watch`), so port-deleted can give it back if libvirt does not (libvirt 11.3
    # leaves a VF used managed='no' earlier on vfio-pci at stop)
    domain = Domain(name=port.owner, uuid=port.owner_uuid, hostdevs=(port.hostdev(),))
    host = Host(Settings.from_env(), read_only=dry_run)
    answer_early(host, channel, f"network {network}: {port.owner}",
                 host.config.bind_timeout + host.config.restore_timeout)
    if dry_run:
        return print_preview(host, domain)
    prepare(host, domain, network=network)
    return 0


def _port_deleted(network: str, data: bytes, dry_run: bool, channel) -> int:
    from vfio_libvirt.lifecycle import Host, release
    from vfio_libvirt.netport import NetworkPort
    from vfio_libvirt.settings import Settings

    port = NetworkPort.from_hook_xml(data, network)
    if port.address is None:
        return 0
    vf = str(port.address)
    host = Host(Settings.from_env(), config_fallback=True)

    def this_port(entry) -> bool:
        return entry.address == vf and entry.network == network

    mine = [e for e in host.journal.read().for_domain(port.owner) if this_port(e)]
    if not mine:
        return 0  # never switched nor watched here, or given back already
    answer_early(host, channel, f"network {network}: {port.owner}", host.config.restore_timeout)
    if dry_run:
        for entry in mine:
            print(f"{entry.address}: would restore to {entry.original_driver or 'no driver'}")
        return 0
    failures = release(host, port.owner, only=this_port)
    if failures:
        print(f"{PREFIX}: network {network}: {port.owner}: could not restore {'; '.join(failures)}",
              file=sys.stderr)
        return 1
    return 0
