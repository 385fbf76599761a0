"""CLI commands that look at or change this host's devices: plan, status, bind, restore, test-hook.

They call the same lifecycle functions the hook does, so what an admin tries by hand
is what libvirtd will get.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

from vfio_libvirt.cli_common import Command, emit_json, read_input, require_valid_config, warn
from vfio_libvirt.errors import InputError, OperationError
from vfio_libvirt.settings import MAX_XML_BYTES, Settings

CLI_DRIVER = "--driver {} on the command line"
HOOK_PATH = "/etc/libvirt/hooks/qemu.d/vfio-libvirt"
HOOK_OPS = {
    "prepare": "begin", "start": "begin", "started": "begin", "stopped": "end",
    "release": "end", "reconnect": "begin", "migrate": "begin", "restore": "begin",
    "attach": "begin",
}


def _load_domain(args: argparse.Namespace):
    from vfio_libvirt.domain import Domain

    if args.xml:
        return Domain.from_xml(read_input(args.xml, MAX_XML_BYTES))
    if not args.domain:
        raise InputError("give a domain name or --xml FILE")
    from vfio_libvirt.virt import domain_xml

    return Domain.from_xml(domain_xml(args.domain, args.connect))


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from vfio_libvirt.lifecycle import Host
    from vfio_libvirt.views import preview

    require_valid_config(settings)
    domain = _load_domain(args)
    plan = preview(Host(settings, read_only=True), domain)
    if args.json:
        emit_json(plan.to_json())
    else:
        if not plan.steps and not plan.problems:
            print(f"domain {domain.name} assigns no host PCI devices: nothing to do")
        for step in plan.steps:
            print(step.describe())
        for problem in plan.problems:
            print(f"refused: {problem}")
    return (2 if plan.bad_input else 1) if plan.problems else 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from vfio_libvirt.lifecycle import Host
    from vfio_libvirt.views import drift

    host = Host(settings)
    try:
        host.config  # noqa: B018 -- read only so its problems are warned about (once, by the core)
    except InputError as err:
        warn(f"{err}; status does not depend on it")
    snapshot = host.journal.read()
    entries = snapshot.entries
    owners, libvirt_note = _libvirt_owners(args.connect)
    rows = []
    for address in host.sysfs.devices():
        key = str(address)
        entry = entries.get(key)
        driver = host.sysfs.driver(address)
        on_vfio = host.on_vfio_driver(address)
        if entry is None and not on_vfio:
            continue
        pf = host.sysfs.physfn(address)
        rows.append({
            "address": key,
            "driver": driver,
            "driver_override": host.sysfs.driver_override(address),
            "original_driver": entry.original_driver if entry else None,
            "domain": entry.domain if entry else None,
            "libvirt_domain": owners.get(key),
            "role": entry.role if entry else None,
            "status": entry.status if entry else "not in journal",
            "error": entry.error if entry else "",
            "age_seconds": round(time.time() - entry.updated, 1) if entry else None,
            "worked_on": host.domain_locks.busy(entry.domain) if entry and entry.in_flight else None,
            "pf": str(pf) if pf else None,
            "network": entry.network if entry else None,
        })
    drifted = drift(host)
    if args.json:
        emit_json({"devices": rows, "drift": drifted, "journal_problems": list(snapshot.problems),
                   "libvirt": libvirt_note})
        return 0
    if not rows:
        print("no device is in the journal or on a VFIO driver")
    for row in rows:
        owner = row["domain"] or "-"
        running = f"  running in {row['libvirt_domain']}" if row["libvirt_domain"] else ""
        status = row["status"]
        if status == "stuck":  # how long the kernel has kept the write, and is anyone waiting
            status += f" for {row['age_seconds']:.0f} s" + ("" if row["worked_on"] else ", abandoned")
        print(f"{row['address']}  {row['driver'] or '(none)':<18} {status:<15} "
              f"domain={owner}  original={row['original_driver'] or '-'}{running}{_sriov_note(row)}"
              + (f"  error: {row['error']}" if row["error"] else ""))
    for line in drifted:
        print(f"drift: {line}")
    for line in snapshot.problems:
        print(f"journal: {line}")
    print(f"libvirt: {libvirt_note}")
    return 0


def _sriov_note(row: dict) -> str:
    """`  VF of <PF>, pool <network>`: which PF a VF hangs off (unbinding that PF's driver
    destroys it) and which libvirt network handed it out (its port-deleted restores it)."""
    parts = ([f"VF of {row['pf']}"] if row["pf"] else []) + (
        [f"pool {row['network']}"] if row["network"] else [])
    return "  " + ", ".join(parts) if parts else ""


def _libvirt_owners(uri: str | None) -> tuple[dict[str, str], str]:
    """BDF → running domain that has it, from libvirt (read-only); empty if unreachable."""
    from vfio_libvirt.domain import Domain
    from vfio_libvirt.errors import VfioLibvirtError
    from vfio_libvirt.virt import running_domains

    try:
        domains = running_domains(uri)
    except VfioLibvirtError as err:
        return {}, f"not consulted ({err})"
    owners = {}
    for name, xml in domains.items():
        try:
            owners.update({str(h.address): name for h in Domain.from_xml(xml).hostdevs})
        except VfioLibvirtError:
            continue
    return owners, f"{len(domains)} running domain(s) scanned"


def cmd_bind(args: argparse.Namespace, settings: Settings) -> int:
    from vfio_libvirt.domain import Domain, HostDev
    from vfio_libvirt.lifecycle import Host, prepare
    from vfio_libvirt.names import module_name
    from vfio_libvirt.pci import PciAddress

    address = PciAddress.parse(args.bdf)
    hostdev = HostDev(address, managed=False, origin="hostdev",
                      driver_model=module_name(args.driver) if args.driver else None,
                      driver_source=CLI_DRIVER)
    domain = Domain(name=owner_name(args.owner), uuid=None, hostdevs=(hostdev,))
    require_valid_config(settings)
    plan = prepare(Host(settings), domain)
    for step in plan.steps:
        print(step.describe())
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    from vfio_libvirt.lifecycle import Host, release, restore_device

    chosen = [bool(args.bdf), bool(args.domain), args.all]
    if sum(chosen) != 1:
        raise InputError("give exactly one of: a PCI address, --domain NAME, --all")
    # a restore never stops for a config mistake: the core uses the safe reading (or
    # the defaults if the file is not even TOML) and warns about each problem once
    host = Host(settings, config_fallback=True)
    host.config  # noqa: B018 -- read now so the warnings come first, even if nothing is restored
    if args.bdf:
        print(restore_device(host, args.bdf))
        return 0
    snapshot = host.journal.read()
    owners = {e.domain for e in snapshot.entries.values()}
    if not snapshot.problems:  # an unreadable journal may name anyone's devices: say so below
        if args.domain and args.domain not in owners:
            print(f"nothing to restore: no device of domain {args.domain} in the journal")
            return 0
        if not owners:
            print("nothing to restore: the journal is empty")
            return 0
    domains = [args.domain] if args.domain else sorted(owners)
    failures = [f for name in domains for f in release(host, name)] if domains else [
        f"journal: {problem}" for problem in snapshot.problems]
    failures = list(dict.fromkeys(failures))  # each domain's release repeats the journal's problems
    for failure in failures:
        print(f"not restored: {failure}", file=sys.stderr)
    if failures:
        raise OperationError(f"restore incomplete: {len(failures)} problem(s) (see above)")
    print(f"restored every device of {', '.join(domains)}")
    return 0


def owner_name(text: str) -> str:
    """The owner `bind` records stands for a domain: `restore --domain` and every status
    line must be able to name it, so empty, padded or control characters are refused."""
    if (not text.strip() or text != text.strip()
            or any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")
                   for c in text)):
        raise InputError(f"invalid --owner {text!r}: give a domain name without surrounding "
                         "spaces or control characters")
    return text


def cmd_test_hook(args: argparse.Namespace, settings: Settings) -> int:
    if args.op not in HOOK_OPS:
        raise InputError(f"unknown hook op {args.op!r}: one of {', '.join(HOOK_OPS)}")
    hook = Path(args.hook or HOOK_PATH)
    if not os.access(hook, os.X_OK):
        raise OperationError(f"hook {hook} is not installed or not executable (sudo ./install.sh)")
    if args.xml:
        data = read_input(args.xml, MAX_XML_BYTES)
    else:
        from vfio_libvirt.virt import domain_xml

        data = domain_xml(args.domain, args.connect)
    # libvirtd runs hooks with a minimal environment; keep only our own overrides
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("VFIO_LIBVIRT_")})
    if args.dry_run:
        env["VFIO_LIBVIRT_DRY_RUN"] = "1"
    argv = [str(hook), args.domain, args.op, HOOK_OPS[args.op], "-"]
    print(f"$ {' '.join(argv)} < domain XML ({len(data)} bytes)")
    proc = subprocess.run(argv, input=data, capture_output=True, env=env, check=False)
    sys.stdout.write(proc.stdout.decode(errors="replace"))
    sys.stdout.write(proc.stderr.decode(errors="replace"))
    print(f"exit code {proc.returncode}")
    return proc.returncode


def register(command: Command) -> None:
    """Add this module's commands; `command(name, func, help)` returns a subparser."""
    p = command("plan", cmd_plan, "show what prepare would do for a domain, with reasons")
    p.add_argument("domain", nargs="?", help="libvirt domain name (needs libvirt-python)")
    p.add_argument("--xml", metavar="FILE", help="domain XML file, or - for stdin")
    p.add_argument("--connect", metavar="URI", help="libvirt URI, as for virsh")
    p.add_argument("--json", action="store_true")

    p = command("status", cmd_status, "devices in the journal or on a VFIO driver, and drift")
    p.add_argument("--connect", metavar="URI", help="libvirt URI to find which domain runs each")
    p.add_argument("--json", action="store_true")

    p = command("bind", cmd_bind, "bind one device to its best VFIO driver by hand (journaled)")
    p.add_argument("bdf")
    p.add_argument("--driver", help="VFIO module or driver to use instead of the alias rule")
    p.add_argument("--owner", default="manual", help="owner recorded in the journal")

    p = command("restore", cmd_restore, "give devices back to their original drivers")
    p.add_argument("bdf", nargs="?")
    p.add_argument("--domain", help="every device the journal gives to this domain")
    p.add_argument("--all", action="store_true", help="every device in the journal")

    p = command("test-hook", cmd_test_hook, "run the installed hook as libvirtd would")
    p.add_argument("domain")
    p.add_argument("op", help="prepare, release, start, stopped, reconnect, …")
    p.add_argument("--xml", metavar="FILE", help="use this XML instead of asking libvirt")
    p.add_argument("--connect", metavar="URI")
    p.add_argument("--hook", help=f"hook to run (default {HOOK_PATH})")
    p.add_argument("--dry-run", action="store_true", help="show the plan; the hook writes nothing")
