"""Bounded waits against a real kernel: a driver that sleeps in remove() or probe().

The test host driver vlt_slow_host (tests/vm/module) owns three QEMU `edu` devices,
each alone in its IOMMU group; its probe()/remove() msleep() for probe_ms/remove_ms,
so a write to unbind or drivers_probe stays in the kernel (D state) that long, as
under a real driver that hangs in its remove or probe.

(a) A write still in the kernel at the deadline (bind_seconds for prepare,
restore_seconds for release): the hook answers libvirt on time, exit 1, one stderr
line naming the device, the write and "stuck", with its stdout/stderr closed (the
test's communicate() returns); the journal says "stuck" while the write is in the
kernel, `vfio-libvirt status` shows it, and a detached process (the entry's pid)
puts the device back on its original driver and drops the entry once the write
returns.  Throughout, a device off its original driver always has a journal entry.
(b) Devices in separate IOMMU groups switch side by side: three cost about one.

Timing under TCG: a hook run spends seconds starting Python over 9p before its
deadline even starts, so a deadline is measured from the moment the stuck write
entered the driver (the module counts the probe()/remove() calls under way in its
read-only parameter "busy"; a sampler watches it), and a call with nothing to wait
for against the same call on an idle domain.  Bytecode goes to a cache in /tmp (an
installed product has its .pyc; the repo here is read-only).  (b) compares the time
the driver spends in probe()/remove() (first call in -> last out), not wall times.

Every test starts and ends with the three devices on vlt-slow-host, the module's
parameters at 0 and no process of the product left behind (the `slow` fixture).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.kernel.guest.guest_sysfs import SYS_PCI, PciDevice, modprobe, wait_for, write_sysfs
from tests.vm import guest as H

pytestmark = pytest.mark.real_sysfs

ORIGINAL = H.SLOW_DRIVER
SLACK = 2.0            # seconds a hook may take beyond its deadline (TCG)
STUCK_MS = 15000       # a write that outlives any deadline here, and the checks made meanwhile
SETTLE = 40.0          # the detached process finishes within this after the write returns
SLOW_MS = 3000         # (b): each remove() and probe() this long
PARALLEL_FACTOR = 1.6  # (b): three groups may cost at most this many times one
PYCACHE = "/tmp/vlt-bounded-pycache"   # inside the guest: a writable overlay


def hostdev(bdf: str) -> str:
    _, bus, rest = bdf.split(":")
    slot, function = rest.split(".")
    return ("<hostdev mode='subsystem' type='pci' managed='no'><source>"
            f"<address domain='0x0000' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/>"
            "</source></hostdev>")


def domain(name: str, *devices: str) -> str:
    return f"<domain type='qemu'><name>{name}</name><devices>{''.join(devices)}</devices></domain>"


def set_param(name: str, ms: int) -> None:
    write_sysfs(H.SLOW_PARAMS / name, str(ms))


def busy() -> int:
    """probe()/remove() calls of vlt_slow_host under way (the driver link cannot tell:
    it appears before probe() runs and goes before remove() does)."""
    return int((H.SLOW_PARAMS / "busy").read_text())


def alive(pid: int) -> bool:
    """A process that still runs (a zombie has finished)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def ours(pid: int) -> bool:
    """The product's process (hook or CLI), not a pid reused by something else."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"vfio_libvirt" in cmdline or b"hooks/qemu" in cmdline


@dataclasses.dataclass
class HookRun:
    what: str
    rc: int | None
    stdout: str
    stderr: str
    seconds: float    # until communicate() returned: the hook exited AND its pipes closed
    answered: bool    # within the limit
    exited: bool      # the process had exited by the limit (pipes may still be open)
    pid: int
    started: float    # time.monotonic() at Popen
    ended: float      # time.monotonic() when communicate() returned (or gave up)

    def describe(self) -> str:
        state = (f"answered in {self.seconds:.1f} s" if self.answered else
                 f"exited but its stdout/stderr were still open after {self.seconds:.1f} s"
                 if self.exited else f"still running after {self.seconds:.1f} s")
        return (f"{self.what}: {state}, rc={self.rc}\n--- stdout ---\n{self.stdout}"
                f"--- stderr ---\n{self.stderr}")


class Bounded:
    """The slow devices, and the hook and CLI on one state dir and config."""

    def __init__(self, tmp: Path, repo: Path):
        self.devices = [PciDevice(spec) for spec in H.SLOW_DEVICES]
        self.state = tmp / "state"
        self.config = tmp / "config.toml"
        self.repo = repo
        self.configure(bind_seconds=3, restore_seconds=3)

    def configure(self, bind_seconds: float, restore_seconds: float) -> None:
        self.bind_seconds, self.restore_seconds = float(bind_seconds), float(restore_seconds)
        self.config.write_text(f'[libvirt]\nversion = "11.3.0"\n[timeouts]\n'
                               f"bind_seconds = {bind_seconds}\nrestore_seconds = {restore_seconds}\n")

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(self.repo), "PYTHONPYCACHEPREFIX": PYCACHE,
               "VFIO_LIBVIRT_STATE_DIR": str(self.state), "VFIO_LIBVIRT_CONFIG": str(self.config)}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def hook(self, name: str, op: str, subop: str, xml: str, limit: float) -> HookRun:
        """hooks/qemu as libvirtd runs it, given `limit` seconds to exit and close its pipes."""
        H.require_guest()
        start = time.monotonic()
        proc = subprocess.Popen([H.GUEST_PYTHON, str(self.repo / "hooks" / "qemu"), name, op, subop, "-"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=self.env, text=True)
        answered = True
        try:
            out, err = proc.communicate(xml, timeout=limit)
        except subprocess.TimeoutExpired:
            answered = False
        ended = time.monotonic()
        seconds = ended - start
        exited = proc.poll() is not None
        if not answered:
            if not exited:
                proc.kill()  # takes effect when its write leaves the kernel
            try:
                out, err = proc.communicate(timeout=STUCK_MS / 1000 + SETTLE)
            except subprocess.TimeoutExpired:  # something the hook left behind holds the pipes
                out, err = "", "(pipes held open by another process)\n"
                for pipe in (proc.stdout, proc.stderr):
                    if pipe:
                        pipe.close()
                proc.wait(timeout=60)
        return HookRun(f"{op} {subop} of {name}", proc.returncode, out, err, seconds, answered,
                       exited, proc.pid, start, ended)

    def idle_release(self) -> HookRun:
        """`release end` of a domain the journal does not know: the fixed cost of a hook
        run here (interpreter, imports, config, journal), with nothing to wait for.
        Without a journal file the hook returns before all that: call it after a run."""
        assert (self.state / "journal.json").exists(), "no journal yet: the idle run would cost nothing"
        run = self.hook("vm-idle", "release", "end", domain("vm-idle"), 120)
        assert run.answered and run.rc == 0, run.describe()
        return run

    def journal(self) -> dict[str, dict]:
        """The journal's devices by BDF ({} without a journal file)."""
        path = self.state / "journal.json"
        for _ in range(3):
            try:
                return json.loads(path.read_text())["devices"]
            except FileNotFoundError:
                return {}
            except json.JSONDecodeError:  # never expected (tmp + rename); look again
                time.sleep(0.05)
        return json.loads(path.read_text())["devices"]

    def status(self) -> dict[str, dict]:
        """`vfio-libvirt status --json`'s rows by address."""
        proc = subprocess.run([H.GUEST_PYTHON, "-m", "vfio_libvirt", "status", "--json"],
                              cwd=self.repo, env=self.env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, f"status failed ({proc.returncode}): {proc.stderr}"
        return {row["address"]: row for row in json.loads(proc.stdout)["devices"]}

    def helpers(self) -> set[int]:
        """Pids the journal names that still run."""
        return {e["pid"] for e in self.journal().values()
                if isinstance(e.get("pid"), int) and alive(e["pid"])}

    def settled(self, devices: list[PciDevice]) -> bool:
        """Every device back on its original driver, without a journal entry."""
        journal = self.journal()
        return all(d.bdf not in journal and d.driver == ORIGINAL for d in devices)


class Watch(threading.Thread):
    """Samples the journal, then the drivers, every `interval` s until stopped.

    Reading the journal first makes the check race-free: an entry may only go once
    its device is back, so "no entry" followed by "off its original driver" is a
    real moment at which the journal did not cover the device.  The module's "busy"
    count, sampled too, tells when a write was inside the driver's probe()/remove().
    """

    def __init__(self, bounded: Bounded, devices: list[PciDevice], *, never: tuple[str, ...] = (),
                 interval: float = 0.1):
        super().__init__(daemon=True)
        self.bounded, self.devices, self.never, self.interval = bounded, devices, never, interval
        self.halt = threading.Event()
        self.violations: list[str] = []
        self.timeline: dict[str, list[tuple[float, str | None, str | None]]] = {
            d.bdf: [] for d in devices}   # (monotonic time, driver, journal status)
        self.busy: list[tuple[float, int]] = []   # (monotonic time, busy())
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval)

    def sample(self) -> None:
        self.busy.append((time.monotonic(), busy()))
        journal = self.bounded.journal()
        now = time.monotonic()
        at = now - self.start_time
        for dev in self.devices:
            driver = dev.driver
            entry = journal.get(dev.bdf)
            status = entry.get("status") if entry else None
            self.timeline[dev.bdf].append((now, driver, status))
            if entry is None and driver != ORIGINAL:
                self.violations.append(f"{at:.1f} s: {dev.bdf} on {driver} without a journal entry")
            if status in self.never:
                self.violations.append(f"{at:.1f} s: {dev.bdf} has status {status!r}")

    def __enter__(self) -> Watch:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join(timeout=30)
        self.sample()

    @property
    def seen(self) -> dict[str, list[str]]:
        """Per device, the distinct states in order: "status/driver"."""
        out: dict[str, list[str]] = {}
        for bdf, samples in self.timeline.items():
            labels = out.setdefault(bdf, [])
            for _, driver, status in samples:
                label = f"{status or '-'}/{driver or 'none'}"
                if not labels or labels[-1] != label:
                    labels.append(label)
        return out

    def entered(self, after: float, why: str = "") -> float:
        """When the driver was first seen inside probe()/remove() after `after`."""
        for at, count in list(self.busy):
            if at >= after and count:
                return at
        raise AssertionError(f"vlt_slow_host never seen in probe()/remove(); states {self.seen}{why}")

    def in_driver(self, start: float, end: float, why: str = "") -> float:
        """Seconds from the first sample in [start, end] with the driver busy to the first
        idle one after the last busy one (each sample is `interval` apart)."""
        window = [(at, count) for at, count in list(self.busy) if start <= at <= end]
        busy_at = [i for i, (_, count) in enumerate(window) if count]
        if not busy_at:
            raise AssertionError(f"vlt_slow_host never seen in probe()/remove(); states {self.seen}{why}")
        last = busy_at[-1] + 1
        if last >= len(window):
            raise AssertionError(f"vlt_slow_host still busy at the end of the window{why}")
        return window[last][0] - window[busy_at[0]][0]

    def check(self) -> None:
        samples = min(len(t) for t in self.timeline.values())
        assert samples >= 5, f"only {samples} journal samples"
        assert not self.violations, (
            f"the journal did not cover the devices: {self.violations[:10]} (states seen: {self.seen})")


