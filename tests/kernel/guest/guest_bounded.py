"""Support for test_guest_bounded.py: the slow devices, hook runs with a limit, a sampler.

The test host driver vlt_slow_host (tests/vm/module) sleeps in probe()/remove() as long
as its parameters probe_ms/remove_ms say (set_param()) and counts the calls under way in
"busy" (busy()).  Bounded runs hooks/qemu and `vfio-libvirt status` on one state dir and
config, as libvirtd and the admin would; Watch samples the journal, the drivers and
"busy" in a thread while a test runs; the assert_* helpers, stuck_helper() and
wait_settled() are the checks the tests share.  The `slow` fixture (conftest.py) gives
each test a Bounded with the devices on their original driver.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from tests.kernel.guest.guest_sysfs import PciDevice, wait_for, write_sysfs
from tests.kernel.guest.guest_xml import domain
from tests.vm import guest as H

ORIGINAL = H.SLOW_DRIVER
SLACK = 2.0            # seconds a hook may take beyond its deadline (TCG)
STUCK_MS = 15000       # a write that outlives any deadline here, and the checks made meanwhile
SETTLE = 40.0          # the detached process finishes within this after the write returns
PYCACHE = "/tmp/vlt-bounded-pycache"   # inside the guest: a writable overlay


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
