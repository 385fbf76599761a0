"""The things the hook does, as plain functions the hook and the CLI share.

prepare: plan and claim under the journal lock → switch; a failure rolls back what
this run did, and only that.  release: give back what the journal says the domain
took, with retries; a device that cannot go home stays on its VFIO driver rather than
driverless, and the journal says so.  The journal entry is the truth about a device's
original driver: a second prepare without a release (libvirtd restarted, a failed
restore) keeps it, and a restore binds exactly that driver.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from vfio_libvirt.apply import describe
from vfio_libvirt.domain import Domain
from vfio_libvirt.errors import OperationError
from vfio_libvirt.host import Host, make_plan
from vfio_libvirt.pci import PciAddress
from vfio_libvirt.plan import Plan, Step
from vfio_libvirt.restore import forget, left, restore_device, restore_entry
from vfio_libvirt.state import Entries, Entry
from vfio_libvirt.stuck import refuse_if_stuck, run_bounded, stuck_entries, stuck_line

__all__ = ["Host", "PlanRefused", "make_plan", "prepare", "release", "restore_device"]

log = logging.getLogger("vfio_libvirt")

WAIT_POLL = 0.05
"""Seconds between looks at a device another domain is still giving back."""
NEEDS_AN_ADMIN = {"restore-failed"}
"""Another domain's entries in these states are refused at once: waiting will not help."""


class PlanRefused(OperationError):
    """The plan has problems; nothing was written.  Exit 2 when the input is at fault."""

    def __init__(self, plan: Plan) -> None:
        more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
        super().__init__(plan.problems[0] + more)
        self.exit_code = 2 if plan.bad_input else 1


# --- prepare ---------------------------------------------------------------------------
def prepare(host: Host, domain: Domain, network: str | None = None) -> Plan:
    """Bind every managed='no' device of `domain` to its VFIO driver, or change nothing.

    `network`: the devices are a port of that libvirt network (the network hook); their
    journal entries say so, and the port's deletion gives them back.

    The whole start, waits included, has one deadline (`bind_seconds`): libvirt puts no
    timeout on hooks.  A write still in the kernel then: the caller is told the start
    failed, and this run undoes it once the write returns (stuck.py).  The domain's lock
    keeps an admin's `restore --domain` out until this start has finished or rolled back.
    """
    deadline = host.deadline = time.monotonic() + host.config.bind_timeout
    if stuck := refuse_if_stuck(host, domain.name):
        raise OperationError(stuck[0] + "; start it again after that")
    with host.domain_locks.hold(domain.name, host.config.bind_timeout):
        return _prepare(host, domain, deadline, network)


