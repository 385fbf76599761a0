"""Carry out one device switch against sysfs: load, override, unbind, probe, verify.

Retries follow tenacity's model: a per-device deadline, exponential backoff from 10 ms
capped at 0.5 s, and only for conditions that can clear by themselves (EBUSY/EAGAIN
from the kernel, a device still held open through VFIO, a driver link that has not
appeared yet).  Anything else fails at once: retrying ENODEV only wastes the deadline.

A write can also sleep in the kernel far past any deadline (a driver's remove() waiting
for its users).  Nothing here can interrupt it; the Switcher records which write each
device is in (`in_kernel`) so the caller, waiting from another thread, can say what is
stuck.  modprobe runs as a child that is never wait()ed for past its deadline: a module
init sleeping in D state would hang wait() too.
"""

from __future__ import annotations

import errno
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from vfio_libvirt.errors import OperationError
from vfio_libvirt.names import module_name
from vfio_libvirt.pci import PciAddress
from vfio_libvirt.sysfs import Sysfs

_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.EINTR}


LATE_GRACE = 0.25
"""Seconds past its deadline a bind may still start a write: a run is declared late
only then (stuck.py), so a write that merely spans the deadline is not 'stuck'."""

HOLDER_POLL = 0.005
"""Seconds between looks at known holders: a few readlinks, so a restore starts within
milliseconds of QEMU letting go, not after a backoff step."""


class NotYet(Exception):
    """A condition that may clear by itself: worth another try before the deadline."""


