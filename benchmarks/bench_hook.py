"""Hook costs: the no-hostdev fast path, and prepare/release for 1 and 32 devices.

    /usr/bin/python3 benchmarks/bench_hook.py

1. `hooks/qemu VM prepare begin` for a domain with no PCI hostdev, against a bare
   `python3 -c pass` (target: at most 1.5x) — libvirtd runs the hook for every
   event of every domain.
2. prepare (and release) on the sysfs simulator with 50 ms injected per sysfs write,
   for 1 and 32 devices: shows the cost is the kernel's writes, not our planning.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

PLAIN_XML = (b"<domain type='kvm'><name>plain</name><devices><disk type='file'/>"
             b"<interface type='network'><source network='default'/></interface></devices></domain>")


USB_XML = (b"<domain type='kvm'><name>usb</name><devices><disk type='file'/>"
           b"<hostdev mode='subsystem' type='usb' managed='yes'><source><vendor id='0x046d'/>"
           b"<product id='0xc52b'/></source></hostdev>"
           b"<interface type='network'><source network='default'/></interface></devices></domain>")


def alternating_medians(cases: dict[str, tuple[list[str], bytes]], rounds: int = 40) -> dict[str, float]:
    """Median wall time of each case, the cases run in turn each round: a machine that gets
    slower or faster during the run shifts every case alike, not just one."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (argv, stdin) in cases.items():
            start = time.perf_counter()
            subprocess.run(argv, input=stdin, check=True, stdout=subprocess.DEVNULL)
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def fast_path() -> None:
    python, hook = "/usr/bin/python3", str(REPO / "hooks/qemu")
    with tempfile.TemporaryDirectory() as state:
        os.environ["VFIO_LIBVIRT_STATE_DIR"] = state  # no journal: release and reconnect are free
        ms = alternating_medians({
            "python3 -c pass": ([python, "-c", "pass"], b""),
            "prepare, no hostdev": ([python, hook, "plain", "prepare", "begin", "-"], PLAIN_XML),
            "prepare, one USB hostdev": ([python, hook, "usb", "prepare", "begin", "-"], USB_XML),
            "started (ignored op)": ([python, hook, "usb", "started", "begin", "-"], USB_XML),
            "release, no journal": ([python, hook, "usb", "release", "end", "-"], USB_XML),
            "reconnect, no journal": ([python, hook, "usb", "reconnect", "begin", "-"], USB_XML),
        })
    bare = ms.pop("python3 -c pass")
    print(f"{'python3 -c pass':<28} {bare:6.1f} ms")
    for name, value in ms.items():
        print(f"hook {name:<23} {value:6.1f} ms  ({value / bare:.2f}x, target <= 1.5x)")


def on_simulator(count: int, delay: float) -> tuple[float, float, int]:
    import vfio_libvirt.sysfs
    from tests.support.simkernel import SimKernel
    from vfio_libvirt import hook

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("root", "modules", "state"):
            (root / sub).mkdir()
        sim = SimKernel(root / "root")
        sim.add_module("e1000e", "e1000e", ids=["pci:v00008086d000010D3*"], loaded=True)
        sim.add_module("vfio_pci", "vfio-pci", vfio=True, aliases=["vfio_pci:v*d*sv*sd*bc*sc*i*"])
        devices = []
        for i in range(count):
            bdf = f"0000:{1 + i // 32:02x}:{i % 32:02x}.0"
            sim.add_device(bdf, "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00",
                           group=str(100 + i), driver="e1000e")
            bus, slot = bdf.split(":")[1:3]
            devices.append(f"<hostdev mode='subsystem' type='pci' managed='no'><source><address "
                           f"bus='0x{bus}' slot='0x{slot.split('.')[0]}' function='0'/></source></hostdev>")
        sim.write_modules_alias(root / "modules")
        (root / "config.toml").write_text('[libvirt]\nversion = "11.3.0"\n')
        os.environ.update(
            VFIO_LIBVIRT_SYSFS_ROOT=str(root / "root"), VFIO_LIBVIRT_MODULES_DIR=str(root / "modules"),
            VFIO_LIBVIRT_STATE_DIR=str(root / "state"), VFIO_LIBVIRT_CONFIG=str(root / "config.toml"),
            VFIO_LIBVIRT_MODPROBE=str(sim.modprobe_script()),
        )
        vfio_libvirt.sysfs._write = sim.write
        xml = f"<domain><name>bench</name><devices>{''.join(devices)}</devices></domain>".encode()
        sim.faults.write_delay = delay
        start = time.perf_counter()
        assert hook.main(["qemu", "bench", "prepare", "begin", "-"], io.BytesIO(xml)) == 0
        prepare = time.perf_counter() - start
        writes = len(sim.writes)
        start = time.perf_counter()
        assert hook.main(["qemu", "bench", "release", "end", "-"], io.BytesIO(b"")) == 0
        release = time.perf_counter() - start
        return prepare, release, writes


def main() -> None:
    fast_path()
    for count in (1, 32):
        prepare, release, writes = on_simulator(count, 0.050)
        floor = writes * 0.050
        print(f"{count:2d} device(s), 50 ms/write: prepare {prepare:6.2f} s ({writes} writes, "
              f"floor {floor:.2f} s, overhead {(prepare - floor) * 1000 / count:.1f} ms/device), "
              f"release {release:6.2f} s")


if __name__ == "__main__":
    main()
