"""libvirt qemu hook: `<hook> <domain> <op> <subop> <extra…>`, domain XML on stdin.

libvirtd runs this for every domain event and waits for it with no timeout, so the
common case (an op we ignore, a VM with no PCI hostdev) returns before lxml or the
rest of the package is imported.  The hook never calls back into libvirt (libvirt's
docs: deadlock); it learns what it needs from stdin, sysfs and its own journal.
Exit codes: 0 ok, 1 failed, 2 bad input — any non-zero from `prepare` makes libvirt
abort the start, and the one line on stderr is what the user sees in virsh.
"""

from __future__ import annotations

import os
import sys

from vfio_libvirt.hookrun import (
    PREFIX,
    answer_early,
    guarded,
    hook_words,
    journal_exists,
    print_preview,
    run,
)

# `typing` alone costs more than the whole fast path; only type checkers need these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import BinaryIO


def main(
    argv: Sequence[str] | None = None, stdin: BinaryIO | None = None, *, detach: bool | None = None,
) -> int:
    """`detach` (default: when run as libvirt's hook, i.e. without `argv`): do the work in a
    child process that answers libvirt on time however long the kernel takes (detach.py)."""
    detach = argv is None if detach is None else detach
    if (words := hook_words(argv, "qemu", "DOMAIN")) is None:
        return 2
    domain_name, op, subop = words
    dry_run = os.environ.get("VFIO_LIBVIRT_DRY_RUN") == "1"
    if (op, subop) == ("prepare", "begin"):
        from vfio_libvirt.limits import MAX_XML_BYTES
        from vfio_libvirt.prescan import may_assign_pci

        data = (stdin or sys.stdin.buffer).read(MAX_XML_BYTES + 1)
        if not may_assign_pci(data):
            return 0  # USB, SCSI, mdev or network devices only: nothing of ours to do
        return run(domain_name, lambda channel: _prepare(domain_name, data, dry_run, channel),
                   detach and not dry_run)
    if (op, subop) in (("release", "end"), ("reconnect", "begin")) and not journal_exists():
        return 0  # nothing was ever switched (or a reboot cleared /run with every binding)
    if (op, subop) == ("release", "end"):
        return run(domain_name, lambda channel: _release(domain_name, dry_run, channel),
                   detach and not dry_run)
    if (op, subop) == ("reconnect", "begin"):
        return guarded(domain_name, lambda: _reconnect(domain_name))
    return 0


def _prepare(domain_name: str, data: bytes, dry_run: bool, channel) -> int:
    from vfio_libvirt.domain import Domain
    from vfio_libvirt.errors import InputError
    from vfio_libvirt.lifecycle import Host, prepare
    from vfio_libvirt.settings import Settings

    domain = Domain.from_xml(data)
    if domain.name != domain_name:
        raise InputError(f"XML on stdin is for domain {domain.name!r}, not {domain_name!r}")
    if not domain.hostdevs:
        return 0
    host = Host(Settings.from_env(), read_only=dry_run)
    # a start answers by its binds' deadline plus a rollback's
    answer_early(host, channel, domain_name, host.config.bind_timeout + host.config.restore_timeout)
    if dry_run:
        return print_preview(host, domain)
    prepare(host, domain)
    return 0


def _release(domain_name: str, dry_run: bool, channel) -> int:
    from vfio_libvirt.lifecycle import Host, release
    from vfio_libvirt.settings import Settings

    host = Host(Settings.from_env(), config_fallback=True)
    answer_early(host, channel, domain_name, host.config.restore_timeout)
    if dry_run:
        for entry in host.journal.read().for_domain(domain_name):
            print(f"{entry.address}: would restore to {entry.original_driver or 'no driver'}")
        return 0
    failures = release(host, domain_name)
    if failures:
        print(f"{PREFIX}: {domain_name}: could not restore {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def _reconnect(domain_name: str) -> int:
    import logging

    from vfio_libvirt.lifecycle import Host
    from vfio_libvirt.settings import Settings
    from vfio_libvirt.views import drift

    host = Host(Settings.from_env())
    for line in drift(host, domain_name):
        logging.getLogger("vfio_libvirt").warning("%s: drift: %s", domain_name, line)
    return 0