class TooLate(OperationError):
    """A bind past its deadline writes nothing more: the start has failed (libvirt may
    have been told so already), and every further write would only have to be undone,
    a host NIC dropping its link for nothing."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, NotYet) or (
        isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS
    )


def retrying(seconds: float, sleep: Callable[[float], None] = time.sleep) -> Retrying:
    """Backoff never sleeps past the deadline: a worker asleep there would be reported late."""
    deadline = time.monotonic() + seconds
    backoff = wait_exponential(multiplier=0.01, max=0.5)
    return Retrying(
        stop=stop_after_delay(seconds),
        wait=lambda state: min(backoff(state), max(0.0, deadline - time.monotonic())),
        retry=retry_if_exception(is_transient),
        reraise=True,
        sleep=sleep,
    )


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return str(exc)


class Switcher:
    """Moves devices between drivers; the only caller of Sysfs' writing half."""

    def __init__(self, sysfs: Sysfs, modprobe: Sequence[str]) -> None:
        self.sysfs = sysfs
        self.modprobe = list(modprobe)
        self.in_kernel: dict[str, tuple[str, float]] = {}
        """BDF -> (the write it is in, monotonic start) while a worker is inside it."""
        self.holders_seen: dict[str, dict[int, str]] = {}
        """BDF -> the VFIO holders (pid -> comm) last seen before its unbind, to say what
        held a device whose unbind got stuck without scanning /proc again."""

    def driver_for_module(self, module: str, seconds: float = 60.0) -> str:
        """Load `module` if needed (within `seconds`) and return the PCI driver name it registers.

        The names differ (`vfio_pci` registers `vfio-pci`); writing the module name to
        driver_override leaves a device with no driver at all.
        """
        module = module_name(module)
        drivers = self.sysfs.module_pci_drivers(module)
        if not drivers:
            self._modprobe(module, seconds)
            drivers = self.sysfs.module_pci_drivers(module)
        if not drivers:
            raise OperationError(f"module {module} registered no PCI driver")
        if len(drivers) > 1:
            raise OperationError(f"module {module} registers several PCI drivers: {drivers}")
        return drivers[0]

    def _modprobe(self, module: str, seconds: float) -> None:
        try:
            proc = subprocess.Popen(
                [*self.modprobe, module], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, start_new_session=True,
            )
        except OSError as err:
            raise OperationError(f"cannot load module {module}: {err}") from None
        try:
            out, err_text = proc.communicate(timeout=max(seconds, 0.1))
        except subprocess.TimeoutExpired:
            # kill it, but do not wait(): a module init asleep in the kernel ignores
            # SIGKILL until it returns, and wait() would sleep with it
            proc.kill()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            raise OperationError(f"modprobe {module} still running after {seconds:g} s "
                                 f"(pid {proc.pid}; stuck in the module's init?)") from None
        if proc.returncode != 0:
            detail = (err_text or out).strip().splitlines()
            raise OperationError(f"modprobe {module} failed" + (f": {detail[-1]}" if detail else ""))

    @contextmanager
    def _writing(self, address: PciAddress, what: str, until: float | None) -> Iterator[None]:
        """Mark `address` as inside `what`; `until`: refuse to start it past that time."""
        if until is not None and time.monotonic() > until + LATE_GRACE:
            raise TooLate(f"the deadline passed before {what}; not written")
        key = str(address)
        self.in_kernel[key] = (what, time.monotonic())
        try:
            yield
        finally:
            self.in_kernel.pop(key, None)

    def bind(self, address: PciAddress, driver: str, seconds: float) -> None:
        """Make `driver` (and only it) drive the device, within `seconds`."""
        deadline = time.monotonic() + seconds
        for attempt in retrying(seconds):
            with attempt:
                self._bind_once(address, driver, deadline)

    def restore(
        self, address: PciAddress, driver: str | None, override: str | None, seconds: float
    ) -> None:
        """Give the device back to the *recorded* `driver`, then put `override` back.

        Clearing driver_override and probing would let whichever loaded driver matches
        first take the device (`vfio-pci.ids=`/`new_id` for a twin card, nouveau beside
        nvidia, a uio driver), and every retry would meet the same wrong driver.  So the
        override pins the recorded driver for the probe, and the recorded override is
        written only once that driver holds the device (writing it unbinds nothing).
        `driver` None: the device had no driver, and is left without one.
        """
        deadline = time.monotonic() + seconds
        for attempt in retrying(seconds):
            with attempt:
                self._restore_once(address, driver, override, deadline)

    def _bind_once(self, address: PciAddress, driver: str, deadline: float) -> None:
        sysfs = self.sysfs
        current = sysfs.driver(address)
        if current != driver:
            self._release_current(address, current, pin=driver, deadline=deadline, strict=True)
            self._probe_for(address, driver, until=deadline)
        if sysfs.driver_override(address) != driver:
            with self._writing(address, "driver_override", until=deadline):
                sysfs.set_driver_override(address, driver)

    def _restore_once(
        self, address: PciAddress, driver: str | None, override: str | None, deadline: float
    ) -> None:
        sysfs = self.sysfs
        current = sysfs.driver(address)
        if current != driver:
            if driver is not None and not sysfs.driver_registered(driver):
                # unbinding now would strand the device: wait for the driver to come back
                raise NotYet(f"its original driver {driver} is not loaded")
            self._release_current(address, current, pin=driver if driver is not None else override,
                                  deadline=deadline, strict=False)
            if driver is not None:
                self._probe_for(address, driver, until=None)
        if sysfs.driver_override(address) != override:
            with self._writing(address, "driver_override", until=None):
                sysfs.set_driver_override(address, override)

    def _probe_for(self, address: PciAddress, driver: str, until: float | None) -> None:
        """Probe, and check `driver` took it: drivers_probe reports success even when nothing bound."""
        with self._writing(address, f"drivers_probe for {driver}", until):
            self.sysfs.probe(address)
        now = self.sysfs.driver(address)
        if now != driver:
            raise NotYet(f"{driver} did not bind (driver now {now or 'none'})")

    def _release_current(
        self, address: PciAddress, current: str | None, *, pin: str | None, deadline: float,
        strict: bool,
    ) -> None:
        """Pin the override to `pin`, then unbind `current`; holders are checked before any write.

        Unbinding a VFIO device that a process still holds blocks in the kernel until it
        lets go, so a held device is a reason to wait, and nothing is written meanwhile.
        `strict`: write nothing once the deadline has passed (a bind; a restore goes on).
        """
        sysfs = self.sysfs
        until = deadline if strict else None
        if current is not None:
            if holders := sysfs.vfio_holder_pids(address):
                self._wait_for(address, holders, deadline)
                holders = sysfs.vfio_holder_pids(address)  # a new holder may have come
            self.holders_seen[str(address)] = holders
            if holders:
                raise NotYet("still held open by " + ", ".join(f"{p} ({c})" for p, c in holders.items()))
        if sysfs.driver_override(address) != pin:
            with self._writing(address, "driver_override", until):
                sysfs.set_driver_override(address, pin)
        if current is not None:
            with self._writing(address, f"unbind from {current}", until):
                sysfs.unbind(address)
            if sysfs.driver(address) is not None:
                raise NotYet(f"{current} did not let go")

    def _wait_for(self, address: PciAddress, holders: dict[int, str], deadline: float) -> None:
        """Wait until the processes in `holders` let go of the device, or the deadline."""
        pids = list(holders)
        while time.monotonic() < deadline and self.sysfs.vfio_holder_pids(address, among=pids):
            time.sleep(HOLDER_POLL)
