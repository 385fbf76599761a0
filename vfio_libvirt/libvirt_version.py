"""Learn the libvirt version without talking to libvirt.

The hook runs inside libvirtd's own call (calling back would deadlock), and the CLI's
planning must work without a connection.  The daemon binary answers `--version`; the
hook's parent process is normally that daemon, so it is the first guess.  The answer
is cached per binary (path + mtime) in the state dir, so an upgraded daemon is re-read.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from vfio_libvirt.config import Config

DAEMONS = ("/usr/sbin/virtqemud", "/usr/sbin/libvirtd", "/usr/bin/virtqemud", "/usr/bin/libvirtd")
_VERSION = re.compile(r"\blibvirt\)?\s+(\d+)\.(\d+)\.(\d+)")
VARIANT_MIN = (10, 0, 0)
"""libvirt accepts a managed='no' device on a variant driver (one with vfio-dev/) from 10.0."""


def daemon_candidates(proc_root: Path = Path("/proc")) -> list[Path]:
    """The parent's executable first (libvirtd or virtqemud running the hook), then the usual paths."""
    found: list[Path] = []
    try:
        parent = Path(os.readlink(proc_root / str(os.getppid()) / "exe"))
        if parent.name in ("libvirtd", "virtqemud"):
            found.append(parent)
    except OSError:
        pass
    found += [Path(p) for p in DAEMONS if Path(p) not in found]
    return found


def parse_version_output(text: str) -> tuple[int, int, int] | None:
    match = _VERSION.search(text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def detect(config: Config, cache_dir: Path | None) -> tuple[tuple[int, ...] | None, str]:
    """Return (version or None, where it came from)."""
    if config.libvirt_version is not None:
        return config.libvirt_version, "config"
    cache = _load_cache(cache_dir)
    for daemon in daemon_candidates():
        try:
            stat = daemon.stat()
        except OSError:
            continue
        key = f"{daemon}:{stat.st_mtime_ns}"
        if key in cache:
            return tuple(cache[key]), f"{daemon} --version (cached)"
        try:
            proc = subprocess.run(
                [str(daemon), "--version"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10, check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = parse_version_output(proc.stdout)
        if version:
            _store_cache(cache_dir, {key: list(version)})
            return version, f"{daemon} --version"
    return None, "no libvirt daemon found"


def _load_cache(cache_dir: Path | None) -> dict:
    if cache_dir is None:
        return {}
    try:
        return json.loads((cache_dir / "libvirt-version.json").read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(cache_dir: Path | None, value: dict) -> None:
    if cache_dir is None:
        return
    from vfio_libvirt.locks import make_private_dirs

    try:
        make_private_dirs(cache_dir)
        tmp = cache_dir / "libvirt-version.json.tmp"
        tmp.write_text(json.dumps(value))
        tmp.replace(cache_dir / "libvirt-version.json")
    except OSError:
        pass  # a cache we cannot write only costs one more `--version` next time
