"""The README's demo (./demo): the hook at work on real devices, in one throwaway QEMU guest.

On the host (`python3 -m tests.vm.demo`, run by ./demo once provisioning is done): boot
one guest with the two test NICs (tests/vm/guest.py), print the guest's progress as it
goes, then a table of each device's driver before, during and after a domain's life,
with the reason its VFIO driver was chosen.  Exit 0 only if every device was on a VFIO
driver, open in the domain's QEMU, while the domain ran, and back on its own driver with
no driver_override afterwards.  Nothing here touches the host's /sys.

In the guest (`--guest DIR`): configure libvirt like the libvirt tier does
(tests/libvirt/guest/guest_libvirt.py), install.sh, start libvirtd, define a domain with
both devices managed='no', ask `vfio-libvirt plan` why, virsh start, virsh destroy,
install.sh --uninstall; progress lines go to DIR/progress and the outcome to
DIR/result.json (DIR is a host directory shared with the guest).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tests.vm import guest as H

DOMAIN = "demo"                 # defined as vlt-demo (guest_libvirt.DOMAIN_PREFIX)
GUEST_TIMEOUT = 600.0           # the whole guest run; about 2 min on an idle 2-core machine
RESTORE_WAIT = 30.0             # for each device to be back on its own driver after destroy
HEARTBEAT = 30.0                # a line at least this often while the guest is quiet
COLUMNS = ("device", "before", "during (vm running)", "after", "why")


# ------------------------------------------------------------------ pure (unit-tested)


def reasons_by_address(plan: dict) -> dict[str, str]:
    """BDF -> "why" from `vfio-libvirt plan --json`: the step's reason, or the refusal."""
    found = {}
    for step in plan.get("steps", []):
        action = step.get("action")
        reason = step.get("reason", "")
        found[step["address"]] = reason if action in ("bind", "keep") else f"{action}: {reason}"
    for problem in plan.get("problems", []):
        for address in found:
            if address in problem:
                found[address] = f"refused: {problem}"
    return found


def render_table(devices: Sequence[dict]) -> str:
    """The before/during/after table; the last column (why) is not padded."""
    rows = [COLUMNS] + [
        (f"{d['address']} {d['name']}", d.get("before") or "(none)", d.get("during") or "(none)",
         d.get("after") or "(none)", d.get("why") or "?")
        for d in devices]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows)


def problems(devices: Sequence[dict]) -> list[str]:
    """What went wrong, one line per device and fault; [] when the demo did what it shows."""
    found = []
    if not devices:
        return ["no device was recorded"]
    for d in devices:
        where = f"{d['address']} {d['name']}"
        if not d.get("during_vfio"):
            found.append(f"{where}: not on a VFIO driver while the domain ran ({d.get('during')})")
        elif not d.get("held"):
            found.append(f"{where}: on {d.get('during')}, but the domain's QEMU did not have it open")
        if d.get("after") != d.get("before"):
            found.append(f"{where}: on {d.get('after')} after the domain stopped, not {d.get('before')}")
        elif d.get("override_after") not in (None, "(null)"):
            found.append(f"{where}: driver_override {d['override_after']!r} left behind")
    return found


class LineFollower:
    """The complete lines appended to a file since the last call (the guest's progress)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = ""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        text = self.partial + data.decode(errors="replace")
        *lines, self.partial = text.split("\n")
        return lines


# ------------------------------------------------------------------ host side


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def _follow(follower: LineFollower, stop: threading.Event, started: float) -> None:
    """Print the guest's progress lines as they come, and a heartbeat while it is quiet."""
    quiet_since = time.monotonic()
    while not stop.wait(0.5):
        lines = follower.new_lines()
        for line in lines:
            _say(f"  [{time.monotonic() - started:4.0f} s] {line}")
        if lines:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= HEARTBEAT:
            _say(f"  [{time.monotonic() - started:4.0f} s] … still working")
            quiet_since = time.monotonic()
    for line in follower.new_lines():
        _say(f"  [{time.monotonic() - started:4.0f} s] {line}")


