"""IOMMU groups switch side by side, each group in order, one journal writer at a time,
and a failure in any group rolls back every group the run switched."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from tests.unit.conftest import AUDIO_BDF, GPU_BDF, domain_xml, pci, run_hook, write_config
from vfio_libvirt import engine

E1000E = "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00"
NICS = [f"0000:0{n}:00.0" for n in range(2, 10)]  # eight e1000e NICs, one IOMMU group each


def journal() -> dict:
    path = Path(os.environ["VFIO_LIBVIRT_STATE_DIR"]) / "journal.json"
    return json.loads(path.read_text())["devices"] if path.exists() else {}


@pytest.fixture
def many(sim):
    for n, bdf in enumerate(NICS):
        sim.add_device(bdf, E1000E, group=str(20 + n), driver="e1000e")
    return sim


@pytest.fixture
def overlap(sim, monkeypatch):
    """How many sysfs writes were in the kernel at once, and in what order they came."""
    state = {"now": 0, "most": 0, "order": []}
    lock = threading.Lock()
    write = sim.write

    def counting(path, value):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["order"].append(Path(path).name if Path(path).name != "drivers_probe" else value)
        try:
            write(path, value)
        finally:
            with lock:
                state["now"] -= 1

    import vfio_libvirt.sysfs
    monkeypatch.setattr(vfio_libvirt.sysfs, "_write", counting)
    sim.faults.write_delay = 0.05
    return state


def test_groups_switch_side_by_side_and_the_journal_loses_nothing(many, overlap):
    xml = domain_xml("vm1", *[pci(bdf) for bdf in NICS])
    assert run_hook("vm1", "prepare", "begin", xml) == 0
    assert overlap["most"] >= 4  # eight groups, writes in flight together
    entries = journal()
    assert sorted(entries) == NICS
    assert {(e["status"], e["target_driver"]) for e in entries.values()} == {("bound", "vfio-pci")}
    overlap["most"] = 0
    assert run_hook("vm1", "release", "end", xml) == 0
    assert overlap["most"] >= 4
    assert all(many.driver_of(bdf) == "e1000e" for bdf in NICS) and journal() == {}


def test_one_group_failing_rolls_back_every_group(many, overlap, capsys):
    # the failing group retries until bind_seconds; the rollback gets restore_seconds of its own
    write_config('[libvirt]\nversion = "11.3.0"\n[timeouts]\nbind_seconds = 1\nrestore_seconds = 10\n')
    many.faults.probe_fails[NICS[5]] = {"vfio-pci"}
    xml = domain_xml("vm1", *[pci(bdf) for bdf in NICS])
    assert run_hook("vm1", "prepare", "begin", xml) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{NICS[5]}: cannot bind vfio_pci" in err
    assert all(many.driver_of(bdf) == "e1000e" for bdf in NICS)
    assert all(many.override_of(bdf) is None for bdf in NICS)
    assert journal() == {}


def test_the_devices_of_one_group_switch_in_order(sim, overlap):
    """The GPU and its audio function share IOMMU group 1: never both in the kernel at once."""
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(GPU_BDF), pci(AUDIO_BDF))) == 0
    assert overlap["most"] == 1
    order = overlap["order"]
    assert order.index(AUDIO_BDF) > order.index(GPU_BDF)  # probes in the domain's order


def test_a_crash_in_one_group_is_a_crash_of_the_run():
    """A BaseException that is no Exception (a kill, here) ends the run once every
    worker has stopped; ordinary failures are returned for the caller to undo."""
    class Killed(BaseException):
        pass

    done: list[int] = []

    def work(n: int) -> None:
        if n == 3:
            raise Killed
        if n == 5:
            raise OSError("EBUSY")
        done.append(n)

    killed = engine.start(list(range(8)), lambda n: n % 4, work)
    assert killed.wait() is True  # every worker has stopped first
    with pytest.raises(Killed):
        killed.raise_fatal()
    run = engine.start([0, 1, 2, 5, 6], lambda n: n % 4, lambda n: work(n) if n != 3 else None)
    run.wait()
    run.raise_fatal()
    assert [(o.item, type(o.error).__name__ if o.error else None, o.attempted) for o in run.outcomes] == [
        (0, None, True), (1, None, True), (2, None, True), (5, "OSError", True), (6, None, True)]


def test_a_group_stops_at_its_first_failure():
    seen: list[int] = []

    def work(n: int) -> None:
        seen.append(n)
        if n == 1:
            raise ValueError("no")

    run = engine.start([1, 3, 5, 2], lambda n: n % 2, work)
    run.wait()
    assert [o.attempted for o in run.outcomes] == [True, False, False, True]
    assert sorted(seen) == [1, 2]


def test_a_deadline_stops_the_waiting_not_the_work():
    """A worker asleep in the kernel cannot be interrupted: the caller stops waiting at the
    deadline, and stop() keeps the rest of that group from starting afterwards."""
    gate, seen = threading.Event(), []

    def work(n: int) -> None:
        seen.append(n)
        if n == 0:
            gate.wait()  # a write that does not come back by itself

    run = engine.start([0, 2, 1, 3], lambda n: n % 2, work)
    began = time.monotonic()
    assert run.wait(until=began + 0.3) is False
    assert 0.25 < time.monotonic() - began < 1.0
    assert [o.item for o in run.unfinished] == [0]
    run.stop()
    gate.set()
    assert run.wait() is True
    assert sorted(seen) == [0, 1, 3]  # 2 was queued behind 0 in its group: never started
    assert [(o.item, o.attempted, o.done) for o in run.outcomes] == [
        (0, True, True), (2, False, False), (1, True, True), (3, True, True)]
