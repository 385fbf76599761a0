"""What processes hold: one pass over /proc, shared by a plan's devices and split over CPUs.

A process holds a device when it has one of the device's nodes open (a DRM card, an
NVMe namespace, a VFIO group or cdev) or its BARs mapped (`<bdf>/resource0`); a mount
that exists only in a container's mount namespace is found through each process's
`ns/mnt`.  Only procfs tells any of this, one process at a time: a read of its memory
map, and one readlink per open file.  Nothing cheaper says what an fd is: `lstat` of
an fd link describes the link, a directory entry names only the number, and a `stat`
through the link asks the file's filesystem (a hung FUSE or NFS server blocks it).  So
the pass is a count of syscalls — on a host of 2,000 processes with 10-40 open files
each, some 70,000 — and what this module does about it is keep to that count and share
it out:

- one pass: a process's maps, its fds and (when asked) its `ns/mnt` are read together;
  per fd only the readlink, relative to the open fd directory (a third of a walk from
  /proc), and a prefix test; a kernel thread (empty maps) costs one read;
- the processes are dealt round-robin to up to `MAX_WORKERS` forked workers when the
  host has the CPUs and enough processes to pay for a fork (about 1.5 ms).  Each reads
  its share and hands back what it found, marshalled through a pipe.  Threads do not
  pay: the GIL changes hands at every syscall; on 2 CPUs and the simulated host of
  benchmarks/bench_guard.py two threads were no faster than one, while two forked
  workers took 40% off a device's read.  A worker that cannot be forked, dies, or sends
  nothing whole has its share read here instead: a failure costs time, never findings.
  A worker closes every file it inherited — a state lock must not outlive the hook
  that took it, nor the hook's stdout, which libvirt reads to its end — and dies after
  `WORKER_SECONDS` even inside a blocked read (a process stuck holding its mmap lock
  blocks a read of its maps).

The scan tolerates a tree that changes under it: a process that exits between the
listing of /proc and the reading of its files is skipped without a word.
"""

from __future__ import annotations

import marshal
import os
import re
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

MAX_WORKERS = 4
"""Workers at most, however many CPUs: only 2 CPUs were measured (2 workers nearly halve
the pass there, a third gains nothing), so a larger host gets a modest share, not all."""
PARALLEL_FROM = 256
"""Processes below which one process reads them all: a fork costs more than it saves."""
WORKER_SECONDS = 120
"""A worker's life at most, then SIGALRM (default action) ends it whatever it waits on."""

_RESOURCE = re.compile(
    rb"/([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])/(resource\d+(?:_wc)?)$", re.MULTILINE)
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class ProcessScan:
    """What processes hold, indexed for any device, filled by at most two passes over /proc.

    Memory maps (`resource*` files of any BDF) are always needed; open files only when a
    device has nodes to look for (a plain NIC on its host driver has none), and reading
    every fd link is the dear part.  When a device with nodes comes first, one pass does
    both; a later pass for fds visits only the processes the first found to be userspace.
    The mount namespace of each userspace process (one readlink of `ns/mnt`) is read in
    the same pass when a device has block devices: a mount may exist only in a
    container's or a service's namespace.
    """

    def __init__(self, proc: Path, workers: int | None = None) -> None:
        """`workers`: how many processes may read /proc at once; by default one per CPU
        we may run on, at most MAX_WORKERS."""
        self.proc = proc
        self.workers = workers if workers is not None else min(_cpus(), MAX_WORKERS)
        self.error: str | None = None
        """Why /proc could not be listed at all."""
        self.denied: set[int] = set()
        """Processes whose files we may not read (not running as root)."""
        self._resources: dict[str, dict[int, set[str]]] | None = None
        self._nodes: dict[str, set[int]] | None = None
        self._namespaces: dict[str, list[int]] | None = None
        self._user_pids: list[int] = []

    def resources(self) -> dict[str, dict[int, set[str]]]:
        """BDF → pid → the device's resource files it maps (`resource0`, `resource2_wc`)."""
        if self._resources is None:
            self._scan(fds=False, ns=False)
        return self._resources or {}

    def nodes(self) -> dict[str, set[int]]:
        """/dev path, as readlink shows an open fd → pids."""
        if self._nodes is None:
            self._scan(fds=True, ns=False)
        return self._nodes or {}

    def namespaces(self) -> dict[str, list[int]]:
        """Mount namespace (`mnt:[4026531841]`) → the userspace pids in it.  Open files
        are indexed in the same pass: whoever asks has block devices, hence nodes."""
        if self._namespaces is None:
            self._scan(fds=True, ns=True)
        return self._namespaces or {}

    def _scan(self, fds: bool, ns: bool) -> None:
        fds, ns = fds and self._nodes is None, ns and self._namespaces is None
        maps = self._resources is None
        if maps:
            try:
                names = os.listdir(self.proc)
            except OSError as err:
                self.error = f"{self.proc}: {err.strerror or type(err).__name__}"
                self._resources, self._nodes, self._namespaces = {}, {}, {}
                return
            pids = [int(name) for name in names if name.isdigit() and name.isascii()]
        else:  # maps are read: only userspace remains
            pids = self._user_pids
        read = partial(scan_share, str(self.proc), maps=maps, fds=fds, ns=ns)
        found = [Found.from_wire(wire) for wire in fan_out(read, pids, self.workers)]
        if maps:
            self._resources = {}
            for share in found:
                self._user_pids += share.user
                for bdf, by_pid in share.resources.items():
                    self._resources.setdefault(bdf, {}).update(by_pid)
        if fds:
            self._nodes = {}
            for share in found:
                for target, pids_ in share.nodes.items():
                    self._nodes.setdefault(target, set()).update(pids_)
        if ns:
            self._namespaces = {}
            for share in found:
                for mnt, pids_ in share.namespaces.items():
                    self._namespaces.setdefault(mnt, []).extend(pids_)
        for share in found:
            self.denied.update(share.denied)


