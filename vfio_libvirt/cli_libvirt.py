"""CLI commands that need libvirt itself: doctor, adopt, attach, detach.

The hook is not called for hotplug, so attach/detach do its job around libvirt's
attachDeviceFlags/detachDeviceFlags, with the same journal.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from vfio_libvirt.cli_common import (
    Command,
    Finding,
    core_logs_silenced,
    driver_hooks_since,
    emit_json,
    hook_seen_by,
    reload_marks,
    require_valid_config,
)
from vfio_libvirt.doctor_networks import NETWORK_HOOK
from vfio_libvirt.errors import InputError, OperationError, VfioLibvirtError
from vfio_libvirt.settings import Settings


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 all well, 1 a `fail` finding, 2 a config with mistakes: scripts and Ansible
    act on the exit code, not on the text."""
    # every finding is printed below; the core's own warnings (the config problems,
    # again) would only repeat them on stderr
    with core_logs_silenced():
        findings = doctor(settings, args.connect, Path(args.hook), Path(args.network_hook))
    if args.json:
        emit_json([f.to_json() for f in findings])
    else:
        for f in findings:
            print(f"[{f.level:>4}] {f.what}" + (f"\n       fix: {f.fix}" if f.fix else ""))
    failed = [f for f in findings if f.level == "fail"]
    if any(f.bad_input for f in failed):
        return 2
    return 1 if failed else 0


def doctor(settings: Settings, uri: str | None, hook: Path, network_hook: Path) -> list[Finding]:
    from vfio_libvirt.aliases import AliasTable
    from vfio_libvirt.libvirt_version import VARIANT_MIN
    from vfio_libvirt.lifecycle import Host

    # a config that is not TOML is a finding, not the end of the check-up
    host = Host(settings, config_fallback=True)
    out: list[Finding] = []
    groups = host.sysfs.sys / "kernel" / "iommu_groups"
    count = len(os.listdir(groups)) if groups.is_dir() else 0
    out.append(Finding("ok", f"IOMMU enabled: {count} IOMMU groups") if count else Finding(
        "fail", "no IOMMU groups: the IOMMU is off",
        "enable VT-d/AMD-Vi in firmware and boot with intel_iommu=on (Intel) or amd_iommu=on"))
    try:
        table = AliasTable.load(settings.modules_dir)
        variants = sorted({a.module for a in table.aliases} - {"vfio_pci"})
        if any(a.module == "vfio_pci" for a in table.aliases):
            out.append(Finding("ok", "vfio_pci available; variant drivers: "
                               + (", ".join(variants) or "none")))
        else:
            out.append(Finding("fail", f"no vfio_pci alias in {settings.modules_dir}",
                               "install a kernel with CONFIG_VFIO_PCI and run depmod"))
    except VfioLibvirtError as err:
        out.append(Finding("fail", str(err), "check VFIO_LIBVIRT_MODULES_DIR / the running kernel"))
    out += _config_findings(settings.config_path)
    version = host.libvirt_version
    if version is None:
        out.append(Finding("warn", "libvirt version unknown: managed='no' devices get vfio-pci",
                           "set [libvirt] version in the config"))
    else:
        label = ".".join(map(str, version))
        meaning = ("variant drivers usable for managed='no'" if version >= VARIANT_MIN
                   else "libvirt < 10 accepts only vfio-pci for managed='no'; variant drivers unusable")
        out.append(Finding("ok" if version >= VARIANT_MIN else "warn", f"libvirt {label}: {meaning}"))
    reloaded = reload_marks(settings.state_dir)
    out += _hook_findings(hook, reloaded)
    state = settings.state_dir
    if state.exists() and (state.stat().st_mode & 0o077):
        out.append(Finding("warn", f"state dir {state} is readable by others", f"chmod 700 {state}"))
    out += _journal_findings(host) if state.exists() else [Finding("ok", "journal: 0 device(s)")]
    out += _libvirt_findings(host, uri, network_hook, reloaded)
    return out


def _fix_for(problem: str) -> str:
    if "IOMMU group" in problem:
        return "assign the whole IOMMU group, or [policy] companions = \"bind\""
    if "refusing:" in problem and "(in use;" in problem:
        return "free the device first, give the domain another one, or set in_use = \"allow\" for it"
    if "refusing:" in problem:
        return "the host needs this device: give the domain another one (vfio-libvirt holders BDF)"
    return ""


