"""The best-VFIO-driver rule, from the kernel's `vfio_pci_core` design.

Variant drivers declare `PCI_DRIVER_OVERRIDE_DEVICE_VFIO(...)` ids, which depmod turns
into `alias vfio_pci:v…d…sv…sd…bc…sc…i… <module>` lines.  A device's modalias with a
`vfio_` prefix is matched against them with fnmatch semantics (as kmod does); the
pattern with the fewest `*` is the most specific and wins, ties going to the earlier
line.  That is exactly libvirt ≥ 10's rule, so when both decide they agree.  Plain
`vfio_pci` matches every device with 7 wildcards and is the fallback.

Parsing is a prefix scan, not a line-by-line split: modules.alias has ~27k lines and
only a handful are ours.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from vfio_libvirt.errors import InputError, OperationError
from vfio_libvirt.names import is_module_name

log = logging.getLogger(__name__)

ALIAS_PREFIX = "vfio_pci:"
_ALIAS_LINE = "alias " + ALIAS_PREFIX
_BUILTIN_KEY = b".alias=" + ALIAS_PREFIX.encode()
MODALIAS_RE = re.compile(
    r"pci:v[0-9A-F]{8}d[0-9A-F]{8}sv[0-9A-F]{8}sd[0-9A-F]{8}bc[0-9A-F]{2}sc[0-9A-F]{2}i[0-9A-F]{2}"
)


@dataclass(frozen=True)
class VfioAlias:
    """One `vfio_pci:` alias line: the pattern, the module that declares it, its position."""

    pattern: str
    module: str
    order: int = 0
    source: str = "modules.alias"

    @property
    def wildcards(self) -> int:
        return self.pattern.count("*")

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return re.compile(fnmatch.translate(self.pattern))

    def matches(self, vfio_modalias: str) -> bool:
        return self._regex.match(vfio_modalias) is not None


@dataclass(frozen=True)
class Resolution:
    """Every alias that matches one modalias, best first."""

    modalias: str
    candidates: tuple[VfioAlias, ...]

    @property
    def best(self) -> VfioAlias | None:
        return self.candidates[0] if self.candidates else None

    def to_json(self) -> dict[str, object]:
        best = self.best
        return {
            "modalias": self.modalias,
            "module": best.module if best else None,
            "alias": best.pattern if best else None,
            "wildcards": best.wildcards if best else None,
            "candidates": [
                {"module": c.module, "alias": c.pattern, "wildcards": c.wildcards}
                for c in self.candidates
            ],
        }


def parse_modules_alias(text: str, *, first_order: int = 0) -> list[VfioAlias]:
    """Return the `alias vfio_pci:<pattern> <module>` lines of a modules.alias text.

    `vfio_pcix:` and other look-alike prefixes are not ours: the colon is part of the
    prefix.  Lines with an unsafe module name are skipped with a warning.
    """
    found: list[VfioAlias] = []
    pos = 0
    while (start := text.find(_ALIAS_LINE, pos)) != -1:
        end = text.find("\n", start)
        end = len(text) if end == -1 else end
        pos = end
        if start and text[start - 1] != "\n":
            continue
        parts = text[start:end].split()
        if len(parts) != 3:
            continue
        _, pattern, module = parts
        if not is_module_name(module):
            log.warning("ignoring alias %s: unsafe module name %r", pattern, module)
            continue
        found.append(VfioAlias(pattern, module, first_order + len(found)))
    return found


def parse_builtin_modinfo(data: bytes, *, first_order: int = 0) -> list[VfioAlias]:
    """Return the vfio_pci aliases of built-in modules (`<mod>.alias=vfio_pci:…`, NUL separated)."""
    found: list[VfioAlias] = []
    if _BUILTIN_KEY not in data:
        return found
    for entry in data.split(b"\0"):
        module, sep, pattern = entry.partition(b".alias=")
        if not sep or not pattern.startswith(ALIAS_PREFIX.encode()):
            continue
        name = module.decode("ascii", "replace")
        if not is_module_name(name):
            log.warning("ignoring built-in alias of unsafe module name %r", name)
            continue
        found.append(
            VfioAlias(pattern.decode("ascii", "replace"), name, first_order + len(found), "builtin")
        )
    return found


@dataclass
class AliasTable:
    """The vfio_pci aliases the kernel's modules declare, in file order."""

    aliases: list[VfioAlias] = field(default_factory=list)

    @classmethod
    def load(cls, modules_dir: Path, alias_file: Path | None = None) -> AliasTable:
        """Read `modules.alias` and `modules.builtin.modinfo` from a modules directory.

        With `alias_file`, only that file is read (for inspecting another kernel's
        table, or tests).
        """
        if alias_file is not None:
            return cls(parse_modules_alias(_read_text(alias_file)))
        path = modules_dir / "modules.alias"
        aliases = parse_modules_alias(_read_text(path)) if path.exists() else []
        builtin = modules_dir / "modules.builtin.modinfo"
        if builtin.exists():
            aliases += parse_builtin_modinfo(builtin.read_bytes(), first_order=len(aliases))
        if not path.exists() and not builtin.exists():
            raise OperationError(f"no modules.alias in {modules_dir}: is this the right kernel?")
        return cls(aliases)

    def resolve(self, modalias: str) -> Resolution:
        """Rank every alias that matches `modalias` (a sysfs `pci:v…` string)."""
        if not MODALIAS_RE.fullmatch(modalias):
            raise InputError(f"invalid PCI modalias {modalias!r}: expected pci:v…d…sv…sd…bc…sc…i…")
        key = "vfio_" + modalias
        matching = [a for a in self.aliases if a.matches(key)]
        seen: set[tuple[str, str]] = set()
        unique = []
        for alias in sorted(matching, key=lambda a: (a.wildcards, a.order)):
            if (alias.pattern, alias.module) not in seen:
                seen.add((alias.pattern, alias.module))
                unique.append(alias)
        return Resolution(modalias, tuple(unique))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise InputError(f"alias file not found: {path}") from None
    except OSError as err:
        raise OperationError(f"cannot read {path}: {err.strerror}") from None