def _prepare(host: Host, domain: Domain, deadline: float, network: str | None) -> Plan:
    plan, claimed, before = _plan_and_claim(host, domain, deadline, network)
    binds = [step for step in plan.steps if step.action == "bind"]
    drivers: dict[str, str] = {}
    for step in binds:  # each module is loaded once, before any device is touched
        module = step.module or ""
        if module in drivers:
            continue
        try:
            drivers[module] = host.switcher.driver_for_module(module, left(deadline))
        except Exception as err:
            log.error("%s %s: bind to %s failed: %s", domain.name, step.address, module, describe(err))
            _rollback(host, domain.name, claimed, before, [])
            raise OperationError(f"{step.address}: cannot bind {module}: {describe(err)}; "
                                 "nothing was switched") from None
    if time.monotonic() >= deadline:  # the budget went on waiting: switch nothing now
        _rollback(host, domain.name, claimed, before, [])
        raise OperationError(
            f"bind_seconds ({host.config.bind_timeout:g} s) used up before any device was switched "
            "(waiting for the domain's lock, another domain's devices, the holder check or modprobe); "
            "nothing was switched")
    for step in binds:
        claimed[str(step.address)].target_driver = drivers[step.module or ""]
    # one journal write says every device may now be touched; the workers only write sysfs
    _journal_statuses(host, [claimed[str(s.address)] for s in binds], "switching")

    def switch(step: Step) -> None:
        try:
            host.switcher.bind(step.address, drivers[step.module or ""], left(deadline))
        except Exception as err:
            log.error("%s %s: bind to %s failed: %s", domain.name, step.address, step.module, describe(err))
            raise
        log.info("%s %s: bound to %s (%s)", domain.name, step.address, drivers[step.module or ""],
                 step.reason)

    outcomes, stuck = run_bounded(
        host, binds, _group_of, switch, deadline=deadline, budget=host.config.bind_timeout,
        entry_of=lambda step: claimed[str(step.address)], afterwards=_goes_back, stop_when_late=True,
    )
    failed = [o for o in outcomes if o.error is not None]
    if failed or stuck:  # stuck: libvirt was told the start failed; undo it all
        switched = [o.item for o in outcomes if o.attempted]
        undone = _rollback(host, domain.name, claimed, before, switched)
        if not failed:
            raise OperationError(f"a write stuck in the kernel past the deadline; "
                                 f"rolled back {undone} device(s)")
        step, cause = failed[0].item, describe(failed[0].error)  # type: ignore[arg-type]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise OperationError(
            f"{step.address}: cannot bind {step.module}: {cause}{more}; rolled back {undone} device(s)"
        )
    _journal_statuses(host, [claimed[str(s.address)] for s in binds], "bound")
    for step in plan.steps:
        if step.action != "bind":
            log.info("%s %s: %s: %s", domain.name, step.address, step.action, step.reason)
    return plan


def _journal_statuses(host: Host, entries: list[Entry], status: str) -> None:
    """Record `status` for all `entries` in one write; each must still be this run's."""
    if not entries:
        return
    for entry in entries:
        entry.touch(status)  # type: ignore[arg-type]
    with host.journal.transaction() as journal:
        for entry in entries:
            current = journal.get(entry.address)
            if current is not None and current.domain != entry.domain:
                raise OperationError(f"{entry.address}: its journal entry now belongs to {current.domain}")
            if current is None:
                log.error("%s %s: its journal entry was removed while the domain was starting; "
                          "recording it again", entry.domain, entry.address)
            journal[entry.address] = entry


def _goes_back(entry: Entry) -> str:
    return (f"it is sent back to {entry.original_driver or 'no driver'} when the write returns "
            "(or kept on its VFIO driver, marked restore-failed, if that fails)")


def _group_of(step: Step) -> str:
    return step.iommu_group or str(step.address)  # no IOMMU group: a group of its own


def _plan_and_claim(
    host: Host, domain: Domain, deadline: float, network: str | None
) -> tuple[Plan, dict[str, Entry], dict[str, Entry | None]]:
    """Plan from sysfs and claim in the journal under one lock, so no stop can slip between.

    libvirt frees a stopping domain's devices before its `release` hook has given them
    back, so a start can plan while another domain's restore is mid-way and record a
    VFIO driver (or none) as the original.  Reading the devices under the journal lock,
    and waiting while another domain's entry still holds one, closes that window.
    """
    host.libvirt_version  # noqa: B018 -- may run `virtqemud --version`: not under the lock
    make_plan(host, domain)  # the slow reads (/proc, ip) fill the caches outside the lock
    while True:
        with host.journal.transaction() as entries:
            plan = make_plan(host, domain)
            if plan.problems:
                raise PlanRefused(plan)
            holder = _other_holder(entries, domain.name, plan)
            if holder is None:
                before = {str(s.address): entries.get(str(s.address)) for s in plan.steps}
                return plan, _claim(entries, domain, plan, network), before
        if time.monotonic() >= deadline:
            address, entry = holder
            raise OperationError(
                f"{address} is in use by domain {entry.domain} ({entry.status}) and was not given "
                f"back in time ({host.config.bind_timeout:g} s); if that domain is gone, run: "
                f"vfio-libvirt restore --domain {entry.domain}"
            )
        time.sleep(WAIT_POLL)