@pytest.fixture(scope="module")
def slow_given():
    """Skip when the guest was booted without the slow devices; fail when given but missing.
    Loads vlt_slow_host (udev normally has at boot) and vfio_pci (so no run pays for it)."""
    H.require_guest()
    for spec in H.SLOW_DEVICES:
        if spec not in H.guest_devices():
            pytest.skip(f"this guest was booted without the {spec.name} test device "
                        f"({H.DEVICES_ENV}={os.environ.get(H.DEVICES_ENV, '')!r})")
        assert (SYS_PCI / "devices" / spec.bdf).exists(), f"no {spec.name} at {spec.bdf} in sysfs"
    modprobe(H.SLOW_MODULE)
    modprobe("vfio_pci")
    for name in ("probe_ms", "remove_ms"):
        set_param(name, 0)


@pytest.fixture
def slow(tmp_path, repo, slow_given):
    """The three slow devices on vlt-slow-host with probe_ms = remove_ms = 0, before and
    after the test; after it, no process of the product is left at work on them."""
    for name in ("probe_ms", "remove_ms"):
        set_param(name, 0)
    bounded = Bounded(tmp_path, repo)
    for dev in bounded.devices:
        assert dev.restore() == ORIGINAL, f"{dev} not on {ORIGINAL} before the test: {dev.driver}"
        assert dev.group_members() == [dev.bdf], f"{dev} shares its IOMMU group"
    yield bounded
    for name in ("probe_ms", "remove_ms"):
        set_param(name, 0)  # a sleep already under way still runs to its end
    # a detached process may still be finishing a job: give it the time a write takes
    with contextlib.suppress(AssertionError):
        wait_for("the product's detached processes to finish",
                 lambda: not bounded.helpers() and bounded.settled(bounded.devices),
                 STUCK_MS / 1000 + SETTLE)
    leftover = sorted(p for p in bounded.helpers() if ours(p))
    for pid in leftover:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # dies once its write leaves the kernel
    for dev in bounded.devices:
        dev.restore()  # waits for any write still in the kernel (device lock)
    bad = [f"{dev}: {dev.driver}" for dev in bounded.devices if dev.driver != ORIGINAL]
    assert not bad, f"could not put the slow devices back on {ORIGINAL}: {bad}"
    assert not leftover, f"processes of the product still at work after the test: {leftover}"


