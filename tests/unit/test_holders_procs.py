"""The pass over /proc shared out over forked workers: the same findings as one process
reading everything, whatever happens to a worker."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.support.simhost import HOST_MNT_NS, SimHost, resource_path
from tests.support.simkernel import SimKernel
from vfio_libvirt import holders_procs
from vfio_libvirt.holders_procs import ProcessScan, fan_out

GPU = "0000:01:00.0"
NIC = "0000:00:03.0"
CONTAINER_NS = "mnt:[4026532999]"


@pytest.fixture
def proc(monkeypatch) -> Path:
    """Forty processes of every kind the scan tells apart, and workers from 1 process up."""
    monkeypatch.setattr(holders_procs, "PARALLEL_FROM", 1)
    host = SimHost(SimKernel(Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"])))
    for pid in range(100, 140):
        if pid % 7 == 0:
            host.process(pid, f"kworker/{pid}", fds=("/dev/dri/card0",), kernel_thread=True)
            continue
        fds = ("/dev/null", f"socket:[{pid}]", *(("/dev/dri/card0",) if pid % 5 == 0 else ()))
        maps = ("/usr/bin/app", *((resource_path(GPU, pid % 3),) if pid % 4 == 0 else ()))
        host.process(pid, f"app{pid}", fds=fds, maps=maps,
                     mnt_ns=CONTAINER_NS if pid % 6 == 0 else HOST_MNT_NS)
    (host.proc / "133" / "fd").chmod(0)  # denied, when the tests do not run as root
    return host.proc


def everything(scan: ProcessScan) -> tuple:
    namespaces = {ns: sorted(pids) for ns, pids in scan.namespaces().items()}
    return scan.resources(), scan.nodes(), namespaces, scan.denied, sorted(scan._user_pids)


def test_workers_find_what_one_process_finds(proc, monkeypatch):
    alone = everything(ProcessScan(proc, workers=1))
    forks = []
    fork = os.fork
    monkeypatch.setattr(holders_procs.os, "fork", lambda: forks.append(1) or fork())
    assert alone[0] == {GPU: {pid: {f"resource{pid % 3}"} for pid in range(100, 140, 4)
                              if pid % 7}}
    assert alone[1]["/dev/dri/card0"] == {pid for pid in range(100, 140, 5) if pid % 7}
    for workers in (2, 3, 4):
        assert everything(ProcessScan(proc, workers=workers)) == alone
    assert len(forks) == 1 + 2 + 3


def test_a_second_pass_for_fds_is_shared_out_too(proc):
    alone = ProcessScan(proc, workers=1)
    shared = ProcessScan(proc, workers=3)
    assert shared.resources() == alone.resources()  # maps first: a NIC's device
    assert everything(shared) == everything(alone)


def test_a_worker_that_cannot_be_forked_has_its_share_read_here(proc, monkeypatch):
    alone = everything(ProcessScan(proc, workers=1))

    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(holders_procs.os, "fork", no_fork)
    assert everything(ProcessScan(proc, workers=3)) == alone


def test_a_worker_that_dies_or_answers_garbage_has_its_share_read_here(proc, monkeypatch):
    alone = everything(ProcessScan(proc, workers=1))
    parent = os.getpid()
    scan_share = holders_procs.scan_share
    for failure in ("dies", "garbage", "exits quietly"):
        def flaky(*args, failure=failure, **kwargs):
            if os.getpid() != parent:
                if failure == "dies":
                    os._exit(3)
                if failure == "exits quietly":
                    os._exit(0)
                return lambda: None  # marshal cannot carry it
            return scan_share(*args, **kwargs)

        monkeypatch.setattr(holders_procs, "scan_share", flaky)
        assert everything(ProcessScan(proc, workers=2)) == alone, failure


def test_a_worker_blocked_for_good_is_ended_and_its_share_read_here(monkeypatch):
    monkeypatch.setattr(holders_procs, "PARALLEL_FROM", 1)
    monkeypatch.setattr(holders_procs, "WORKER_SECONDS", 1)
    parent = os.getpid()

    def work(items):
        if os.getpid() != parent:
            time.sleep(60)  # a read of a stuck process's maps
        return [(os.getpid(), item) for item in items]

    started = time.monotonic()
    assert sorted(r for share in fan_out(work, [1, 2, 3, 4], 2) for r in share) == [
        (parent, 1), (parent, 2), (parent, 3), (parent, 4)]
    assert time.monotonic() - started < 10


def test_a_worker_keeps_none_of_our_files(monkeypatch, tmp_path):
    """A state lock or the hook's stdout held by a lingering worker would outlive the hook."""
    monkeypatch.setattr(holders_procs, "PARALLEL_FROM", 1)
    ours = os.open(tmp_path / "lock", os.O_CREAT | os.O_RDWR)
    parent = os.getpid()
    try:
        def work(items):
            return os.getpid(), sorted(int(fd) for fd in os.listdir("/proc/self/fd"))

        (here, _), (child, fds) = fan_out(work, [1, 2], 2)
    finally:
        os.close(ours)
    assert here == parent and child != parent
    assert ours not in fds and 1 not in fds and 2 not in fds
    assert len(fds) <= 2  # the pipe it answers on, and the listing's own directory


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_workers_forked_from_the_guards_thread(proc):
    """The hook reads holders in a thread it can stop waiting for (host.holders_of)."""
    alone = everything(ProcessScan(proc, workers=1))
    result = []
    worker = threading.Thread(target=lambda: result.append(everything(ProcessScan(proc, workers=2))))
    worker.start()
    worker.join(30)
    assert result == [alone]


def test_few_processes_or_one_cpu_fork_nothing(monkeypatch):
    monkeypatch.setattr(holders_procs.os, "fork", lambda: pytest.fail("forked"))
    assert fan_out(sum, list(range(10)), 4) == [45]
    monkeypatch.setattr(holders_procs, "PARALLEL_FROM", 1)
    assert fan_out(sum, list(range(10)), 1) == [45]