def _other_holder(entries: Entries, domain: str, plan: Plan) -> tuple[str, Entry] | None:
    """Another domain's entry to wait for, or None; raises where waiting cannot help.

    A device named by a journal this version cannot read is refused for the hook's own
    binding: what that journal says about its original driver is unknown.
    """
    for step in plan.steps:
        key = str(step.address)
        if key in entries.blocked and step.action in ("bind", "keep"):
            raise OperationError(f"{key}: {entries.blocked[key]}")
        entry = entries.get(key)
        if entry is None or entry.domain == domain:
            continue
        if entry.status in NEEDS_AN_ADMIN:
            raise OperationError(
                f"{key} is in use by domain {entry.domain} ({entry.status}: {entry.error}); "
                f"fix it, then run: vfio-libvirt restore --domain {entry.domain}"
            )
        return key, entry
    return None


def _claim(entries: Entries, domain: Domain, plan: Plan, network: str | None) -> dict[str, Entry]:
    """Record every device this domain will use; an older entry of its own is kept as truth."""
    claimed: dict[str, Entry] = {}
    for step in plan.steps:
        key = str(step.address)
        if step.action == "skip":
            continue  # never journaled: the hook does not touch it
        if key in entries.blocked:  # only a managed='yes' watch gets here: libvirt binds it
            log.warning("%s %s: not watched: %s", domain.name, key, entries.blocked[key])
            continue
        role = "companion" if step.companion else step.action
        status = {"watch": "watching", "keep": "bound"}.get(step.action, "claimed")
        old = entries.get(key)
        if old is None:
            entry = Entry(
                address=key, domain=domain.name, uuid=domain.uuid,
                role=role,  # type: ignore[arg-type]  # bind/watch/keep are journal roles
                original_driver=step.original_driver, original_override=step.original_override,
                status=status,  # type: ignore[arg-type]
                network=network,
            )
        else:
            # Started again without a release: what the device had before *this domain*
            # first took it stays the truth; a role that owns a restore stays so.
            entry = replace(old, uuid=domain.uuid)
            if network is not None:  # now a port of that network: its deletion gives it back
                entry.network = network
            if old.role in ("bind", "companion"):
                pass
            elif role == "keep" and old.original_driver != step.original_driver:
                # it sits on a VFIO driver because of this domain (libvirt bound it for
                # a managed='yes' start): its way home is still owed
                entry.role = "bind"
            else:
                entry.role = role  # type: ignore[assignment]
            entry.touch(status)  # type: ignore[arg-type]
        entry.target_module = step.module
        entry.target_driver = step.original_driver if step.action == "keep" else entry.target_driver
        entry.reason = step.reason
        entries[key] = claimed[key] = entry
    return claimed


def _rollback(
    host: Host, domain: str, claimed: dict[str, Entry], before: dict[str, Entry | None],
    switched: list[Step],
) -> int:
    """Undo this run and nothing else: devices back to how it found them, entries too.

    A device that could not go back keeps the entry its restore wrote (restore-failed,
    with the reason): that is decided by the outcome, not by re-reading a status
    another writer may have changed meanwhile.
    """
    deadline = time.monotonic() + host.config.restore_timeout
    undone: list[Step] = []

    def undo(step: Step) -> None:
        # caught here, so one device's trouble never stops the rest of its group going home
        try:
            if restore_entry(host, claimed[str(step.address)], step.original_driver,
                             step.original_override, deadline):
                undone.append(step)
        except Exception as err:
            log.error("%s %s: rollback failed: %s", domain, step.address, describe(err))

    run_bounded(host, list(reversed(switched)), _group_of, undo, deadline=deadline,
                budget=host.config.restore_timeout, entry_of=lambda step: claimed[str(step.address)],
                afterwards=_goes_back, stop_when_late=False)
    stranded = {str(s.address) for s in switched} - {str(s.address) for s in undone}
    with host.journal.transaction() as entries:
        for key in claimed:
            current = entries.get(key)
            if current is None or current.domain != domain or key in stranded:
                continue
            if (older := before[key]) is None:
                del entries[key]
            else:
                entries[key] = older
    return len(undone)


