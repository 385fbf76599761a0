"""The Ansible role (ansible/): syntax, the config it renders, the values it refuses,
how it reads doctor, and the libvirt reload its handler runs.

Nothing here touches this host's /etc, libvirt, daemons or packages.  The role's own
task files (validate.yml, config.yml, doctor.yml) run against localhost with every
path under tmp: the config goes to a temp file, checked by the product's
`config check` from this checkout and read back with `vfio_libvirt.config`, and
"doctor" is a script printing canned JSON.  install.yml and the handler never run
through Ansible here; the handler's script runs with a PATH of fakes only.  The whole
role (install, reload, doctor, and a second run that changes nothing) needs a host of
its own: the libvirt tier's guest.

One ansible-playbook run serves every config and doctor case (a loop with
block/rescue), so the module costs a few ansible-playbook start-ups, not one per case.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vfio_libvirt.config import Config
from vfio_libvirt.pci import PciAddress

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
ROLE = ANSIBLE / "roles" / "vfio_libvirt"
RELOAD_SCRIPT = ROLE / "files" / "reload-libvirt.sh"
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook")
needs_ansible = pytest.mark.skipif(
    ANSIBLE_PLAYBOOK is None,
    reason="ansible-playbook not installed (Debian: apt-get install ansible-core)")

# --- cases ------------------------------------------------------------------------------
# name -> the role variables it sets; the others keep the role's defaults
GOOD: dict[str, dict] = {
    "defaults": {},
    "everything": {
        "vfio_libvirt_bind_seconds": 5, "vfio_libvirt_restore_seconds": 60,
        "vfio_libvirt_companions": "bind", "vfio_libvirt_libvirt_version": "11.3.0",
        "vfio_libvirt_devices": {
            "0000:06:00.2": {"driver": "mlx5_vfio_pci", "in_use": "allow"},
            "0000:00:1f.3": {"never_touch": True},
            "0000:01:00.0": {"driver": "vfio-pci", "never_touch": False, "in_use": "refuse"},
        },
    },
    # what `-e key=value` and an INI inventory's [group:vars] give: strings
    "strings": {"vfio_libvirt_bind_seconds": "15", "vfio_libvirt_restore_seconds": "2.5",
                "vfio_libvirt_libvirt_version": "10"},
    "bounds": {"vfio_libvirt_bind_seconds": 0.5, "vfio_libvirt_restore_seconds": 3600,
               "vfio_libvirt_libvirt_version": "10.10"},
    "empty_device_upper_hex": {"vfio_libvirt_devices": {"0000:0A:1F.7": {}},
                               "vfio_libvirt_libvirt_version": None},
}

# the cases whose config is written a second time, which must change nothing (each
# template run costs most of a second; the rendering has no state, so two cases show it)
TWICE_CASES = ("defaults", "everything")

# Bad values.  The role reports every mistake at once, so they are grouped into a few
# plays: every bad device in one vfio_libvirt_devices, the scalars in rounds of one bad
# value per variable.  Each entry: what the message about it must say.
NOT_BDF = "is not a PCI address written in full and quoted"
BAD_KEYS: dict[str, object] = {  # a key of vfio_libvirt_devices that is no usable address
    "bdf_not_hex": "0000:zz:00.0",
    "bdf_short": "01:00.0",
    "bdf_slot_over_1f": "0000:01:20.0",
    "bdf_function_over_7": "0000:01:00.8",
    "bdf_newline": "0000:01:00.0\n",
    "bdf_quote": '0000:01:00.0"',
    "bdf_bracket": "0000:01:00.0]",
    # `0000:01:00.0:` unquoted in YAML is a sexagesimal float (60.0): see the test below
    "bdf_unquoted_yaml": 60.0,
}
BAD_SETTINGS: dict[str, tuple[object, str]] = {  # name -> (settings, message after the key)
    "settings_string": ("vfio_pci", " must be a mapping of driver, never_touch and in_use"),
    "settings_null": (None, " must be a mapping of driver, never_touch and in_use"),
    "unknown_key": ({"nevr_touch": True}, ': unknown setting "nevr_touch"'),
    "driver_quote": ({"driver": 'vfio"pci'}, ".driver must be a VFIO module name"),
    "driver_backslash": ({"driver": "vfio\\pci"}, ".driver must be a VFIO module name"),
    "driver_newline": ({"driver": "vfio_pci\n"}, ".driver must be a VFIO module name"),
    "driver_space": ({"driver": "vfio pci"}, ".driver must be a VFIO module name"),
    "driver_path": ({"driver": "../vfio_pci"}, ".driver must be a VFIO module name"),
    "driver_option": ({"driver": "-r"}, ".driver must be a VFIO module name"),
    "driver_number": ({"driver": 5}, ".driver must be a VFIO module name"),
    "never_touch_string": ({"never_touch": "true"}, ".never_touch must be true or false"),
    "in_use_word": ({"in_use": "maybe"}, '.in_use must be "refuse" or "allow"'),
}
BAD_BIND = "vfio_libvirt_bind_seconds must be a number of seconds"
BAD_RESTORE = "vfio_libvirt_restore_seconds must be a number of seconds"
BAD_VERSION = "vfio_libvirt_libvirt_version must be empty or a quoted string"
BAD_COMPANIONS = 'vfio_libvirt_companions must be "refuse" or "bind"'
BAD_SCALARS: dict[str, tuple[str, object, str]] = {  # name -> (variable, value, message)
    "bind_zero": ("vfio_libvirt_bind_seconds", 0, BAD_BIND),
    "bind_over_3600": ("vfio_libvirt_bind_seconds", 3601, BAD_BIND),
    "bind_word": ("vfio_libvirt_bind_seconds", "ten", BAD_BIND),
    "bind_bool": ("vfio_libvirt_bind_seconds", True, BAD_BIND),
    "restore_exponent": ("vfio_libvirt_restore_seconds", 1e-07, BAD_RESTORE),
    "restore_unit": ("vfio_libvirt_restore_seconds", "30s", BAD_RESTORE),
    "restore_null": ("vfio_libvirt_restore_seconds", None, BAD_RESTORE),
    "restore_leading_zero": ("vfio_libvirt_restore_seconds", "010", BAD_RESTORE),  # no TOML number
    "companions_word": ("vfio_libvirt_companions", "always", BAD_COMPANIONS),
    "companions_bool": ("vfio_libvirt_companions", True, BAD_COMPANIONS),
    "version_float": ("vfio_libvirt_libvirt_version", 10.1, BAD_VERSION),  # 10.10 unquoted
    "version_word": ("vfio_libvirt_libvirt_version", "11.x", BAD_VERSION),
    "version_four_parts": ("vfio_libvirt_libvirt_version", "11.3.0.1", BAD_VERSION),
    "version_quote": ("vfio_libvirt_libvirt_version", '11"', BAD_VERSION),
    "deb_list": ("vfio_libvirt_deb", ["a.deb"], "vfio_libvirt_deb must be the path of a .deb"),
    "devices_list": ("vfio_libvirt_devices", ["0000:01:00.0"], "vfio_libvirt_devices must be a mapping"),
}
SAME_DEVICE = ("0000:0a:00.0", "0000:0A:00.0")


def bad_plays() -> dict[str, tuple[dict, dict[str, str]]]:
    """case name -> (its variables, {bad entry: what one of its messages must say})."""
    devices: dict = {}
    expect: dict[str, str] = {}
    for name, key in BAD_KEYS.items():
        devices[key] = {}
        expect[name] = f"vfio_libvirt_devices: {json.dumps(key)} {NOT_BDF}"
    for number, (name, (settings, message)) in enumerate(BAD_SETTINGS.items(), 0x10):
        key = f"0000:{number:02x}:00.0"
        devices[key] = settings
        expect[name] = f"vfio_libvirt_devices[{json.dumps(key)}]{message}"
    devices.update({key: {} for key in SAME_DEVICE})
    expect["bdf_twice"] = f"vfio_libvirt_devices: {json.dumps(SAME_DEVICE[1])} is the same device as"
    plays = {"bad_devices": ({"vfio_libvirt_devices": devices}, expect)}
    rounds: list[tuple[dict, dict[str, str]]] = []
    for name, (variable, value, message) in BAD_SCALARS.items():
        free = next((r for r in rounds if variable not in r[0]), None)
        if free is None:
            free = ({}, {})
            rounds.append(free)
        free[0][variable] = value
        free[1][name] = message
    plays.update({f"bad_scalars_{n}": r for n, r in enumerate(rounds)})
    return plays


BAD_PLAYS = bad_plays()
BAD_ENTRIES = {entry: play for play, (_, expect) in BAD_PLAYS.items() for entry in expect}


# doctor: name -> (exit code, stdout)
FINDINGS_OK = [
    {"level": "ok", "what": "IOMMU enabled: 12 IOMMU groups", "fix": ""},
    {"level": "warn", "what": "libvirtd started before the hook was installed",
     "fix": "systemctl reload libvirtd"},
]
FINDINGS_FAIL = [
    *FINDINGS_OK,
    {"level": "fail", "what": "no IOMMU groups: the IOMMU is off", "fix": "boot with intel_iommu=on"},
    {"level": "fail", "what": "domain vm1: 0000:01:00.0 is not a PCI device", "fix": ""},
]
DOCTOR: dict[str, tuple[int, str]] = {
    "doctor_ok": (0, json.dumps(FINDINGS_OK)),
    "doctor_fail": (1, json.dumps(FINDINGS_FAIL)),
    "doctor_config": (2, json.dumps([{"level": "fail", "what": "config x:3: policy.companions: bad",
                                      "fix": "fix the file"}])),
    "doctor_crash": (1, "Traceback (most recent call last):\n  boom"),
}

# --- running Ansible under tmp -----------------------------------------------------------
CASE_TASKS = """\
- name: "case {{ case.name }}"
  block:
    - name: Load the case's variables (every role variable, so none leaks from the case before)
      ansible.builtin.include_vars:
        file: "{{ case.file }}"
    - name: Check the variables
      ansible.builtin.include_role: {name: vfio_libvirt, tasks_from: validate.yml}
      when: case.kind == 'config'
    - name: Write the config
      ansible.builtin.include_role: {name: vfio_libvirt, tasks_from: config.yml}
      when: case.kind == 'config'
    - name: Remember whether it changed
      ansible.builtin.set_fact:
        changes: "{{ [vfio_libvirt_config_result.changed] if case.kind == 'config' else [] }}"
    - name: Write the config again
      ansible.builtin.include_role: {name: vfio_libvirt, tasks_from: config.yml}
      when: case.kind == 'config' and case.twice
    - name: Read doctor
      ansible.builtin.include_role: {name: vfio_libvirt, tasks_from: doctor.yml}
      when: case.kind == 'doctor'
    - name: Record the success
      ansible.builtin.set_fact:
        results: >-
          {{ results | combine({case.name: {'failed': false,
             'changed': changes + ([vfio_libvirt_config_result.changed] if case.twice else [])}}) }}
  rescue:
    - name: Record the failure
      ansible.builtin.set_fact:
        results: >-
          {{ results | combine({case.name: {'failed': true, 'task': ansible_failed_task.name,
             'msg': ansible_failed_result.msg | default('')}}) }}
