"""plan.py is pure: decisions from plain values, no host needed."""

import pytest

from vfio_libvirt.aliases import AliasTable, parse_modules_alias
from vfio_libvirt.config import Config, VmPolicy
from vfio_libvirt.domain import HostDev
from vfio_libvirt.pci import PciAddress
from vfio_libvirt.plan import Context, DeviceState, plan_prepare

VIRTIO = "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00"
ALIASES = AliasTable(parse_modules_alias(
    "alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_vfio_pci\n"
    "alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n"
))
A = PciAddress.parse("0000:00:10.0")
B = PciAddress.parse("0000:00:10.1")


def ctx(version=(11, 3, 0), config=None, policy=None, loaded=None, aliases=ALIASES) -> Context:
    return Context(aliases=aliases, config=config or Config(), vm_policy=policy or VmPolicy(),
                   libvirt_version=version, module_drivers=loaded or {})


def state(address=A, driver="virtio-pci", group="5", **kw) -> DeviceState:
    return DeviceState(address=address, driver=driver, driver_override=None, modalias=VIRTIO,
                       iommu_group=group, **kw)


def dev(address=A, managed=False, model=None) -> HostDev:
    return HostDev(address=address, managed=managed, driver_model=model, origin="hostdev")


def test_variant_wins_on_libvirt_10_with_a_reason():
    plan = plan_prepare([dev()], {A: state()}, {"5": [state()]}, ctx())
    (step,) = plan.steps
    assert (step.action, step.module) == ("bind", "virtio_vfio_pci")
    assert step.reason == ("virtio_vfio_pci: alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i*, "
                           "5 wildcards, beats vfio_pci with 7")
    assert step.original_driver == "virtio-pci"


@pytest.mark.parametrize(("version", "label"), [((9, 0, 0), "libvirt 9.0.0"),
                                                 (None, "libvirt of unknown version")])
def test_old_or_unknown_libvirt_gets_vfio_pci(version, label):
    (step,) = plan_prepare([dev()], {A: state()}, {}, ctx(version=version)).steps
    assert step.module == "vfio_pci"
    assert f"because {label} accepts only vfio-pci" in step.reason


def test_explicit_variant_on_old_libvirt_is_refused():
    plan = plan_prepare([dev(model="virtio_vfio_pci")], {A: state()}, {}, ctx(version=(9, 0, 0)))
    assert len(plan.problems) == 1
    assert "libvirt 9.0.0 accepts only vfio-pci" in plan.problems[0]
    assert "variant drivers need libvirt >= 10.0" in plan.problems[0]


PRECEDENCE = AliasTable(parse_modules_alias(
    "alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* xml_vfio\n"
    "alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* meta_vfio\n"
    "alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* cfg_vfio\n"
    "alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n"
))


def test_precedence_xml_model_then_metadata_then_host_config():
    config = Config(driver_overrides={A: "cfg_vfio"})
    policy = VmPolicy(drivers={A: "meta_vfio"})
    c = ctx(config=config, policy=policy, aliases=PRECEDENCE)
    assert plan_prepare([dev(model="xml-vfio")], {A: state()}, {}, c).steps[0].module == "xml_vfio"
    assert plan_prepare([dev()], {A: state()}, {}, c).steps[0].module == "meta_vfio"
    assert plan_prepare([dev()], {A: state()}, {},
                        ctx(config=config, aliases=PRECEDENCE)).steps[0].module == "cfg_vfio"


@pytest.mark.parametrize("where", ["xml", "metadata", "config", "xml-managed-yes"])
@pytest.mark.parametrize("driver", ["e1000e", "nouveau", "virtio-pci"])
def test_an_explicit_driver_must_be_a_vfio_driver(where, driver):
    """<driver model='nouveau'/> or driver = "e1000e" would bind a host driver: bad input."""
    config = Config(driver_overrides={A: driver}) if where == "config" else Config()
    policy = VmPolicy(drivers={A: driver}) if where == "metadata" else VmPolicy()
    device = dev(model=driver if where.startswith("xml") else None, managed=where == "xml-managed-yes")
    plan = plan_prepare([device], {A: state()}, {}, ctx(config=config, policy=policy))
    assert plan.steps == () and plan.bad_input
    (problem,) = plan.problems
    assert f"{driver} is not a VFIO driver" in problem


def test_an_explicit_driver_may_name_the_pci_driver_a_vfio_module_registers():
    """Module vlt_virtio_vfio_pci registers PCI driver vlt-virtio-vfio: both names work."""
    aliases = AliasTable(parse_modules_alias(
        "alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* vlt_virtio_vfio_pci\n"))
    loaded = {"vlt_virtio_vfio_pci": ["vlt-virtio-vfio"]}
    for name in ("vlt-virtio-vfio", "vlt_virtio_vfio_pci", "vfio-pci"):
        plan = plan_prepare([dev(model=name)], {A: state()}, {}, ctx(aliases=aliases, loaded=loaded))
        assert not plan.problems, name
    assert plan_prepare([dev(model="vlt-virtio-vfio")], {A: state()}, {},
                        ctx(aliases=aliases)).bad_input  # not loaded: the name is unknown


def test_managed_yes_is_watched_not_bound():
    (step,) = plan_prepare([dev(managed=True)], {A: state()}, {}, ctx()).steps
    assert step.action == "watch" and step.module is None
    assert "picks the best variant itself" in step.reason
    (old,) = plan_prepare([dev(managed=True)], {A: state()}, {}, ctx(version=(9, 0, 0))).steps
    assert "binds vfio-pci" in old.reason


