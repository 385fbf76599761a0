"""ansible/site.yml applied in the guest with -c local, over the package test_25 installed
with dpkg: the first run converges (the same .deb is left alone, config.toml rendered
from variables and checked, doctor passes under the real libvirtd), the second changes
nothing (changed=0).

Every task costs 15-30 s here (a module's Python start under TCG over 9p), so the role
runs exactly twice; its variables and failures are covered on the host
(tests/unit/test_ansible_role.py).
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.libvirt.guest import guest_libvirt as G

pytestmark = pytest.mark.real_sysfs

CONFIG = G.CONFIG_DIR / "config.toml"
PLAY_TIMEOUT = 600.0
# values other than the defaults, so that the first run must write the config
EXTRA_VARS = {"vfio_libvirt_deb": str(G.DEB), "vfio_libvirt_bind_seconds": 12,
              "vfio_libvirt_restore_seconds": 45}


def play(home: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """ansible-playbook -c local with the JSON callback; (process, the stats of localhost)."""
    env = {**G.clean_env(), "HOME": str(home), "ANSIBLE_LOCAL_TEMP": str(home / "local"),
           "ANSIBLE_REMOTE_TEMP": str(home / "remote"), "ANSIBLE_STDOUT_CALLBACK": "json",
           "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3", "ANSIBLE_PIPELINING": "1",
           "ANSIBLE_NOCOLOR": "1"}
    proc = G.run(["ansible-playbook", "-c", "local", "-i", "localhost,", "ansible/site.yml",
                  "-e", json.dumps(EXTRA_VARS)], timeout=PLAY_TIMEOUT, env=env, cwd=G.REPO)
    try:
        stats = json.loads(proc.stdout)["stats"]["localhost"]
    except (ValueError, KeyError, TypeError):
        stats = {}
    return proc, stats


def changed_tasks(proc: subprocess.CompletedProcess) -> list[str]:
    """The names of the tasks that reported a change (for the failure message)."""
    try:
        plays = json.loads(proc.stdout)["plays"]
    except (ValueError, KeyError, TypeError):
        return ["(no JSON output)"]
    return [task["task"]["name"] for p in plays for task in p["tasks"]
            if task["hosts"].get("localhost", {}).get("changed")]


def test_the_role_converges_and_a_second_run_changes_nothing(lv, devices, tmp_path):
    assert G.installed_cli() == G.PACKAGE_CLI, "test_25 installed the package"
    first, stats = play(tmp_path)
    assert first.returncode == 0 and stats.get("failures") == 0, G.describe(first)
    assert stats.get("changed", 0) >= 1, ("the config differs from the defaults", stats)
    config = tomllib.loads(CONFIG.read_text())
    assert config["timeouts"] == {"bind_seconds": 12, "restore_seconds": 45}, CONFIG.read_text()
    check = G.vfio_libvirt("config", "check")
    assert check.returncode == 0, G.describe(check)
    # the role's doctor step ran against the real daemon and found no failure
    assert "vfio-libvirt doctor: no failure" in first.stdout, G.describe(first)

    second, stats = play(tmp_path)
    assert second.returncode == 0, G.describe(second)
    assert (stats.get("changed"), stats.get("failures")) == (0, 0), (stats, changed_tasks(second))
    assert G.installed_cli() == G.PACKAGE_CLI
