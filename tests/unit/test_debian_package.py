"""The Debian package (debian/), its manual page (man/) and bash completion (completion/).

Two parts:

- Always: the man page and the completion describe exactly the CLI's subcommands and
  options (argparse is the truth), the versions agree, and the maintainer scripts'
  daemon reload does what it says with stand-ins for pidof, kill and systemd.
- With dpkg-buildpackage (dpkg-dev) installed: the package is built from a copy of the
  tree, lintian finds no error, its contents are checked, and real `dpkg -i/-r/-P`
  install, remove and purge it in a temporary root (`dpkg --root
  --force-script-chrootless`: the maintainer scripts run on this host with
  DPKG_ROOT set).  Where the kernel allows it (root, unshare), every dpkg run and
  maintainer script runs in a private mount namespace whose `/` is read-only except
  for the test's temp dir, so a script that forgot DPKG_ROOT fails instead of
  touching this host's /etc/libvirt.  Nothing is ever installed on this host.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

import vfio_libvirt
from tests.support import debbuild
from vfio_libvirt.cli import build_parser
from vfio_libvirt.cli_host import HOOK_OPS

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "debian"
MAN_PAGE = REPO / "man" / "vfio-libvirt.8"
COMPLETION = REPO / "completion" / "vfio-libvirt"
PACKAGE = "vfio-libvirt"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
LIBEXEC = "/usr/libexec/vfio-libvirt"
HOOK_LINKS = {  # link in /etc/libvirt/hooks -> what postinst points it at
    "etc/libvirt/hooks/qemu.d/vfio-libvirt": f"{LIBEXEC}/qemu-hook",
    "etc/libvirt/hooks/network.d/vfio-libvirt": f"{LIBEXEC}/network-hook",
}
CONFFILE = "etc/vfio-libvirt/config.toml"
JOURNAL = {"version": 1, "devices": {"0000:06:00.2": {
    "address": "0000:06:00.2", "domain": "vm1", "uuid": None, "role": "bind",
    "original_driver": "e1000e", "original_override": None, "status": "bound"}}}

needs_dpkg_buildpackage = pytest.mark.skipif(
    shutil.which("dpkg-buildpackage", path=CLEAN_PATH) is None,
    reason="dpkg-buildpackage is not installed (dpkg-dev, with debhelper, dh-python, "
           "pybuild-plugin-pyproject, python3-all, python3-setuptools and lintian)")


# --- the CLI as argparse has it ---------------------------------------------------------
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every leaf command by its name as typed: `resolve`, …, `config check`."""
    def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    out = {}
    for name, sub in subparsers(build_parser()).items():
        nested = subparsers(sub)
        if nested:
            out.update({f"{name} {inner}": p for inner, p in nested.items()})
        else:
            out[name] = sub
    return out


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")}


def _positionals(parser: argparse.ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def _bash_table(name: str) -> dict[str, str]:
    """`local -A NAME=( [key]="value" … )` from the completion script."""
    body = re.search(rf"local -A {name}=\(\n(.*?)\n\s*\)", COMPLETION.read_text(), re.S)
    assert body, f"no table {name} in {COMPLETION}"
    return dict(re.findall(r'\[([^]]+)\]="([^"]*)"', body.group(1)))


# --- the man page and completion follow the CLI -------------------------------------------
def test_completion_knows_every_subcommand_option_and_positional():
    commands = _subcommands()
    opts, args = _bash_table("opts"), _bash_table("args")
    assert set(opts) == set(commands), "completion/vfio-libvirt: opts table vs the CLI's commands"
    for name, parser in commands.items():
        assert set(opts[name].split()) == _options(parser), f"completion options of {name}"
        assert args.get(name, "").split() == _positionals(parser), f"completion positionals of {name}"
    text = COMPLETION.read_text()
    top = re.search(r'local commands="([^"]*)"', text).group(1).split()
    assert sorted(top) == sorted({name.split()[0] for name in commands})
    valued = set(re.search(r'local valued="([^"]*)"', text).group(1).split("|"))
    takes_value = {o for p in commands.values() for a in p._actions if a.nargs != 0
                   for o in a.option_strings}
    assert valued == takes_value
    ops = re.search(r'op\) mapfile -t COMPREPLY < <\(compgen -W "([^"]*)"', text).group(1).split()
    assert sorted(ops) == sorted(HOOK_OPS)


def _man_text() -> str:
    """The page's source with troff's escaped hyphens and font switches undone."""
    text = MAN_PAGE.read_text().replace("\\-", "-")
    return re.sub(r"\\f[BIRP]", "", text)


def test_man_page_describes_every_subcommand_and_option():
    text = _man_text()
    for name, parser in _subcommands().items():
        item = re.search(rf'^\.TP\n\.BR? "?{re.escape(name)}"?(?: (.*))?$', text, re.M)
        assert item, f"man/vfio-libvirt.8: no COMMANDS entry for {name}"
        for option in _options(parser):
            assert option in (item.group(1) or ""), f"man/vfio-libvirt.8: {name} lacks {option}"
    read = {v for f in (REPO / "vfio_libvirt").glob("*.py")
            for v in re.findall(r"VFIO_LIBVIRT_[A-Z_]+", f.read_text())}
    for variable in sorted(read):
        assert f".B {variable}\n" in text, f"man/vfio-libvirt.8: ENVIRONMENT lacks {variable}"
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "FILES", "ENVIRONMENT",
                    "EXIT STATUS", "SEE ALSO"):
        assert f"\n.SH {section}\n" in text