def _journal_findings(host) -> list[Finding]:
    """What the journal holds, what it cannot read, and where sysfs disagrees with it.

    Drift covers entries a crashed run left in claimed/switching/restoring and devices
    the journal puts on a VFIO driver that have no driver at all: each needs an admin.
    """
    from vfio_libvirt.views import drift

    try:
        snapshot = host.journal.read()
        drifted = drift(host)
    except VfioLibvirtError as err:
        return [Finding("fail", str(err), "inspect the state dir by hand")]
    entries = snapshot.entries
    failed = [e.address for e in entries.values() if e.status == "restore-failed"]
    out = [Finding("warn" if failed else "ok",
                   f"journal: {len(entries)} device(s)"
                   + (f", restore failed for {', '.join(failed)}" if failed else ""),
                   "vfio-libvirt restore --all" if failed else "")]
    out += [Finding("fail", f"journal: {line}", "inspect the file; remove it once its devices are safe")
            for line in snapshot.problems]
    out += [Finding("warn", f"{e.address}: stuck for {time.time() - e.updated:.0f} s: {e.error}",
                    f"pid {e.pid} finishes it when the kernel returns; if that never happens, the "
                    "driver is waiting for a user of the device (see vfio-libvirt holders BDF)")
            for e in entries.values() if e.status == "stuck" and host.domain_locks.busy(e.domain)]
    out += [Finding("fail", f"drift: {line}") for line in drifted]
    return out


def _config_findings(path: Path) -> list[Finding]:
    from vfio_libvirt.config import Config

    check = "vfio-libvirt config check"
    try:
        config = Config.load(path)
    except InputError as err:
        return [Finding("fail", str(err), f"fix the file, then: {check}", bad_input=True)]
    if not path.exists():
        return [Finding("ok", f"config {path}: none, the defaults apply")]
    if not config.problems:
        return [Finding("ok", f"config {path}: no problems")]
    return [Finding("fail", f"config {problem}",
                    f"edit {problem.path}" + (f" line {problem.line}" if problem.line else "")
                    + f", then: {check}", bad_input=True)
            for problem in config.problems]


def _hook_findings(hook: Path, reloaded: dict[str, float]) -> list[Finding]:
    if not hook.exists():
        return [Finding("fail", f"hook {hook} not installed", "sudo ./install.sh")]
    if not os.access(hook, os.X_OK):
        return [Finding("fail", f"hook {hook} is not executable", f"chmod 755 {hook}")]
    found = [Finding("ok", f"hook installed: {hook}")]
    started = _daemon_start_times()
    since = driver_hooks_since(hook)
    for daemon, start in started.items():
        seen = hook_seen_by(start, reloaded.get(daemon, 0.0), since)
        if seen == "started":
            found.append(Finding("ok", f"{daemon} started after the hook: it runs it"))
        elif seen == "reloaded":
            found.append(Finding("ok", f"{daemon} reloaded since the hook was installed: it runs it"))
        else:
            found.append(Finding("warn", f"{daemon} started before the hook was installed",
                                 f"systemctl reload {daemon}"))
    if not started:
        found.append(Finding("warn", "no libvirtd/virtqemud running",
                             "start libvirtd or virtqemud"))
    return found


def _daemon_start_times(names: tuple[str, ...] = ("libvirtd", "virtqemud")) -> dict[str, float]:
    """The running daemons of `names` and when they started (epoch seconds); by default
    those that run the qemu hook."""
    boot = _boot_time()
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            if name not in names:
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            found[name] = boot + int(fields[19]) / ticks
        except OSError:
            continue
    return found


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _libvirt_findings(host, uri: str | None, network_hook: Path,
                      reloaded: dict[str, float]) -> list[Finding]:
    """Every domain's devices and every SR-IOV hostdev network, over one read-only connection."""
    from vfio_libvirt.doctor_networks import NETWORK_DAEMONS, NetworkXml, network_findings, read_networks
    from vfio_libvirt.virt import connect, xml_of

    networks: list[NetworkXml] = []
    network_error = ""
    try:
        with connect(uri) as conn:
            domains = {dom.name(): xml_of(dom) for dom in conn.listAllDomains()}
            try:
                networks = read_networks(conn)
            except VfioLibvirtError as err:  # the domains are still worth checking
                network_error = str(err)
    except VfioLibvirtError as err:
        return [Finding("warn", f"cannot list domains or networks: {err}")]
    found = _domain_findings(host, domains)
    if network_error:
        return [*found, Finding("warn", network_error)]
    # looked at after the listing, which socket-activates virtnetworkd if it had exited
    return found + network_findings(networks, network_hook, _daemon_start_times(NETWORK_DAEMONS),
                                    reloaded)


