"""Time `resolve` in-process against a real-size (27k-line) modules.alias.

    /usr/bin/python3 benchmarks/bench_resolve.py

Target: under 5 ms per modalias, including reading the alias file (the hook reads
it once per VM start).  Reports load+resolve (cold, per call) and resolve alone.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from tests.support.aliasgen import generate  # noqa: E402
from vfio_libvirt.aliases import AliasTable  # noqa: E402

MODALIASES = [
    "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00",  # virtio-net: variant
    "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00",  # e1000e: vfio_pci
    "pci:v000015B3d0000101Esv000015B3sd00000001bc02sc00i00",  # mlx5 VF: variant
]


def timed(func, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        modules = Path(tmp)
        text = generate()
        (modules / "modules.alias").write_text(text)
        lines = text.count("\n")
        cold = timed(lambda: [AliasTable.load(modules).resolve(m) for m in MODALIASES[:1]], 200)
        table = AliasTable.load(modules)
        warm = timed(lambda: [table.resolve(m) for m in MODALIASES], 2000)
    warm = [t / len(MODALIASES) for t in warm]
    print(f"modules.alias: {lines} lines, {len(table.aliases)} vfio_pci aliases")
    for name, samples in (("load + resolve", cold), ("resolve only", warm)):
        print(f"{name:>15}: median {statistics.median(samples):.3f} ms, "
              f"p95 {sorted(samples)[int(len(samples) * 0.95)]:.3f} ms per modalias")
    verdict = "OK" if statistics.median(cold) < 5 else "OVER"
    print(f"target < 5 ms per modalias (cold): {verdict}")


if __name__ == "__main__":
    main()
