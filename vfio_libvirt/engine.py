"""Run device switches IOMMU group by IOMMU group, the groups side by side.

A switch is mostly the kernel's time: a driver's remove() and probe() run inside our
write(2), and some take seconds (a GPU, an NVMe).  Devices of one IOMMU group move
together and in order (a group is usable by VFIO only as a whole), but different groups
share nothing, so an 8-GPU VM need not pay every GPU's unbind in series.  Each group
gets a worker thread (at most MAX_WORKERS at once); the journal stays consistent
because every update takes its exclusive lock.  A group stops at its first failure;
what to undo is the caller's decision, made with every group's outcome in hand.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    attempted: bool = True
    """False for the items of a group after its first failure: never started."""


def by_group(
    items: Sequence[Item], group_of: Callable[[Item], Hashable], work: Callable[[Item], None],
) -> list[Outcome[Item]]:
    """Run `work` on every item, one worker per group, items of a group in their order.

    Returns the outcomes in the order of `items`.  A BaseException that is not an
    Exception (a KeyboardInterrupt, a test's simulated crash) is re-raised once every
    worker has stopped, as the process would have died there.
    """
    groups: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(group_of(item), []).append(index)
    outcomes: list[Outcome[Item]] = [Outcome(item, attempted=False) for item in items]

    def run_group(indexes: list[int]) -> None:
        for index in indexes:
            outcome = outcomes[index]
            outcome.attempted = True
            try:
                work(outcome.item)
            except BaseException as err:  # recorded; the caller decides
                outcome.error = err
                return

    if len(groups) <= 1:
        for indexes in groups.values():
            run_group(indexes)
    else:
        with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(groups)),
                                thread_name_prefix="vfio-group") as pool:
            for future in [pool.submit(run_group, indexes) for indexes in groups.values()]:
                future.result()
    for outcome in outcomes:
        if outcome.error is not None and not isinstance(outcome.error, Exception):
            raise outcome.error
    return outcomes
