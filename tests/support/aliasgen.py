"""A deterministic, real-size modules.alias for tests and benchmarks.

This machine has no /lib/modules, and the kernel tier reads the real file inside its
guest; unit tests and benchmarks need a file of the same size and shape (Debian 6.12:
~27k lines, a handful of them `vfio_pci:`) that does not depend on provisioning.
The vfio lines below mirror the shapes file2alias writes for real variant drivers.
"""

from __future__ import annotations

import random

VFIO_LINES = [
    # exact device ids (5 wildcards), as PCI_DRIVER_OVERRIDE_DEVICE_VFIO(vendor, device) emits
    "alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci",
    "alias vfio_pci:v000015B3d00001022sv*sd*bc*sc*i* mlx5_vfio_pci",
    "alias vfio_pci:v000019E5d0000A256sv*sd*bc*sc*i* hisi_acc_vfio_pci",
    "alias vfio_pci:v000019E5d0000A259sv*sd*bc*sc*i* hisi_acc_vfio_pci",
    "alias vfio_pci:v00001DD8d00001003sv*sd*bc*sc*i* pds_vfio_pci",
    "alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_vfio_pci",
    "alias vfio_pci:v000010DEd00002342sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci",
    "alias vfio_pci:v00008086d00004941sv*sd*bc*sc*i* qat_vfio_pci",
    # the catch-all of plain vfio_pci (7 wildcards)
    "alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci",
]


def generate(lines: int = 27_000, seed: int = 42, vfio_lines: list[str] | None = None) -> str:
    """Return modules.alias text of about `lines` lines with `vfio_lines` spread through it."""
    rng = random.Random(seed)
    vfio = list(VFIO_LINES if vfio_lines is None else vfio_lines)
    out: list[str] = []
    filler_kinds = ("pci", "usb", "acpi", "of", "hid", "platform", "virtio", "pcix-decoy")
    step = max(1, lines // (len(vfio) + 1))
    for i in range(lines):
        if vfio and i % step == step - 1:
            out.append(vfio.pop(0))
            continue
        kind = filler_kinds[i % len(filler_kinds)]
        mod = f"mod{rng.randrange(4000)}_{kind.replace('-', '_')}"
        if kind == "pci":
            out.append(
                f"alias pci:v{rng.randrange(1 << 16):08X}d{rng.randrange(1 << 16):08X}"
                f"sv*sd*bc*sc*i* {mod}"
            )
        elif kind == "usb":
            out.append(f"alias usb:v{rng.randrange(1 << 16):04X}p*d*dc*dsc*dp*ic*isc*ip*in* {mod}")
        elif kind == "pcix-decoy":
            # look-alike prefix that must never be taken for ours
            out.append(f"alias vfio_pcix:v*d{rng.randrange(1 << 16):08X}sv*sd*bc*sc*i* {mod}")
        else:
            out.append(f"alias {kind}:{rng.getrandbits(48):012x}* {mod}")
    out.extend(vfio)
    return "# Aliases extracted from modules themselves.\n" + "\n".join(out) + "\n"