def assert_answered(run: HookRun, limit: float, what: str = "") -> None:
    assert run.answered and run.seconds < limit, (
        f"not answered within {limit:.1f} s{what}: {run.describe()}")


def assert_answered_after_write(run: HookRun, write_began: float, deadline: float) -> None:
    """Answered (exited, pipes closed) within the deadline + SLACK of the write entering the kernel."""
    assert run.answered, run.describe()
    late = run.ended - write_began
    assert late < deadline + SLACK, (
        f"answered {late:.1f} s after the write entered the kernel, deadline {deadline:g} s "
        f"+ {SLACK:g} s slack (whole run {run.seconds:.1f} s): {run.describe()}")


def assert_stuck_line(run: HookRun, bdf: str, writes: tuple[str, ...]) -> None:
    assert run.rc == 1, run.describe()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, f"want one line on stderr: {run.describe()}"
    line = lines[0]
    assert bdf in line and "stuck" in line and any(w in line for w in writes), (
        f"want {bdf}, one of {writes} and 'stuck' in: {line!r}")


def stuck_helper(bounded: Bounded, bdf: str, hook_pid: int) -> int:
    """The detached process the stuck entry names (checked: it is at work)."""
    entry = bounded.journal().get(bdf)
    assert entry is not None, f"no journal entry for {bdf} while its write is in the kernel"
    assert entry["status"] == "stuck", entry
    pid = entry.get("pid")
    assert isinstance(pid, int) and pid != hook_pid, f"the entry names no detached process: {entry}"
    assert alive(pid), f"the entry's process {pid} is not running: {entry}"
    return pid


