"""Host configuration (`VFIO_LIBVIRT_CONFIG`, TOML) and per-VM policy from domain `<metadata>`.

Host config is the admin's standing policy; the per-VM `<metadata>` element lets one
domain ask for something different without touching the host file.  A missing config
file means the defaults.

A config with mistakes is read *leniently*: `Config.load` returns the safe reading
plus a `ConfigProblem` (file, line, dotted key, message) for every mistake, and only
a file that cannot be read or is not TOML at all raises.  The safe reading never
does more than the admin asked — a device whose settings are garbled is left alone
(never_touch), an unknown or invalid setting falls back to its default — because the
same file is read while VMs run: a typo must not make the hook rebind a device the
admin protected, nor stop a device from going home.  Commands that would change
something on purpose (plan, bind, attach) call `require_valid()` and refuse instead;
the hook and `restore` warn and go on.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from pathlib import Path
from typing import Literal

from lxml import etree

from vfio_libvirt.errors import InputError
from vfio_libvirt.names import is_module_name, module_name
from vfio_libvirt.pci import PciAddress

METADATA_NS = "urn:vfio-libvirt:metadata:1"
CompanionPolicy = Literal["refuse", "bind"]
_COMPANION_POLICIES = ("refuse", "bind")
_SECTIONS = {
    "timeouts": ("bind_seconds", "restore_seconds"),
    "policy": ("companions",),
    "libvirt": ("version",),
    "devices": (),  # keys are PCI addresses
}
_DEVICE_KEYS = ("driver", "never_touch", "in_use")
InUsePolicy = Literal["refuse", "allow"]
_IN_USE_POLICIES = ("refuse", "allow")
_DEFAULT_BIND, _DEFAULT_RESTORE = 10.0, 30.0
_LEFT_ALONE = "the device is never touched"

Keys = tuple[str, ...]


@dataclass(frozen=True)
class ConfigProblem:
    """One mistake in the host config, located well enough to fix it without guessing."""

    path: str
    line: int | None
    """1-based line of the offending key or section header; None when it cannot be found."""
    key: str
    """Dotted TOML key, e.g. `devices."0000:00:10.0".never_touch` or `timeouts.bind_second`."""
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.key}: {self.message}"


@dataclass(frozen=True)
class Config:
    bind_timeout: float = _DEFAULT_BIND
    """Seconds a whole prepare may take (waits included) before it gives up and rolls back."""
    restore_timeout: float = _DEFAULT_RESTORE
    """Seconds a whole release may take to give every device back (a holder is waited for once)."""
    companions: CompanionPolicy = "refuse"
    libvirt_version: tuple[int, ...] | None = None
    driver_overrides: dict[PciAddress, str] = field(default_factory=dict)
    never_touch: frozenset[PciAddress] = frozenset()
    in_use_allowed: frozenset[PciAddress] = frozenset()
    """Devices the host uses (a mount that is not /, an up interface, an open node) that
    may still be given to a VM; host-critical ones never are."""
    problems: tuple[ConfigProblem, ...] = ()
    """What was wrong in the file; every other field is already the safe reading of it."""

    @classmethod
    def load(cls, path: Path) -> Config:
        """The safe reading of `path` plus its problems; raises only if it is unreadable or not TOML."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except UnicodeDecodeError as err:
            raise InputError(f"config {path}: not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise InputError(f"config {path}: {err.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise InputError(f"config {path}: not valid TOML: {err}") from None
        return _Reader(str(path), _KeyLines(text)).read(data)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> Config:
        """Like `load`, for already parsed TOML (problems then carry no line numbers)."""
        return _Reader(where, None).read(data)

    def require_valid(self) -> None:
        """Refuse to act on a config with mistakes: for commands that change things on purpose."""
        if self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            raise InputError(f"{self.problems[0]}{more}")


class _Reader:
    """Turns parsed TOML into the safe reading, collecting a problem per mistake."""

    def __init__(self, where: str, lines: _KeyLines | None) -> None:
        self.where, self.lines = where, lines
        self.problems: list[ConfigProblem] = []

    def problem(self, keys: Keys, message: str) -> None:
        line = self.lines.find(keys) if self.lines else None
        self.problems.append(ConfigProblem(self.where, line, dotted(keys), message))

    def read(self, data: dict) -> Config:
        sections: dict[str, dict] = {}
        for name, value in data.items():
            if name not in _SECTIONS:
                kind = "section" if isinstance(value, dict) else "key"
                self.problem((name,), f"unknown {kind} (known: {', '.join(_SECTIONS)}); ignored")
            elif not isinstance(value, dict):
                self.problem((name,), f"must be a table [{name}], got {describe(value)}; ignored")
            else:
                sections[name] = value
        for name, known in _SECTIONS.items():
            if known:
                for key in [k for k in sections.get(name, {}) if k not in known]:
                    self.problem((name, key), f"unknown key (known: {', '.join(known)}); ignored")
        timeouts = sections.get("timeouts", {})
        overrides, never, allowed = self.devices(sections.get("devices", {}))
        config = Config(
            bind_timeout=self.seconds(timeouts, "bind_seconds", _DEFAULT_BIND),
            restore_timeout=self.seconds(timeouts, "restore_seconds", _DEFAULT_RESTORE),
            companions=self.companions(sections.get("policy", {})),
            libvirt_version=self.version(sections.get("libvirt", {})),
            driver_overrides=overrides,
            never_touch=frozenset(never),
            in_use_allowed=frozenset(allowed),
        )
        self.problems.sort(key=lambda p: (p.line is None, p.line or 0))
        return replace(config, problems=tuple(self.problems))

    def seconds(self, table: dict, key: str, default: float) -> float:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
            self.problem(("timeouts", key), f"must be a number of seconds, more than 0 and at most "
                         f"3600, got {describe(value)}; using the default {default:g}")
            return default
        return float(value)

    def companions(self, table: dict) -> CompanionPolicy:
        value = table.get("companions", "refuse")
        if value not in _COMPANION_POLICIES:
            self.problem(("policy", "companions"),
                         f'must be "refuse" or "bind", got {describe(value)}; using "refuse"')
            return "refuse"
        return value

    def version(self, table: dict) -> tuple[int, ...] | None:
        if "version" not in table:
            return None
        value = table["version"]
        try:
            if not isinstance(value, str):  # 10.10 as a TOML float would read as 10.1
                raise InputError("not a string")
            return parse_version(value)
        except InputError:
            self.problem(("libvirt", "version"), f'must be a string like "11.3.0", got '
                         f"{describe(value)}; ignored (the version is read from the daemon)")
            return None

    def devices(self, table: dict) -> tuple[dict[PciAddress, str], set[PciAddress], set[PciAddress]]:
        overrides: dict[PciAddress, str] = {}
        never: set[PciAddress] = set()
        allowed: set[PciAddress] = set()
        seen: dict[PciAddress, str] = {}
        for bdf, settings in table.items():
            keys = ("devices", bdf)
            try:
                address = PciAddress.parse(bdf)
            except InputError:
                self.problem(keys, "not a PCI address like 0000:01:00.0; ignored")
                continue
            if address in seen:
                self.problem(keys, f"the same device as devices.{dotted((seen[address],))}; "
                             f"{_LEFT_ALONE}")
                never.add(address)
            seen.setdefault(address, bdf)
            if not isinstance(settings, dict):
                self.problem(keys, f"must be a table of {' and '.join(_DEVICE_KEYS)}, got "
                             f"{describe(settings)}; {_LEFT_ALONE}")
                never.add(address)
                continue
            for key in [k for k in settings if k not in _DEVICE_KEYS]:
                # most likely a misspelt never_touch: protecting the device is the safe guess
                self.problem((*keys, key), f"unknown key (known: {', '.join(_DEVICE_KEYS)}); "
                             f"{_LEFT_ALONE}")
                never.add(address)
            flag = settings.get("never_touch", False)
            if flag is True:
                never.add(address)
            elif flag is not False:
                self.problem((*keys, "never_touch"),
                             f"must be true or false, got {describe(flag)}; {_LEFT_ALONE}")
                never.add(address)
            if "driver" in settings:
                driver = settings["driver"]
                if isinstance(driver, str) and is_module_name(driver):
                    overrides[address] = driver
                else:
                    self.problem((*keys, "driver"), f'must be a VFIO module name like "vfio_pci", '
                                 f"got {describe(driver)}; {_LEFT_ALONE}")
                    never.add(address)
            in_use = settings.get("in_use", "refuse")
            if in_use == "allow":
                allowed.add(address)
            elif in_use != "refuse":  # the safe reading is the default: refuse a device in use
                self.problem((*keys, "in_use"), f'must be "refuse" or "allow", got {describe(in_use)}; '
                             "a device in use is refused")
        return overrides, never, allowed


# --- where a key is in the file ------------------------------------------------------
# tomllib reports no positions, so the lines are found by scanning the text for table
# headers and `key =` lines.  The file already parsed, so this only has to be right
# for valid TOML; multi-line strings are skipped so their contents are not taken for keys.
_BARE = r"[A-Za-z0-9_-]+"
_KEY = rf'(?:{_BARE}|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\')'
_DOTTED = rf"{_KEY}(?:[ \t]*\.[ \t]*{_KEY})*"
_HEADER = re.compile(rf"[ \t]*\[\[?[ \t]*({_DOTTED})[ \t]*\]\]?[ \t]*(?:#.*)?")
_ASSIGN = re.compile(rf"[ \t]*({_DOTTED})[ \t]*=")
_PART = re.compile(_KEY)


class _KeyLines:
    def __init__(self, text: str) -> None:
        self.first: dict[Keys, int] = {}
        table: Keys = ()
        in_string = ""
        for number, line in enumerate(text.splitlines(), 1):
            if in_string:
                if line.count(in_string) % 2:
                    in_string = ""
                continue
            if header := _HEADER.fullmatch(line):
                table = _split(header[1])
                self._note(table, number)
            elif assign := _ASSIGN.match(line):
                self._note(table + _split(assign[1]), number)
            in_string = next((d for d in ('"""', "'''") if line.count(d) % 2), "")

    def _note(self, keys: Keys, number: int) -> None:
        for end in range(1, len(keys) + 1):
            self.first.setdefault(keys[:end], number)

    def find(self, keys: Keys) -> int | None:
        """The line of `keys`, else of its nearest enclosing table or inline table."""
        for end in range(len(keys), 0, -1):
            if keys[:end] in self.first:
                return self.first[keys[:end]]
        return None


def _split(text: str) -> Keys:
    return tuple(
        tomllib.loads(f"k = {part}")["k"] if part[0] in "\"'" else part
        for part in _PART.findall(text)
    )


def dotted(keys: Keys) -> str:
    """A key path as it would be written in TOML: `devices."0000:00:10.0".never_touch`."""
    return ".".join(k if re.fullmatch(_BARE, k) else json.dumps(k, ensure_ascii=False) for k in keys)


def describe(value: object) -> str:
    """`'true' (a string)`: the value and its TOML type, the usual cause of a mistake."""
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
             (dict, "a table"), (list, "an array"), (datetime, "a date-time"), (date, "a date"),
             (time, "a time"))
    kind = next((name for t, name in kinds if isinstance(value, t)), type(value).__name__)
    if isinstance(value, dict | list):
        return kind
    text = repr(value)
    return f"{text[:40]}… ({kind})" if len(text) > 40 else f"{text} ({kind})"


@dataclass(frozen=True)
class VmPolicy:
    """What one domain asks for in `<metadata><vfio:policy xmlns:vfio="urn:vfio-libvirt:metadata:1">`."""

    companions: CompanionPolicy | None = None
    drivers: dict[PciAddress, str] = field(default_factory=dict)
    in_use: InUsePolicy | None = None
    """For every device of the domain; a device's own in_use attribute wins."""
    in_use_devices: dict[PciAddress, InUsePolicy] = field(default_factory=dict)

    def allows_in_use(self, address: PciAddress) -> bool:
        return self.in_use_devices.get(address, self.in_use) == "allow"

    @classmethod
    def from_domain(cls, root: etree._Element) -> VmPolicy:
        element = root.find(f"metadata/{{{METADATA_NS}}}policy")
        if element is None:
            return cls()
        companions = element.get("companions")
        drivers: dict[PciAddress, str] = {}
        in_use_devices: dict[PciAddress, InUsePolicy] = {}
        for device in element.findall(f"{{{METADATA_NS}}}device"):
            address = PciAddress.parse(device.get("address") or "")
            if driver := device.get("driver"):
                drivers[address] = module_name(driver)
            if (in_use := device.get("in_use")) is not None:
                in_use_devices[address] = _in_use(in_use)
        in_use = element.get("in_use")
        return cls(
            companions=_companions(companions, "domain metadata") if companions else None,
            drivers=drivers,
            in_use=_in_use(in_use) if in_use is not None else None,
            in_use_devices=in_use_devices,
        )


def parse_version(text: object) -> tuple[int, ...]:
    parts = str(text).strip().split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isascii() and p.isdigit() and len(p) <= 6 for p in parts):
        raise InputError(f"invalid libvirt version {text!r}: expected like 10.0.0")
    return tuple(int(p) for p in parts)


def _in_use(value: str) -> InUsePolicy:
    if value not in _IN_USE_POLICIES:
        raise InputError(f"domain metadata: in_use must be one of {', '.join(_IN_USE_POLICIES)}")
    return value  # type: ignore[return-value]


def _companions(value: object, where: str) -> CompanionPolicy:
    if value not in _COMPANION_POLICIES:
        raise InputError(f"{where}: companions must be one of {', '.join(_COMPANION_POLICIES)}")
    return value  # type: ignore[return-value]
