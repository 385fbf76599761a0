"""What the holder guard adds to a VM start: `HolderReader.read` for one device.

    /usr/bin/python3 benchmarks/bench_guard.py

A simulated host (tests/support/simhost.py) with about 2,000 processes and 100 PCI
devices (NVMe disks with partitions and mounts, NICs, GPUs).  A tenth of the processes
are kernel threads (empty maps, empty fd directory); the rest have 10-40 open files
(/dev/null, ttys, sockets, pipes, eventpolls, logs) and a maps file of 20-120 lines, as
a real host's daemons, shells and workers do.  The dear part of the guard is one
readlink per open file of every process, so the number of open files is what the figure
stands for; until this was written the processes had 4 files each, a sixth of a real
host's.  Each sample is a fresh reader (nothing cached) reading one device, which
includes the one pass over /proc; the median over the repeats is compared with the
target of 20 ms.  The NIC case also runs `ip` three times (here a fake shell script, in
parallel); a real host's `ip` costs about the same as that script.  Under each device,
where the CPU went: the pass runs in forked workers, so on a machine whose CPUs others
are using the wall time hides what a quiet host would see; the line says how much the
other processes took meanwhile, and the CPU per read here and in the workers.

Last, the same pass over this machine's own /proc (read only: maps and fd links, as the
guard reads them), with its counts of processes and open files, because procfs charges
differently from the files that simulate it (a maps line is formatted per read, an fd
link's path is built per readlink).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from tests.support.simhost import NVME, VIRTIO_NET, SimHost, resource_path  # noqa: E402
from tests.support.simkernel import SimKernel  # noqa: E402
from vfio_libvirt.holders import HolderReader  # noqa: E402
from vfio_libvirt.holders_procs import PARALLEL_FROM, ProcessScan  # noqa: E402
from vfio_libvirt.pci import PciAddress  # noqa: E402

GPU = "pci:v000010DEd00002204sv00001458sd00004043bc03sc00i00"
PROCESSES = 2000
TARGET_MS = 20.0


def build(root: Path) -> tuple[SimHost, dict[str, str]]:
    kernel = SimKernel(root)
    host = SimHost(kernel)
    picks = {}
    for n in range(100):
        bdf = f"0000:{n + 1:02x}:00.0"
        if n % 3 == 0:
            kernel.add_device(bdf, NVME, group=str(n), pci_class=0x010802, driver="nvme")
            disk = f"nvme{n}n1"
            host.nvme(bdf, ctrl=f"nvme{n}", namespace=disk, partitions=(f"{disk}p1", f"{disk}p2"))
            host.mount(f"{disk}p1", f"/srv/disk{n}")
            picks.setdefault("nvme", bdf)
        elif n % 3 == 1:
            kernel.add_device(bdf, VIRTIO_NET, group=str(n), driver="virtio-pci")
            host.netdev(bdf, f"eth{n}", under=f"virtio{n}")
            host.ip_link(f"eth{n}", addrs=(f"10.{n}.0.2/24", "fe80::2/64"))
            picks.setdefault("nic", bdf)
        else:
            kernel.add_device(bdf, GPU, group=str(n), pci_class=0x030000, driver="nouveau")
            host.drm(bdf, card=f"card{n}", render=f"renderD{128 + n}")
            picks.setdefault("gpu", bdf)
    host.ip_route("eth1", "10.1.0.1")
    for pid in range(2, PROCESSES + 2):
        if pid % 10 == 0:
            host.process(pid, f"kworker/{pid}", kernel_thread=True)
            continue
        fds = open_files(pid) + (("/dev/dri/card2",) if pid == 999 else ())
        maps = mapped_files(pid) + ((resource_path(picks["gpu"]),) if pid == 777 else ())
        host.process(pid, f"app{pid}", fds=fds, maps=maps)
    return host, picks


def open_files(pid: int) -> tuple[str, ...]:
    """10-40 fds, spread over the processes: stdio on a tty or /dev/null, then what a
    daemon holds (sockets, pipes, an eventpoll, logs, a library)."""
    stdio = "/dev/null" if pid % 3 else f"/dev/pts/{pid % 7}"
    kinds = ("socket:[{pid}{n}]", "pipe:[{pid}{n}]", "anon_inode:[eventpoll]", "/var/log/app{pid}.log",
             "/dev/urandom", "socket:[{pid}{n}9]", "/usr/lib/x86_64-linux-gnu/libssl.so.3",
             "anon_inode:[timerfd]")
    rest = [kinds[n % len(kinds)].format(pid=pid, n=n) for n in range(7 + (pid * 7919) % 31)]
    return (stdio, stdio, stdio, *rest)


def mapped_files(pid: int) -> tuple[str, ...]:
    """20-120 lines: the binary, its libraries (several lines each), the heap."""
    libs = ("libc.so.6", "libm.so.6", "libssl.so.3", "libcrypto.so.3", "libz.so.1",
            "libsystemd.so.0", "libglib-2.0.so.0", "libpython3.11.so.1.0")
    rest = [f"/usr/lib/x86_64-linux-gnu/{libs[n % len(libs)]}" if n % 5 else "[heap]"
            for n in range(19 + (pid * 104729) % 101)]
    return (f"/usr/bin/app{pid % 50}", *rest)


def sample(root: Path, ip: tuple[str, ...], bdf: str, repeat: int) -> tuple[list[float], str]:
    address = PciAddress.parse(bdf)
    return measure(lambda: HolderReader(root, ip).read(address), repeat)


def measure(call: Callable[[], object], repeat: int) -> tuple[list[float], str]:
    """`repeat` calls' wall times in ms, and where the CPU went meanwhile: ours per call
    (this process, then its workers and `ip`), and the share of the CPUs other processes
    took — on a busy machine the parallel pass cannot show in wall time."""
    times = []
    before, busy_before, start_all = os.times(), _busy_seconds(), time.perf_counter()
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    after, busy_after, span = os.times(), _busy_seconds(), time.perf_counter() - start_all
    here = after.user + after.system - before.user - before.system
    there = (after.children_user + after.children_system
             - before.children_user - before.children_system)
    others = (busy_after - busy_before - here - there) / (span * (os.cpu_count() or 1))
    return times, (f"CPU per read {here / repeat * 1000:.0f} ms here + {there / repeat * 1000:.0f} ms "
                   f"in child processes (workers, ip); others took {max(others, 0):.0%} of the CPUs")


def _busy_seconds() -> float:
    """CPU time the whole machine spent busy so far (/proc/stat), in seconds."""
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def calibrate(root: Path) -> str:
    """What this machine charges for the calls the scan is made of, to compare hosts."""
    fd_dir = root / "proc" / "101" / "fd"
    link = str(fd_dir / "0")
    calls = {"readlink": lambda: os.readlink(link), "listdir": lambda: os.listdir(fd_dir)}
    costs = []
    for name, call in calls.items():
        start = time.perf_counter()
        for _ in range(2000):
            call()
        costs.append(f"{name} {(time.perf_counter() - start) / 2000 * 1e6:.1f} us")
    return "this machine: " + ", ".join(costs)


def real_proc(repeat: int = 9) -> str:
    """The guard's pass over this machine's /proc (maps and fd links, read only)."""
    times, cpu = measure(lambda: ProcessScan(Path("/proc")).nodes(), repeat)
    listed = [name for name in os.listdir("/proc") if name.isdigit()]
    fds = 0
    for name in listed:
        try:
            fds += len(os.listdir(f"/proc/{name}/fd"))
        except OSError:
            continue  # exited, or not ours to read
    workers = ProcessScan(Path("/proc")).workers if len(listed) >= PARALLEL_FROM else 1
    return (f"this machine's /proc: {len(listed)} processes, {fds} open files: pass median "
            f"{statistics.median(times):.2f} ms, min {min(times):.2f} ms, {workers} worker(s)"
            f"\n     {cpu}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        host, picks = build(root)
        print(calibrate(root))
        ip = host.ip_command()
        for kind, bdf in picks.items():
            found = HolderReader(root, ip).read(PciAddress.parse(bdf))
            times, cpu = sample(root, ip, bdf, 30)
            median = statistics.median(times)
            verdict = "OK" if median <= TARGET_MS else "OVER"
            print(f"{kind:>4} {bdf}: median {median:6.2f} ms, min {min(times):6.2f} ms  "
                  f"(target <= {TARGET_MS:.0f} ms: {verdict}); {len(found.holders)} holder(s): "
                  + "; ".join(map(str, found.holders)))
            print(f"     {cpu}")
        reader = HolderReader(root, ip)
        start = time.perf_counter()
        for bdf in picks.values():
            reader.read(PciAddress.parse(bdf))
        print(f"one reader, all {len(picks)} devices above: {(time.perf_counter() - start) * 1000:.2f} ms")
        fds = sum(len(os.listdir(d)) for d in (root / "proc").glob("*/fd"))
    print(f"simulated host: {PROCESSES} processes ({fds} open files), 100 PCI devices")
    print(real_proc())


if __name__ == "__main__":
    main()