"""

CASES_PLAY = """\
- name: Every case
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Start with no results
      ansible.builtin.set_fact:
        results: {}
    - name: Run each case
      ansible.builtin.include_tasks: case.yml
      loop: "{{ lookup('ansible.builtin.file', 'cases.json') | from_json }}"
      loop_control:
        loop_var: case
        label: "{{ case.name }}"
    - name: Write the results
      ansible.builtin.copy:
        content: "{{ results | to_nice_json }}"
        dest: "{{ playbook_dir }}/results.json"
        mode: "0644"
"""

# the role's check and config steps alone, as one play would run them
CONFIG_PLAY = """\
- name: Check and write the config
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Check the variables
      ansible.builtin.include_role: {name: vfio_libvirt, tasks_from: validate.yml}
    - name: Write the config
      ansible.builtin.include_role: {name: vfio_libvirt, tasks_from: config.yml}
"""


def ansible_env(home: Path) -> dict[str, str]:
    """Ansible's state, temp files and config all under `home`; no colour, no retry files."""
    (home / "ansible.cfg").write_text("[defaults]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({
        "HOME": str(home), "ANSIBLE_HOME": str(home / ".ansible"),
        "ANSIBLE_CONFIG": str(home / "ansible.cfg"),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp-local"), "ANSIBLE_REMOTE_TEMP": str(home / "tmp-remote"),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"),
        "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3",
        "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
    })
    return env


