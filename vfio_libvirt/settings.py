"""Where the product finds the kernel, its modules, its state and its config.

Every path comes from one place so that tests (and odd hosts) can redirect all of
them with environment variables, and no code path can reach the real /sys by
building a path of its own.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vfio_libvirt.limits import MAX_XML_BYTES

__all__ = ["MAX_XML_BYTES", "Settings"]

@dataclass(frozen=True)
class Settings:
    sysfs_root: Path
    """Root under which `sys/` is read: `$VFIO_LIBVIRT_SYSFS_ROOT/sys/bus/pci/...`."""
    modules_dir: Path
    state_dir: Path
    config_path: Path
    modprobe: tuple[str, ...]
    ip: tuple[str, ...] = ("ip",)
    """iproute2's `ip`, run read-only (`ip -j addr/route show`) to see what a NIC carries."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        modules_dir = env.get("VFIO_LIBVIRT_MODULES_DIR") or f"/lib/modules/{os.uname().release}"
        modprobe = shlex.split(env.get("VFIO_LIBVIRT_MODPROBE") or "modprobe")
        ip = shlex.split(env.get("VFIO_LIBVIRT_IP") or "ip")
        return cls(
            sysfs_root=Path(env.get("VFIO_LIBVIRT_SYSFS_ROOT") or "/"),
            modules_dir=Path(modules_dir),
            state_dir=Path(env.get("VFIO_LIBVIRT_STATE_DIR") or "/run/vfio-libvirt"),
            config_path=Path(env.get("VFIO_LIBVIRT_CONFIG") or "/etc/vfio-libvirt/config.toml"),
            modprobe=tuple(modprobe) or ("modprobe",),
            ip=tuple(ip) or ("ip",),
        )
