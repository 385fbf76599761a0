"""A mistyped host config from the command line: `config check`, doctor, and which
commands refuse it (plan, bind, attach) or warn and go on (restore, status, detach)."""

import json
import os
from pathlib import Path

import pytest

from tests.unit.conftest import E1000, NIC, domain_xml, pci, run_hook
from vfio_libvirt.cli import main

# the sim fixture's config, then two mistakes a hand-edited file really has
SIM_CONFIG = '[libvirt]\nversion = "11.3.0"\n[timeouts]\nbind_seconds = 2\nrestore_seconds = 2\n'
TYPOS = SIM_CONFIG + 'bind_second = 5\n[devices."0000:00:11.0"]\nnever_touch = "true"\n'
#                                  line 6                   line 7, 8


def config_path() -> Path:
    return Path(os.environ["VFIO_LIBVIRT_CONFIG"])


def expected_problems() -> list[str]:
    path = config_path()
    return [
        f"{path}:6: timeouts.bind_second: unknown key (known: bind_seconds, restore_seconds); ignored",
        f'{path}:8: devices."0000:00:11.0".never_touch: must be true or false, got \'true\' '
        "(a string); the device is never touched",
    ]


def test_config_check_lists_each_problem_with_its_line_and_exits_2(capsys):
    config_path().write_text(TYPOS)
    assert main(["config", "check"]) == 2
    out = capsys.readouterr().out
    assert out.splitlines() == expected_problems()


def test_config_check_json(capsys):
    config_path().write_text(TYPOS)
    assert main(["config", "check", "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["error"] is None
    assert [(p["line"], p["key"]) for p in report["problems"]] == [
        (6, "timeouts.bind_second"), (8, 'devices."0000:00:11.0".never_touch')]


def test_config_check_ok_and_other_file(tmp_path, capsys):
    config_path().write_text(SIM_CONFIG)
    assert main(["config", "check"]) == 0
    assert capsys.readouterr().out == f"config {config_path()}: ok\n"
    other = tmp_path / "other.toml"
    other.write_text("[policy]\ncompanions = 'bind'\n")
    assert main(["config", "check", "--file", str(other)]) == 0
    assert capsys.readouterr().out == f"config {other}: ok\n"


@pytest.mark.parametrize("args", [["config", "check", "--file", "/nonexistent.toml"],
                                  ["config", "check"], ["config"]])
def test_config_check_unparseable_or_missing_file_exits_2_with_one_line(capsys, args):
    config_path().write_text("[timeouts\nbind_seconds = 2\n")
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("vfio-libvirt")


def test_config_check_absent_default_file_is_the_defaults(capsys):
    assert not config_path().exists()
    assert main(["config", "check"]) == 0
    assert "ok (no such file: the defaults apply)" in capsys.readouterr().out


@pytest.fixture
def xml_file(tmp_path):
    path = tmp_path / "domain.xml"
    path.write_bytes(domain_xml("vm1", pci(NIC)))
    return str(path)


@pytest.mark.parametrize("args", [["bind", NIC], ["plan", "--xml", "XML"], ["attach", "vm1", NIC]])
def test_changing_commands_refuse_a_mistyped_config_before_any_write(sim, capsys, xml_file, args):
    config_path().write_text(TYPOS)
    args = [xml_file if a == "XML" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"vfio-libvirt: error: {expected_problems()[0]} (and 1 more)\n"
    assert sim.writes == []
    assert sim.driver_of(NIC) == "virtio-pci"


def test_restore_warns_about_each_problem_once_and_restores(sim, capsys):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC), pci(E1000))) == 0
    assert sim.driver_of(E1000) == "vfio-pci"
    config_path().write_text(TYPOS)  # edited while the VM runs
    capsys.readouterr()
    assert main(["restore", "--domain", "vm1"]) == 0
    captured = capsys.readouterr()
    assert sim.driver_of(NIC) == "virtio-pci" and sim.driver_of(E1000) == "e1000e"
    warnings = captured.err.splitlines()
    assert len(warnings) == 2, captured.err
    for line, problem in zip(warnings, expected_problems(), strict=True):
        assert line.startswith("vfio-libvirt: warning: ") and problem in line
    assert captured.out == "restored every device of vm1\n"


def test_restore_with_a_config_that_is_not_toml_uses_the_defaults(sim, capsys):
    assert run_hook("vm1", "prepare", "begin", domain_xml("vm1", pci(NIC))) == 0
    config_path().write_text("[timeouts\n")
    capsys.readouterr()
    assert main(["restore", "--all"]) == 0
    assert sim.driver_of(NIC) == "virtio-pci"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config {config_path()}: not valid TOML" in err


@pytest.mark.parametrize("text", [TYPOS, "[timeouts\n"], ids=["typos", "not-toml"])
def test_status_warns_and_still_reports(sim, capsys, text):
    assert main(["bind", E1000]) == 0
    config_path().write_text(text)
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    captured = capsys.readouterr()
    assert [d["address"] for d in json.loads(captured.out)["devices"]] == [E1000]
    lines = captured.err.splitlines()
    assert lines and all(line.startswith("vfio-libvirt: warning: ") for line in lines)
    assert len(lines) == (2 if text == TYPOS else 1)


def test_doctor_reports_config_problems_as_failures_with_lines_and_exits_2(sim, tmp_path, capsys):
    config_path().write_text(TYPOS)
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    assert main(["doctor", "--json", "--hook", str(hook), "--connect", "test:///default"]) == 2
    captured = capsys.readouterr()
    findings = json.loads(captured.out)
    config = [f for f in findings if f["what"].startswith("config ")]
    assert [(f["level"], f["what"]) for f in config] == [
        ("fail", f"config {p}") for p in expected_problems()]
    assert config[0]["fix"] == f"edit {config_path()} line 6, then: vfio-libvirt config check"
    assert captured.err == ""  # the findings say it all; no warnings repeating them


def test_doctor_with_a_config_that_is_not_toml_still_checks_everything(sim, tmp_path, capsys):
    config_path().write_text("[timeouts\n")
    assert main(["doctor", "--json", "--hook", str(tmp_path / "none")]) == 2
    findings = json.loads(capsys.readouterr().out)
    (toml,) = [f for f in findings if "not valid TOML" in f["what"]]
    assert toml["level"] == "fail" and toml["what"].startswith(f"config {config_path()}: ")
    assert any(f["what"].startswith("IOMMU enabled") for f in findings)


def test_doctor_says_the_config_is_fine(sim, tmp_path, capsys):
    main(["doctor", "--json", "--hook", str(tmp_path / "none")])
    findings = json.loads(capsys.readouterr().out)
    assert {"level": "ok", "what": f"config {config_path()}: no problems", "fix": ""} in findings