def playbook(home: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    assert ANSIBLE_PLAYBOOK
    return subprocess.run([ANSIBLE_PLAYBOOK, "-c", "local", "-i", "localhost,", *args],
                          cwd=home, env=ansible_env(home), capture_output=True, text=True,
                          timeout=timeout, check=False)


def role_defaults() -> dict:
    import yaml  # python3-yaml: a dependency of ansible-core, there whenever it is

    return yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())


def config_check_command() -> str:
    """The product's `config check` from this checkout, as the role's validate command."""
    return (f"env PYTHONPATH={shlex.quote(str(REPO))} {shlex.quote(sys.executable)} "
            "-m vfio_libvirt config check --file %s")


def sandbox_vars(home: Path, name: str) -> dict:
    return {
        "vfio_libvirt_config_path": str(home / "configs" / f"{name}.toml"),
        "vfio_libvirt_config_owner": str(os.getuid()),
        "vfio_libvirt_config_group": str(os.getgid()),
        "vfio_libvirt_config_validate": config_check_command(),
        "vfio_libvirt_cli": str(home / "no-such-cli"),
        "vfio_libvirt_reload_libvirt": False,
        "vfio_libvirt_deb_dir": str(home / "deb"),
    }


class Run:
    def __init__(self, home: Path, proc: subprocess.CompletedProcess, results: dict) -> None:
        self.home, self.proc, self.results = home, proc, results

    def config(self, name: str) -> Path:
        return self.home / "configs" / f"{name}.toml"

    def result(self, name: str) -> dict:
        assert name in self.results, f"case {name} did not run:\n{self.describe()}"
        return self.results[name]

    def describe(self) -> str:
        return f"rc={self.proc.returncode}\n{self.proc.stdout[-6000:]}\n{self.proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Run:
    """Every case through the role's task files in one ansible-playbook run."""
    if ANSIBLE_PLAYBOOK is None:
        pytest.skip("ansible-playbook not installed (Debian: apt-get install ansible-core)")
    import yaml

    home = tmp_path_factory.mktemp("ansible")
    (home / "configs").mkdir()
    (home / "cases").mkdir()
    defaults = role_defaults()
    listed = []

    def add(name: str, kind: str, overrides: dict, twice: bool = False) -> None:
        file = home / "cases" / f"{name}.yml"
        variables = {**defaults, **sandbox_vars(home, name), **overrides}
        file.write_text(yaml.safe_dump(variables, sort_keys=False))  # keys of mixed types
        listed.append({"name": name, "kind": kind, "file": str(file), "twice": twice})

    for name, overrides in GOOD.items():
        add(name, "config", overrides, twice=name in TWICE_CASES)
    for name, (overrides, _) in BAD_PLAYS.items():
        add(name, "config", overrides)
    for name, (code, stdout) in DOCTOR.items():
        (home / f"{name}.out").write_text(stdout)
        cli = home / f"{name}-cli"
        cli.write_text(f'#!/bin/sh\n[ "$*" = "doctor --json" ] || exit 99\n'
                       f'cat {shlex.quote(str(home / f"{name}.out"))}\nexit {code}\n')
        cli.chmod(0o755)
        add(name, "doctor", {"vfio_libvirt_cli": str(cli)})
    (home / "cases.json").write_text(json.dumps(listed))
    (home / "case.yml").write_text(CASE_TASKS)
    (home / "cases.yml").write_text(CASES_PLAY)
    proc = playbook(home, "cases.yml")
    results_file = home / "results.json"
    run = Run(home, proc, json.loads(results_file.read_text()) if results_file.exists() else {})
    assert proc.returncode == 0 and run.results, run.describe()
    return run


