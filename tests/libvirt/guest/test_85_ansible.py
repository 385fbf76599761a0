"""The Ansible role in the guest, against the package test_80 installed: a first run
converges (config rendered, doctor passes), a second run changes nothing."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from tests.libvirt.guest import guest_libvirt as G

pytestmark = pytest.mark.real_sysfs

DEB = Path(os.environ.get("VFIO_LIBVIRT_TEST_DEB", "/nonexistent.deb"))
CONFIG = G.CONFIG_DIR / "config.toml"


def play(tmp: Path) -> tuple[object, dict]:
    """ansible-playbook -c local with the JSON callback; (process, stats for localhost)."""
    env = {**G.clean_env(), "HOME": str(tmp), "ANSIBLE_LOCAL_TEMP": str(tmp / "local"),
           "ANSIBLE_REMOTE_TEMP": str(tmp / "remote"), "ANSIBLE_STDOUT_CALLBACK": "json",
           "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3", "ANSIBLE_NOCOLOR": "1"}
    proc = G.run(["ansible-playbook", "-c", "local", "-i", "localhost,", "ansible/site.yml",
                  "-e", f"vfio_libvirt_deb={DEB}", "-e", "vfio_libvirt_bind_seconds=12"],
                 timeout=600, env=env, cwd=G.REPO)
    try:
        stats = json.loads(proc.stdout)["stats"]["localhost"]
    except (ValueError, KeyError):
        stats = {}
    return proc, stats


def test_the_role_converges_and_a_second_run_changes_nothing(lv, tmp_path):
    assert G.running_domains() == []
    first, stats = play(tmp_path)
    assert first.returncode == 0 and stats.get("failures") == 0, G.describe(first)
    config = tomllib.loads(CONFIG.read_text())
    assert config["timeouts"]["bind_seconds"] == 12, CONFIG.read_text()
    second, stats = play(tmp_path)
    assert second.returncode == 0, G.describe(second)
    assert (stats.get("changed"), stats.get("failures")) == (0, 0), (stats, G.describe(second))
