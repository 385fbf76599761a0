"""Run device switches IOMMU group by IOMMU group, the groups side by side, with a deadline.

A switch is mostly the kernel's time: a driver's remove() and probe() run inside our
write(2), and some take seconds (a GPU, an NVMe).  Devices of one IOMMU group move
together and in order (a group is usable by VFIO only as a whole), but different groups
share nothing, so an 8-GPU VM need not pay every GPU's unbind in series.  Each group
gets a worker thread (at most MAX_WORKERS at once); the journal stays consistent
because every update takes its exclusive lock.  A group stops at its first failure;
what to undo is the caller's decision, made with every group's outcome in hand.

The caller's thread never enters the kernel for a switch: a write(2) a driver keeps
sleeping in cannot be interrupted, so the only way to keep a deadline is to stop
*waiting* for it.  `Run.wait(until=…)` does that; the worker is left to finish its
write, and `Run.stop()` keeps its group from starting anything after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

MAX_WORKERS = 32
"""Groups switched at once: a large GPU server or a VM with dozens of VFs in one round;
the workers mostly wait in the kernel, so even a small host carries them."""

Item = TypeVar("Item")


@dataclass
class Outcome(Generic[Item]):
    item: Item
    error: BaseException | None = None
    attempted: bool = False
    """False for items never started: after their group's first failure, or after stop()."""
    done: bool = False
    """False while the work on it is still running (a write still in the kernel)."""


class Run(Generic[Item]):
    """Groups at work in their own threads; the caller waits with or without a deadline."""

    def __init__(
        self, items: Sequence[Item], group_of: Callable[[Item], Hashable], work: Callable[[Item], None],
    ) -> None:
        groups: dict[Hashable, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(group_of(item), []).append(index)
        self.outcomes: list[Outcome[Item]] = [Outcome(item) for item in items]
        self._work = work
        self._stopped = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_WORKERS)
        self._threads = [
            threading.Thread(target=self._run_group, args=(indexes,), name="vfio-group", daemon=True)
            for indexes in groups.values()
        ]
        for thread in self._threads:
            thread.start()

    def _run_group(self, indexes: list[int]) -> None:
        with self._slots:
            for index in indexes:
                if self._stopped.is_set():
                    return
                outcome = self.outcomes[index]
                outcome.attempted = True
                try:
                    self._work(outcome.item)
                except BaseException as err:  # recorded; the caller decides
                    outcome.error = err
                    return
                finally:
                    outcome.done = True

    def wait(self, until: float | None = None) -> bool:
        """Wait for every group, or until the monotonic time `until`; True if all finished."""
        for thread in self._threads:
            thread.join(None if until is None else max(0.0, until - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        """Start no further item; what is already running runs to its end."""
        self._stopped.set()

    @property
    def unfinished(self) -> list[Outcome[Item]]:
        """Items whose work was started and is still running."""
        return [o for o in self.outcomes if o.attempted and not o.done]

    def raise_fatal(self) -> None:
        """Re-raise a BaseException that is not an Exception (a KeyboardInterrupt, a test's
        simulated crash): the process would have died there."""
        for outcome in self.outcomes:
            if outcome.error is not None and not isinstance(outcome.error, Exception):
                raise outcome.error


def start(
    items: Sequence[Item], group_of: Callable[[Item], Hashable], work: Callable[[Item], None],
) -> Run[Item]:
    """Start `work` on every item, one worker per group, items of a group in their order."""
    return Run(items, group_of, work)

