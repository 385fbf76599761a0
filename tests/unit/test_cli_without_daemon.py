"""The CLI on a host where something is missing: no IOMMU, no libvirt-python, no daemon.

What scripts and Ansible rely on here is the exit code and stderr: a `fail` finding
exits non-zero, and an error is one line — ours, not libvirt's own printout as well.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vfio_libvirt.cli import main

REPO = Path(__file__).resolve().parents[2]
NO_DAEMON = "qemu+unix:///system?socket=/nonexistent"
NIC = "0000:00:10.0"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """A separate process: libvirt's default error handler writes to fd 2 from C."""
    return subprocess.run([sys.executable, "-m", "vfio_libvirt", *args], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd="/",
                          timeout=60, check=False)


@pytest.fixture
def installed_hook(tmp_path) -> str:
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    return str(hook)


# --- doctor on a host without an IOMMU (the sandbox has none) -----------------------------
@pytest.mark.parametrize("extra", [[], ["--json"], ["--connect", NO_DAEMON],
                                   ["--json", "--connect", NO_DAEMON]],
                         ids=["text", "json", "no-daemon", "json-no-daemon"])
def test_doctor_without_iommu_exits_1(installed_hook, extra):
    proc = run_cli("doctor", "--hook", installed_hook, *extra)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    if "--json" in extra:
        levels = {f["what"]: f["level"] for f in json.loads(proc.stdout)}
        assert levels["no IOMMU groups: the IOMMU is off"] == "fail"
    else:
        assert "[fail] no IOMMU groups: the IOMMU is off" in proc.stdout


def test_doctor_exit_code_follows_the_worst_finding(mocker, capsys):
    from vfio_libvirt import cli_libvirt
    from vfio_libvirt.cli_libvirt import Finding

    for findings, code in (([Finding("ok", "a")], 0), ([Finding("ok", "a"), Finding("warn", "b")], 0),
                           ([Finding("warn", "b"), Finding("fail", "c")], 1),
                           ([Finding("fail", "c"), Finding("fail", "config x", bad_input=True)], 2)):
        mocker.patch.object(cli_libvirt, "doctor", return_value=findings)
        assert main(["doctor"]) == code
        assert main(["doctor", "--json"]) == code
    capsys.readouterr()


# --- libvirt-python present, daemon absent: one line on stderr, ours --------------------------
@pytest.mark.parametrize("args", [["plan", "vm1", "--connect", NO_DAEMON],
                                  ["attach", "vm1", NIC, "--connect", NO_DAEMON]])
def test_an_unreachable_daemon_is_one_line_on_stderr(args):
    pytest.importorskip("libvirt")
    proc = run_cli(*args)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("vfio-libvirt: error: cannot connect to libvirt")


@pytest.mark.parametrize("args", [["status"], ["doctor", "--json"]])
def test_status_and_doctor_report_an_unreachable_daemon_without_libvirts_printout(args):
    pytest.importorskip("libvirt")
    proc = run_cli(*args, "--connect", NO_DAEMON)
    assert proc.stderr == ""
    assert "Failed to connect socket to '/nonexistent'" in proc.stdout


# --- libvirt-python missing: the hint fits the command -----------------------------------------
@pytest.fixture
def no_libvirt(monkeypatch):
    monkeypatch.setitem(sys.modules, "libvirt", None)  # `import libvirt` raises ImportError


def test_plan_without_libvirt_python_suggests_xml(no_libvirt, capsys):
    assert main(["plan", "vm1"]) == 1
    err = capsys.readouterr().err
    assert err == ("vfio-libvirt: error: libvirt-python is not installed "
                   "(Debian: apt install python3-libvirt); or pass --xml FILE\n")


def test_test_hook_without_libvirt_python_suggests_xml(no_libvirt, installed_hook, capsys):
    assert main(["test-hook", "vm1", "prepare", "--hook", installed_hook]) == 1
    assert capsys.readouterr().err.endswith("; or pass --xml FILE\n")


@pytest.mark.parametrize("args", [["adopt", "vm1"], ["attach", "vm1", NIC], ["detach", "vm1", NIC]])
def test_commands_without_xml_get_the_install_hint_alone(no_libvirt, capsys, args):
    assert main(args) == 1
    assert capsys.readouterr().err == ("vfio-libvirt: error: libvirt-python is not installed "
                                       "(Debian: apt install python3-libvirt)\n")


def test_doctor_and_status_without_libvirt_python_name_no_xml_option(no_libvirt, installed_hook, capsys):
    main(["doctor", "--json", "--hook", installed_hook])
    findings = json.loads(capsys.readouterr().out)
    (listing,) = [f["what"] for f in findings if f["what"].startswith("cannot list domains")]
    assert listing.endswith("libvirt-python is not installed (Debian: apt install python3-libvirt)")
    assert main(["status", "--json"]) == 0
    note = json.loads(capsys.readouterr().out)["libvirt"]
    assert note == "not consulted (libvirt-python is not installed (Debian: apt install python3-libvirt))"
