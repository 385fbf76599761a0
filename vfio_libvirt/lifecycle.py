"""The three things the hook does, as plain functions the hook and the CLI share.

prepare: read state → plan → claim the devices in the journal → switch them; any
failure rolls back what this run switched.  release: give back what the journal says
this domain took, with retries; a device that cannot go home is put back on its VFIO
driver rather than left driverless, and the journal says so.  reconnect: compare
journal and sysfs, report drift, change nothing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from functools import cached_property

from vfio_libvirt import libvirt_version
from vfio_libvirt.aliases import AliasTable
from vfio_libvirt.apply import Switcher, describe
from vfio_libvirt.config import Config
from vfio_libvirt.domain import Domain
from vfio_libvirt.errors import OperationError
from vfio_libvirt.pci import PciAddress
from vfio_libvirt.plan import Context, DeviceState, Plan, Step, plan_prepare
from vfio_libvirt.settings import Settings
from vfio_libvirt.state import Entry, Journal
from vfio_libvirt.sysfs import Sysfs

log = logging.getLogger("vfio_libvirt")


@dataclass
class Host:
    """The host as the lifecycle sees it, built from Settings (environment)."""

    settings: Settings
    read_only: bool = False
    """Plans and dry runs: not even the libvirt-version cache is written."""

    @cached_property
    def sysfs(self) -> Sysfs:
        return Sysfs(self.settings.sysfs_root)

    @cached_property
    def journal(self) -> Journal:
        return Journal(self.settings.state_dir)

    @cached_property
    def config(self) -> Config:
        return Config.load(self.settings.config_path)

    @cached_property
    def switcher(self) -> Switcher:
        return Switcher(self.sysfs, self.settings.modprobe)

    @cached_property
    def aliases(self) -> AliasTable:
        return AliasTable.load(self.settings.modules_dir)

    @cached_property
    def libvirt_version(self) -> tuple[int, ...] | None:
        cache = None if self.read_only else self.settings.state_dir
        version, source = libvirt_version.detect(self.config, cache)
        log.debug("libvirt version %s from %s", version, source)
        return version

    def device_state(self, address: PciAddress) -> DeviceState:
        s = self.sysfs
        s.require(address)
        return DeviceState(
            address=address,
            driver=s.driver(address),
            driver_override=s.driver_override(address),
            modalias=s.modalias(address),
            iommu_group=s.iommu_group(address),
            has_vfio_dev=s.has_vfio_dev(address),
            is_bridge=s.is_bridge(address),
        )


class PlanRefused(OperationError):
    pass


def make_plan(host: Host, domain: Domain) -> Plan:
    """Read what the plan needs from the host and plan `prepare`; writes nothing."""
    states: dict[PciAddress, DeviceState] = {}
    groups: dict[str, list[DeviceState]] = {}
    for hostdev in domain.hostdevs:
        if not host.sysfs.exists(hostdev.address):
            continue
        state = states[hostdev.address] = host.device_state(hostdev.address)
        if state.iommu_group and state.iommu_group not in groups and not hostdev.managed:
            groups[state.iommu_group] = [
                states.get(m) or host.device_state(m)
                for m in host.sysfs.iommu_group_members(state.iommu_group)
            ]
    unmanaged = any(not h.managed for h in domain.hostdevs)
    modules = {
        name: host.sysfs.module_pci_drivers(name)
        for name in {a.module for a in host.aliases.aliases}
    } if unmanaged else {}
    ctx = Context(
        aliases=host.aliases if unmanaged else AliasTable(),
        config=host.config,
        vm_policy=domain.policy,
        libvirt_version=host.libvirt_version,
        module_drivers=modules,
    )
    return plan_prepare(domain.hostdevs, states, groups, ctx)


def prepare(host: Host, domain: Domain) -> Plan:
    """Bind every managed='no' device of `domain` to its VFIO driver, or change nothing."""
    plan = make_plan(host, domain)
    if plan.problems:
        more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
        raise PlanRefused(plan.problems[0] + more)
    claimed = _claim(host, domain, plan)
    switched: list[Step] = []
    for step in plan.steps:
        if step.action != "bind":
            continue
        entry = claimed[str(step.address)]
        try:
            _journal_status(host, entry, "switching")
            switched.append(step)
            driver = host.switcher.driver_for_module(step.module or "")
            entry.target_driver = driver
            host.switcher.bind(step.address, driver, host.config.bind_timeout)
        except Exception as err:
            cause = describe(err)
            log.error("%s %s: bind to %s failed: %s", domain.name, step.address, step.module, cause)
            undone = _rollback(host, domain.name, claimed, switched)
            raise OperationError(
                f"{step.address}: cannot bind {step.module}: {cause}; rolled back {undone} device(s)"
            ) from None
        _journal_status(host, entry, "bound")
        log.info("%s %s: bound to %s (%s)", domain.name, step.address, driver, step.reason)
    for step in plan.steps:
        if step.action != "bind":
            log.info("%s %s: %s: %s", domain.name, step.address, step.action, step.reason)
    return plan


def _claim(host: Host, domain: Domain, plan: Plan) -> dict[str, Entry]:
    """Record every device this domain will use, or refuse if another domain holds one."""
    with host.journal.transaction() as entries:
        for step in plan.steps:
            entry = entries.get(str(step.address))
            if entry is not None and entry.domain != domain.name:
                raise OperationError(
                    f"{step.address} is in use by domain {entry.domain} ({entry.status}); "
                    f"if that domain is gone, run: vfio-libvirt restore --domain {entry.domain}"
                )
        claimed: dict[str, Entry] = {}
        for step in plan.steps:
            if step.action == "skip":
                continue  # never journaled: the hook does not touch it
            key = str(step.address)
            old = entries.get(key)
            entries[key] = claimed[key] = Entry(
                address=key,
                domain=domain.name,
                uuid=domain.uuid,
                # the actions bind/watch/keep are the journal's roles
                role="companion" if step.companion else step.action,  # type: ignore[arg-type]
                # a domain started again without a release keeps its first originals
                original_driver=old.original_driver if old else step.original_driver,
                original_override=old.original_override if old else step.original_override,
                status="watching" if step.action == "watch" else
                "bound" if step.action == "keep" else "claimed",
                target_module=step.module,
                target_driver=step.original_driver if step.action == "keep" else None,
                reason=step.reason,
            )
    return claimed


def _journal_status(host: Host, entry: Entry, status: str, error: str = "") -> None:
    entry.touch(status, error)  # type: ignore[arg-type]
    with host.journal.transaction() as entries:
        entries[entry.address] = entry


def _rollback(host: Host, domain: str, claimed: dict[str, Entry], switched: list[Step]) -> int:
    """Undo this run: switched devices go back, and the domain's claims are dropped."""
    undone = 0
    for step in reversed(switched):
        entry = claimed[str(step.address)]
        if _restore_entry(host, entry):
            undone += 1
    with host.journal.transaction() as entries:
        for key in claimed:
            current = entries.get(key)
            if current and current.domain == domain and current.status != "restore-failed":
                del entries[key]
    return undone