def _stop_guest_of(shared: Path) -> None:
    """Kill the vng/QEMU run_in_guest started for us (it runs in a session of its own,
    which Ctrl-C does not reach): the process groups of the processes whose command line
    names our shared directory, which is unique to this run."""
    mine = os.getpgid(0)
    groups = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if any(str(shared).encode() in arg for arg in argv):
                groups.add(os.getpgid(int(proc.name)))
        except (OSError, ProcessLookupError):
            continue
    for group in groups - {mine}:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def host_main() -> int:
    started = time.monotonic()
    info, reason = H.check_libvirt_provisioned()
    if info is None:
        _say(f"cannot boot the guest: {reason}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    devices = H.DEFAULT_TEST_DEVICES
    _say(f"booting a throwaway QEMU guest (kernel {info.kver}, TCG) with "
         + " and ".join(f"{d.name} at {d.bdf}" for d in devices))
    with tempfile.TemporaryDirectory(prefix="vlt-demo-") as tmp:
        shared = Path(tmp)
        stop = threading.Event()
        follower = threading.Thread(target=_follow, daemon=True,
                                    args=(LineFollower(shared / "progress"), stop, started))
        follower.start()
        command = shlex.join([H.GUEST_PYTHON, "-m", "tests.vm.demo", "--guest", str(shared)])
        try:
            result = H.run_in_guest(command, devices=devices, rwdirs=[shared], info=info,
                                    timeout=GUEST_TIMEOUT)
        except KeyboardInterrupt:
            stop.set()
            _stop_guest_of(shared)
            _say("interrupted: the guest is stopped, nothing is left behind")
            return 130
        finally:
            stop.set()
            follower.join()
        try:
            outcome = json.loads((shared / "result.json").read_text())
        except (OSError, ValueError):
            outcome = None
    return report(result, outcome, started)


def report(result: H.GuestResult, outcome: dict | None, started: float) -> int:
    if outcome is None:
        _say("the guest left no result")
        print(result.describe(tail=40), file=sys.stderr)
        return 1
    print()
    print(render_table(outcome["devices"]))
    if outcome.get("hook_log"):
        print("\nwhat the hook logged (journalctl -t vfio-libvirt on a real host):")
        print("\n".join(f"  {line}" for line in outcome["hook_log"]))
    print()
    found = problems(outcome["devices"])
    if outcome.get("error"):
        found.insert(0, f"in the guest: {outcome['error']}")
    if not result.ok:
        found.append(result.describe(tail=40))
    host_started = float(os.environ.get("VFIO_LIBVIRT_DEMO_STARTED") or 0)
    took = f"guest {result.seconds:.0f} s"
    if host_started:
        took = f"{time.time() - host_started:.0f} s in all, {took}"
    if found:
        _say("FAILED:\n" + "\n".join(f"  {line}" for line in found))
        return 1
    _say(f"ok: every device was on a VFIO driver while the domain ran, and went home after ({took})")
    return 0


# ------------------------------------------------------------------ guest side


class Progress:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, text: str) -> None:
        with self.path.open("a") as f:
            f.write(text.rstrip("\n") + "\n")


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def guest_main(shared: Path) -> int:
    from tests.kernel.guest.guest_sysfs import Pci
    from tests.libvirt.guest import guest_libvirt as G

    H.require_guest()
    say = Progress(shared / "progress")
    pci = list(Pci(H.DEFAULT_TEST_DEVICES))
    rows = {dev.bdf: {"address": dev.bdf, "name": dev.spec.name} for dev in pci}
    outcome: dict = {"devices": list(rows.values()), "hook_log": [], "error": None}
    syslog = G.SyslogCatcher().start()
    pid = None
    installed = False
    domains = G.Domains(Path(tempfile.mkdtemp(prefix="vlt-demo-")))
    try:
        version = G.run(["libvirtd", "--version"]).stdout.strip()
        say(f"guest up: Linux {os.uname().release}, {version}")
        G.prepare_host()
        _checked(G.install_sh("--no-deps"), G.describe)
        installed = True
        say(f"./install.sh: hook at {G.HOOK}")
        say("starting libvirtd (under TCG its first QEMU probe takes up to a minute)")
        pid = G.start_libvirtd()
        name = domains.define(DOMAIN, [(dev.bdf, False) for dev in pci])
        say(f"defined domain {name}: {' and '.join(dev.bdf for dev in pci)} as managed='no' hostdevs")
        plan = _checked(G.vfio_libvirt("plan", name, "--connect", G.URI, "--json"), G.describe)
        for address, why in reasons_by_address(json.loads(plan.stdout)).items():
            if address in rows:
                rows[address]["why"] = why
        _record(pci, rows, "before")
        say(f"virsh start {name}")
        G.virsh("start", name)
        _record(pci, rows, "during")
        qemu = G.qemu_pid(name)
        for dev in pci:
            rows[dev.bdf]["during_vfio"] = (dev.path / "vfio-dev").is_dir()
            rows[dev.bdf]["held"] = G.holds_vfio(qemu, dev)
        say(f"virsh destroy {name}")
        G.virsh("destroy", name)
        for dev in pci:
            dev.wait_driver(rows[dev.bdf]["before"], timeout=RESTORE_WAIT)
        _record(pci, rows, "after")
        for dev in pci:
            rows[dev.bdf]["override_after"] = dev.override
    except Exception as err:
        outcome["error"] = f"{type(err).__name__}: {err}\n{G.diagnostics()}"
        say(f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    finally:
        outcome["hook_log"] = [line for line in syslog.hook_lines() if DOMAIN in line]
        _cleanup(domains, installed, pid, say, outcome)
        syslog.stop()
        (shared / "result.json").write_text(json.dumps(outcome, indent=1))
    return 1 if outcome["error"] or problems(outcome["devices"]) else 0


def _checked(proc, describe: Callable):
    if proc.returncode != 0:
        raise RuntimeError(describe(proc))
    return proc


def _record(pci: Iterable, rows: dict[str, dict], when: str) -> None:
    for dev in pci:
        rows[dev.bdf][when] = dev.driver


def _cleanup(domains, installed: bool, pid: int | None, say: Callable[[str], None],
             outcome: dict) -> None:
    """Undefine the domain, uninstall, stop libvirtd; each step even if one before failed."""
    from tests.libvirt.guest import guest_libvirt as G

    steps = [("undefine the domain", domains.cleanup)]
    if installed:
        def uninstall():
            proc = _checked(G.install_sh("--uninstall"), G.describe)
            say(f"./install.sh --uninstall: {_last_line(proc.stdout).removeprefix('install.sh: ')}")
        steps.append(("uninstall", uninstall))
    if pid is not None:
        steps.append(("stop libvirtd", lambda: G.stop_libvirtd(pid)))
    for what, step in steps:
        try:
            step()
        except Exception as err:
            outcome["error"] = (outcome["error"] or "") + f"\ncleanup: {what}: {err}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guest", metavar="DIR", type=Path,
                        help="run the guest side (inside the test guest only)")
    args = parser.parse_args(argv)
    if args.guest:
        return guest_main(args.guest)
    return host_main()


if __name__ == "__main__":
    sys.exit(main())
