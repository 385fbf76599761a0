"""The host as the lifecycle sees it: sysfs, journal, config, aliases, libvirt version.

Everything is built lazily from `Settings` (the environment), so a hook run for an op
it ignores never pays for it, and tests redirect every path at once.  `make_plan`
reads what a plan needs from here and hands it to the pure planner; it writes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from vfio_libvirt import libvirt_version
from vfio_libvirt.aliases import AliasTable
from vfio_libvirt.apply import Switcher
from vfio_libvirt.config import Config
from vfio_libvirt.domain import Domain
from vfio_libvirt.errors import InputError, VfioLibvirtError
from vfio_libvirt.holders import DeviceHolders, Holder, HolderReader
from vfio_libvirt.locks import DomainLocks
from vfio_libvirt.pci import PciAddress
from vfio_libvirt.plan import Context, DeviceState, Plan, plan_prepare
from vfio_libvirt.settings import Settings
from vfio_libvirt.state import Journal
from vfio_libvirt.sysfs import Sysfs

log = logging.getLogger("vfio_libvirt")

MIN_GUARD_SECONDS = 0.5
"""What the guard gets even when a start's budget went on waiting for another domain:
the refusal must then say why it waited, not that the device could not be checked."""


@dataclass
class Host:
    settings: Settings
    read_only: bool = False
    """Plans and dry runs: not even the libvirt-version cache is written."""
    config_fallback: bool = False
    """Restores: a config that cannot be parsed means the defaults (logged), because a
    typo made while a VM runs must never keep its devices from going home."""
    deadline: float | None = None
    """time.monotonic() by which a start must be done (set by prepare); bounds the guard."""
    answer: Callable[[int, str], None] | None = None
    """How a run answers its caller before it is over (the hook: detach.py), when the
    kernel keeps a write past the deadline; None (the CLI): nobody needs an early answer."""
    _holders_stuck: str = ""
    _holders_read: dict[PciAddress, DeviceHolders] = field(default_factory=dict)

    @cached_property
    def sysfs(self) -> Sysfs:
        return Sysfs(self.settings.sysfs_root)

    @cached_property
    def journal(self) -> Journal:
        return Journal(self.settings.state_dir)

    @cached_property
    def domain_locks(self) -> DomainLocks:
        return DomainLocks(self.settings.state_dir)

    @cached_property
    def config(self) -> Config:
        """The safe reading of the host config; every problem in it is logged."""
        path = self.settings.config_path
        try:
            config = Config.load(path)
        except InputError as err:
            if not self.config_fallback:
                raise
            log.warning("%s; restoring with the default settings instead", err)
            return Config()
        for problem in config.problems:
            log.warning("config: %s", problem)
        return config

    @cached_property
    def switcher(self) -> Switcher:
        return Switcher(self.sysfs, self.settings.modprobe)

    @cached_property
    def holders(self) -> HolderReader:
        """One reader per run: what the whole host holds is read once for every device."""
        return HolderReader(self.settings.sysfs_root, self.settings.ip)

    def holders_of(self, address: PciAddress) -> DeviceHolders:
        """What the host uses `address` for, within the run's budget; a reader that fails
        or does not answer in time cannot decide, so it refuses.

        Reading a process's memory map blocks while that process holds its mmap lock
        (a task stuck on I/O), and `ip` can hang: the read runs in a thread we stop
        waiting for at the deadline (libvirt has no timeout on hooks).  A reader that
        timed out once is not asked again: its thread may still be filling its caches.
        """
        if self._holders_stuck:
            return _cannot_decide(address, self._holders_stuck)
        if address in self._holders_read:  # read moments ago, by the plan outside the lock
            return self._holders_read[address]
        budget = self.config.bind_timeout if self.deadline is None else self.deadline - time.monotonic()
        budget = max(budget, MIN_GUARD_SECONDS)
        result: list[DeviceHolders | BaseException] = []

        def read() -> None:
            try:
                result.append(self.holders.read(address))
            except BaseException as err:  # handed to the waiting thread
                result.append(err)

        worker = threading.Thread(target=read, name=f"holders {address}", daemon=True)
        worker.start()
        worker.join(max(0.0, budget))
        if not result:
            self._holders_stuck = f"could not be checked within {max(0.0, budget):.1f} s"
            log.error("%s: what holds the device %s", address, self._holders_stuck)
            return _cannot_decide(address, self._holders_stuck)
        if isinstance(result[0], InputError):
            raise result[0]
        if isinstance(result[0], BaseException):  # the guard must never crash a start
            err = result[0]
            log.error("%s: reading what holds the device failed: %s: %s", address, type(err).__name__, err)
            return _cannot_decide(address, f"cannot be checked ({type(err).__name__}: {err})")
        self._holders_read[address] = result[0]
        return result[0]

    def known_holders(self, address: PciAddress) -> DeviceHolders | None:
        """What this run already read about `address`, without reading anything now."""
        return self._holders_read.get(address)

    @cached_property
    def aliases(self) -> AliasTable:
        return AliasTable.load(self.settings.modules_dir)

    @cached_property
    def libvirt_version(self) -> tuple[int, ...] | None:
        cache = None if self.read_only else self.settings.state_dir
        version, source = libvirt_version.detect(self.config, cache)
        log.debug("libvirt version %s from %s", version, source)
        return version

    def device_state(self, address: PciAddress) -> DeviceState:
        s = self.sysfs
        s.require(address)
        return DeviceState(
            address=address,
            driver=s.driver(address),
            driver_override=s.driver_override(address),
            modalias=s.modalias(address),
            iommu_group=s.iommu_group(address),
            has_vfio_dev=s.has_vfio_dev(address),
            is_bridge=s.is_bridge(address),
            physfn=s.physfn(address),
        )

    def on_vfio_driver(self, address: PciAddress) -> bool:
        return self.sysfs.has_vfio_dev(address) or self.sysfs.driver(address) == "vfio-pci"


def _cannot_decide(address: PciAddress, why: str) -> DeviceHolders:
    return DeviceHolders(address, (Holder("unknown", str(address), why, "critical"),))


def make_plan(host: Host, domain: Domain) -> Plan:
    """Read what the plan needs from the host and plan `prepare`; writes nothing."""
    states: dict[PciAddress, DeviceState] = {}
    groups: dict[str, list[DeviceState]] = {}
    for hostdev in domain.hostdevs:
        if not host.sysfs.exists(hostdev.address):
            continue  # the planner reports it, before anything else
        state = states[hostdev.address] = host.device_state(hostdev.address)
        if state.iommu_group and state.iommu_group not in groups and not hostdev.managed:
            groups[state.iommu_group] = [
                states.get(m) or host.device_state(m)
                for m in host.sysfs.iommu_group_members(state.iommu_group)
            ]
    aliases, alias_error, modules = AliasTable(), None, {}
    if any(not h.managed or h.driver_model for h in domain.hostdevs):
        try:
            aliases = host.aliases
        except VfioLibvirtError as err:
            alias_error = str(err)
        modules = {name: host.sysfs.module_pci_drivers(name) for name in {a.module for a in aliases.aliases}}
    ctx = Context(
        aliases=aliases,
        config=host.config,
        vm_policy=domain.policy,
        libvirt_version=host.libvirt_version,
        module_drivers=modules,
        alias_error=alias_error,
    )
    # everything that may be unbound: assigned devices not on a VFIO driver yet, and the
    # companions that would have to follow them
    members = [m for group in groups.values() for m in group if not m.leaves_group_usable]
    at_risk = {s.address for s in [*states.values(), *members] if not s.on_vfio_driver}
    holders = {address: host.holders_of(address) for address in sorted(at_risk)}
    return plan_prepare(domain.hostdevs, states, groups, ctx, holders)