def test_man_page_renders_without_warnings():
    if shutil.which("man") is None or shutil.which("groff") is None:
        pytest.skip("man-db/groff not installed: lintian checks the page when the package is built")
    proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(MAN_PAGE)],
                          capture_output=True, text=True, env={"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8",
                                                               "MANROFFSEQ": "", "MANWIDTH": "80"},
                          check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


def test_versions_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    changelog = re.match(r"vfio-libvirt \(([^)]+)\)", (DEBIAN / "changelog").read_text()).group(1)
    assert (DEBIAN / "source" / "format").read_text().strip() == "3.0 (native)"
    assert changelog == project == vfio_libvirt.__version__
    assert f'"vfio\\-libvirt {project}"' in MAN_PAGE.read_text()


# --- bash completion, run in bash ---------------------------------------------------------
def _bash_words(line: str) -> list[str]:
    """COMP_WORDS as bash makes them: split at blanks, then at ':' and '=' (COMP_WORDBREAKS),
    which become words of their own."""
    words = [part for token in line.split() for part in re.split(r"([:=])", token) if part]
    return [*words, ""] if line.endswith(" ") else words


def _complete(line: str, tmp_path: Path, *, init: bool) -> list[str]:
    """COMPREPLY for the command line `vfio-libvirt LINE` with the cursor at its end.  As
    in bash, a reply replaces only what follows the last ':' of the current word."""
    stub = tmp_path / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "virsh").write_text("#!/bin/sh\nprintf 'vm1\\nvm2\\nother\\n'\n")
    (stub / "virsh").chmod(0o755)
    line = f"vfio-libvirt {line}"
    script = "\n".join([
        ". /usr/share/bash-completion/bash_completion" if init else "",
        f". {COMPLETION}",
        'COMP_LINE=$1; COMP_POINT=${#COMP_LINE}; shift',
        'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))',
        '_vfio_libvirt vfio-libvirt "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"',
        'printf "%s\\n" "${COMPREPLY[@]}"',
    ])
    env = {"PATH": f"{stub}:{CLEAN_PATH}", "HOME": str(tmp_path), "LC_ALL": "C.UTF-8",
           "VFIO_LIBVIRT_SYSFS_ROOT": os.environ["VFIO_LIBVIRT_SYSFS_ROOT"]}
    proc = subprocess.run(["bash", "-c", script, "complete", line, *_bash_words(line)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return sorted(filter(None, proc.stdout.split("\n")))


@pytest.mark.parametrize("init", [False, True], ids=["plain-bash", "bash-completion"])
def test_completion_completes_commands_options_domains_and_addresses(tmp_path, init):
    if init and not Path("/usr/share/bash-completion/bash_completion").exists():
        pytest.skip("bash-completion is not installed (the script also works without it: plain-bash)")
    devices = Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"], "sys/bus/pci/devices")
    devices.mkdir(parents=True)
    for bdf in ("0000:00:1f.0", "0000:06:00.2", "0000:06:00.3"):
        (devices / bdf).mkdir()
    assert _complete("re", tmp_path, init=init) == ["resolve", "restore"]
    assert _complete("attach v", tmp_path, init=init) == ["vm1", "vm2"]
    assert _complete("attach vm1 0000:06", tmp_path, init=init) == ["06:00.2", "06:00.3"]
    assert _complete("attach vm1 ", tmp_path, init=init) == ["0000:00:1f.0", "0000:06:00.2", "0000:06:00.3"]
    assert _complete("attach --connect qemu:///system vm1 0000:06:00.", tmp_path,
                     init=init) == ["00.2", "00.3"]
    assert _complete("attach --connect qemu:///system ", tmp_path, init=init) == ["other", "vm1", "vm2"]
    assert _complete("restore --domain o", tmp_path, init=init) == ["other"]
    assert _complete("restore 0000:00", tmp_path, init=init) == ["00:1f.0"]
    assert _complete("test-hook vm1 re", tmp_path, init=init) == ["reconnect", "release", "restore"]
    assert _complete("doctor --n", tmp_path, init=init) == ["--network-hook"]
    assert _complete("config ", tmp_path, init=init) == ["--help", "-h", "check"]
    assert _complete("config check --", tmp_path, init=init) == ["--file", "--help", "--json"]
    assert _complete("plan --xml dom", tmp_path, init=init) == []
    (tmp_path / "domain.xml").write_text("<domain/>")
    assert _complete("plan --xml dom", tmp_path, init=init) == ["domain.xml"]


# --- the maintainer scripts' daemon reload -----------------------------------------------
@cache
def _sandbox_prefix() -> tuple[str, ...]:
    """A command prefix that runs its command with `/` read-only (only the test's temp
    dirs writable), or () when this kernel or user cannot make one."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return ()
    prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
              'for d in "$VLT_WRITABLE"; do mount --bind "$d" "$d" || exit 97; done; '
              'mount -o remount,bind,ro / || exit 97; exec "$@"', "sandbox")
    probe = subprocess.run([*prefix, "sh", "-c", "! touch /.vfio-libvirt-ro-probe 2>/dev/null"],
                           env={"PATH": CLEAN_PATH, "VLT_WRITABLE": "/tmp"}, capture_output=True,
                           check=False)
    return prefix if probe.returncode == 0 else ()


def _sandboxed(argv: list[str], writable: Path, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    prefix = _sandbox_prefix()
    return subprocess.run([*prefix, *argv], env={**env, "VLT_WRITABLE": str(writable)},
                          capture_output=True, text=True, check=False, **kw)


def _shell_function(script: str, name: str) -> str:
    text = (DEBIAN / f"vfio-libvirt.{script}").read_text()
    body = re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", text, re.S | re.M)
    assert body, f"no {name} in debian/vfio-libvirt.{script}"
    return body.group(0)


@pytest.mark.parametrize("script", ["postinst", "postrm"])
@pytest.mark.parametrize("init", ["systemd", "no-systemd", "chroot"])
@pytest.mark.parametrize("policy", [None, 0, 101], ids=["no-policy-rc.d", "policy-allows", "policy-forbids"])
def test_reload_reaches_every_running_daemon_and_never_fails(tmp_path, script, init, policy):
    """libvirt looks for hooks only at start and reload: virtqemud and virtnetworkd (modular
    daemons) and libvirtd must all hear of it.  Under systemd through deb-systemd-invoke,
    otherwise SIGHUP; nothing in a chroot (systemctl ignores commands there with status 0,
    pidof would name the host's daemons) or when policy-rc.d forbids it (101).  postinst
    leaves doctor a mark of each daemon that took the reload, and only of those."""
    stub, log, state = tmp_path / "stub", tmp_path / "log", tmp_path / "state"
    systemd_dir = tmp_path / "run-systemd-system"     # exists only while systemd runs
    if init == "systemd":
        systemd_dir.mkdir()
    stub.mkdir()
    stubs = {
        "pidof": 'case "$1" in virtqemud) echo 101 102;; libvirtd) echo 201;; *) exit 1;; esac',
        "ischroot": f"exit {0 if init == 'chroot' else 1}",
        # virtqemud takes the reload; libvirtd's unit is not there
        "deb-systemd-invoke": f'echo "deb-systemd-invoke $*" >> {log}; [ "$2" = virtqemud.service ]',
        "systemctl": f'echo "systemctl $*" >> {log}; [ "$1 $3" = "is-active virtqemud.service" ]',
    }
    if policy is not None:
        stubs["policy-rc.d"] = f'echo "policy-rc.d $*" >> {log}; exit {policy}'
    for name, body in stubs.items():
        (stub / name).write_text(f"#!/bin/sh\n{body}\n")
        (stub / name).chmod(0o755)
    program = "\n".join([
        "say() { echo \"vfio-libvirt: $*\"; }",
        # virtqemud takes the signal, libvirtd is gone meanwhile
        f'kill() {{ echo "kill $*" >> {log}; [ "$2" = 101 ]; }}',
        'ROOT=""',
        f"POLICY_RC_D={stub}/policy-rc.d",
        _shell_function(script, "policy_allows"),
        *([_shell_function(script, "mark_reloaded")] if script == "postinst" else []),
        _shell_function(script, "reload_libvirt"),
        f"SYSTEMD_RUNNING={systemd_dir}",
        "reload_libvirt",
        "echo rc=$?",
    ])
    proc = _sandboxed(["sh", "-e", "-c", program], tmp_path,
                      {"PATH": f"{stub}:{CLEAN_PATH}", "VFIO_LIBVIRT_STATE_DIR": str(state)})
    assert proc.returncode == 0 and proc.stdout.endswith("rc=0\n"), proc.stdout + proc.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    asked = [c for c in calls if c.startswith("policy-rc.d ")]
    acted = [c for c in calls if not c.startswith(("systemctl is-active ", "policy-rc.d "))]
    if policy is not None and init == "systemd":      # as deb-systemd-invoke asks it
        assert asked == [f"policy-rc.d {d}.service try-reload-or-restart"
                         for d in ("virtqemud", "virtnetworkd", "libvirtd")]
    elif policy is not None and init == "no-systemd":   # as invoke-rc.d would, for running ones
        assert asked == ["policy-rc.d virtqemud reload", "policy-rc.d libvirtd reload"]
    if init == "chroot" or policy == 101:
        assert acted == [], calls
    elif init == "systemd":
        assert acted == [f"deb-systemd-invoke try-reload-or-restart {d}.service"
                         for d in ("virtqemud", "virtnetworkd", "libvirtd")]
    else:
        assert acted == ["kill -HUP 101 102", "kill -HUP 201"]
    # services are acted on through deb-systemd-invoke (policy-rc.d); systemctl only asked
    assert all(c.startswith("systemctl is-active ") for c in calls if c.startswith("systemctl"))
    if policy == 101 and init == "no-systemd":
        assert "policy-rc.d forbids reloading virtqemud" in proc.stdout
    marks = sorted(p.name for p in (state / "reloaded").iterdir()) if state.exists() else []
    took = script == "postinst" and init != "chroot" and policy != 101
    assert marks == (["virtqemud"] if took else []), (marks, calls)
    if took:
        assert "reloaded virtqemud: libvirt now runs the hooks" in proc.stdout


@pytest.mark.parametrize("script", ["postinst", "postrm"])
@pytest.mark.parametrize(("answer", "allowed"), [(None, True), (0, True), (104, True), (101, False),
                                                (1, True)])
def test_policy_rc_d_is_asked_as_deb_systemd_invoke_asks_it(tmp_path, script, answer, allowed):
    """deb-systemd-invoke exits 0 without reloading when policy-rc.d answers 101 (and goes
    on for any other answer): the scripts ask the same question themselves."""
    policy = tmp_path / "policy-rc.d"
    if answer is not None:
        policy.write_text(f"#!/bin/sh\necho \"$*\" > {tmp_path}/asked\nexit {answer}\n")
        policy.chmod(0o755)
    program = "\n".join([f"POLICY_RC_D={policy}", _shell_function(script, "policy_allows"),
                          "if policy_allows virtqemud.service try-reload-or-restart; then echo allowed; "
                          "else echo forbidden; fi"])
    proc = subprocess.run(["sh", "-e", "-c", program], capture_output=True, text=True, check=False,
                          env={"PATH": CLEAN_PATH})
    assert (proc.returncode, proc.stdout) == (0, "allowed\n" if allowed else "forbidden\n"), proc.stderr
    if answer is not None:
        assert (tmp_path / "asked").read_text() == "virtqemud.service try-reload-or-restart\n"


# --- the built package ---------------------------------------------------------------------
@dataclass
class Built:
    deb: Path
    changes: Path
    log: str

    def contents(self) -> dict[str, str]:
        """path (no leading ./) -> the `dpkg-deb -c` mode string, symlink arrows included."""
        out = subprocess.run(["dpkg-deb", "-c", str(self.deb)], capture_output=True, text=True,
                             check=True).stdout
        entries = {}
        for line in out.splitlines():
            mode, _owner, _size, _date, _time, path = line.split(None, 5)
            entries[path.removeprefix("./").rstrip("/")] = mode
        return entries

    def field(self, name: str) -> str:
        return subprocess.run(["dpkg-deb", "-f", str(self.deb), name], capture_output=True,
                              text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    top = tmp_path_factory.mktemp("debian-build")
    try:
        deb, log = debbuild.build(top)
    except debbuild.BuildFailed as err:
        pytest.fail(str(err))
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return Built(deb=deb, changes=next(top.glob(f"{PACKAGE}_{version}_*.changes")), log=log)


@needs_dpkg_buildpackage
def test_lintian_finds_no_error(built):
    if shutil.which("lintian", path=CLEAN_PATH) is None:
        pytest.fail("lintian is not installed (apt-get install lintian)")
    proc = subprocess.run(["lintian", "--fail-on", "error", str(built.changes)], capture_output=True,
                          text=True, env={"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8"}, check=False)
    tags = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                     if not line.startswith("running with root privileges"))
    assert proc.returncode == 0, f"lintian:\n{tags}"
    print(f"lintian: {tags or 'no tags'}")  # warnings and below are shown, not failed (pytest -rP)


@needs_dpkg_buildpackage
def test_build_ran_the_smoke_test(built):
    assert re.search(r"smoke-test: \d+ modules import, vfio-libvirt --help works", built.log), \
        built.log[-3000:]


@needs_dpkg_buildpackage
def test_package_lays_out_hooks_cli_man_page_completion_and_config(built):
    contents = built.contents()
    for path in (f"{LIBEXEC.lstrip('/')}/qemu-hook", f"{LIBEXEC.lstrip('/')}/network-hook",
                 "usr/sbin/vfio-libvirt"):
        assert contents.get(path) == "-rwxr-xr-x", (path, contents.get(path))
    assert contents.get("usr/share/man/man8/vfio-libvirt.8.gz") == "-rw-r--r--"
    assert contents.get("usr/share/bash-completion/completions/vfio-libvirt") == "-rw-r--r--"
    assert contents.get(CONFFILE) == "-rw-r--r--"
    # the library in the system Python path, every module of the tree
    site = "usr/lib/python3/dist-packages/vfio_libvirt"
    for module in sorted((REPO / "vfio_libvirt").glob("*.py")):
        assert f"{site}/{module.name}" in contents, f"{module.name} missing from the package"
    # no hook as a file under /etc (it would be a conffile, alive after dpkg -r), no /usr/bin
    assert contents.get("etc/libvirt/hooks/qemu.d", "").startswith("d")
    assert contents.get("etc/libvirt/hooks/network.d", "").startswith("d")
    assert not [p for p in contents if p.startswith("etc/libvirt/") and not contents[p].startswith("d")]
    assert not [p for p in contents if p.startswith("usr/bin")]
    assert not [p for p in contents if "__pycache__" in p or p.endswith(".pyc")]


@needs_dpkg_buildpackage
def test_package_control_fields(built):
    def names(field: str) -> set[str]:
        return {alt.split()[0] for dep in built.field(field).split(",") for alt in dep.split("|")
                if alt.strip()}

    assert built.field("Package") == PACKAGE
    assert built.field("Architecture") == "all"
    assert built.field("Version") == vfio_libvirt.__version__
    assert {"python3-lxml", "python3-tenacity"} <= names("Depends")
    assert "python3:any" in names("Depends") or "python3" in names("Depends")
    assert "python3-libvirt" in names("Recommends")
    assert "python3-libvirt" not in names("Depends")
    ctl = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(built.deb)], capture_output=True, check=True)
    listed = subprocess.run(["tar", "-xO", "./conffiles"], input=ctl.stdout, capture_output=True, check=True)
    assert listed.stdout.decode().split() == [f"/{CONFFILE}"]


@needs_dpkg_buildpackage
def test_shipped_files_are_the_trees(built, tmp_path):
    subprocess.run(["dpkg-deb", "-x", str(built.deb), str(tmp_path)], check=True)
    assert (tmp_path / CONFFILE).read_bytes() == (REPO / "xml/config.toml.example").read_bytes()
    assert (tmp_path / "usr/share/bash-completion/completions/vfio-libvirt").read_bytes() == \
        COMPLETION.read_bytes()
    assert gzip.decompress((tmp_path / "usr/share/man/man8/vfio-libvirt.8.gz").read_bytes()) == \
        MAN_PAGE.read_bytes()
    for hook, module in (("qemu-hook", "vfio_libvirt.hook"), ("network-hook", "vfio_libvirt.network_hook")):
        text = (tmp_path / LIBEXEC.lstrip("/") / hook).read_text()
        # cheap start for every libvirt event: Debian's python3 itself, no entry-point
        # wrapper, no repo-path search; isolated from PYTHONPATH and ~/.local
        assert text.startswith("#!/usr/bin/python3 -I\n"), text
        assert f"from {module} import main\n" in text
        assert "sys.path" not in text and "pkg_resources" not in text and "importlib" not in text
    assert (tmp_path / "usr/sbin/vfio-libvirt").read_text().startswith("#!/usr/bin/python3\n")


# --- dpkg -i / -r / -P in a temporary root --------------------------------------------------
class DpkgRoot:
    """A throwaway dpkg root: `dpkg --root=ROOT --force-script-chrootless` runs the real
    maintainer scripts on this host with DPKG_ROOT=ROOT.  py3compile and friends are
    stand-ins that log their calls (the real ones would look at this host's dpkg database)."""

    def __init__(self, base: Path, deb: Path):
        self.base, self.deb = base, deb
        self.root = base / "root"
        admin = self.root / "var/lib/dpkg"
        for sub in ("info", "updates", "triggers"):
            (admin / sub).mkdir(parents=True)
        (admin / "status").touch()
        (admin / "available").touch()
        self.stub, self.calls = base / "stub", base / "calls.log"
        self.stub.mkdir()
        for name in ("py3compile", "py3clean", "pypy3compile", "deb-systemd-invoke", "systemctl",
                     "invoke-rc.d", "pidof"):
            (self.stub / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {self.calls}\nexit 1\n'
                                          if name == "pidof" else
                                          f'#!/bin/sh\necho "{name} $*" >> {self.calls}\n')
            (self.stub / name).chmod(0o755)

    def dpkg(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        argv = ["dpkg", f"--root={self.root}", f"--log={self.base / 'dpkg.log'}",
                "--force-script-chrootless", "--force-depends", "--force-not-root", *args]
        return _sandboxed(argv, self.base, {"PATH": f"{self.stub}:{CLEAN_PATH}", "LC_ALL": "C.UTF-8",
                                            **(env or {})})

    def install(self) -> subprocess.CompletedProcess:
        proc = self.dpkg("-i", str(self.deb))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def status(self) -> str:
        proc = self.dpkg("-s", PACKAGE)
        found = re.search(r"^Status: (.*)$", proc.stdout, re.M)
        return found.group(1) if found else "not-installed"

    def at(self, path: str) -> Path:
        return self.root / path

    def links(self) -> dict[str, str]:
        return {p: os.readlink(self.at(p)) for p in HOOK_LINKS if self.at(p).is_symlink()}

    def leftovers(self) -> list[str]:
        """Anything named vfio-libvirt in libvirt's hook directories."""
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob("etc/libvirt/hooks/*/*"))

    def journal(self, content: str | dict) -> Path:
        path = self.at("run/vfio-libvirt/journal.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path


@pytest.fixture
def droot(built, tmp_path) -> DpkgRoot:
    return DpkgRoot(tmp_path, built.deb)


def _real_host_hooks() -> dict[str, bool]:
    return {p: os.path.lexists(f"/{p}") for p in HOOK_LINKS}


@needs_dpkg_buildpackage
def test_install_links_the_hooks_and_remove_and_purge_leave_nothing(droot):
    host_before = _real_host_hooks()
    proc = droot.install()
    assert droot.status() == "install ok installed"
    assert droot.links() == HOOK_LINKS
    for link, target in HOOK_LINKS.items():  # the links resolve inside the root
        assert os.access(droot.root / target.lstrip("/"), os.X_OK), link
    assert "no libvirt daemon reloaded" in proc.stdout
    assert droot.at(CONFFILE).is_file()
    assert "py3compile -p vfio-libvirt" in droot.calls.read_text()

    proc = droot.dpkg("-r", PACKAGE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert droot.status() == "deinstall ok config-files"
    assert droot.leftovers() == [], "dpkg -r left a hook behind"
    assert not droot.at("usr/libexec/vfio-libvirt").exists()
    assert not droot.at("usr/lib/python3/dist-packages/vfio_libvirt").exists()
    assert droot.at(CONFFILE).is_file(), "dpkg -r keeps the conffile"

    proc = droot.dpkg("-P", PACKAGE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not droot.at("etc/vfio-libvirt").exists()
    assert droot.status() == "not-installed"
    assert _real_host_hooks() == host_before, "this host's /etc/libvirt/hooks was touched"


@needs_dpkg_buildpackage
def test_removal_refuses_while_the_journal_shows_switched_devices(droot):
    droot.install()
    journal = droot.journal(JOURNAL)
    proc = droot.dpkg("-r", PACKAGE)
    assert proc.returncode != 0
    assert "refusing to remove" in proc.stderr
    assert "0000:06:00.2  domain vm1  bound" in proc.stderr
    assert "vfio-libvirt status" in proc.stderr
    assert "vfio-libvirt restore --domain NAME" in proc.stderr
    assert "VFIO_LIBVIRT_FORCE_REMOVE=1" in proc.stderr
    assert droot.status().endswith("ok installed")  # still installed, hooks live
    assert droot.links() == HOOK_LINKS
    assert droot.at("usr/libexec/vfio-libvirt/qemu-hook").exists()

    # an upgrade (here: the same version again) is never refused
    proc = droot.dpkg("-i", str(droot.deb))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "installed libvirt hook" not in proc.stdout  # the links were there already
    assert droot.links() == HOOK_LINKS

    proc = droot.dpkg("-r", PACKAGE, env={"VFIO_LIBVIRT_FORCE_REMOVE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" in proc.stderr and "0000:06:00.2" in proc.stderr
    assert droot.leftovers() == []
    assert journal.read_text() == json.dumps(JOURNAL), "the journal must be left alone"
    assert droot.dpkg("-P", PACKAGE).returncode == 0
    assert journal.read_text() == json.dumps(JOURNAL), "purge must leave the journal alone"


@pytest.mark.parametrize("case", ["empty", "garbage", "set-aside"])
@needs_dpkg_buildpackage
def test_removal_and_journals_it_cannot_read(droot, case):
    droot.install()
    if case == "empty":
        droot.journal({"version": 1, "devices": {}})
    elif case == "garbage":
        droot.journal("{not json")
    else:
        droot.journal({"version": 1, "devices": {}})
        droot.at("run/vfio-libvirt/journal.unreadable.20260101T000000Z.json").write_text("{")
    proc = droot.dpkg("-r", PACKAGE)
    if case == "empty":
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert droot.leftovers() == []
    else:  # a guard that cannot tell refuses
        assert proc.returncode != 0
        assert "refusing to remove" in proc.stderr
        assert ("cannot be read" if case == "garbage" else "set aside as unreadable") in proc.stderr
        assert droot.links() == HOOK_LINKS


@needs_dpkg_buildpackage
def test_an_admins_own_hook_file_is_never_replaced_or_removed(droot):
    mine = droot.at("etc/libvirt/hooks/qemu.d/vfio-libvirt")
    mine.parent.mkdir(parents=True)
    mine.write_text("#!/bin/sh\nexit 0\n")
    proc = droot.install()
    assert "is not the package's link" in proc.stderr
    assert not mine.is_symlink() and mine.read_text() == "#!/bin/sh\nexit 0\n"
    assert droot.links() == {k: v for k, v in HOOK_LINKS.items() if "network.d" in k}
    assert droot.dpkg("-P", PACKAGE).returncode == 0
    assert mine.read_text() == "#!/bin/sh\nexit 0\n"
    assert droot.leftovers() == ["etc/libvirt/hooks/qemu.d/vfio-libvirt"]


@needs_dpkg_buildpackage
def test_install_refuses_over_an_install_sh_installation(droot):
    manifest = droot.at("usr/lib/vfio-libvirt/MANIFEST")
    manifest.parent.mkdir(parents=True)
    manifest.write_text("/etc/libvirt/hooks/qemu.d/vfio-libvirt\n")
    hook = droot.at("etc/libvirt/hooks/qemu.d/vfio-libvirt")
    hook.parent.mkdir(parents=True)
    hook.write_text("#!/usr/bin/python3\n# installed by install.sh\n")
    proc = droot.dpkg("-i", str(droot.deb))
    assert proc.returncode != 0
    assert "install.sh --uninstall" in proc.stderr
    assert droot.status() != "install ok installed"
    assert hook.read_text() == "#!/usr/bin/python3\n# installed by install.sh\n"
    assert not droot.at("usr/libexec/vfio-libvirt").exists()


@needs_dpkg_buildpackage
def test_purge_takes_the_config_and_its_dpkg_copies_but_not_an_admins_files(droot):
    droot.install()
    droot.at(CONFFILE).write_text("[timeouts]\nbind_seconds = 20\n")  # edited: dpkg keeps it at -r
    droot.at("etc/vfio-libvirt/config.toml.dpkg-old").write_text("old")
    assert droot.dpkg("-r", PACKAGE).returncode == 0
    assert droot.at(CONFFILE).read_text() == "[timeouts]\nbind_seconds = 20\n"
    droot.at("etc/vfio-libvirt/notes.txt").write_text("mine")
    assert droot.dpkg("-P", PACKAGE).returncode == 0
    assert sorted(p.name for p in droot.at("etc/vfio-libvirt").iterdir()) == ["notes.txt"]


@needs_dpkg_buildpackage
def test_installed_hooks_and_cli_run_from_the_system_python_path(droot, tmp_path):
    """The shipped scripts, run as the kernel would run them (`python3 -I SCRIPT …`) but with
    the root's dist-packages first on sys.path, answer the common events at once."""
    droot.install()
    site = droot.at("usr/lib/python3/dist-packages")

    def run(script: str, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
        path = droot.at(script.lstrip("/"))
        code = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = sys.argv[1]; "
                "import vfio_libvirt; assert vfio_libvirt.__file__.startswith(sys.path[0]), "
                "vfio_libvirt.__file__; runpy.run_path(sys.argv.pop(1), run_name='__main__')")
        env = {k: v for k, v in os.environ.items() if k.startswith("VFIO_LIBVIRT_")}
        return subprocess.run(["/usr/bin/python3", "-I", "-c", code, str(site), str(path), *argv],
                              input=stdin, capture_output=True, cwd=tmp_path, env={**env, "PATH": CLEAN_PATH},
                              check=False)

    qemu = next(v for k, v in HOOK_LINKS.items() if "qemu.d" in k)
    network = next(v for k, v in HOOK_LINKS.items() if "network.d" in k)
    assert run(qemu, "vm1", "start", "begin", "-").returncode == 0
    domain = b"<domain type='kvm'><name>vm1</name><devices><disk type='file'/></devices></domain>"
    proc = run(qemu, "vm1", "prepare", "begin", "-", stdin=domain)
    assert proc.returncode == 0, proc.stderr
    assert run(qemu, "vm1").returncode == 2
    proc = run(network, "net1", "port-created", "begin", "-",
               stdin=b"<hookData><network><name>net1</name></network><networkport><owner>"
                     b"<name>vm1</name></owner><plug type='network' bridge='virbr0'/></networkport>"
                     b"</hookData>")
    assert proc.returncode == 0, proc.stderr
    proc = run("/usr/sbin/vfio-libvirt", "config", "check", "--file", str(droot.at(CONFFILE)))
    assert proc.returncode == 0 and b": ok" in proc.stdout, proc.stdout + proc.stderr
    proc = run("/usr/sbin/vfio-libvirt", "--help")
    assert proc.returncode == 0 and b"test-hook" in proc.stdout, proc.stdout + proc.stderr
