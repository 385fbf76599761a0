"""`resolve` and `hostdevs` from the command line: output contract, exit codes, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.aliasgen import generate
from tests.unit.test_domain import BILLION_LAUGHS, DOMAIN, XXE
from vfio_libvirt.cli import main

REPO = Path(__file__).resolve().parents[2]
VIRTIO_NET = "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00"
UNKNOWN = "pci:v0000ABCDd00001234sv00000000sd00000000bc02sc00i00"


@pytest.fixture
def modules(tmp_path, monkeypatch):
    mdir = tmp_path / "modules"
    mdir.mkdir()
    (mdir / "modules.alias").write_text(generate())
    monkeypatch.setenv("VFIO_LIBVIRT_MODULES_DIR", str(mdir))
    return mdir


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "vfio_libvirt", *args],
        input=stdin, capture_output=True, env=env, timeout=20, check=False,
    )


def test_resolve_modalias_json(modules, capsys):
    assert main(["resolve", "--modalias", VIRTIO_NET, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "modalias": VIRTIO_NET,
        "module": "virtio_vfio_pci",
        "alias": "vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i*",
        "wildcards": 5,
        "candidates": [
            {"module": "virtio_vfio_pci", "alias": "vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i*",
             "wildcards": 5},
            {"module": "vfio_pci", "alias": "vfio_pci:v*d*sv*sd*bc*sc*i*", "wildcards": 7},
        ],
    }


def test_resolve_human_output_ranks_candidates(modules, capsys):
    assert main(["resolve", "--modalias", VIRTIO_NET]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"modalias: {VIRTIO_NET}"
    assert lines[1].split()[:4] == ["*", "1.", "virtio_vfio_pci", "5"]
    assert lines[2].split()[:3] == ["2.", "vfio_pci", "7"]


def test_resolve_no_match_exits_1_with_null_module(tmp_path, capsys):
    alias_file = tmp_path / "only-virtio.alias"
    alias_file.write_text("alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_vfio_pci\n")
    assert main(["resolve", "--modalias", UNKNOWN, "--alias-file", str(alias_file), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["module"] is None
    assert "no VFIO driver alias matches" in captured.err
    assert captured.err.count("\n") == 1


def test_resolve_bdf_reads_modalias_from_sysfs_root(modules, capsys):
    dev = Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"]) / "sys/bus/pci/devices/0000:00:10.0"
    dev.mkdir(parents=True)
    (dev / "modalias").write_text(VIRTIO_NET + "\n")
    assert main(["resolve", "0000:00:10.0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["module"] == "virtio_vfio_pci"


@pytest.mark.parametrize(
    "args",
    [
        ["resolve", "0000:00:99.0"],
        ["resolve", "../../etc"],
        ["resolve", "0000:00:10.0"],  # well-formed but absent
        ["resolve"],
        ["resolve", "0000:00:10.0", "--modalias", VIRTIO_NET],
        ["resolve", "--modalias", "pci:v*; rm -rf /"],
        ["hostdevs"],
        ["hostdevs", "--xml", "/nonexistent.xml"],
        ["no-such-command"],
    ],
)
def test_bad_input_exits_2_with_one_line(modules, capsys, args):
    with pytest.raises(SystemExit) as exc:
        rc = main(args)
        raise SystemExit(rc)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_hostdevs_json_from_stdin():
    proc = run_cli("hostdevs", "--xml", "-", "--json", stdin=DOMAIN)
    assert proc.returncode == 0, proc.stderr
    assert [d["address"] for d in json.loads(proc.stdout)] == [
        "0000:06:12.5", "0002:03:00.1", "0000:06:12.6"
    ]


def test_hostdevs_human(tmp_path, capsys):
    path = tmp_path / "d.xml"
    path.write_bytes(DOMAIN)
    assert main(["hostdevs", "--xml", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["0000:06:12.5", "hostdev", "managed"]
    assert out[2].split() == ["0000:06:12.6", "hostdev", "unmanaged", "model=mlx5_vfio_pci"]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("billion-laughs", BILLION_LAUGHS),
        ("xxe", XXE),
        ("20MB", b"<domain><name>x</name>" + b"<!-- -->" * (20 * 1024 * 1024 // 8) + b"</domain>"),
        ("non-utf8", b"<domain><name>\xc3\x28</name></domain>"),
        ("bus-traversal", DOMAIN.replace(b"bus='0x06'", b"bus='../..'")),
        ("function-8", DOMAIN.replace(b"function='0x5'", b"function='8'")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_hostile_xml_exits_2_with_one_line_and_no_traceback(name, data):
    proc = run_cli("hostdevs", "--xml", "-", "--json", stdin=data)
    assert proc.returncode == 2, (name, proc.stderr)
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("vfio-libvirt: error:"), err
    assert "Traceback" not in err and "root:" not in err