class Found:
    """What one share of the processes holds, in containers marshal can carry."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[int, set[str]]] = {}
        self.nodes: dict[str, set[int]] = {}
        self.namespaces: dict[str, list[int]] = {}
        self.user: list[int] = []
        """The userspace processes (non-empty maps, or maps we may not read)."""
        self.denied: set[int] = set()

    def to_wire(self) -> tuple[Any, ...]:
        return self.resources, self.nodes, self.namespaces, self.user, self.denied

    @classmethod
    def from_wire(cls, wire: tuple[Any, ...]) -> Found:
        found = cls()
        found.resources, found.nodes, found.namespaces, found.user, found.denied = wire
        return found

    def read_maps(self, pid_dir: str, pid: int) -> bool:
        """Index the process's resource mappings; False for a kernel thread (no memory map)."""
        try:
            fd = os.open(f"{pid_dir}/maps", _READ_FLAGS)
        except PermissionError:
            self.denied.add(pid)
            return True
        except OSError:
            return True  # gone (its fd directory will say so), or a tree without maps
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        except OSError:
            return True  # exited while we read
        finally:
            os.close(fd)
        if not chunks:
            return False  # a kernel thread (or a zombie): no memory, no files
        maps = b"".join(chunks)
        if b"/resource" in maps:
            for bdf, resource in _RESOURCE.findall(maps):
                self.resources.setdefault(bdf.decode(), {}).setdefault(pid, set()).add(
                    resource.decode())
        return True

    def read_fds(self, pid_dir: str, pid: int, ns: bool) -> None:
        """Index the process's open /dev nodes; and its namespace (`ns`), read relative to
        the open fd directory, which costs a third of a walk from /proc."""
        try:
            dir_fd = os.open(f"{pid_dir}/fd", _DIR_FLAGS)
        except PermissionError:
            self.denied.add(pid)
            return
        except OSError:
            return  # exited since /proc was listed
        nodes = self.nodes
        try:
            for fd in os.listdir(dir_fd):
                try:
                    target = os.readlink(fd, dir_fd=dir_fd)
                except OSError:
                    continue  # closed meanwhile, or the process exited
                if target.startswith("/dev/"):
                    holders = nodes.get(target)
                    if holders is None:
                        nodes[target] = {pid}
                    else:
                        holders.add(pid)
            if ns:
                self.read_namespace(pid, "../ns/mnt", dir_fd)
        except OSError:
            pass  # the directory went away under us
        finally:
            os.close(dir_fd)

    def read_namespace(self, pid: int, link: str, dir_fd: int | None) -> None:
        """Index the process by its mount namespace (the `ns/mnt` link's target)."""
        try:
            mnt = os.readlink(link, dir_fd=dir_fd)
        except OSError:
            return  # exited, or not ours to inspect (counted by the maps already)
        pids = self.namespaces.get(mnt)
        if pids is None:
            self.namespaces[mnt] = [pid]
        else:
            pids.append(pid)


def scan_share(base: str, pids: list[int], *, maps: bool, fds: bool, ns: bool) -> tuple[Any, ...]:
    """Read `pids` under `base` (/proc): their maps (which also tell userspace from
    kernel threads), fds and namespaces as asked; what they hold, as `Found.to_wire`."""
    found = Found()
    for pid in pids:
        pid_dir = f"{base}/{pid}"
        if maps:
            if not found.read_maps(pid_dir, pid):
                continue
            found.user.append(pid)
        if fds:
            found.read_fds(pid_dir, pid, ns)
        elif ns:
            found.read_namespace(pid, f"{pid_dir}/ns/mnt", None)
    return found.to_wire()


# --- sharing the pass out ------------------------------------------------------------
def fan_out(work: Callable[[list[int]], Any], items: list[int], workers: int) -> list[Any]:
    """`work` of each share of `items`, dealt round-robin over `workers` processes (this
    one and forked ones); what `work` returns must be marshallable.  Few items, or one
    worker, is just `[work(items)]`."""
    if workers < 2 or len(items) < PARALLEL_FROM:
        return [work(items)]
    shares = [items[n::workers] for n in range(workers)]
    started = [(share, _fork(work, share)) for share in shares[1:]]
    results = [work(shares[0])]
    for share, child in started:
        result = _collect(*child) if child else _NOTHING
        results.append(work(share) if result is _NOTHING else result)
    return results


_NOTHING = object()


def _fork(work: Callable[[list[int]], Any], share: list[int]) -> tuple[int, int] | None:
    """A worker reading `share`: (its pid, the pipe it answers on), None if none could
    be started."""
    try:
        read_end, write_end = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:  # the worker: never returns
        status = 1
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(WORKER_SECONDS)
            os.closerange(0, write_end)  # stdout too: libvirt reads the hook's to its end
            os.closerange(write_end + 1, max(os.sysconf("SC_OPEN_MAX"), write_end + 1))
            data = memoryview(marshal.dumps(work(share)))
            while data:
                data = data[os.write(write_end, data):]
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    return pid, read_end


def _collect(pid: int, read_end: int) -> Any:
    """What the worker answered; _NOTHING unless it sent a whole answer and exited 0."""
    chunks = []
    try:
        while chunk := os.read(read_end, 1 << 16):
            chunks.append(chunk)
    except OSError:
        chunks = []
    finally:
        os.close(read_end)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        status = -1  # reaped by someone else: its answer is not to be trusted
    if status != 0 or not chunks:
        return _NOTHING
    try:
        return marshal.loads(b"".join(chunks))
    except (EOFError, ValueError, TypeError):
        return _NOTHING


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
