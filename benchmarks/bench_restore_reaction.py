"""How soon a restore starts after the last holder lets go (target: 50 ms).

    /usr/bin/python3 benchmarks/bench_restore_reaction.py

On the sysfs simulator: a VM's NIC is bound, a process (QEMU) holds its VFIO group,
`release end` starts and waits; the holder lets go at a known moment, and the restore
then runs.  Reaction = (release done - holder gone) - (the same restore with no holder),
so the restore's own work is not counted.  Medians over holders that let go after
0.12 to 1.1 s (three runs each).
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

TARGET_MS = 50.0
HOLDS = (0.12, 0.2, 0.35, 0.5, 0.75, 1.1)
NIC = "0000:00:10.0"
XML = (b"<domain><name>vm</name><devices><hostdev mode='subsystem' type='pci' managed='no'>"
       b"<source><address bus='0' slot='0x10' function='0'/></source></hostdev></devices></domain>")


def setup(tmp: Path):
    import vfio_libvirt.sysfs
    from tests.support.simkernel import SimKernel

    for sub in ("root", "modules", "state"):
        (tmp / sub).mkdir()
    sim = SimKernel(tmp / "root")
    sim.add_module("virtio_pci", "virtio-pci", ids=["pci:v00001AF4d*"], loaded=True)
    sim.add_module("vfio_pci", "vfio-pci", vfio=True, aliases=["vfio_pci:v*d*sv*sd*bc*sc*i*"])
    sim.add_device(NIC, "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00", group="10",
                   driver="virtio-pci")
    sim.write_modules_alias(tmp / "modules")
    vfio_libvirt.sysfs._write = sim.write
    (tmp / "config.toml").write_text('[libvirt]\nversion = "11.3.0"\n[timeouts]\nrestore_seconds = 10\n')
    os.environ.update(
        VFIO_LIBVIRT_SYSFS_ROOT=str(tmp / "root"), VFIO_LIBVIRT_MODULES_DIR=str(tmp / "modules"),
        VFIO_LIBVIRT_STATE_DIR=str(tmp / "state"), VFIO_LIBVIRT_CONFIG=str(tmp / "config.toml"),
        VFIO_LIBVIRT_MODPROBE=str(sim.modprobe_script()), VFIO_LIBVIRT_IP="false")
    return sim


def release_ms(sim, hold: float | None) -> float:
    """Wall time of `release end`; with `hold`, measured from the holder letting go."""
    from vfio_libvirt import hook

    assert hook.main(["qemu", "vm", "prepare", "begin", "-"], io.BytesIO(XML)) == 0
    gone: list[float] = []
    if hold is not None:
        sim.hold_open(NIC, seconds=None, pid=4242)

        def let_go() -> None:
            time.sleep(hold)
            shutil.rmtree(sim.root / "proc" / "4242")
            gone.append(time.monotonic())

        threading.Thread(target=let_go, daemon=True).start()
    start = time.monotonic()
    assert hook.main(["qemu", "vm", "release", "end", "-"], io.BytesIO(b"")) == 0
    end = time.monotonic()
    assert sim.driver_of(NIC) == "virtio-pci"
    return (end - (gone[0] if gone else start)) * 1000


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sim = setup(Path(tmp))
        plain = statistics.median(release_ms(sim, None) for _ in range(15))
        # holders let go at varied moments: a backoff schedule can be lucky for one of them
        held = statistics.median(release_ms(sim, hold) for hold in HOLDS for _ in range(3))
    reaction = max(0.0, held - plain)
    verdict = "ok" if reaction <= TARGET_MS else "OVER"
    print(f"release, nothing holds the device:       {plain:6.1f} ms")
    print(f"release, from the holder letting go:     {held:6.1f} ms")
    print(f"restore reaction:                        {reaction:6.1f} ms  "
          f"(target <= {TARGET_MS:g} ms: {verdict})")


if __name__ == "__main__":
    main()