def _domain_findings(host, domains: dict[str, bytes]) -> list[Finding]:
    from vfio_libvirt.domain import Domain
    from vfio_libvirt.lifecycle import make_plan

    found = []
    for name, xml in sorted(domains.items()):
        try:
            domain = Domain.from_xml(xml)
            if not domain.hostdevs:
                continue
            plan = make_plan(host, domain)
        except VfioLibvirtError as err:
            found.append(Finding("fail", f"domain {name}: {err}"))
            continue
        for problem in plan.problems:
            found.append(Finding("fail", f"domain {name}: {problem}", _fix_for(problem)))
        if not plan.problems:
            summary = ", ".join(f"{s.address} {s.action}" + (f" {s.module}" if s.module else "")
                                for s in plan.steps)
            found.append(Finding("ok", f"domain {name}: {summary}"))
    return found


# --- adopt ---------------------------------------------------------------------------
def cmd_adopt(args: argparse.Namespace, settings: Settings) -> int:
    import difflib

    from lxml import etree

    from vfio_libvirt.domain import Domain, parse_xml
    from vfio_libvirt.libvirt_version import VARIANT_MIN
    from vfio_libvirt.lifecycle import Host, make_plan
    from vfio_libvirt.virt import connect, lookup, xml_of

    # VIR_DOMAIN_XML_SECURE: without it libvirt leaves out secrets such as
    # <graphics passwd=...>, and redefining from that XML would delete them.  libvirt
    # refuses the flag on a read-only connection; a dry run defines nothing, so it can
    # do without.
    secure = not args.dry_run
    with connect(args.connect, write=secure) as conn:
        dom = lookup(conn, args.domain)
        original = xml_of(dom, inactive=True, secure=secure)
        root = parse_xml(original)
        managed = [h for h in Domain.from_xml(original).hostdevs if h.managed]
        if not managed:
            print(f"domain {args.domain}: no managed='yes' PCI device; nothing to adopt")
            return 0
        host = Host(settings)
        as_unmanaged = Domain(args.domain, None, tuple(
            type(h)(h.address, False, h.driver_model, h.origin) for h in managed))
        plan = make_plan(host, as_unmanaged)
        if plan.problems:
            raise OperationError("cannot adopt: " + "; ".join(plan.problems))
        for step in plan.steps:
            print(f"{step.address}: the hook would {step.action} {step.module or ''}: {step.reason}")
        if not (host.libvirt_version and host.libvirt_version >= VARIANT_MIN):
            print("note: a variant driver is not possible for managed='no' on this libvirt (< 10): "
                  "adopting adds bounded restore retries and IOMMU group handling, not a better driver")
        addresses = {str(s.address) for s in plan.steps}
        # both sides of the diff come from the same serializer, so it shows only what
        # changes, not libvirt's quoting against lxml's
        before = etree.tostring(root, encoding="unicode")
        for element in root.xpath("devices/hostdev[@managed='yes'] | devices/interface[@managed='yes']"):
            address = element.find("source/address")
            if address is not None and _bdf(address) in addresses:
                element.set("managed", "no")
        updated = etree.tostring(root, encoding="unicode")
        diff = difflib.unified_diff(before.splitlines(), updated.splitlines(),
                                    "persistent", "adopted", lineterm="")
        print("\n".join(diff))
        if args.dry_run:
            print("dry run: definition unchanged")
            return 0
        conn.defineXML(updated)
        print(f"domain {args.domain}: redefined with managed='no' for {len(addresses)} device(s); "
              "takes effect at its next start")
    return 0