def release(host: Host, domain_name: str) -> list[str]:
    """Give back everything the journal says `domain_name` took; return the failures."""
    failures = []
    for entry in host.journal.read().for_domain(domain_name):
        if entry.role != "keep" and not _restore_entry(host, entry):
            failures.append(f"{entry.address}: {entry.error}")
            continue
        with host.journal.transaction() as entries:
            entries.pop(entry.address, None)
    return failures


def restore_device(host: Host, bdf: str) -> str:
    """Give one device back: per the journal if it is there, else to whatever host driver probes."""
    address = PciAddress.parse(bdf)
    host.sysfs.require(address)
    entry = host.journal.read().entries.get(str(address))
    if entry is not None:
        if not _restore_entry(host, entry):
            raise OperationError(f"{address}: {entry.error}")
        with host.journal.transaction() as entries:
            entries.pop(entry.address, None)
        return f"{address}: restored to {entry.original_driver or 'no driver'} (from the journal)"
    sysfs = host.sysfs
    before = sysfs.driver(address)
    sysfs.set_driver_override(address, None)
    if before is not None:
        if holders := sysfs.vfio_holders(address):
            raise OperationError(f"{address}: still held open by {', '.join(holders)}")
        sysfs.unbind(address)
    sysfs.probe(address)
    after = sysfs.driver(address)
    if after is None:
        if before is not None:
            host.switcher.bind(address, before, host.config.bind_timeout)
        raise OperationError(f"{address}: no host driver bound; left on {before or 'no driver'}")
    return f"{address}: not in the journal; now on {after} (was {before or 'no driver'})"


