"""A small simulator of the kernel's PCI sysfs, for unit tests.

The tree lives on disk under a temp root, so the product reads it with its ordinary
file calls.  Writes are where the kernel reacts, so the simulator replaces
`vfio_libvirt.sysfs._write` and performs the kernel's reaction faithfully:

- `driver_override`: stored; a lone newline clears it (reads back as "(null)").
- `driver/unbind`: removes the `driver` link (and `vfio-dev/`); ENODEV if not bound.
- `drivers_probe`: binds the driver named by driver_override if that driver is
  registered (and nothing otherwise), else the first registered driver whose id
  patterns match the modalias; VFIO drivers are override-only, as in the kernel.
  Success is reported even when nothing binds.
- `modprobe` (a generated script, run as a subprocess like the real one) registers a
  module's driver: `/sys/module/<mod>/drivers/pci:<name>` and `/sys/bus/pci/drivers/<name>`.

Fault injection: writes that sleep until released (a remove() waiting for its users),
EBUSY on unbind, a process holding `/dev/vfio/<group>` for a while (`/proc/<pid>/fd`),
probes that bind nothing, modules that fail to load, a delay per write, and a crash
(`SimCrash`, a BaseException like a kill) after the n-th write.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CATALOG = "sim-catalog.json"


class SimCrash(BaseException):
    """The hook process 'dies' here: not an Exception, so no handler in the product sees it."""


@dataclass
class Faults:
    unbind_ebusy: dict[str, int] = field(default_factory=dict)
    """BDF → how many unbind attempts fail with EBUSY."""
    probe_binds_nothing: dict[str, int] = field(default_factory=dict)
    """BDF → how many drivers_probe writes bind nothing (-1: forever)."""
    probe_fails: dict[str, set[str]] = field(default_factory=dict)
    """BDF → drivers whose probe() fails for it (the device stays without a driver)."""
    write_delay: float = 0.0
    blocked: dict[tuple[str, str], threading.Event] = field(default_factory=dict)
    """(write, BDF) -> an event the write sleeps on before the kernel reacts, like a
    driver's remove() or probe() waiting for its users: `("unbind", bdf)`,
    `("drivers_probe", bdf)`.  Set the event and the write returns."""
    crash_after_writes: int | None = None
    """Raise SimCrash once `all_writes` (sysfs writes and journal saves) reaches this."""


class SimKernel:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        self.devices = self.sys / "bus" / "pci" / "devices"
        self.drivers = self.sys / "bus" / "pci" / "drivers"
        self.devices.mkdir(parents=True, exist_ok=True)
        self.drivers.mkdir(parents=True, exist_ok=True)
        (self.root / "proc").mkdir(exist_ok=True)
        self.faults = Faults()
        self.writes: list[tuple[str, str]] = []
        """sysfs writes, in order."""
        self.journal_writes = 0
        self.all_writes = 0
        """sysfs writes and journal saves: `crash_after_writes` counts these."""
        self._vfio_minor = 0
        self._save_catalog({"modules": {}, "failing": []})

    # --- building the host ---------------------------------------------------------
    def add_module(
        self, module: str, driver: str, *, ids: list[str] | None = None, vfio: bool = False,
        aliases: list[str] | None = None, loaded: bool = False, probed_first: bool = False,
    ) -> None:
        """A module that, once loaded, registers PCI driver `driver` matching `ids` (fnmatch).

        Drivers are tried in catalog order, like the kernel's bus driver list;
        `probed_first` puts this one ahead of every other (a driver that registered earlier).
        """
        catalog = self._catalog()
        info = {"driver": driver, "ids": ids or [], "vfio": vfio, "aliases": aliases or []}
        if probed_first:
            catalog["modules"] = {module: info, **catalog["modules"]}
        else:
            catalog["modules"][module] = info
        self._save_catalog(catalog)
        if loaded:
            register_module(self.root, module)

    def fail_module(self, module: str) -> None:
        catalog = self._catalog()
        catalog["failing"].append(module)
        self._save_catalog(catalog)

    def add_device(
        self, bdf: str, modalias: str, *, group: str, pci_class: int = 0x020000,
        driver: str | None = None,
    ) -> None:
        dev = self.devices / bdf
        dev.mkdir(parents=True)
        (dev / "modalias").write_text(modalias + "\n")
        (dev / "class").write_text(f"0x{pci_class:06x}\n")
        (dev / "driver_override").write_text("(null)\n")
        group_dir = self.sys / "kernel" / "iommu_groups" / group / "devices"
        group_dir.mkdir(parents=True, exist_ok=True)
        os.symlink(dev, group_dir / bdf)
        os.symlink(group_dir.parent, dev / "iommu_group")
        if driver is not None:
            self._bind(bdf, driver)

    def write_modules_alias(self, modules_dir: Path) -> None:
        lines = ["# Aliases extracted from modules themselves."]
        for module, info in self._catalog()["modules"].items():
            lines += [f"alias {alias} {module}" for alias in info["aliases"]]
            lines += [f"alias pci:{i.removeprefix('pci:')} {module}" for i in info["ids"]]
        modules_dir.mkdir(parents=True, exist_ok=True)
        (modules_dir / "modules.alias").write_text("\n".join(lines) + "\n")

    def modprobe_script(self) -> Path:
        script = self.root / "fake-modprobe"
        repo_dir = Path(__file__).resolve().parents[2]
        script.write_text(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(repo_dir)!r})\n"
            "from tests.support.simkernel import modprobe_main\n"
            f"sys.exit(modprobe_main({str(self.root)!r}, sys.argv[1:]))\n"
        )
        script.chmod(0o755)
        return script

    # --- looking -------------------------------------------------------------------
    def driver_of(self, bdf: str) -> str | None:
        link = self.devices / bdf / "driver"
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None

    def override_of(self, bdf: str) -> str | None:
        text = (self.devices / bdf / "driver_override").read_text().strip()
        return None if text == "(null)" else text

    def loaded_modules(self) -> set[str]:
        modules = self.sys / "module"
        return {p.name for p in modules.iterdir()} if modules.exists() else set()

    # --- faults ----------------------------------------------------------------------
    def hold_open(
        self, bdf: str, seconds: float | None, pid: int = 4242, comm: str = "qemu-system-x86"
    ) -> None:
        """A process opens /dev/vfio/<group> (and lets go after `seconds`, if given)."""
        group = os.readlink(self.devices / bdf / "iommu_group").rsplit("/", 1)[-1]
        fd_dir = self.root / "proc" / str(pid) / "fd"
        fd_dir.mkdir(parents=True, exist_ok=True)
        (fd_dir.parent / "comm").write_text(comm + "\n")
        os.symlink(f"/dev/vfio/{group}", fd_dir / "7")
        if seconds is not None:
            timer = threading.Timer(seconds, shutil.rmtree, (fd_dir.parent,))
            timer.daemon = True
            timer.start()

    # --- the kernel's reactions ------------------------------------------------------
    def write(self, path: Path, value: str) -> None:
        path = Path(os.path.realpath(path))
        if self.root.resolve() not in path.parents:
            raise AssertionError(f"write outside the simulated root: {path}")
        if self.faults.write_delay:
            time.sleep(self.faults.write_delay)
        bdf = value.strip() if path.name in ("unbind", "drivers_probe") else path.parent.name
        if (gate := self.faults.blocked.get((path.name, bdf))) is not None:
            gate.wait()
        self.writes.append((str(path.relative_to(self.root.resolve())), value))
        if path.name == "driver_override":
            text = value.strip()
            path.write_text((text or "(null)") + "\n")
        elif path.name == "unbind":
            self._unbind(path.parent.name, value.strip())
        elif path.name == "drivers_probe":
            self._probe(value.strip())
        else:
            raise OSError(errno.EACCES, f"simulator: no such write target {path.name}")
        self._after_write(path.name, value)

    def _unbind(self, driver: str, bdf: str) -> None:
        if self.faults.unbind_ebusy.get(bdf, 0) > 0:
            self.faults.unbind_ebusy[bdf] -= 1
            raise OSError(errno.EBUSY, "Device or resource busy")
        if self.driver_of(bdf) != driver:
            raise OSError(errno.ENODEV, "No such device")
        dev = self.devices / bdf
        (dev / "driver").unlink()
        shutil.rmtree(dev / "vfio-dev", ignore_errors=True)

    def _probe(self, bdf: str) -> None:
        dev = self.devices / bdf
        if not dev.is_dir():
            raise OSError(errno.ENODEV, "No such device")
        if self.driver_of(bdf) is not None:
            return
        remaining = self.faults.probe_binds_nothing.get(bdf, 0)
        if remaining:
            self.faults.probe_binds_nothing[bdf] = remaining - 1 if remaining > 0 else -1
            return
        override = self.override_of(bdf)
        modalias = (dev / "modalias").read_text().strip()
        registered = {p.name for p in self.drivers.iterdir()}
        catalog = self._catalog()["modules"]
        failing = self.faults.probe_fails.get(bdf, set())
        if override is not None:
            if override in registered and override not in failing:
                self._bind(bdf, override)
            return
        for info in catalog.values():
            if info["driver"] in registered and not info["vfio"] and any(
                fnmatch.fnmatchcase(modalias, pattern) for pattern in info["ids"]
            ):
                if info["driver"] not in failing:
                    self._bind(bdf, info["driver"])
                return

    def _bind(self, bdf: str, driver: str) -> None:
        dev = self.devices / bdf
        os.symlink(self.drivers / driver, dev / "driver")
        vfio = any(
            info["driver"] == driver and info["vfio"] for info in self._catalog()["modules"].values()
        )
        if vfio:
            (dev / "vfio-dev" / f"vfio{self._vfio_minor}").mkdir(parents=True)
            self._vfio_minor += 1

    # --- catalog (shared with the modprobe subprocess) -------------------------------
    def _catalog(self) -> dict:
        return json.loads((self.root / CATALOG).read_text())

    def _save_catalog(self, catalog: dict) -> None:
        (self.root / CATALOG).write_text(json.dumps(catalog))

    def install(self, monkeypatch) -> SimKernel:
        """Route the product's sysfs writes here, and count its journal saves as writes too,
        so a crash can be injected after any write the hook makes."""
        import vfio_libvirt.state
        import vfio_libvirt.sysfs

        monkeypatch.setattr(vfio_libvirt.sysfs, "_write", self.write)
        save = vfio_libvirt.state.Journal._save

        def counted_save(journal, *args, **kwargs):
            save(journal, *args, **kwargs)
            self.journal_writes += 1
            self._after_write("journal", "")

        monkeypatch.setattr(vfio_libvirt.state.Journal, "_save", counted_save)
        return self

    def _after_write(self, what: str, value: str) -> None:
        self.all_writes += 1
        limit = self.faults.crash_after_writes
        if limit is not None and self.all_writes >= limit:
            raise SimCrash(f"crash after write {self.all_writes}: {what} {value!r}")


def register_module(root: Path, module: str) -> None:
    info = json.loads((root / CATALOG).read_text())["modules"][module]
    (root / "sys" / "module" / module / "drivers").mkdir(parents=True, exist_ok=True)
    driver_dir = root / "sys" / "bus" / "pci" / "drivers" / info["driver"]
    driver_dir.mkdir(parents=True, exist_ok=True)
    link = root / "sys" / "module" / module / "drivers" / f"pci:{info['driver']}"
    if not link.is_symlink():
        os.symlink(driver_dir, link)


def modprobe_main(root: str, argv: list[str]) -> int:
    """What `modprobe MODULE` does to the simulated tree."""
    catalog = json.loads((Path(root) / CATALOG).read_text())
    (module,) = argv
    if module in catalog["failing"] or module not in catalog["modules"]:
        print(f"modprobe: FATAL: Module {module} not found in directory /lib/modules/sim",
              file=sys.stderr)
        return 1
    register_module(Path(root), module)
    return 0
