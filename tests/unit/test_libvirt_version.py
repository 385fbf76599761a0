"""The hook learns libvirt's version from the daemon binary, never from a connection."""

from pathlib import Path

import pytest

from vfio_libvirt import libvirt_version
from vfio_libvirt.config import Config


@pytest.mark.parametrize(("text", "expected"), [
    ("libvirtd (libvirt) 11.3.0\n", (11, 3, 0)),
    ("virtqemud (libvirt) 9.0.0", (9, 0, 0)),
    ("garbage", None),
])
def test_parse_version_output(text, expected):
    assert libvirt_version.parse_version_output(text) == expected


def fake_daemon(tmp_path: Path, version: str) -> Path:
    counter = tmp_path / "calls"
    daemon = tmp_path / "virtqemud"
    daemon.write_text(f"#!/bin/sh\necho x >> {counter}\necho 'virtqemud (libvirt) {version}'\n")
    daemon.chmod(0o755)
    return daemon


def test_config_wins_and_nothing_is_run(tmp_path, monkeypatch):
    monkeypatch.setattr(libvirt_version, "daemon_candidates", lambda: [fake_daemon(tmp_path, "9.0.0")])
    assert libvirt_version.detect(Config(libvirt_version=(10, 5, 0)), tmp_path) == ((10, 5, 0), "config")
    assert not (tmp_path / "calls").exists()


def test_daemon_version_is_read_once_and_cached(tmp_path, monkeypatch):
    daemon = fake_daemon(tmp_path, "11.3.0")
    monkeypatch.setattr(libvirt_version, "daemon_candidates", lambda: [tmp_path / "missing", daemon])
    cache = tmp_path / "state"
    assert libvirt_version.detect(Config(), cache) == ((11, 3, 0), f"{daemon} --version")
    assert libvirt_version.detect(Config(), cache) == ((11, 3, 0), f"{daemon} --version (cached)")
    assert (tmp_path / "calls").read_text().count("x") == 1


def test_no_daemon_means_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(libvirt_version, "daemon_candidates", lambda: [tmp_path / "none"])
    assert libvirt_version.detect(Config(), tmp_path) == (None, "no libvirt daemon found")


def test_parent_process_is_the_first_guess(tmp_path):
    proc = tmp_path / "proc"
    import os
    (proc / str(os.getppid())).mkdir(parents=True)
    os.symlink("/usr/sbin/libvirtd", proc / str(os.getppid()) / "exe")
    assert libvirt_version.daemon_candidates(proc)[0] == Path("/usr/sbin/libvirtd")
