"""Boot a throwaway QEMU guest with a real kernel and run a command in it.

Stdlib only; used from host-side pytest (tests/kernel) and, via in_guest(),
from the tests running inside the guest.

The guest is started with virtme-ng (vng) from the venv that
tests/vm/provision.sh made: Debian's 6.12 kernel, TCG (never KVM unless
VFIO_LIBVIRT_TEST_KVM=1), a q35 machine with an emulated Intel IOMMU, the
host's root filesystem shared read-only over 9p (/etc, /var, /tmp, ... are
throwaway overlays/tmpfs inside), and the test devices below.  Nothing here
writes to the host's /sys: everything that touches sysfs runs in the guest.

Guest-side facts the tests rely on:
  * /proc/cmdline carries GUEST_MARKER; in_guest() checks it (an environment
    variable alone is never trusted).
  * /lib/modules/<kver> is a symlink to the provisioned modules dir (which
    is also exported with --rodir, because /var/cache is a tmpfs in the
    guest), so plain `modprobe vfio_pci` / `modprobe vlt_virtio_vfio_pci`
    work and /lib/modules/$(uname -r)/modules.alias has the test aliases.
  * The command runs as root with cwd = the repo root (visible read-only),
    PATH without the host's pyenv shims (use /usr/bin/python3), and
    PYTHONPATH, VFIO_LIBVIRT_TEST_REPO and VFIO_LIBVIRT_TEST_OUT set
    (OUT is a host-visible writable dir: write results there).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_MARKER = "vfio_libvirt_test_guest=1"
GUEST_PYTHON = "/usr/bin/python3"
DEFAULT_CACHE = "/var/cache/vfio-libvirt-tests"
DEFAULT_TIMEOUT = 300.0
# vng pastes paths into a shell command line unquoted: refuse anything odd.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_.+,:@/-]*$")
# Every --rodir/--rwdir is one more virtio-9p PCI device that QEMU places at
# the first free slot; keep them well below slot 0x10 where ours live.
_MAX_EXPORTS = 6


@dataclasses.dataclass(frozen=True)
class TestDevice:
    """A PCI device the guest gets, at a fixed address."""

    name: str
    bdf: str              # address inside the guest
    vendor: str           # as in sysfs "vendor", e.g. "0x1af4"
    device: str
    modalias_prefix: str  # start of sysfs "modalias"
    host_driver: str      # the driver that owns it after boot
    iommu_group_own: bool  # alone in its IOMMU group
    qemu_opts: tuple[str, ...]  # "{nvme_image}" stands for GuestInfo.nvme_image
    min_qemu: int = 0     # QEMU major version the device needs (0: any)

    @property
    def needs_image(self) -> bool:
        return any("{nvme_image}" in opt for opt in self.qemu_opts)

    def qemu_args(self, info: GuestInfo) -> tuple[str, ...]:
        """qemu_opts with the provisioned paths filled in."""
        if not self.needs_image:
            return self.qemu_opts
        if info.nvme_image is None:
            raise GuestUnavailable(f"{self.name}: no NVMe image provisioned (re-run tests/vm/provision.sh)")
        return tuple(o.replace("{nvme_image}", _safe(info.nvme_image)) for o in self.qemu_opts)


VIRTIO_NET = TestDevice(
    name="virtio-net",
    bdf="0000:00:10.0",
    vendor="0x1af4",
    device="0x1041",
    modalias_prefix="pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00",
    host_driver="virtio-pci",
    iommu_group_own=True,
    qemu_opts=("-netdev", "user,id=vltnet0",
               "-device", "virtio-net-pci,disable-legacy=on,netdev=vltnet0,addr=0x10"),
)
E1000E = TestDevice(
    name="e1000e",
    bdf="0000:00:11.0",
    vendor="0x8086",
    device="0x10d3",
    modalias_prefix="pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00",
    host_driver="e1000e",
    iommu_group_own=True,
    qemu_opts=("-netdev", "user,id=vltnet1",
               "-device", "e1000e,netdev=vltnet1,addr=0x11"),
)
DEFAULT_TEST_DEVICES: tuple[TestDevice, ...] = (VIRTIO_NET, E1000E)

# Real hardware for the host-safety tests (QEMU >= 8).  The igb is an SR-IOV PF; on
# the root bus its VFs (routing ID offset 0x80, stride 2) would overflow the devfn
# space, so it sits alone behind a PCIe root port and its VFs appear on that bus.
IGB_ROOT_PORT_BDF = "0000:00:12.0"
IGB_PF = TestDevice(
    name="igb",
    bdf="0000:01:00.0",
    vendor="0x8086",
    device="0x10c9",
    modalias_prefix="pci:v00008086d000010C9sv00001AF4sd00001100bc02sc00i00",
    host_driver="igb",
    iommu_group_own=True,
    qemu_opts=("-device", "pcie-root-port,id=vltrp0,bus=pcie.0,chassis=1,addr=0x12",
               "-netdev", "user,id=vltnet2",
               "-device", "igb,netdev=vltnet2,bus=vltrp0,addr=0x0"),
    min_qemu=8,
)
IGB_VF_VENDOR, IGB_VF_DEVICE = "0x8086", "0x10ca"
IGB_VF_DRIVER = "igbvf"
IGB_VF_BDFS = ("0000:01:10.0", "0000:01:10.2")   # VFs 0 and 1 (offset 0x80, stride 2)
# An NVMe controller over the provisioned ext4 image; snapshot=on sends every write
# to a throwaway overlay, so the cached image never changes.
NVME = TestDevice(
    name="nvme",
    bdf="0000:00:13.0",
    vendor="0x1b36",
    device="0x0010",
    modalias_prefix="pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02",
    host_driver="nvme",
    iommu_group_own=True,
    qemu_opts=("-drive", "file={nvme_image},if=none,id=vltnvme0,format=raw,snapshot=on",
               "-device", "nvme,drive=vltnvme0,serial=vltnvme0,addr=0x13"),
)
NVME_LABEL = "vltnvme"                       # the image's ext4 label (provision.sh)
# Its one namespace's block device.  Debian's kernel has native NVMe multipath on
# (nvme_core.multipath=Y): below the PCI device sits only the hidden path disk
# nvme0c0n1; nvme0n1, the one with a /dev node, belongs to nvme-subsys0.
NVME_NAMESPACE = "nvme0n1"
NVME_PATH_DISK = "nvme0c0n1"
NVME_KNOWN_FILE = ("vfio-libvirt-test.txt", "vfio-libvirt test NVMe\n")
HARDWARE_DEVICES: tuple[TestDevice, ...] = (IGB_PF, NVME)


# Three QEMU "edu" devices (1234:11e8, no in-kernel driver) for the bounded-wait tests,
# each alone in its IOMMU group: the test host driver vlt_slow_host (tests/vm/module)
# binds them, and its probe()/remove() sleep as long as its probe_ms/remove_ms
# parameters say, so an unbind or drivers_probe write stays in the kernel (D state).
def _slow(index: int, slot: int) -> TestDevice:
    return TestDevice(
        name=f"slow{index}",
        bdf=f"0000:00:{slot:02x}.0",
        vendor="0x1234",
        device="0x11e8",
        modalias_prefix="pci:v00001234d000011E8sv00001AF4sd00001100bc00scFFi00",
        host_driver="vlt-slow-host",
        iommu_group_own=True,
        qemu_opts=("-device", f"edu,addr={slot:#x}"),
    )


SLOW_DEVICES: tuple[TestDevice, ...] = tuple(_slow(i, 0x14 + i) for i in range(3))
SLOW_MODULE = "vlt_slow_host"
SLOW_DRIVER = "vlt-slow-host"
SLOW_PARAMS = Path("/sys/module") / SLOW_MODULE / "parameters"   # probe_ms, remove_ms (guest)
KERNEL_TIER_DEVICES: tuple[TestDevice, ...] = (*DEFAULT_TEST_DEVICES, *HARDWARE_DEVICES,
                                               *SLOW_DEVICES)
# The libvirt tier: the two NICs for the domain tests, and the igb PF whose VFs the
# SR-IOV tests give to domains (interface type='hostdev', hostdev networks).
LIBVIRT_TIER_DEVICES: tuple[TestDevice, ...] = (*DEFAULT_TEST_DEVICES, IGB_PF)
ALL_DEVICES = {d.name: d for d in KERNEL_TIER_DEVICES}
# Names that stand for several devices (guest.py --devices slow)
DEVICE_GROUPS: dict[str, tuple[TestDevice, ...]] = {"slow": SLOW_DEVICES}
# Inside the guest: the names of the devices it was booted with, comma-separated.
DEVICES_ENV = "VFIO_LIBVIRT_TEST_DEVICES"

# The test variant drivers built by provision.sh (tests/vm/module).  Module
# and PCI driver names differ on purpose.
VARIANT_EXACT_MODULE = "vlt_virtio_vfio_pci"      # 1af4:1041, 5 "*" in its alias
VARIANT_EXACT_DRIVER = "vlt-virtio-vfio"
VARIANT_VENDOR_MODULE = "vlt_vendor_vfio_pci"     # 1af4:*, 6 "*" in its alias
VARIANT_VENDOR_DRIVER = "vlt-vendor-vfio"

IOMMU_QEMU_OPTS = ("-device", "intel-iommu,intremap=on,caching-mode=on")
IOMMU_KERNEL_ARGS = ("intel_iommu=on", "iommu=pt")


class GuestUnavailable(RuntimeError):
    """The kernel tier is not provisioned on this machine."""


class GuestError(RuntimeError):
    """The guest did not boot, or the command failed (see .result)."""

    def __init__(self, message: str, result: GuestResult):
        super().__init__(f"{message}\n{result.describe()}")
        self.result = result


# --------------------------------------------------------------- inside


def in_guest() -> bool:
    """True only inside a guest booted by run_in_guest (kernel cmdline marker)."""
    try:
        cmdline = Path("/proc/cmdline").read_text()
    except OSError:
        return False
    return GUEST_MARKER in cmdline.split()


def require_guest() -> None:
    """Raise unless in_guest(): call before anything that writes to sysfs."""
    if not in_guest():
        raise RuntimeError(
            f"refusing to touch sysfs: {GUEST_MARKER!r} is not on /proc/cmdline "
            "(this is not the vfio-libvirt test guest)")


def guest_devices() -> tuple[TestDevice, ...]:
    """The test devices this guest was booted with (from run_in_guest's environment).

    A guest test uses it to tell "booted without the device" (skip) from "given the
    device but the kernel does not show it" (fail).
    """
    names = [n for n in os.environ.get(DEVICES_ENV, "").split(",") if n]
    return tuple(ALL_DEVICES[n] for n in names if n in ALL_DEVICES)


# --------------------------------------------------------------- host side


@dataclasses.dataclass(frozen=True)
class GuestInfo:
    """What provision.sh left in CACHE_DIR/env."""

    cache: Path
    kver: str
    vmlinuz: Path
    kernel_root: Path
    modules_dir: Path
    vng: Path
    venv_bin: Path
    qemu: str
    qemu_version: tuple[int, ...] = ()   # () when `qemu --version` said nothing usable
    nvme_image: Path | None = None       # provision.sh's ext4 image for the NVMe


def qemu_version(qemu: str) -> tuple[int, ...]:
    """(major, minor, micro) of a qemu-system binary, () when it cannot be told."""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(n) for n in match.groups() if n is not None) if match else ()


def devices_unavailable(info: GuestInfo, devices: Sequence[TestDevice]) -> str:
    """Why `devices` cannot be given to a guest here ("" when they can).

    QEMU 7.2 (bookworm) has no SR-IOV igb, and the NVMe needs provision.sh's image.
    """
    have = ".".join(map(str, info.qemu_version)) or "of unknown version"
    for dev in devices:
        if dev.min_qemu and (not info.qemu_version or info.qemu_version[0] < dev.min_qemu):
            return (f"kernel tier: QEMU {have} is older than {dev.min_qemu}, which the {dev.name} "
                    "test device needs (tests/vm/provision.sh installs it from bookworm-backports)")
        if dev.needs_image and (info.nvme_image is None or not info.nvme_image.is_file()):
            return (f"kernel tier: no NVMe image for the {dev.name} test device "
                    f"({info.nvme_image or 'VLT_NVME_IMAGE not in env'}; re-run tests/vm/provision.sh)")
    return ""


def cache_dir() -> Path:
    return Path(os.environ.get("VFIO_LIBVIRT_TEST_CACHE") or DEFAULT_CACHE)


def _read_env(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw_line in path.read_text().splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        parts = shlex.split(raw)
        values[key.strip()] = parts[0] if parts else ""
    return values


def check_provisioned(cache: os.PathLike | str | None = None,
                      devices: Sequence[TestDevice] = DEFAULT_TEST_DEVICES,
                      ) -> tuple[GuestInfo | None, str]:
    """(info, "") when a guest with `devices` can run here, else (None, reason)."""
    cache = Path(cache) if cache is not None else cache_dir()
    env_file = cache / "env"
    if not env_file.is_file():
        return None, f"kernel tier not provisioned: no {env_file} (run tests/vm/provision.sh)"
    try:
        env = _read_env(env_file)
        qemu = shutil.which("qemu-system-x86_64") or ""
        info = GuestInfo(
            cache=Path(env["VLT_CACHE"]),
            kver=env["VLT_KVER"],
            vmlinuz=Path(env["VLT_VMLINUZ"]),
            kernel_root=Path(env["VLT_KERNEL_ROOT"]),
            modules_dir=Path(env["VLT_MODULES_DIR"]),
            vng=Path(env["VLT_VNG"]),
            venv_bin=Path(env["VLT_VENV_BIN"]),
            qemu=qemu,
            qemu_version=qemu_version(qemu) if qemu else (),
            nvme_image=Path(env["VLT_NVME_IMAGE"]) if env.get("VLT_NVME_IMAGE") else None,
        )
    except (OSError, KeyError, ValueError) as exc:
        return None, f"kernel tier: unreadable {env_file}: {exc!r} (re-run tests/vm/provision.sh)"
    for what, path in (("kernel image", info.vmlinuz),
                       ("modules.alias", info.modules_dir / "modules.alias"),
                       ("vng", info.vng)):
        if not path.exists():
            return None, f"kernel tier: {what} missing at {path} (re-run tests/vm/provision.sh)"
    if not info.qemu:
        return None, "kernel tier: qemu-system-x86_64 not installed"
    if os.geteuid() != 0:
        # vng runs the guest command as the calling user; sysfs writes need root
        return None, "kernel tier: must run as root (the guest command runs as the calling user)"
    for tool in ("busybox", "udevadm", "file"):
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/bin:/usr/bin")):
            return None, f"kernel tier: {tool} not installed (run tests/vm/provision.sh)"
    for path in (info.cache, info.vmlinuz, REPO_ROOT):
        if not _SAFE_PATH.match(str(path)):
            return None, f"kernel tier: path {path} has characters vng cannot pass through"
    if reason := devices_unavailable(info, devices):
        return None, reason
    return info, ""


def provisioned(cache: os.PathLike | str | None = None,
                devices: Sequence[TestDevice] = DEFAULT_TEST_DEVICES) -> GuestInfo | None:
    """GuestInfo when the kernel tier can run here, else None (see check_provisioned)."""
    return check_provisioned(cache, devices)[0]


@dataclasses.dataclass
class GuestResult:
    rc: int | None          # the command's exit status; None if it never finished
    stdout: str             # the command's stdout
    stderr: str             # the command's stderr
    console: str            # vng/qemu messages and the guest kernel console
    started: bool           # the guest booted far enough to start the command
    finished: bool          # the command ran to completion
    timed_out: bool
    attempts: int
    seconds: float
    argv: list[str]
    out_dir: Path | None = None   # VFIO_LIBVIRT_TEST_OUT, if kept

    @property
    def boot_failed(self) -> bool:
        return not self.started

    @property
    def ok(self) -> bool:
        return self.finished and self.rc == 0

    def describe(self, tail: int = 60) -> str:
        state = ("timed out" if self.timed_out else
                 "boot failed" if not self.started else
                 "command died" if not self.finished else f"rc={self.rc}")
        lines = [f"guest: {state} after {self.seconds:.1f}s, {self.attempts} attempt(s)"]
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr),
                           ("console", self.console)):
            if tail > 0 and text.strip():
                body = "\n".join(text.rstrip().splitlines()[-tail:])
                lines.append(f"--- guest {name} (last {tail} lines) ---\n{body}")
        return "\n".join(lines)

    def check(self) -> GuestResult:
        if not self.ok:
            raise GuestError("guest command did not succeed", self)
        return self


def _safe(path: Path | str) -> str:
    text = str(path)
    if not _SAFE_PATH.match(text):
        raise ValueError(f"path {text!r} cannot be passed through vng's shell command line")
    return text


def _guest_script(nonce: str, work: Path, cwd: Path, env: Mapping[str, str]) -> str:
    exports = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "VFIO_LIBVIRT_TEST_REPO": str(REPO_ROOT),
        "VFIO_LIBVIRT_TEST_OUT": str(work / "out"),
        **env,
    }
    for key in exports:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"bad environment variable name {key!r}")
    lines = [
        "#!/bin/sh",
        "# generated by tests/vm/guest.py",
        f"echo VLT-GUEST-START-{nonce}",
        f"grep -qw {GUEST_MARKER} /proc/cmdline || {{ echo 'not the test guest' >&2; exit 125; }}",
        *(f"export {k}={shlex.quote(v)}" for k, v in exports.items()),
        f"cd {shlex.quote(str(cwd))} || exit 125",
        f"sh {shlex.quote(str(work / 'cmd.sh'))} </dev/null 2>{shlex.quote(str(work / 'stderr'))}",
        "rc=$?",
        f"echo $rc >{shlex.quote(str(work / 'rc'))}",
        f"echo VLT-GUEST-END-{nonce} rc=$rc",
        "exit $rc",
    ]
    return "\n".join(lines) + "\n"


def vng_argv(info: GuestInfo, script: Path, *, devices: Sequence[TestDevice],
             rwdirs: Sequence[str], rodirs: Sequence[str], memory: str, cpus: int,
             append: Sequence[str], qemu_opts: Sequence[str]) -> list[str]:
    kargs = [*IOMMU_KERNEL_ARGS, GUEST_MARKER, *append]
    qemu = [*IOMMU_QEMU_OPTS, *(o for d in devices for o in d.qemu_args(info)), *qemu_opts]
    for word in (*kargs, *qemu):
        if not re.fullmatch(r"[A-Za-z0-9_.,:=/+@-]+", word):
            raise ValueError(f"{word!r} cannot be passed through vng's shell command line")
    argv = [str(info.vng), "--run", _safe(info.vmlinuz),
            "--disable-microvm", "--force-9p", "--verbose",
            "--memory", memory, "--cpus", str(cpus)]
    if os.environ.get("VFIO_LIBVIRT_TEST_KVM") != "1":
        argv.append("--disable-kvm")
    exports = [("rodir", d) for d in rodirs] + [("rwdir", d) for d in rwdirs]
    if len(exports) > _MAX_EXPORTS:
        raise ValueError(f"at most {_MAX_EXPORTS} --rodir/--rwdir exports")
    argv += [f"--{kind}={_safe(path)}" for kind, path in exports]
    # "=" forms: argparse would take a value starting with "-" for an option.
    argv += [f"--append={' '.join(kargs)}", f"--qemu-opts={' '.join(qemu)}",
             f"--exec=sh {_safe(script)}"]
    return argv


def run_in_guest(command: str | Sequence[str], *,
                 devices: Sequence[TestDevice] = DEFAULT_TEST_DEVICES,
                 rwdirs: Iterable[os.PathLike | str] = (),
                 rodirs: Iterable[os.PathLike | str] = (),
                 env: Mapping[str, str] | None = None,
                 cwd: os.PathLike | str = REPO_ROOT,
                 timeout: float = DEFAULT_TIMEOUT,
                 memory: str = "1G", cpus: int = 2,
                 append: Sequence[str] = (), qemu_opts: Sequence[str] = (),
                 boot_retries: int = 1, keep_out: bool = False,
                 info: GuestInfo | None = None, echo: bool = False) -> GuestResult:
    """Boot a fresh guest, run `command` (a shell string or an argv) as root.

    `timeout` bounds the whole call (all attempts).  A boot that dies before
    the command starts is retried `boot_retries` times; a command that fails
    is not.  The command's stdout/stderr come back separately from the
    console (vng, QEMU and the guest kernel log).  With keep_out=True the
    VFIO_LIBVIRT_TEST_OUT dir is kept and returned as result.out_dir (the
    caller removes it).  With echo=True a failed boot's console is printed.
    """
    if info is None:
        info, reason = check_provisioned(devices=devices)
        if info is None:
            raise GuestUnavailable(reason)
    elif reason := devices_unavailable(info, devices):
        raise GuestUnavailable(reason)
    # the guest learns which devices it was given (guest_devices())
    guest_env = {DEVICES_ENV: ",".join(d.name for d in devices), **(env or {})}
    if not isinstance(command, str):
        command = shlex.join(list(command))
    base = Path(tempfile.mkdtemp(prefix="vlt-guest-"))
    deadline = time.monotonic() + timeout
    started_at = time.monotonic()
    attempts = 0
    result: GuestResult | None = None
    try:
        while True:
            attempts += 1
            work = base / f"try{attempts}"
            (work / "out").mkdir(parents=True)
            (work / "cmd.sh").write_text(command + "\n")
            nonce = uuid.uuid4().hex[:12]
            script = work / "run.sh"
            script.write_text(_guest_script(nonce, work, Path(cwd), guest_env))
            argv = vng_argv(
                info, script, devices=devices,
                rwdirs=[str(work), *map(str, rwdirs)],
                rodirs=[str(info.cache), *map(str, rodirs)],
                memory=memory, cpus=cpus, append=append, qemu_opts=qemu_opts)
            result = _run_once(argv, nonce, work, deadline - time.monotonic())
            result.attempts = attempts
            result.seconds = time.monotonic() - started_at
            if (result.started or result.timed_out or attempts > boot_retries
                    or deadline - time.monotonic() < 60):
                break
            if echo:
                print(f"[guest] boot failed, retrying\n{result.console}", file=sys.stderr)
        if echo and result.boot_failed:
            print(f"[guest] boot failed\n{result.describe()}", file=sys.stderr)
        if keep_out:
            kept = Path(tempfile.mkdtemp(prefix="vlt-guest-out-"))
            shutil.copytree(work / "out", kept, dirs_exist_ok=True)
            result.out_dir = kept
        return result
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_once(argv: list[str], nonce: str, work: Path, timeout: float) -> GuestResult:
    env = dict(os.environ)
    venv_bin = str(Path(argv[0]).parent)
    # vng runs virtme-run through PATH; keep the pyenv shims etc. out of it.
    env["PATH"] = f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    timed_out = False
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=str(REPO_ROOT),
                            start_new_session=True, text=True, errors="replace")
    try:
        out, console = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        out, console = proc.communicate()
    start = f"VLT-GUEST-START-{nonce}"
    end = f"VLT-GUEST-END-{nonce}"
    started = start in out
    stdout = out.split(start + "\n", 1)[-1] if started else out
    finished = False
    rc: int | None = None
    rc_file = work / "rc"
    if rc_file.is_file():
        try:
            rc = int(rc_file.read_text().strip())
            finished = True
        except ValueError:
            pass
    if end in stdout:
        stdout = stdout[:stdout.rfind(end)]
        finished = True
        if rc is None:
            rc = proc.returncode
    try:
        stderr = (work / "stderr").read_text(errors="replace")
    except OSError:
        stderr = ""
    return GuestResult(rc=rc, stdout=stdout, stderr=stderr,
                       console=console + f"\n[vng exit status {proc.returncode}]",
                       started=started, finished=finished, timed_out=timed_out,
                       attempts=1, seconds=0.0, argv=argv)


# --------------------------------------------------------------- libvirt tier


LIBVIRT_MIN = (10, 0)           # managed='no' on a variant driver needs libvirt >= 10
LIBVIRT_PACKAGES = ("libvirt-daemon-system", "libvirt-daemon-driver-qemu", "libvirt-clients",
                    "python3-libvirt")


def check_libvirt_provisioned(cache: os.PathLike | str | None = None,
                              devices: Sequence[TestDevice] = LIBVIRT_TIER_DEVICES,
                              ) -> tuple[GuestInfo | None, str]:
    """(info, "") when the libvirt tier can run here with `devices`, else (None, reason).

    The guest runs the host's libvirt (the root filesystem is shared), so it must be
    installed here: tests/vm/provision.sh --libvirt.  Asks dpkg only; nothing here
    runs a libvirt binary on the host.  The tier's igb needs QEMU >= 8, like the
    kernel tier's (provision.sh installs it).
    """
    info, reason = check_provisioned(cache, devices)
    if info is None:
        return None, reason
    dpkg = shutil.which("dpkg-query", path="/usr/bin:/bin")
    if not dpkg:
        return None, "libvirt tier: no dpkg-query (the tier is provisioned from Debian packages)"
    proc = subprocess.run([dpkg, "-W", "-f=${Package} ${db:Status-Status} ${Version}\n",
                           *LIBVIRT_PACKAGES], capture_output=True, text=True, check=False)
    found = {}
    for line in proc.stdout.splitlines():
        name, status, version = [*line.split(), "", ""][:3]
        if status == "installed":
            found[name] = version
    missing = [p for p in LIBVIRT_PACKAGES if p not in found]
    if missing:
        return None, (f"libvirt tier not provisioned: {', '.join(missing)} not installed "
                      "(run tests/vm/provision.sh --libvirt)")
    daemon = found["libvirt-daemon-driver-qemu"]
    numbers = tuple(int(n) for n in re.findall(r"\d+", daemon.split(":")[-1])[:2])
    if numbers < LIBVIRT_MIN:
        return None, (f"libvirt tier: libvirt {daemon} is older than "
                      f"{'.'.join(map(str, LIBVIRT_MIN))} (run tests/vm/provision.sh --libvirt)")
    return info, ""


def run_pytest_in_guest(testdir: str, *, timeout: float, info: GuestInfo,
                        args: Sequence[str] = (),
                        devices: Sequence[TestDevice] = DEFAULT_TEST_DEVICES,
                        env: Mapping[str, str] | None = None,
                        ) -> tuple[GuestResult, ET.Element | None]:
    """One boot, one inner pytest session on `testdir` (repo-relative); (result, JUnit root).

    The JUnit report is None when the session wrote none (boot failure, crash).
    """
    command = shlex.join([GUEST_PYTHON, "-m", "pytest", testdir, "-p", "no:cacheprovider",
                          "-q", "-o", "console_output_style=classic", *args])
    command += ' --junitxml="$VFIO_LIBVIRT_TEST_OUT/junit.xml"'
    result = run_in_guest(command, timeout=timeout, keep_out=True, info=info, echo=True,
                          devices=devices, env=env)
    try:
        junit = result.out_dir / "junit.xml" if result.out_dir else None
        report = ET.parse(junit).getroot() if junit and junit.is_file() else None
    finally:
        if result.out_dir:
            shutil.rmtree(result.out_dir, ignore_errors=True)
    return result, report


def junit_totals(report: ET.Element) -> dict[str, int]:
    suites = [report] if report.tag == "testsuite" else report.findall("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def junit_failed(report: ET.Element) -> list[str]:
    return [f"{c.get('classname')}::{c.get('name')}" for c in report.iter("testcase")
            if c.find("failure") is not None or c.find("error") is not None]


def junit_outcomes(report: ET.Element) -> tuple[int, int, int]:
    """(passed, failed, skipped), one outcome per test case.

    Counted per <testcase> rather than from the suite totals: pytest counts a test
    that passes and then errors in teardown once as passed and once as an error,
    so tests - failures - errors - skipped can undercount.  failed = failure or error.
    """
    passed = failed = skipped = 0
    for case in report.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped


def tier_summary_line(tier: str, result: GuestResult, report: ET.Element | None) -> str:
    """One line for the host's terminal summary: what ran in the guest, and how long.

    Both QEMU tiers print it, so a reader of the CI log sees the inner session's
    outcome without -s, e.g. `kernel tier: 25 passed, 0 failed, 0 skipped in the
    guest (78 s)`.  Without a JUnit report (the guest never booted, or the inner
    pytest died) the line says so with the guest's state instead of counts.
    """
    if report is None:
        state = result.describe(tail=0).splitlines()[0]
        return f"{tier} tier: no test report from the guest ({state})"
    passed, failed, skipped = junit_outcomes(report)
    return (f"{tier} tier: {passed} passed, {failed} failed, {skipped} skipped "
            f"in the guest ({round(result.seconds)} s)")


def tier_not_run_line(tier: str, reason: str) -> str:
    """The summary line for a tier whose guest was never started, with the reason."""
    return f"{tier} tier: not run ({reason})"


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop vng and the QEMU it started (their own session, made by Popen)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":   # ad-hoc: python3 tests/vm/guest.py 'cmd ...'
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="uname -a; cat /proc/cmdline")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--console", action="store_true", help="print the console too")
    known = {**{n: (d,) for n, d in ALL_DEVICES.items()}, **DEVICE_GROUPS}
    parser.add_argument("--devices", default=",".join(ALL_DEVICES),
                        help=f"comma-separated test devices (default: all; {','.join(known)})")
    ns = parser.parse_args()
    try:
        chosen = tuple(dict.fromkeys(d for n in ns.devices.split(",") if n for d in known[n]))
    except KeyError as bad:
        sys.exit(f"guest: unknown test device {bad} (known: {', '.join(known)})")
    info, why = check_provisioned(devices=chosen)
    if info is None:
        sys.exit(f"guest: {why}")
    res = run_in_guest(ns.command, timeout=ns.timeout, info=info, echo=True, devices=chosen)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if ns.console:
        sys.stderr.write(res.console)
    print(f"[guest] {res.describe(tail=0).splitlines()[0]}", file=sys.stderr)
    sys.exit(res.rc if res.finished and res.rc is not None else 124)