# --- release and restore ---------------------------------------------------------------
def release(host: Host, domain_name: str, only: Callable[[Entry], bool] | None = None) -> list[str]:
    """Give back everything the journal says `domain_name` took; return the failures.

    `only`: just the entries it accepts (a network port's VF when the port is deleted).

    One deadline (`restore_seconds`) covers the whole release: a holder that keeps one
    device keeps its whole IOMMU group, and waiting again per device would multiply it.
    A write still in the kernel at the deadline: the caller is answered, the device is
    marked stuck, and this run restores it when the write returns (stuck.py).
    A journal this version cannot read is a failure too: it may name this domain's devices.
    """
    deadline = time.monotonic() + host.config.restore_timeout
    scope = only or (lambda _entry: True)
    stuck = stuck_entries(host, domain_name)
    if not stuck:
        with host.domain_locks.hold(domain_name, host.config.restore_timeout):
            return _release(host, domain_name, scope, deadline, frozenset())
    # A run of this domain is stuck in the kernel and keeps the domain's lock until the
    # write returns; it finishes its own devices (they carry its pid).  The domain's
    # other devices (another port, the qemu hook's) go home now, without that lock: the
    # journal lock decides, entry by entry, that none of them is that run's.
    # Releases beside a stuck run take turns on the domain's side lock, which also tells
    # status and the next start that this one is alive if it gets stuck in turn.
    busy = frozenset(e.pid for e in stuck if e.pid is not None)
    waiting = [stuck_line(e) for e in stuck if scope(e)]
    with host.domain_locks.hold(domain_name, host.config.restore_timeout, side=True):
        return waiting + _release(host, domain_name, lambda e: scope(e) and e.pid not in busy,
                                  deadline, busy)


def _release(
    host: Host, domain_name: str, scope: Callable[[Entry], bool], deadline: float, busy: frozenset,
) -> list[str]:
    snapshot = host.journal.read()
    failures = [f"journal: {problem}" for problem in snapshot.problems]
    mine = [e for e in snapshot.for_domain(domain_name) if scope(e)]
    entries = _mark_restoring(host, [e for e in mine if e.role != "keep"], busy)
    home = [e for e in mine if e.role == "keep"]

    def give_back(entry: Entry) -> None:
        # caught here, so one device's trouble never stops the rest of its group going home
        try:
            went_home = restore_entry(host, entry, entry.original_driver, entry.original_override,
                                      deadline, marked=True)
        except Exception as err:
            failures.append(f"{entry.address}: {describe(err)}")
            return
        if went_home:
            home.append(entry)
        else:
            failures.append(f"{entry.address}: {entry.error}")

    host.switcher  # noqa: B018 -- built once, before the group workers share it
    outcomes, _ = run_bounded(
        host, entries, lambda e: _entry_group(host, e), give_back, deadline=deadline,
        budget=host.config.restore_timeout, entry_of=lambda e: e, afterwards=_goes_back,
        stop_when_late=False,
    )
    failures += [f"{o.item.address}: never attempted" for o in outcomes if not o.attempted]
    forget(host, *home)  # one journal write for every device that went home
    return failures


def _mark_restoring(host: Host, entries: list[Entry], busy: frozenset) -> list[Entry]:
    """Mark all `entries` restoring in one write; return those still this domain's and
    not taken meanwhile by a run in `busy` (pids of runs stuck in the kernel)."""
    if not entries:
        return []
    mine = []
    with host.journal.transaction() as journal:
        for entry in entries:
            current = journal.get(entry.address)
            if current is not None and current.domain == entry.domain and current.pid not in busy:
                entry.touch("restoring")
                journal[entry.address] = entry
                mine.append(entry)
    return mine


def _entry_group(host: Host, entry: Entry) -> str:
    return host.sysfs.iommu_group(PciAddress.parse(entry.address)) or entry.address


