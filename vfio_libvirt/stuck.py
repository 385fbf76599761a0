"""Switches with a deadline the kernel cannot break: answer on time, finish later.

A driver's remove() or probe() runs inside our write(2) and may sleep there for as
long as its users keep it (snd_hda_intel with an open PCM, nvidia with clients); the
writer sleeps uninterruptibly, so no signal or timeout ends the write.  libvirt waits
for its hook with no timeout, so a run waits for its group workers only until the
deadline.  Then every device whose worker is still busy is marked `stuck` in the
journal (with the write it is in and what holds the device), the hook answers libvirt
(`Host.answer`, see detach.py), and this process stays behind to wait for the kernel
and finish the job the caller describes, updating the journal as it goes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from vfio_libvirt import engine
from vfio_libvirt.host import Host
from vfio_libvirt.pci import PciAddress
from vfio_libvirt.state import Entry

log = logging.getLogger("vfio_libvirt")

Item = TypeVar("Item")

GRACE = 0.25
"""Seconds past the deadline for workers that are not inside a kernel write: they stop
waiting at the deadline themselves (a holder, a retry) and only need to record it."""


def run_bounded(
    host: Host, items: Sequence[Item], group_of: Callable[[Item], Hashable],
    work: Callable[[Item], None], *, deadline: float, budget: float,
    entry_of: Callable[[Item], Entry], afterwards: Callable[[Entry], str], stop_when_late: bool,
) -> tuple[list[engine.Outcome[Item]], bool]:
    """Run `work` group by group; return the outcomes and whether the run was late.

    Late: not finished at the deadline (plus GRACE for workers between writes).  Then
    the caller has been answered (exit 1) before this returns, the unfinished devices
    are marked stuck, and the outcomes are final.  `stop_when_late`: items not started
    by then never start (a start that failed binds nothing more; a stop keeps going, as
    every device must go home).  `budget` is the deadline's length, for the message;
    `afterwards(entry)` says what happens to a stuck device once its write returns.
    """
    run = engine.start(items, group_of, work)
    if run.wait(until=deadline) or _wait_for_stragglers(host, run, entry_of, deadline + GRACE):
        run.raise_fatal()
        return run.outcomes, False
    if stop_when_late:
        run.stop()
    found = [(entry_of(o.item), *describe(host, entry_of(o.item), budget)) for o in run.unfinished]
    mark_stuck(host, found)
    lines = [f"{entry.address}: {why}; marked stuck, {afterwards(entry)}" for entry, why, _ in found]
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    answer(host, 1, lines[0] + more if lines else f"still switching after {budget:g} s")
    for line in lines:
        log.error("%s", line)
    run.wait()  # the kernel decides how long; nobody is waiting on us any more
    run.raise_fatal()
    for entry, _, _ in found:
        log.info("%s %s: the stuck write returned", entry.domain, entry.address)
    return run.outcomes, True


def _wait_for_stragglers(
    host: Host, run: engine.Run[Item], entry_of: Callable[[Item], Entry], until: float,
) -> bool:
    """Give workers that are not inside a kernel write until `until`; True if all finished."""
    while True:
        if run.wait(until=min(until, time.monotonic() + 0.005)):
            return True
        if time.monotonic() >= until or any(
            entry_of(o.item).address in host.switcher.in_kernel for o in run.unfinished
        ):
            return False


def describe(host: Host, entry: Entry, budget: float) -> tuple[str, float]:
    """('unbind from e1000e still in the kernel after 3 s (held by …)', when it began)."""
    what, since = host.switcher.in_kernel.get(entry.address, ("its switch", time.monotonic() - budget))
    held = _holders(host, PciAddress.parse(entry.address))
    seconds = time.monotonic() - since
    why = (f"{what} still in the kernel after {seconds:.0f} s "
           f"({'held by ' + ', '.join(held) if held else 'nothing known holds it'})")
    return why, time.time() - seconds


def _holders(host: Host, address: PciAddress) -> list[str]:
    """What holds the device, from what this run already knows: nothing slow, nothing new."""
    try:
        found = host.sysfs.vfio_holders(address)
    except OSError:
        found = []
    known = host.known_holders(address)
    return found + [str(h) for h in known.holders] if known is not None else found


def mark_stuck(host: Host, stuck: list[tuple[Entry, str, float]]) -> None:
    """Record each (entry, why, when its write began): `updated` is when the write began,
    so the age `status` shows is how long the kernel has kept it."""
    with host.journal.transaction() as journal:
        for entry, why, began in stuck:
            current = journal.get(entry.address)
            if current is not None and current.domain != entry.domain:
                continue
            entry.touch("stuck", why)
            entry.updated = began
            journal[entry.address] = entry


def answer(host: Host, code: int, message: str) -> None:
    """Tell whoever runs us the outcome now; the run goes on (the CLI has nobody to tell)."""
    if host.answer is not None:
        host.answer(code, message)
    else:
        log.warning("%s; waiting for the kernel", message)


def refuse_if_stuck(host: Host, domain: str) -> list[str]:
    """`domain`'s devices still stuck in a live run's kernel write, as one line each."""
    lines = []
    for entry in host.journal.read().for_domain(domain):
        if entry.status == "stuck" and host.domain_locks.busy(domain):
            age = time.time() - entry.updated
            lines.append(f"{entry.address}: {entry.error} (stuck for {age:.0f} s; "
                         f"pid {entry.pid} finishes the job when the write returns)")
    return lines
