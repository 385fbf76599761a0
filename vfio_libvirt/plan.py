"""Pure planning: device state + alias ranking + policy → what to do, and why.

Nothing here touches the host, so every decision (which driver, whether libvirt will
accept it, whether the IOMMU group is usable) is unit-testable from plain values, and
`vfio-libvirt plan` shows exactly what `prepare` would do.  A plan with problems is
refused as a whole before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from vfio_libvirt.aliases import AliasTable
from vfio_libvirt.config import Config, VmPolicy
from vfio_libvirt.domain import HostDev
from vfio_libvirt.errors import InputError
from vfio_libvirt.libvirt_version import VARIANT_MIN
from vfio_libvirt.names import canonical_module
from vfio_libvirt.pci import PciAddress

if TYPE_CHECKING:
    from vfio_libvirt.holders import DeviceHolders

Action = Literal["bind", "watch", "keep", "skip"]
FALLBACK_MODULE = "vfio_pci"
# Drivers that leave an IOMMU group usable by VFIO besides VFIO drivers themselves.
_GROUP_SAFE_DRIVERS = {"pci-stub", "vfio-pci"}


@dataclass(frozen=True)
class DeviceState:
    """What sysfs says about one device, read once before planning."""

    address: PciAddress
    driver: str | None
    driver_override: str | None
    modalias: str
    iommu_group: str | None
    has_vfio_dev: bool = False
    is_bridge: bool = False
    physfn: PciAddress | None = None
    """The SR-IOV PF of a VF: never a companion (unbinding it destroys every VF)."""

    @property
    def on_vfio_driver(self) -> bool:
        return self.has_vfio_dev or self.driver == "vfio-pci"

    @property
    def leaves_group_usable(self) -> bool:
        return self.is_bridge or self.driver is None or self.on_vfio_driver or (
            self.driver in _GROUP_SAFE_DRIVERS
        )


@dataclass(frozen=True)
class Step:
    address: PciAddress
    action: Action
    reason: str
    module: str | None = None
    original_driver: str | None = None
    original_override: str | None = None
    companion: bool = False
    managed: bool = False
    iommu_group: str | None = None
    """Devices of one group switch in order; different groups switch side by side."""
    holders: tuple[str, ...] = ()
    """What the host uses the device for, one line each with its severity (for `plan`)."""

    def describe(self) -> str:
        target = f" → {self.module}" if self.module else ""
        who = " (companion)" if self.companion else ""
        lines = [f"{self.address}{who}: {self.action}{target}: {self.reason}"]
        return "\n".join(lines + [f"    held: {line}" for line in self.holders])


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    problems: tuple[str, ...] = ()
    bad_input: bool = False
    """Some problem is the caller's input (e.g. a driver that is no VFIO driver): exit 2."""

    def to_json(self) -> dict[str, object]:
        return {
            "steps": [
                {
                    "address": str(s.address), "action": s.action, "module": s.module,
                    "reason": s.reason, "original_driver": s.original_driver,
                    "companion": s.companion, "managed": s.managed, "holders": list(s.holders),
                }
                for s in self.steps
            ],
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class Context:
    """Everything a plan depends on besides the devices themselves."""

    aliases: AliasTable
    config: Config
    vm_policy: VmPolicy
    libvirt_version: tuple[int, ...] | None
    module_drivers: dict[str, list[str]]
    """PCI driver names of modules already loaded (module → names), to spot no-op binds."""
    alias_error: str | None = None
    """Why the alias table could not be read; reported per device that needs it."""

    def vfio_module(self, requested: str) -> str | None:
        """The VFIO module `requested` names (a module or the PCI driver it registers), else None.

        A VFIO driver is vfio_pci or a module that declares `vfio_pci:` aliases; anything
        else (e1000e, nouveau) would hand the device to a host driver.
        """
        module = canonical_module(requested)
        modules = {a.module for a in self.aliases.aliases} | {FALLBACK_MODULE}
        if module in modules:
            return module
        return next((m for m, drivers in self.module_drivers.items()
                     if requested in drivers and m in modules), None)

    @property
    def libvirt_accepts_variants(self) -> bool:
        return self.libvirt_version is not None and self.libvirt_version >= VARIANT_MIN

    @property
    def libvirt_label(self) -> str:
        if self.libvirt_version is None:
            return "libvirt of unknown version"
        return "libvirt " + ".".join(map(str, self.libvirt_version))


def plan_prepare(
    hostdevs: list[HostDev] | tuple[HostDev, ...],
    states: dict[PciAddress, DeviceState],
    groups: dict[str, list[DeviceState]],
    ctx: Context,
    holders: Mapping[PciAddress, DeviceHolders] | None = None,
) -> Plan:
    """Decide, for each assigned device (and any companions), what `prepare` must do.

    `holders` is what the host uses each device for (holders.HolderReader); a device
    that is going to be unbound (bind, or watch: libvirt unbinds it) is guarded by it.
    """
    steps: list[Step] = []
    companion_steps: list[Step] = []
    problems: list[str] = []
    missing: list[str] = []  # said first: what is wrong with the devices themselves
    bad_input = False
    assigned = {h.address for h in hostdevs}
    seen_companions: set[PciAddress] = set()
    for hostdev in hostdevs:
        state = states.get(hostdev.address)
        if state is None:
            missing.append(f"{hostdev.address}: no such PCI device on this host")
            continue
        if state.is_bridge:
            problems.append(f"{hostdev.address}: is a PCI bridge and cannot be assigned")
            continue
        try:
            step = _plan_device(hostdev, state, ctx)
        except _BadChoice as err:
            problems.append(f"{hostdev.address}: {err}")
            bad_input = True
            continue
        except InputError as err:
            problems.append(f"{hostdev.address}: {err}")
            continue
        steps.append(step)
        if step.action != "bind":
            continue
        for member in groups.get(state.iommu_group or "", []):
            if member.address in assigned or member.address in seen_companions:
                continue
            if member.leaves_group_usable:
                continue
            seen_companions.add(member.address)
            problem = _companion_problem(member, state, ctx)
            if problem:
                problems.append(problem)
                continue
            try:
                companion_steps.append(_plan_companion(member, ctx))
            except InputError as err:
                problems.append(f"{member.address}: {err}")
    steps += companion_steps
    if holders:
        steps = [_guard(step, holders.get(step.address), ctx, problems) for step in steps]
    return Plan(tuple(steps), tuple(missing + problems), bad_input)


def _guard(step: Step, held: DeviceHolders | None, ctx: Context, problems: list[str]) -> Step:
    """Refuse to unbind a device the host needs; say why in one line.

    Host-critical (/, /usr, /boot, swap, the default route, a PF with VFs, the console)
    is always refused: unbinding takes it from the host at once.  Merely in use (another
    mount, an up interface, an open node) is refused unless the admin allows it.
    """
    if held is None or step.action not in ("bind", "watch"):
        return step
    lines = tuple(f"{h.severity}: {h}" for h in held.holders)
    allowed = step.address in ctx.config.in_use_allowed or ctx.vm_policy.allows_in_use(step.address)
    if held.critical:
        problems.append(f"{step.address}: refusing: {_first(held.critical)}")
    elif held.in_use and not allowed:
        problems.append(f'{step.address}: refusing: {_first(held.in_use)} (in use; to give it to a '
                        'VM anyway, set in_use = "allow" for it)')
    elif held.in_use:
        return replace(step, holders=lines, reason=f"{step.reason}; in use by the host, allowed by policy")
    return replace(step, holders=lines)


def _first(holders: tuple) -> str:
    more = f" (and {len(holders) - 1} more)" if len(holders) > 1 else ""
    return f"{holders[0]}{more}"


class _BadChoice(InputError):
    """An explicit driver choice that is refused: the caller's input, not the host's state."""


def _plan_device(hostdev: HostDev, state: DeviceState, ctx: Context) -> Step:
    base = {
        "address": hostdev.address,
        "original_driver": state.driver,
        "original_override": state.driver_override,
        "managed": hostdev.managed,
        "iommu_group": state.iommu_group,
    }
    if hostdev.managed:
        if hostdev.driver_model is not None:  # libvirt would bind it: the same rule applies
            _require_vfio(hostdev.driver_model, hostdev.driver_source.format(hostdev.driver_model), ctx)
        if hostdev.address in ctx.config.never_touch:
            raise InputError(
                "is never_touch in the host config, but managed='yes' lets libvirt rebind it"
            )
        if state.on_vfio_driver:
            return Step(action="skip", reason=f"already on VFIO driver {state.driver} before "
                        "start; libvirt (managed='yes') decides what happens to it", **base)
        who = "picks the best variant itself" if ctx.libvirt_accepts_variants else "binds vfio-pci"
        return Step(
            action="watch",
            reason=f"managed='yes': {ctx.libvirt_label} {who}; the hook records "
            f"{state.driver or 'no driver'} and checks the device gets it back at release",
            **base,
        )
    if hostdev.address in ctx.config.never_touch:
        return Step(action="skip", reason="never_touch in the host config", **base)
    module, reason = choose_module(hostdev, state, ctx)
    loaded_drivers = ctx.module_drivers.get(module, [])
    if state.driver is not None and state.driver in loaded_drivers:
        return Step(action="keep", module=module,
                    reason=f"already on {state.driver} ({reason})", **base)
    return Step(action="bind", module=module, reason=reason, **base)


def choose_module(hostdev: HostDev, state: DeviceState, ctx: Context) -> tuple[str, str]:
    """The VFIO module for a managed='no' device, and the reason it was chosen."""
    explicit = [
        (hostdev.driver_model, hostdev.driver_source),
        (ctx.vm_policy.drivers.get(hostdev.address), "the domain's vfio-libvirt metadata asks for {}"),
        (ctx.config.driver_overrides.get(hostdev.address), "the host config asks for {}"),
    ]
    for requested, why in explicit:
        if requested:
            module = _require_vfio(requested, why.format(requested), ctx)
            if module != FALLBACK_MODULE and _libvirt_too_old(ctx):
                raise _BadChoice(
                    f"{why.format(requested)}, but {ctx.libvirt_label} accepts only vfio-pci for "
                    "managed='no' (variant drivers need libvirt >= 10.0)"
                )
            return module, why.format(requested)
    return _alias_choice(state, ctx)


def _require_vfio(requested: str, source: str, ctx: Context) -> str:
    if ctx.alias_error:
        raise InputError(ctx.alias_error)
    module = ctx.vfio_module(requested)
    if module is None:
        raise _BadChoice(f"{source}: {requested} is not a VFIO driver (neither vfio_pci nor a "
                         "module with a vfio_pci: alias in modules.alias); refusing to bind it")
    return module


def _alias_choice(state: DeviceState, ctx: Context) -> tuple[str, str]:
    if ctx.alias_error:
        raise InputError(ctx.alias_error)
    resolution = ctx.aliases.resolve(state.modalias)
    best = resolution.best
    if best is None:
        raise InputError(f"no VFIO driver alias matches {state.modalias} (is vfio-pci available?)")
    why = f"{best.module}: alias {best.pattern}, {best.wildcards} wildcards"
    others = [c for c in resolution.candidates[1:] if c.module != best.module]
    if others:
        why += f", beats {others[0].module} with {others[0].wildcards}"
    elif best.module == FALLBACK_MODULE:
        why += " (no variant driver matches)"
    if best.module != FALLBACK_MODULE and not ctx.libvirt_accepts_variants:
        if not any(c.module == FALLBACK_MODULE for c in resolution.candidates):
            raise InputError(f"{why}; {ctx.libvirt_label} needs vfio-pci, which is not available")
        return FALLBACK_MODULE, (
            f"vfio_pci, because {ctx.libvirt_label} accepts only vfio-pci for managed='no' "
            f"(variant drivers need libvirt >= 10.0); the best would be {why}"
        )
    return best.module, why


def _libvirt_too_old(ctx: Context) -> bool:
    return ctx.libvirt_version is not None and ctx.libvirt_version < VARIANT_MIN


def _companion_problem(member: DeviceState, device: DeviceState, ctx: Context) -> str | None:
    policy = ctx.vm_policy.companions or ctx.config.companions
    holder = f"{member.address} ({member.driver or 'no driver'})"
    if member.address == device.physfn:
        return (f"{holder} is the SR-IOV PF of {device.address} and shares IOMMU group "
                f"{device.iommu_group} with it: a PF never goes with its VF (unbinding it destroys "
                "every VF); this VF can only be assigned where ACS isolates it from its PF")
    if member.address in ctx.config.never_touch:
        return (f"{holder} shares IOMMU group {device.iommu_group} with {device.address} "
                "and is never_touch in the host config")
    if policy == "bind":
        return None
    return (
        f"{holder} shares IOMMU group {device.iommu_group} with {device.address} but the "
        "domain does not assign it; assign it too, or allow companions "
        "([policy] companions = \"bind\")"
    )


def _plan_companion(member: DeviceState, ctx: Context) -> Step:
    module, reason = _alias_choice(member, ctx)
    return Step(
        address=member.address,
        action="bind",
        module=module,
        reason=f"companion in IOMMU group {member.iommu_group}: {reason}",
        original_driver=member.driver,
        original_override=member.driver_override,
        companion=True,
        iommu_group=member.iommu_group,
    )
