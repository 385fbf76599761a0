"""libvirtd, virsh, domains and the hook's log, for the tests inside the libvirt tier's guest.

Everything that changes the system (config files under the guest's throwaway /etc,
/dev nodes, the daemon) calls require_guest() first: importing this on the host is
harmless, using it there is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

from tests.kernel.guest.guest_sysfs import Pci, SriovPf
from tests.vm import guest as H

REPO = Path(os.environ.get("VFIO_LIBVIRT_TEST_REPO") or Path(__file__).resolve().parents[3])
URI = "qemu:///system"
HOOKS_DIR = Path("/etc/libvirt/hooks")
HOOK = HOOKS_DIR / "qemu.d" / "vfio-libvirt"
NETWORK_HOOK = HOOKS_DIR / "network.d" / "vfio-libvirt"
CLI = Path("/usr/local/sbin/vfio-libvirt")            # install.sh's (test_10, test_20)
INSTALLED_LIB = Path("/usr/lib/vfio-libvirt")
PACKAGE_CLI = Path("/usr/sbin/vfio-libvirt")           # the Debian package's (test_25 on)
PACKAGE_LIBEXEC = Path("/usr/libexec/vfio-libvirt")
# the package the host built for this boot (tests/libvirt/test_libvirt_tier.py)
DEB = Path(os.environ.get("VFIO_LIBVIRT_TEST_DEB") or "/nonexistent/vfio-libvirt.deb")
CONFIG_DIR = Path("/etc/vfio-libvirt")
STATE_DIR = Path("/run/vfio-libvirt")
JOURNAL = STATE_DIR / "journal.json"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
QEMU_RUN_DIR = Path("/run/libvirt/qemu")
LIBVIRTD_LOG = Path("/var/log/libvirt/libvirtd.log")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
SYSLOG_SOCKET = Path("/dev/log")
DOMAIN_PREFIX = "vlt-"
NETWORK_PREFIX = "vlt-"

# The guest runs everything as root and has no AppArmor/SELinux; virtlogd is not
# running, so QEMU's stdio goes straight to /var/log/libvirt/qemu/<dom>.log.
QEMU_CONF = """\
# written by tests/libvirt/guest (throwaway /etc of the test guest)
user = "root"
group = "root"
security_driver = "none"
stdio_handler = "file"
"""
LIBVIRT_DIRS = ("/var/log/libvirt/qemu", "/var/lib/libvirt/qemu", "/var/cache/libvirt/qemu",
                "/run/libvirt")


class CommandFailed(AssertionError):
    pass


def run(argv: Sequence[str], *, timeout: float = 180, input: str | None = None,
        env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `argv`; past `timeout` record what everything waits on, then fail the test.

    subprocess.run would wait without limit for a killed command's pipes (and a process
    asleep in the kernel cannot be killed), and a hung daemon makes every later call time
    out too, until the outer harness kills the guest with no report at all.  So the
    evidence goes to the kernel log, which the harness prints from the console.
    """
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or clean_env(), cwd=cwd)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        evidence = hang_evidence()
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
        headline = f"$ {' '.join(map(str, argv))}: no answer in {timeout:g} s"
        to_console(headline, evidence)
        raise CommandFailed(f"{headline}\n{evidence}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def hang_evidence() -> str:
    """The process tree with what each waits on, and the kernel stacks of the interesting."""
    try:
        tree = subprocess.run(["ps", "-eo", "pid,ppid,stat,wchan:32,etime,args", "--forest"],
                              capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"ps: {err}"
    lines = [line for line in tree.splitlines()
             if " D" in line[:20] or any(w in line for w in ("qemu", "virsh", "libvirtd", "vfio-libvirt"))]
    stacks = []
    for line in lines:
        pid = line.split()[0]
        try:
            stack = Path(f"/proc/{pid}/stack").read_text().splitlines()[:10]
        except (OSError, ValueError):
            continue
        stacks.append(f"--- {pid}: " + " < ".join(frame.split()[-1] for frame in stack))
    return "\n".join(["--- processes", *lines, *stacks])


def to_console(headline: str, evidence: str) -> None:
    try:
        with open("/dev/kmsg", "w") as kmsg:
            for line in [headline, *evidence.splitlines()][:80]:
                kmsg.write(f"vlt-libvirt-tier: {line[:200]}\n")
                kmsg.flush()
    except OSError:
        pass


def clean_env() -> dict[str, str]:
    """The environment an admin's root shell would have: no repo on PYTHONPATH (the
    installed CLI must run from /usr/lib/vfio-libvirt), no VFIO_LIBVIRT_* overrides."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("VFIO_LIBVIRT_")}
    env["LIBVIRT_DEFAULT_URI"] = URI
    return env


def describe(proc: subprocess.CompletedProcess) -> str:
    return (f"$ {' '.join(map(str, proc.args))}\nexit {proc.returncode}\n"
            f"--- stdout\n{proc.stdout.rstrip()}\n--- stderr\n{proc.stderr.rstrip()}")


def virsh(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = run(["virsh", "-c", URI, *args], timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandFailed(describe(proc))      # the report adds diagnostics() (conftest)
    return proc


def installed_cli() -> Path:
    """The CLI of whichever install is in place: install.sh's or the package's, never both
    (the package's preinst refuses to go over an install.sh copy)."""
    found = [path for path in (CLI, PACKAGE_CLI) if path.exists()]
    if len(found) != 1:
        raise CommandFailed(f"expected exactly one installed vfio-libvirt CLI, found {found}")
    return found[0]


def vfio_libvirt(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The installed CLI, run like an admin would."""
    return run([str(installed_cli()), *args], timeout=timeout)


def dpkg(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """dpkg as an admin runs it, with man-db's trigger off.

    The trigger runs `mandb`, which stat()s every man page of the guest's root: over
    9p under TCG that did not end in 300 s.  Removing auto-update is what answering
    debconf's man-db/auto-update with "no" does; the guest's /var is throwaway.
    """
    H.require_guest()
    Path("/var/lib/man-db/auto-update").unlink(missing_ok=True)
    return run(["dpkg", *args], timeout=timeout)


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------- host set-up


def prepare_host() -> None:
    """What a Debian host has and the bare guest lacks, before libvirtd starts."""
    H.require_guest()
    Path("/etc/libvirt/qemu.conf").write_text(QEMU_CONF)
    for path in LIBVIRT_DIRS:
        Path(path).mkdir(parents=True, exist_ok=True)
    # the default network would need dnsmasq and a firewall; no test uses it
    for link in Path("/etc/libvirt/qemu/networks/autostart").glob("*"):
        link.unlink()
    # the guest sees this machine's root, whose policy-rc.d may be a container's "exit
    # 101": on a libvirt host the package's maintainer scripts may reload the daemon
    Path("/usr/sbin/policy-rc.d").unlink(missing_ok=True)
    make_static_vfio_node()


def make_static_vfio_node() -> None:
    """/dev/vfio/vfio as systemd's kmod-static-nodes makes it on every real host.

    libvirt refuses any PCI passthrough ("host doesn't support passthrough of host PCI
    devices") while the node is missing; opening it loads the vfio module on demand.
    The guest has no systemd, so the node appears only once vfio is loaded, which the
    hook does for managed='no' but libvirt's check for managed='yes' comes first.
    """
    H.require_guest()
    node = Path("/dev/vfio/vfio")
    if node.exists():
        return
    devname = Path("/lib/modules") / os.uname().release / "modules.devname"
    for line in devname.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "vfio/vfio" and parts[2].startswith("c"):
            major, minor = (int(n) for n in parts[2][1:].split(":"))
            node.parent.mkdir(exist_ok=True)
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            return
    raise AssertionError(f"no vfio/vfio line in {devname}")


def install_sh(*args: str) -> subprocess.CompletedProcess:
    H.require_guest()
    return run([str(REPO / "install.sh"), *args], cwd=REPO, timeout=300)


def start_libvirtd(timeout: float = 300) -> int:
    """libvirtd -d, warnings and errors to LIBVIRTD_LOG; returns its pid once virsh answers."""
    H.require_guest()
    env = {**clean_env(), "LIBVIRT_LOG_OUTPUTS": f"3:file:{LIBVIRTD_LOG}"}
    proc = run(["libvirtd", "-d"], env=env, timeout=120)
    if proc.returncode != 0:
        raise CommandFailed(f"libvirtd did not start\n{describe(proc)}\n{tail(LIBVIRTD_LOG)}")
    # The first question makes libvirt probe QEMU's capabilities: QEMU 10 under TCG on a
    # busy 2-core machine took 53 s once, so one try may use most of the budget.
    if not wait_for(lambda: virsh("version", check=False, timeout=timeout).returncode == 0, timeout, 1.0):
        raise CommandFailed(f"libvirtd does not answer after {timeout:.0f}s\n{tail(LIBVIRTD_LOG)}")
    return int(LIBVIRTD_PIDFILE.read_text().split()[0])


def stop_libvirtd(pid: int, timeout: float = 60) -> None:
    H.require_guest()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout)


def tree_listing(root: Path, *, times: bool = False) -> list[tuple]:
    """(relative path, type and mode, content hash[, mtime]) of everything under root."""
    if not root.exists():
        return []
    found = []
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        content = ""
        if stat.S_ISREG(st.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        entry = (str(path.relative_to(root)), stat.filemode(st.st_mode), content)
        found.append((*entry, st.st_mtime_ns) if times else entry)
    return found


# --------------------------------------------------------------- domains


def _address(bdf: str) -> str:
    domain, bus, slot_fn = bdf.split(":")
    slot, function = slot_fn.split(".")
    return (f"<address type='pci' domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' "
            f"function='0x{function}'/>")


def hostdev_interface(bdf: str, mac: str, *, managed: bool = False) -> str:
    """<interface type='hostdev'> on the SR-IOV VF at `bdf`, with a MAC libvirt sets
    through the PF before QEMU starts."""
    return (f"<interface type='hostdev' managed={quoteattr('yes' if managed else 'no')}>"
            f"<mac address={quoteattr(mac)}/><source>{_address(bdf)}</source>"
            "<rom bar='off'/></interface>")


def network_interface(network: str) -> str:
    """<interface type='network'> on a libvirt network (a hostdev pool: libvirt picks a VF)."""
    return f"<interface type='network'><source network={quoteattr(network)}/><rom bar='off'/></interface>"


def domain_xml(name: str, hostdevs: Sequence[tuple[str, bool]],
               interfaces: Sequence[str] = ()) -> str:
    """A 128 MiB TCG q35 domain with no disk, these (BDF, managed) PCI hostdevs and
    these <interface> elements (hostdev_interface(), network_interface()).

    The nested guest runs no OS, so nobody answers a hot-unplug request.  With ACPI
    PCI hotplug off, QEMU uses native PCIe hotplug, and a device hot-plugged into a
    root port whose slot the (absent) OS never powered on is removed at once: that
    stands in for a guest that acknowledges the unplug.
    """
    devices = []
    for bdf, managed in hostdevs:
        domain, bus, slot_fn = bdf.split(":")
        slot, function = slot_fn.split(".")
        devices.append(
            f"<hostdev mode='subsystem' type='pci' managed={quoteattr('yes' if managed else 'no')}>"
            f"<source><address domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' "
            f"function='0x{function}'/></source><rom bar='off'/></hostdev>")
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {"".join(devices)}
    {"".join(interfaces)}
  </devices>
  <qemu:commandline>
    <qemu:arg value='-global'/>
    <qemu:arg value='ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off'/>
  </qemu:commandline>
</domain>
"""


class Domains:
    """Domains a test defines; cleanup() destroys and undefines all of them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.names: list[str] = []

    def define(self, name: str, hostdevs: Sequence[tuple[str, bool]],
               interfaces: Sequence[str] = ()) -> str:
        name = DOMAIN_PREFIX + name
        path = self.tmp / f"{name}.xml"
        path.write_text(domain_xml(name, hostdevs, interfaces))
        self.names.append(name)
        virsh("define", str(path))
        return name

    @staticmethod
    def start(name: str) -> None:
        virsh("start", name)

    @staticmethod
    def destroy(name: str) -> None:
        virsh("destroy", name)

    def cleanup(self) -> None:
        for name in self.names:
            if is_running(name):
                virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)


class Networks:
    """libvirt networks a test defines and starts; cleanup() destroys and undefines them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.names: list[str] = []

    def hostdev_pool(self, name: str, pf_netdev: str, *, managed: bool) -> str:
        """A <forward mode='hostdev'> pool of the VFs of `pf_netdev`, defined and started."""
        name = NETWORK_PREFIX + name
        path = self.tmp / f"net-{name}.xml"
        path.write_text(
            f"<network><name>{name}</name>"
            f"<forward mode='hostdev' managed={quoteattr('yes' if managed else 'no')}>"
            f"<pf dev={quoteattr(pf_netdev)}/></forward></network>\n")
        self.names.append(name)
        virsh("net-define", str(path))
        virsh("net-start", name)
        return name

    def cleanup(self) -> None:
        for name in self.names:
            virsh("net-destroy", name, check=False)
            virsh("net-undefine", name, check=False)


def network_ports(network: str) -> list[dict]:
    """The network's ports (virsh net-port-dumpxml): owner domain, plug type, managed,
    BDF of the VF a hostdev pool plugged, and the XML itself (what the network hook gets
    as <networkport>)."""
    from lxml import etree

    found = []
    for uuid in virsh("net-port-list", network, "--uuid").stdout.split():
        xml = virsh("net-port-dumpxml", network, uuid).stdout
        root = etree.fromstring(xml.encode())
        plug = root.find("plug")
        address = plug.find("address") if plug is not None else None
        found.append({
            "uuid": uuid,
            "owner": root.findtext("owner/name"),
            "plug": plug.get("type") if plug is not None else None,
            "managed": plug.get("managed") if plug is not None else None,
            "bdf": pci_address(address) if address is not None else None,
            "xml": xml,
        })
    return found


def leftover_networks() -> list[str]:
    """Networks of ours that libvirt still knows (a failed cleanup)."""
    names = virsh("net-list", "--all", "--name", check=False).stdout.split()
    return [n for n in names if n.startswith(NETWORK_PREFIX)]


def running_domains() -> list[str]:
    return virsh("list", "--name").stdout.split()


def defined_domains() -> list[str]:
    return virsh("list", "--all", "--name").stdout.split()


def is_running(name: str) -> bool:
    return virsh("domstate", name, check=False).stdout.strip() == "running"


def qemu_pid(name: str) -> int:
    return int((QEMU_RUN_DIR / f"{name}.pid").read_text().split()[0])


def open_files(pid: int) -> set[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    found = set()
    for fd in os.listdir(fd_dir):
        try:
            found.add(os.readlink(fd_dir / fd))
        except OSError:
            continue
    return found


def hostdev_sources(name: str) -> list[str]:
    """BDFs of the PCI hostdevs in the domain's live (or inactive) XML."""
    from lxml import etree

    root = etree.fromstring(virsh("dumpxml", name).stdout.encode())
    found = []
    for address in root.xpath("devices/hostdev[@type='pci']/source/address"):
        found.append("{:04x}:{:02x}:{:02x}.{:x}".format(
            *(int(address.get(k), 16) for k in ("domain", "bus", "slot", "function"))))
    return found


def pci_address(element) -> str:
    """The BDF of a libvirt <address domain= bus= slot= function=/> element."""
    return "{:04x}:{:02x}:{:02x}.{:x}".format(
        *(int(element.get(k), 16) for k in ("domain", "bus", "slot", "function")))


def live_interfaces(name: str) -> list[dict]:
    """The domain's <interface> elements as libvirt shows them: type, managed, MAC,
    network (the pool it came from) and BDF (of a PCI source, e.g. the VF a hostdev
    pool gave: a running domain's XML shows the actual type='hostdev')."""
    from lxml import etree

    root = etree.fromstring(virsh("dumpxml", name).stdout.encode())
    found = []
    for iface in root.xpath("devices/interface"):
        address = iface.find("source/address")
        mac = iface.find("mac")
        found.append({
            "type": iface.get("type"),
            "managed": iface.get("managed"),
            "mac": mac.get("address") if mac is not None else None,
            "network": iface.find("source").get("network") if iface.find("source") is not None else None,
            "bdf": pci_address(address) if address is not None and address.get("bus") else None,
        })
    return found


def holds_vfio(pid: int, dev) -> bool:
    """Whether process `pid` has `dev` open through VFIO: its group /dev/vfio/<group>
    (legacy) or its cdev /dev/vfio/devices/vfioN (iommufd)."""
    held = open_files(pid)
    cdevs = {f"/dev/vfio/devices/{p.name}" for p in (dev.path / "vfio-dev").glob("vfio*")}
    return f"/dev/vfio/{dev.iommu_group}" in held or bool(cdevs & held)


def journal() -> dict[str, dict]:
    """The hook's journal, by BDF ({} when there is none)."""
    try:
        return json.loads(JOURNAL.read_text())["devices"]
    except FileNotFoundError:
        return {}


# --------------------------------------------------------------- the hook's log


class SyslogCatcher:
    """A minimal syslog daemon on /dev/log, so the tests can read what the hook logs.

    The guest has no syslog; the hook logs there when /dev/log exists (and only then).
    """

    running: SyslogCatcher | None = None   # for diagnostics()

    def __init__(self, path: Path = SYSLOG_SOCKET) -> None:
        self.path = path
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def start(self) -> SyslogCatcher:
        H.require_guest()
        if self.path.exists():
            raise AssertionError(f"{self.path} exists already: another syslog daemon runs")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.5)
        threading.Thread(target=self._loop, name="syslog", daemon=True).start()
        SyslogCatcher.running = self
        return self

    def _loop(self) -> None:
        while self._sock is not None:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode(errors="replace").rstrip("\0\n")
            if text.startswith("<") and ">" in text:
                text = text.split(">", 1)[1]       # drop the <priority>
            with self._lock:
                self._lines.append(text)

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        SyslogCatcher.running = None
        if sock is not None:
            sock.close()
            self.path.unlink(missing_ok=True)

    def mark(self) -> int:
        with self._lock:
            return len(self._lines)

    def lines(self, since: int = 0) -> list[str]:
        with self._lock:
            return self._lines[since:]

    def hook_lines(self, since: int = 0) -> list[str]:
        return [line for line in self.lines(since) if line.startswith("vfio-libvirt[")]

    def find(self, text: str, since: int = 0, timeout: float = 10.0) -> list[str]:
        """The hook's lines since `since` that contain `text`, waiting a little for the first."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.hook_lines(since) if text in line]
            return bool(found)

        wait_for(seen, timeout, 0.1)
        return found


# --------------------------------------------------------------- diagnostics


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()[-lines:]
    except OSError as err:
        return f"--- {path}: {err.strerror}"
    return f"--- {path} (last {lines} lines)\n" + "\n".join(text)


def device_summary() -> str:
    lines = [f"{dev.bdf} {dev.spec.name}: driver={dev.driver} driver_override={dev.override}"
             for dev in Pci(H.DEFAULT_TEST_DEVICES)]
    if H.IGB_PF in H.guest_devices():
        pf = SriovPf(H.IGB_PF)
        lines.append(f"{pf.bdf} {pf.spec.name}: driver={pf.driver} driver_override={pf.override} "
                     f"sriov_numvfs={pf.numvfs} netdevs={sorted(pf.netdev_ifindexes())}")
        lines += [f"{vf.bdf} {vf.spec.name}: driver={vf.driver} driver_override={vf.override}"
                  for vf in pf.vfs()]
    return "\n".join(lines)


def diagnostics() -> str:
    """Everything worth seeing when a libvirt-tier test fails."""
    try:
        summary = device_summary()
    except OSError as err:
        summary = f"(could not read the devices: {err})"
    parts = ["--- devices", summary]
    try:
        parts += ["--- journal", JOURNAL.read_text().strip()]
    except OSError as err:
        parts.append(f"--- journal: {err.strerror}")
    proc = run(["virsh", "-c", URI, "list", "--all"], timeout=60)
    parts += ["--- virsh list --all", (proc.stdout + proc.stderr).strip()]
    proc = run(["virsh", "-c", URI, "net-list", "--all"], timeout=60)
    parts += ["--- virsh net-list --all", (proc.stdout + proc.stderr).strip()]
    if SyslogCatcher.running is not None:
        parts += ["--- syslog (last 30 lines)", "\n".join(SyslogCatcher.running.lines()[-30:])]
    parts.append(tail(LIBVIRTD_LOG))
    parts += [tail(log, 15) for log in sorted(QEMU_LOG_DIR.glob(f"{DOMAIN_PREFIX}*.log"))]
    return "\n".join(parts)