def test_managed_yes_never_touch_is_refused():
    plan = plan_prepare([dev(managed=True)], {A: state()}, {},
                        ctx(config=Config(never_touch=frozenset({A}))))
    assert "never_touch" in plan.problems[0]


def test_already_on_target_driver_is_kept():
    s = state(driver="virtio-vfio-pci", has_vfio_dev=True)
    (step,) = plan_prepare([dev()], {A: s}, {}, ctx(loaded={"virtio_vfio_pci": ["virtio-vfio-pci"]})).steps
    assert step.action == "keep"


def test_no_alias_at_all_is_a_problem():
    plan = plan_prepare([dev()], {A: state()}, {}, ctx(aliases=AliasTable()))
    assert "no VFIO driver alias matches" in plan.problems[0]


def test_bridge_and_missing_devices_are_problems():
    plan = plan_prepare([dev(), dev(B)], {A: state(is_bridge=True)}, {}, ctx())
    # what is wrong with the devices themselves comes first
    assert plan.problems == (f"{B}: no such PCI device on this host",
                             f"{A}: is a PCI bridge and cannot be assigned")


@pytest.mark.parametrize(("driver", "vfio", "ok"), [
    (None, False, True), ("pci-stub", False, True), ("vfio-pci", False, True),
    ("mlx5-vfio-pci", True, True), ("snd_hda_intel", False, False),
])
def test_group_member_viability(driver, vfio, ok):
    member = state(B, driver=driver, has_vfio_dev=vfio)
    plan = plan_prepare([dev()], {A: state()}, {"5": [state(), member]}, ctx())
    assert (plan.problems == ()) is ok
    if not ok:
        assert f"{B} ({driver}) shares IOMMU group 5 with {A}" in plan.problems[0]


def test_companion_planned_when_policy_allows():
    member = state(B, driver="snd_hda_intel")
    plan = plan_prepare([dev()], {A: state()}, {"5": [state(), member]},
                        ctx(policy=VmPolicy(companions="bind")))
    assert plan.problems == ()
    companion = plan.steps[-1]
    assert companion.companion and companion.address == B and companion.action == "bind"
    assert companion.reason.startswith("companion in IOMMU group 5")


# --- the guard: what the host holds ----------------------------------------------------
def held(address=A, *holders: tuple[str, str, str, str]):
    from vfio_libvirt.holders import DeviceHolders, Holder
    return DeviceHolders(address, tuple(Holder(*h) for h in holders))


ROOT = ("mount", "nvme0n1p2", "is mounted at / (root filesystem)", "critical")
DATA = ("mount", "nvme0n1p1", "is mounted at /data", "in_use")
DOWN = ("netdev", "eth1", "is down", "info")


def test_a_host_critical_device_is_refused_naming_the_holder():
    plan = plan_prepare([dev()], {A: state()}, {}, ctx(), {A: held(A, ROOT, DATA)})
    assert plan.problems == (f"{A}: refusing: nvme0n1p2 is mounted at / (root filesystem)",)
    assert not plan.bad_input


@pytest.mark.parametrize("allow", ["config", "vm", "vm-device"])
def test_a_critical_device_is_refused_whatever_the_policy_says(allow):
    config = Config(in_use_allowed=frozenset({A})) if allow == "config" else Config()
    policy = VmPolicy(in_use="allow" if allow == "vm" else None,
                      in_use_devices={A: "allow"} if allow == "vm-device" else {})
    plan = plan_prepare([dev()], {A: state()}, {}, ctx(config=config, policy=policy), {A: held(A, ROOT)})
    assert plan.problems == (f"{A}: refusing: nvme0n1p2 is mounted at / (root filesystem)",)


def test_a_device_in_use_is_refused_by_default_and_allowed_by_policy():
    plan = plan_prepare([dev()], {A: state()}, {}, ctx(), {A: held(A, DATA, DOWN)})
    (problem,) = plan.problems
    assert problem.startswith(f"{A}: refusing: nvme0n1p1 is mounted at /data (in use;")
    assert 'in_use = "allow"' in problem
    for policy in (VmPolicy(in_use="allow"), VmPolicy(in_use_devices={A: "allow"})):
        (step,) = plan_prepare([dev()], {A: state()}, {}, ctx(policy=policy), {A: held(A, DATA, DOWN)}).steps
        assert step.action == "bind" and step.reason.endswith("in use by the host, allowed by policy")
        assert step.holders == ("in_use: nvme0n1p1 is mounted at /data", "info: eth1 is down")
    # a device's own refuse beats the domain-wide allow
    policy = VmPolicy(in_use="allow", in_use_devices={A: "refuse"})
    assert plan_prepare([dev()], {A: state()}, {}, ctx(policy=policy), {A: held(A, DATA)}).problems


def test_managed_yes_devices_and_companions_are_guarded_too():
    plan = plan_prepare([dev(managed=True)], {A: state()}, {}, ctx(), {A: held(A, ROOT)})
    assert plan.problems == (f"{A}: refusing: nvme0n1p2 is mounted at / (root filesystem)",)
    companion = state(B, driver="snd_hda_intel", group="5")
    plan = plan_prepare([dev()], {A: state()}, {"5": [state(), companion]},
                        ctx(config=Config(companions="bind")), {A: held(A), B: held(B, DATA)})
    assert [s.address for s in plan.steps] == [A, B]
    assert plan.problems[0].startswith(f"{B}: refusing: nvme0n1p1 is mounted at /data")


def test_info_only_holders_do_not_refuse_and_show_in_the_plan():
    (step,) = plan_prepare([dev()], {A: state()}, {}, ctx(), {A: held(A, DOWN)}).steps
    assert step.holders == ("info: eth1 is down",)
    assert "    held: info: eth1 is down" in step.describe()