def assert_status_stuck(rows: dict[str, dict], bdf: str) -> None:
    assert bdf in rows and rows[bdf]["status"] == "stuck", rows.get(bdf, rows)


def wait_settled(bounded: Bounded, dev: PciDevice, helper: int) -> float:
    """Wait until the device is back on its driver without an entry; returns when."""
    wait_for(f"{dev} back on {ORIGINAL} without a journal entry",
             lambda: bounded.settled([dev]), STUCK_MS / 1000 + SETTLE)
    settled = time.monotonic()
    wait_for(f"the detached process {helper} to finish", lambda: not alive(helper), SETTLE)
    assert dev.override == "(null)", f"{dev}'s driver_override not restored: {dev.override!r}"
    return settled


# ---------------------------------------------------- (a) a write that outlives the deadline


def test_prepare_stuck_in_remove_answers_on_time_and_puts_the_device_back_later(slow):
    dev = slow.devices[0]
    slow.configure(bind_seconds=3, restore_seconds=3)
    xml = domain("vm-stuck", hostdev(dev.bdf))
    set_param("remove_ms", STUCK_MS)
    with Watch(slow, [dev], never=("bound",)) as watch:
        run = slow.hook("vm-stuck", "prepare", "begin", xml, 60)
        began = watch.entered(run.started, f"\n{run.describe()}")
        assert_answered_after_write(run, began, slow.bind_seconds)
        assert_stuck_line(run, dev.bdf, ("unbind",))
        assert busy() == 1, "the remove() is no longer under way: raise STUCK_MS"
        helper = stuck_helper(slow, dev.bdf, run.pid)

        # libvirt answers a failed start with release: it must not wait for the write
        # either; meanwhile the admin asks for the status
        with ThreadPoolExecutor(1) as pool:
            status = pool.submit(slow.status)
            release = slow.hook("vm-stuck", "release", "end", xml, 60)
            rows = status.result(timeout=120)
        assert busy() == 1, "the remove() ended before the release and status did: raise STUCK_MS"
        assert_status_stuck(rows, dev.bdf)
        assert dev.driver != "vfio-pci"

        settled = wait_settled(slow, dev, helper)
    watch.check()
    idle = slow.idle_release()
    print(f"\nprepare stuck in remove() ({STUCK_MS} ms): answered {run.ended - began:.1f} s after "
          f"remove() began (whole run {run.seconds:.1f} s); release during it {release.seconds:.1f} s "
          f"(idle release {idle.seconds:.1f} s); back on {ORIGINAL} {settled - began:.1f} s after "
          f"remove() began; states {watch.seen[dev.bdf]}")
    assert_answered(release, idle.seconds + slow.restore_seconds + SLACK,
                    f" (an idle release took {idle.seconds:.1f} s)")