# --- the playbook -------------------------------------------------------------------------
@needs_ansible
def test_site_playbook_passes_syntax_check(tmp_path):
    proc = playbook(tmp_path, "--syntax-check", str(ANSIBLE / "site.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_ansible
def test_site_playbook_checks_before_it_installs_and_reloads_before_doctor(tmp_path):
    proc = playbook(tmp_path, "--list-tasks", str(ANSIBLE / "site.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tasks = [line.strip().split("\t")[0] for line in proc.stdout.splitlines()
             if line.startswith("      vfio_libvirt : ")]
    names = [t.removeprefix("vfio_libvirt : ") for t in tasks]

    def index(name: str) -> int:
        assert name in names, names
        return names.index(name)

    checks = [i for i, n in enumerate(names) if n.startswith("Check ")]
    render = index("Render the vfio-libvirt host config")
    assert max(checks) < index("Install the .deb") < index("Install the packages vfio-libvirt recommends")
    assert index("Install the packages vfio-libvirt recommends") < render
    assert index("Install vfio-libvirt from the apt sources") < render < index("Run vfio-libvirt doctor")
    assert names[-1] == "Fail on doctor's \"fail\" findings"


def test_role_uses_only_builtin_modules():
    """CI has no galaxy: every module is ansible.builtin.*, spelt out."""
    import re

    files = [ANSIBLE / "site.yml", *sorted((ROLE / "tasks").glob("*.yml")), ROLE / "handlers" / "main.yml"]
    for path in files:
        for line in path.read_text().splitlines():
            match = re.match(r"\s*-?\s*([a-z_]+(?:\.[a-z_]+)*):(?:\s|$)", line)
            if match and "." in match[1]:
                assert match[1].startswith("ansible.builtin."), f"{path}: {line}"


# --- the config it writes -----------------------------------------------------------------
@needs_ansible
@pytest.mark.parametrize("name", list(GOOD))
def test_config_is_written_validated_by_config_check_and_rewritten_by_no_second_run(cases, name):
    result = cases.result(name)
    expected = [True, False] if name in TWICE_CASES else [True]
    assert result == {"failed": False, "changed": expected}, result
    config = Config.load(cases.config(name))
    assert config.problems == ()
    assert cases.config(name).stat().st_mode & 0o777 == 0o644


@needs_ansible
def test_defaults_are_the_products_defaults(cases):
    example = Config.load(REPO / "xml" / "config.toml.example")
    assert Config.load(cases.config("defaults")) == Config() == example
    text = cases.config("defaults").read_text()
    assert "[libvirt]" not in text and "[devices" not in text


@needs_ansible
def test_every_setting_arrives(cases):
    config = Config.load(cases.config("everything"))
    assert (config.bind_timeout, config.restore_timeout, config.companions) == (5.0, 60.0, "bind")
    assert config.libvirt_version == (11, 3, 0)
    nic, audio, gpu = (PciAddress.parse(a) for a in ("0000:06:00.2", "0000:00:1f.3", "0000:01:00.0"))
    assert config.driver_overrides == {nic: "mlx5_vfio_pci", gpu: "vfio-pci"}
    assert config.never_touch == {audio}
    assert config.in_use_allowed == {nic}


@needs_ansible
def test_strings_from_the_command_line_become_numbers(cases):
    config = Config.load(cases.config("strings"))
    assert (config.bind_timeout, config.restore_timeout, config.libvirt_version) == (15.0, 2.5, (10,))
    config = Config.load(cases.config("bounds"))
    assert (config.bind_timeout, config.restore_timeout, config.libvirt_version) == (0.5, 3600.0, (10, 10))


@needs_ansible
def test_an_empty_device_table_and_upper_case_hex(cases):
    config = Config.load(cases.config("empty_device_upper_hex"))
    assert config == Config()  # a table with nothing in it asks for nothing
    assert '[devices."0000:0A:1F.7"]' in cases.config("empty_device_upper_hex").read_text()


# --- the values it refuses ----------------------------------------------------------------
@needs_ansible
@pytest.mark.parametrize("entry", list(BAD_ENTRIES))
def test_bad_value_fails_before_anything_is_written(cases, entry):
    play = BAD_ENTRIES[entry]
    result = cases.result(play)
    assert result["failed"] and result["task"] == "Check the role's variables", result
    messages = result["msg"]
    assert any(BAD_PLAYS[play][1][entry] in m for m in messages), messages
    assert not cases.config(play).exists()


@needs_ansible
@pytest.mark.parametrize("play", list(BAD_PLAYS))
def test_every_mistake_is_reported_once(cases, play):
    """One message per bad entry, none for the good ones beside them."""
    messages = cases.result(play)["msg"]
    assert len(messages) == len(BAD_PLAYS[play][1]), messages


@needs_ansible
def test_an_unquoted_address_in_yaml_is_a_number():
    """Why bdf_unquoted_yaml passes 60.0: YAML 1.1 reads 0000:01:00.0 as base 60."""
    import yaml  # python3-yaml: a dependency of ansible-core

    assert yaml.safe_load("0000:01:00.0: {never_touch: true}") == {60.0: {"never_touch": True}}


@needs_ansible
def test_a_bad_address_fails_the_play(tmp_path):
    bad = {**sandbox_vars(tmp_path, "bad"), "vfio_libvirt_devices": {"0000:zz:00.0": {"never_touch": True}}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "config.yml").write_text(CONFIG_PLAY)
    proc = playbook(tmp_path, "config.yml", "-e", "@bad.json")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f'\\"0000:zz:00.0\\" {NOT_BDF}' in proc.stdout  # in JSON: quotes escaped
    assert "failed=1" in proc.stdout
    assert not (tmp_path / "configs").exists()


# --- doctor -------------------------------------------------------------------------------
@needs_ansible
def test_doctor_with_warnings_only_passes(cases):
    assert cases.result("doctor_ok") == {"failed": False, "changed": []}


@needs_ansible
def test_doctor_failures_fail_the_play_naming_each_with_its_fix(cases):
    result = cases.result("doctor_fail")
    assert result["failed"] and result["task"] == 'Fail on doctor\'s "fail" findings', result
    assert result["msg"] == (
        "vfio-libvirt doctor reports 2 failure(s): "
        "[1] no IOMMU groups: the IOMMU is off (fix: boot with intel_iommu=on); "
        "[2] domain vm1: 0000:01:00.0 is not a PCI device"), result
    result = cases.result("doctor_config")
    assert result["failed"] and "config x:3: policy.companions: bad (fix: fix the file)" in result["msg"]


@needs_ansible
def test_doctor_output_that_is_no_json_fails_the_play(cases):
    result = cases.result("doctor_crash")
    assert result["failed"] and result["task"] == "Run vfio-libvirt doctor", result


# --- the handler's reload -----------------------------------------------------------------
FAKE_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> "$LOG"
case "$1" in
    is-active) for d in $ACTIVE; do [ "$d" = "$3" ] && exit 0; done; exit 3 ;;
    reload) [ "$2" = "$RELOAD_FAILS" ] && exit 1; exit 0 ;;
esac
exit 64
"""
FAKE_PIDOF = """#!/bin/sh
echo "pidof $*" >> "$LOG"
[ "$1" = "$PIDOF_NAME" ] && { echo "$PIDOF_PID"; exit 0; }
exit 1
"""


def reload(tmp_path: Path, systemctl: bool = True, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    """The handler's script with a PATH holding only fakes: nothing real is asked or reloaded."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, text in (("systemctl", FAKE_SYSTEMCTL if systemctl else None), ("pidof", FAKE_PIDOF)):
        if text:
            (fake / name).write_text(text)
            (fake / name).chmod(0o755)
    for tool in ("mkdir", "touch"):     # for the reload marks, in the test's own state dir
        if not (fake / tool).exists():
            (fake / tool).symlink_to(shutil.which(tool))
    log = tmp_path / "calls.log"
    log.write_text("")
    proc = subprocess.run(["/bin/sh", str(RELOAD_SCRIPT)], capture_output=True, text=True, timeout=30,
                          env={"PATH": str(fake), "LOG": str(log),
                               "VFIO_LIBVIRT_STATE_DIR": str(tmp_path / "state"), **env}, check=False)
    return proc, log.read_text()


def reload_marks(tmp_path: Path) -> list[str]:
    """The daemons the script left a reload mark for (doctor reads them)."""
    marks = tmp_path / "state" / "reloaded"
    return sorted(p.name for p in marks.iterdir()) if marks.exists() else []


def test_reload_through_systemd(tmp_path):
    proc, calls = reload(tmp_path, ACTIVE="virtqemud virtnetworkd")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["reloaded virtqemud (systemctl reload)",
                                        "reloaded virtnetworkd (systemctl reload)"]
    assert "systemctl reload virtqemud\n" in calls and "systemctl reload virtnetworkd\n" in calls
    assert "pidof libvirtd" in calls and "pidof virtqemud" not in calls
    assert reload_marks(tmp_path) == ["virtnetworkd", "virtqemud"]


@pytest.mark.parametrize("systemctl", [True, False], ids=["systemd-not-pid-1", "no-systemctl"])
def test_reload_without_systemd_sends_sighup(tmp_path, systemctl):
    """The libvirt tier's guest runs libvirtd by hand: SIGHUP to the pid pidof names."""
    daemon = subprocess.Popen(["/bin/sleep", "60"])  # stands for libvirtd; SIGHUP ends it
    try:
        proc, calls = reload(tmp_path, systemctl, PIDOF_NAME="libvirtd", PIDOF_PID=str(daemon.pid))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [f"sent SIGHUP to libvirtd ({daemon.pid})"]
        assert daemon.wait(timeout=10) == -signal.SIGHUP
        assert "reload" not in calls
        assert reload_marks(tmp_path) == ["libvirtd"]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_reload_with_no_daemon_running_changes_nothing(tmp_path):
    proc, calls = reload(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to reload" in proc.stdout  # the handler's changed_when reads this
    assert "systemctl reload" not in calls
    assert reload_marks(tmp_path) == []


def test_a_failed_reload_fails_the_handler(tmp_path):
    proc, _ = reload(tmp_path, ACTIVE="virtqemud", RELOAD_FAILS="virtqemud")
    assert proc.returncode == 1
    assert "systemctl reload virtqemud failed" in proc.stderr
    assert "nothing to reload" not in proc.stdout
    assert reload_marks(tmp_path) == []