def _bdf(address) -> str:
    from vfio_libvirt.pci import PciAddress

    return str(PciAddress.from_xml(domain=address.get("domain"), bus=address.get("bus"),
                                   slot=address.get("slot"), function=address.get("function")))


# --- hotplug -------------------------------------------------------------------------
def hostdev_xml(bdf) -> str:
    return (
        "<hostdev mode='subsystem' type='pci' managed='no'><source>"
        f"<address domain='0x{bdf.domain:04x}' bus='0x{bdf.bus:02x}' slot='0x{bdf.slot:02x}' "
        f"function='0x{bdf.function:x}'/></source></hostdev>"
    )


def _affect_flags(libvirt, persistent: bool) -> int:
    """The running domain always; its persistent definition too with --persistent."""
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    return live | libvirt.VIR_DOMAIN_AFFECT_CONFIG if persistent else live


def cmd_attach(args: argparse.Namespace, settings: Settings) -> int:
    from vfio_libvirt.domain import Domain, HostDev
    from vfio_libvirt.lifecycle import Host, prepare, restore_device
    from vfio_libvirt.pci import PciAddress
    from vfio_libvirt.virt import connect, libvirt_module, lookup

    address = PciAddress.parse(args.bdf)
    require_valid_config(settings)  # bad input first: exit 2 whether or not libvirt is there
    libvirt = libvirt_module()
    host = Host(settings)
    with connect(args.connect, write=True) as conn:
        dom = lookup(conn, args.domain)
        if not dom.isActive():
            raise InputError(f"domain {args.domain} is not running")
        plan = prepare(host, Domain(args.domain, dom.UUIDString(), (
            HostDev(address, managed=False, driver_model=args.driver, origin="hostdev",
                    driver_source="--driver {} on the command line"),)))
        for step in plan.steps:
            print(step.describe())
        flags = _affect_flags(libvirt, args.persistent)
        try:
            dom.attachDeviceFlags(hostdev_xml(address), flags)
        except libvirt.libvirtError as err:
            restore_device(host, str(address))
            raise OperationError(f"libvirt refused to attach {address}: {err}; device restored") from None
    print(f"{address} attached to {args.domain}")
    return 0


def cmd_detach(args: argparse.Namespace, settings: Settings) -> int:
    from vfio_libvirt.lifecycle import Host, restore_device
    from vfio_libvirt.pci import PciAddress
    from vfio_libvirt.virt import connect, libvirt_module, lookup

    libvirt = libvirt_module()
    address = PciAddress.parse(args.bdf)
    with connect(args.connect, write=True) as conn:
        dom = lookup(conn, args.domain)
        flags = _affect_flags(libvirt, args.persistent)
        try:
            dom.detachDeviceFlags(hostdev_xml(address), flags)
        except libvirt.libvirtError as err:
            raise OperationError(f"libvirt refused to detach {address}: {err}") from None
    # a restore: a config mistake is warned about, never a reason to keep the device
    print(restore_device(Host(settings, config_fallback=True), str(address)))
    return 0


def register(command: Command) -> None:
    p = command("doctor", cmd_doctor,
                "check IOMMU, VFIO modules, libvirt, the hooks, every domain and SR-IOV network")
    p.add_argument("--connect", metavar="URI")
    p.add_argument("--hook", default="/etc/libvirt/hooks/qemu.d/vfio-libvirt")
    p.add_argument("--network-hook", default=NETWORK_HOOK,
                   help="checked for every managed='no' SR-IOV hostdev network")
    p.add_argument("--json", action="store_true")

    p = command("adopt", cmd_adopt, "switch a domain's managed='yes' PCI devices to the hook")
    p.add_argument("domain")
    p.add_argument("--connect", metavar="URI")
    p.add_argument("--dry-run", action="store_true", help="show the diff; change nothing")

    for name, func, text in (("attach", cmd_attach, "bind the best VFIO driver, then hotplug"),
                             ("detach", cmd_detach, "hot-unplug, then restore the host driver")):
        p = command(name, func, text)
        p.add_argument("domain")
        p.add_argument("bdf")
        p.add_argument("--persistent", action="store_true", help="also change the persistent config")
        p.add_argument("--connect", metavar="URI")
        if name == "attach":
            p.add_argument("--driver", help="VFIO module to use instead of the alias rule")
