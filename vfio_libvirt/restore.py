"""Giving one device back to its original driver, shared by release, rollback and the CLI.

A restore binds the driver the journal recorded, and never leaves a device silently
driverless: a device that cannot go home is put back on the VFIO driver it had and
its entry says why (restore-failed).  Journal writes here are best effort: the entry
already names the original driver, and a full /run must not stop a device going home.
"""

from __future__ import annotations

import logging
import time

from vfio_libvirt.apply import describe
from vfio_libvirt.errors import OperationError
from vfio_libvirt.host import Host
from vfio_libvirt.pci import PciAddress
from vfio_libvirt.state import Entry

log = logging.getLogger("vfio_libvirt")


def left(deadline: float) -> float:
    """Seconds left before `deadline` (never negative)."""
    return max(0.0, deadline - time.monotonic())


def save_entry(host: Host, entry: Entry) -> bool:
    """Record `entry` as it is, unless it is no longer this domain's to record."""
    with host.journal.transaction() as entries:
        current = entries.get(entry.address)
        if current is None or current.domain != entry.domain:
            return False
        entries[entry.address] = entry
    return True


def forget(host: Host, *gone: Entry) -> None:
    if not gone:
        return
    with host.journal.transaction() as entries:
        for entry in gone:
            current = entries.get(entry.address)
            if current is not None and current.domain == entry.domain:
                del entries[entry.address]


def restore_device(host: Host, bdf: str) -> str:
    """Give one device back: per the journal if it is there; otherwise only if it needs it."""
    address = PciAddress.parse(bdf)
    host.sysfs.require(address)
    snapshot = host.journal.read()
    entry = snapshot.entries.get(str(address))
    if entry is not None:
        with host.domain_locks.hold(entry.domain, host.config.restore_timeout):
            entry = host.journal.read().entries.get(str(address))  # as the last run left it
            if entry is None:
                return f"{address}: already restored by another run"
            deadline = time.monotonic() + host.config.restore_timeout
            if not restore_entry(host, entry, entry.original_driver, entry.original_override, deadline):
                raise OperationError(f"{address}: {entry.error}")
            forget(host, entry)
        return f"{address}: restored to {entry.original_driver or 'no driver'} (from the journal)"
    if str(address) in snapshot.blocked:
        raise OperationError(f"{address}: {snapshot.blocked[str(address)]}")
    return _restore_unjournaled(host, address)


def _restore_unjournaled(host: Host, address: PciAddress) -> str:
    """A device the journal does not know: hand it to a host driver, if it is not on one.

    A mistyped address must not drop a NIC's link or the root disk, so a device on a
    host driver is left alone, and a held one is refused before anything is written.
    """
    sysfs = host.sysfs
    before = sysfs.driver(address)
    if before is not None and not host.on_vfio_driver(address):
        return f"{address}: not in the journal and on host driver {before}: nothing to do"
    if before is not None and (holders := sysfs.vfio_holders(address)):
        raise OperationError(f"{address}: still held open by {', '.join(holders)}; nothing changed")
    override = sysfs.driver_override(address)
    if override is not None:
        sysfs.set_driver_override(address, None)
    if before is not None:
        sysfs.unbind(address)
    sysfs.probe(address)
    after = sysfs.driver(address)
    if after is not None and not host.on_vfio_driver(address):
        return f"{address}: not in the journal; now on {after} (was {before or 'no driver'})"
    # No host driver wants it: put it back exactly as it was.
    host.switcher.restore(address, before, override, host.config.restore_timeout)
    raise OperationError(f"{address}: no host driver takes it; left on {before or 'no driver'}")


def _record(host: Host, entry: Entry, status: str, error: str = "") -> bool | None:
    """save_entry, best effort: None (logged) when the journal cannot be written; the
    entry in hand says the new status either way (release reports from it)."""
    entry.touch(status, error)  # type: ignore[arg-type]
    try:
        return save_entry(host, entry)
    except Exception as err:
        log.error("%s %s: cannot record %s in the journal: %s", entry.domain, entry.address,
                  status, describe(err))
        return None


def restore_entry(
    host: Host, entry: Entry, driver: str | None, override: str | None, deadline: float,
    *, marked: bool = False,
) -> bool:
    """Send one device to `driver`; on failure keep it on its VFIO driver and record why.

    `marked`: the caller already recorded it as restoring (release does so for all its
    devices in one journal write).
    """
    address = PciAddress.parse(entry.address)
    if not host.sysfs.exists(address):
        log.warning("%s %s: device is gone; forgetting it", entry.domain, address)
        return True
    current = host.sysfs.driver(address)
    if host.on_vfio_driver(address):
        entry.target_driver = current  # where to put it back if the restore fails
    if entry.role == "watch" and current != driver:
        log.warning("%s %s: libvirt left it on %s, not %s; restoring", entry.domain, address,
                    current or "no driver", driver or "no driver")
    if not marked and _record(host, entry, "restoring") is False:
        return True  # someone else (a concurrent restore) finished it
    try:
        host.switcher.restore(address, driver, override, left(deadline))
    except Exception as err:
        cause = describe(err)
        fallback = _fallback_to_vfio(host, entry, address)
        _record(host, entry, "restore-failed", f"{cause}; {fallback}")
        log.error("%s %s: cannot restore %s: %s; %s", entry.domain, address,
                  driver or "no driver", cause, fallback)
        return False
    log.info("%s %s: restored to %s", entry.domain, address, driver or "no driver")
    return True


def _fallback_to_vfio(host: Host, entry: Entry, address: PciAddress) -> str:
    """Never leave a device silently driverless: put it back on the VFIO driver it had."""
    current = host.sysfs.driver(address)
    if current is not None:
        # pin it, so that no later probe hands a device someone still holds to a host driver
        try:
            if host.sysfs.driver_override(address) != current:
                host.sysfs.set_driver_override(address, current)
        except OSError:
            pass
        return f"left on {current}"
    if not entry.target_driver:
        return "left with no driver"
    try:
        host.switcher.bind(address, entry.target_driver, host.config.bind_timeout)
    except Exception as err:
        return f"and could not return it to {entry.target_driver} either ({describe(err)}): no driver"
    return f"kept on {entry.target_driver}"
