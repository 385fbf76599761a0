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
import os
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from typing import TypeVar

from vfio_libvirt import engine
from vfio_libvirt.apply import LATE_GRACE
from vfio_libvirt.apply import describe as describe_error
from vfio_libvirt.host import Host
from vfio_libvirt.pci import PciAddress
from vfio_libvirt.state import Entry

log = logging.getLogger("vfio_libvirt")

Item = TypeVar("Item")

STUCK_LOCK_SECONDS = 1.0
"""How long marking devices stuck may wait for the journal lock before answering anyway."""


def run_bounded(
    host: Host, items: Sequence[Item], group_of: Callable[[Item], Hashable],
    work: Callable[[Item], None], *, deadline: float, budget: float,
    entry_of: Callable[[Item], Entry], afterwards: Callable[[Entry], str], stop_when_late: bool,
) -> tuple[list[engine.Outcome[Item]], bool]:
    """Run `work` group by group; return the outcomes and whether the run was late.

    Late: not finished at the deadline (plus LATE_GRACE for workers between writes).  Then
    the caller has been answered (exit 1) before this returns, the devices whose write
    is in the kernel are marked stuck, and the outcomes are final.  `stop_when_late`:
    items not started by then never start (a start that failed binds nothing more; a
    stop keeps going, as every device must go home).  `budget` is the deadline's length,
    for the message; `afterwards(entry)` says what happens to a stuck device later.
    """
    run = engine.start(items, group_of, work)
    if run.wait(until=deadline) or _wait_for_stragglers(host, run, entry_of, deadline + LATE_GRACE):
        run.raise_fatal()
        return run.outcomes, False
    try:
        if stop_when_late:
            run.stop()
        found = _in_kernel(host, run, entry_of)
        lines = [f"{entry.address}: {why}; marked stuck, {afterwards(entry)}" for _, entry, why, _ in found]
        try:
            mark_stuck(host, found)
        except Exception as err:  # a full /run, a held lock: still answer, still finish
            lines = [line.replace("; marked stuck,", ";") for line in lines]
            lines.append(f"the journal could not record it ({describe_error(err)})")
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        answer(host, 1, lines[0] + more if lines else
               f"still switching after {budget:g} s; finishing in the background")
        for line in lines:
            log.error("%s", line)
    finally:
        run.wait()  # the kernel decides how long; never leave a worker inside a write
    run.raise_fatal()
    for _, entry, _, _ in found:
        log.info("%s %s: the stuck write returned", entry.domain, entry.address)
    return run.outcomes, True


def _wait_for_stragglers(
    host: Host, run: engine.Run[Item], entry_of: Callable[[Item], Entry], until: float,
) -> bool:
    """Wait until `until`, or until a write has been in the kernel for LATE_GRACE already (it
    is stuck: answer now); True if every worker finished."""
    while True:
        now = time.monotonic()
        if run.wait(until=min(until, now + 0.005)):
            return True
        if now >= until:
            return False
        for outcome in run.unfinished:
            inside = host.switcher.in_kernel.get(entry_of(outcome.item).address)
            if inside is not None and now - inside[1] >= LATE_GRACE:
                return False


Stuck = tuple[engine.Outcome[Item], Entry, str, float]
"""(outcome, its entry, 'unbind from X still in the kernel after N s (…)', wall time it began)"""


def _in_kernel(host: Host, run: engine.Run[Item], entry_of: Callable[[Item], Entry]) -> list[Stuck]:
    """The unfinished items whose worker is inside a kernel write now, described."""
    found = []
    for outcome in run.unfinished:
        entry = entry_of(outcome.item)
        inside = host.switcher.in_kernel.get(entry.address)
        if inside is None:
            continue  # between writes: it stops at the deadline by itself
        what, since = inside
        seconds = time.monotonic() - since
        held = _holders(host, entry.address)
        why = (f"{what} still in the kernel after {seconds:.0f} s "
               f"({'held by ' + ', '.join(held) if held else 'nothing known holds it'})")
        found.append((outcome, entry, why, time.time() - seconds))
    return found


def _holders(host: Host, address: str) -> list[str]:
    """What holds the device, from what this run already knows: no /proc scan now."""
    seen = host.switcher.holders_seen.get(address, {})
    known = host.known_holders(PciAddress.parse(address))
    return [f"{pid} ({comm})" for pid, comm in seen.items()] + (
        [str(h) for h in known.holders] if known is not None else [])


def mark_stuck(host: Host, found: list[Stuck]) -> None:
    """Record each device as stuck, unless its worker has finished meanwhile.

    The worker owns its Entry object and writes its own outcome (restore-failed, say):
    this writes a copy, under the journal lock, and never over a worker that is done or
    over restore-failed.  `updated` is when the write began, so `status` shows how long
    the kernel has kept it.  The lock wait is short: libvirt is waiting for an answer.
    """
    with host.journal.transaction(lock_timeout=STUCK_LOCK_SECONDS) as journal:
        for outcome, entry, why, began in found:
            current = journal.get(entry.address)
            if (outcome.done or current is None or current.domain != entry.domain
                    or current.status == "restore-failed"):
                continue
            marked = replace(current)
            marked.touch("stuck", why)
            marked.updated = began
            journal[entry.address] = marked


def answer(host: Host, code: int, message: str) -> None:
    """Tell whoever runs us the outcome now; the run goes on (the CLI has nobody to tell)."""
    if host.answer is not None:
        host.answer(code, message)
    else:
        log.warning("%s; waiting for the kernel", message)


def stuck_entries(host: Host, domain: str) -> list[Entry]:
    """`domain`'s entries stuck in a live run's kernel write (none if that run is gone:
    then a release or restore may take them over).  Alive: its process exists and one of
    the domain's locks is held; another run holding the lock does not keep a dead run's
    entry alive."""
    stuck = [e for e in host.journal.read().for_domain(domain)
             if e.status == "stuck" and (e.pid is None or _process_exists(e.pid))]
    return stuck if stuck and host.domain_locks.busy(domain) else []


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists
    return True


def stuck_line(entry: Entry) -> str:
    return (f"{entry.address}: {entry.error} (stuck for {time.time() - entry.updated:.0f} s; "
            f"pid {entry.pid} finishes the job when the write returns)")


def refuse_if_stuck(host: Host, domain: str) -> list[str]:
    """`domain`'s devices still stuck in a live run's kernel write, as one line each."""
    return [stuck_line(e) for e in stuck_entries(host, domain)]