def test_release_stuck_in_probe_answers_on_time_and_puts_the_device_back_later(slow):
    dev = slow.devices[0]
    slow.configure(bind_seconds=3, restore_seconds=3)
    xml = domain("vm-stuck", hostdev(dev.bdf))
    with Watch(slow, [dev]) as watch:
        run = slow.hook("vm-stuck", "prepare", "begin", xml, 120)
        assert run.answered and run.rc == 0, run.describe()
        assert dev.driver == "vfio-pci"
        assert slow.journal()[dev.bdf]["status"] == "bound"

        set_param("probe_ms", STUCK_MS)
        release = slow.hook("vm-stuck", "release", "end", xml, 60)
        began = watch.entered(release.started, f"\n{release.describe()}")
        assert_answered_after_write(release, began, slow.restore_seconds)
        assert_stuck_line(release, dev.bdf, ("probe",))
        assert busy() == 1, "the probe() is no longer under way: raise STUCK_MS"
        helper = stuck_helper(slow, dev.bdf, release.pid)
        rows = slow.status()
        assert busy() == 1, "the probe() ended before status did: raise STUCK_MS"
        assert_status_stuck(rows, dev.bdf)

        settled = wait_settled(slow, dev, helper)
    watch.check()
    print(f"\nrelease stuck in probe() ({STUCK_MS} ms): answered {release.ended - began:.1f} s after "
          f"probe() began (whole run {release.seconds:.1f} s); back on {ORIGINAL} "
          f"{settled - began:.1f} s after; states {watch.seen[dev.bdf]}")


# ------------------------------------------------- (b) separate IOMMU groups side by side


def test_three_groups_switch_side_by_side(slow, record_property):
    """remove() and probe() take SLOW_MS each: three groups must cost about one.

    Cost = the time the driver spends in remove() (prepare) or probe() (release), from
    the first call entering to the last leaving, sampled every 0.1 s: three devices one
    after another would take three times as long.  The hooks' wall times are printed
    too (under TCG they are mostly the interpreter starting).
    """
    slow.configure(bind_seconds=30, restore_seconds=30)
    set_param("remove_ms", SLOW_MS)
    set_param("probe_ms", SLOW_MS)
    spans: dict[str, float] = {}
    walls: dict[str, float] = {}
    with Watch(slow, slow.devices) as watch:
        for label, devices in (("one", slow.devices[:1]), ("three", slow.devices)):
            name = f"vm-{label}"
            xml = domain(name, *(hostdev(d.bdf) for d in devices))
            for op, subop, target in (("prepare", "begin", "vfio-pci"), ("release", "end", ORIGINAL)):
                run = slow.hook(name, op, subop, xml, 60)
                assert run.answered and run.rc == 0, run.describe()
                assert [d.driver for d in devices] == [target] * len(devices), run.describe()
                assert busy() == 0
                time.sleep(3 * watch.interval)  # an idle sample after the run
                spans[f"{op} {label}"] = watch.in_driver(run.started, time.monotonic(),
                                                         f"\n{run.describe()}")
                walls[f"{op} {label}"] = run.seconds
            assert slow.journal() == {}
    watch.check()
    line = ", ".join(f"{k} {spans[k]:.1f} s (hook {walls[k]:.1f} s)" for k in spans)
    record_property("side_by_side_seconds", line)
    print(f"\nremove()/probe() {SLOW_MS} ms each, time in the driver: {line}")
    for op in ("prepare", "release"):
        one, three = spans[f"{op} one"], spans[f"{op} three"]
        assert one > SLOW_MS / 1000 * 0.9, (
            f"{op} of one device: {one:.1f} s in the driver, the slow driver was not in it")
        assert three < PARALLEL_FACTOR * one, (
            f"{op}: three devices in three IOMMU groups spent {three:.1f} s in the driver, one "
            f"{one:.1f} s (want < {PARALLEL_FACTOR}x): the groups did not switch side by side ({line})")