def _restore_entry(host: Host, entry: Entry) -> bool:
    """Send one device home; on failure keep it on its VFIO driver and record why."""
    address = PciAddress.parse(entry.address)
    if not host.sysfs.exists(address):
        log.warning("%s %s: device is gone; forgetting it", entry.domain, address)
        return True
    current = host.sysfs.driver(address)
    if entry.role == "watch" and current == entry.original_driver:
        return True
    if entry.role == "watch":
        log.warning("%s %s: libvirt left it on %s, not %s; restoring", entry.domain, address,
                    current or "no driver", entry.original_driver or "no driver")
    _journal_status(host, entry, "restoring")
    try:
        host.switcher.restore(
            address, entry.original_driver, entry.original_override, host.config.restore_timeout
        )
    except Exception as err:
        cause = describe(err)
        fallback = _fallback_to_vfio(host, entry, address)
        _journal_status(host, entry, "restore-failed", f"{cause}; {fallback}")
        log.error("%s %s: cannot restore %s: %s; %s", entry.domain, address,
                  entry.original_driver or "no driver", cause, fallback)
        return False
    log.info("%s %s: restored to %s", entry.domain, address, entry.original_driver or "no driver")
    return True


def _fallback_to_vfio(host: Host, entry: Entry, address: PciAddress) -> str:
    """Never leave a device silently driverless: put it back on the VFIO driver it had."""
    current = host.sysfs.driver(address)
    if current is not None:
        # the restore may have cleared the override already; pin it again so no
        # later probe hands a device someone still holds to the host driver
        with contextlib.suppress(OSError):
            host.sysfs.set_driver_override(address, current)
        return f"left on {current}"
    if not entry.target_driver:
        return "left with no driver"
    try:
        host.switcher.bind(address, entry.target_driver, host.config.bind_timeout)
    except Exception as err:
        return f"and could not return it to {entry.target_driver} either ({describe(err)})"
    return f"kept on {entry.target_driver}"


def drift(host: Host, domain_name: str | None = None) -> list[str]:
    """Where sysfs disagrees with the journal (for reconnect and `status`); changes nothing."""
    found = []
    for entry in host.journal.read().entries.values():
        if domain_name is not None and entry.domain != domain_name:
            continue
        address = PciAddress.parse(entry.address)
        if not host.sysfs.exists(address):
            found.append(f"{address}: in the journal for {entry.domain} but gone from the host")
            continue
        current = host.sysfs.driver(address)
        expected = _expected_driver(entry)
        if expected is not None and current != expected:
            found.append(
                f"{address}: journal says {entry.domain} has it on {expected}, "
                f"sysfs says {current or 'no driver'}"
            )
        elif entry.role == "watch" and not host.sysfs.has_vfio_dev(address) and current != "vfio-pci":
            found.append(f"{address}: {entry.domain} (managed='yes') runs but the device is on "
                         f"{current or 'no driver'}, not a VFIO driver")
    return found


def _expected_driver(entry: Entry) -> str | None:
    if entry.role in ("bind", "companion", "keep") and entry.status == "bound":
        return entry.target_driver or entry.original_driver
    return None

