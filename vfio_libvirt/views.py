"""Read-only views of the journal against the host: what a start would do now, and where
sysfs disagrees with the journal.  Both write nothing, so `plan`, `status`, `doctor`,
dry runs and the hook's `reconnect` can call them at any time.
"""

from __future__ import annotations

import time
from dataclasses import replace

from vfio_libvirt.domain import Domain
from vfio_libvirt.host import Host, make_plan
from vfio_libvirt.pci import PciAddress
from vfio_libvirt.plan import Plan
from vfio_libvirt.state import Entry


def preview(host: Host, domain: Domain) -> Plan:
    """What `prepare` would do now, journal included (for `plan` and dry runs); writes nothing."""
    plan = make_plan(host, domain)
    snapshot = host.journal.read()
    problems = []
    for step in plan.steps:
        key = str(step.address)
        if key in snapshot.blocked and step.action in ("bind", "keep"):
            problems.append(f"{key}: {snapshot.blocked[key]}")
        entry = snapshot.entries.get(key)
        if entry is not None and entry.domain != domain.name:
            problems.append(f"{key} is in use by domain {entry.domain} ({entry.status}); a start "
                            f"would wait up to {host.config.bind_timeout:g} s for it to be given back")
    return replace(plan, problems=plan.problems + tuple(problems)) if problems else plan


def drift(host: Host, domain_name: str | None = None) -> list[str]:
    """Where sysfs disagrees with the journal (for reconnect, `status`, `doctor`); changes nothing."""
    found = []
    for entry in host.journal.read().entries.values():
        if domain_name is not None and entry.domain != domain_name:
            continue
        address = PciAddress.parse(entry.address)
        if not host.sysfs.exists(address):
            found.append(f"{address}: in the journal for {entry.domain} but gone from the host")
            continue
        if entry.in_flight and not host.domain_locks.busy(entry.domain):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.updated))
            state = "left stuck in the kernel" if entry.status == "stuck" else f"stuck in {entry.status}"
            found.append(f"{address}: {entry.domain}'s entry is {state} since {since} "
                         f"(written by pid {entry.pid}; no run is at work on that domain); "
                         f"run: vfio-libvirt restore --domain {entry.domain}")
            continue
        current = host.sysfs.driver(address)
        expected = _expected_driver(entry)
        if expected is not None and current != expected:
            found.append(
                f"{address}: journal says {entry.domain} has it on {expected}, "
                f"sysfs says {current or 'no driver'}"
            )
        elif entry.role == "watch" and not host.on_vfio_driver(address):
            found.append(f"{address}: {entry.domain} (managed='yes') runs but the device is on "
                         f"{current or 'no driver'}, not a VFIO driver")
    return found


def _expected_driver(entry: Entry) -> str | None:
    if entry.role in ("bind", "companion", "keep") and entry.status == "bound":
        return entry.target_driver or entry.original_driver
    return None
