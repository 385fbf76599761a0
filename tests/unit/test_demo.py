"""The README's demo: its pure parts (plan reasons, the table, the verdict, progress
following) and the ./demo script's shape.  The demo itself boots a QEMU guest and is
not run here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.vm import demo

REPO = Path(__file__).resolve().parents[2]
VIRTIO_WHY = ("vlt_virtio_vfio_pci: alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i*, 5 wildcards, "
              "beats vlt_vendor_vfio_pci with 6")
E1000E_WHY = "vfio_pci: alias vfio_pci:v*d*sv*sd*bc*sc*i*, 7 wildcards (no variant driver matches)"


def _row(address="0000:00:10.0", name="virtio-net", before="virtio-pci", during="vlt-virtio-vfio",
         after="virtio-pci", **extra):
    return {"address": address, "name": name, "before": before, "during": during, "after": after,
            "why": VIRTIO_WHY, "during_vfio": True, "held": True, "override_after": "(null)", **extra}


def test_reasons_from_plan_json():
    plan = {"steps": [
        {"address": "0000:00:10.0", "action": "bind", "module": "vlt_virtio_vfio_pci", "reason": VIRTIO_WHY},
        {"address": "0000:00:11.0", "action": "keep", "module": "vfio_pci", "reason": "already on vfio-pci"},
        {"address": "0000:00:12.0", "action": "skip", "module": None, "reason": "never_touch"},
    ], "problems": []}
    assert demo.reasons_by_address(plan) == {
        "0000:00:10.0": VIRTIO_WHY,
        "0000:00:11.0": "already on vfio-pci",
        "0000:00:12.0": "skip: never_touch",
    }


def test_a_refusal_names_its_device():
    plan = {"steps": [{"address": "0000:00:10.0", "action": "bind", "reason": VIRTIO_WHY}],
            "problems": ["0000:00:10.0: in use by domain other"]}
    assert demo.reasons_by_address(plan) == {
        "0000:00:10.0": "refused: 0000:00:10.0: in use by domain other"}


def test_table_lines_up_and_leaves_why_unpadded():
    rows = [_row(), _row(address="0000:00:11.0", name="e1000e", before="e1000e", during="vfio-pci",
                         after="e1000e", why=E1000E_WHY)]
    lines = demo.render_table(rows).splitlines()
    assert lines == [
        "device                   before      during (vm running)  after       why",
        f"0000:00:10.0 virtio-net  virtio-pci  vlt-virtio-vfio      virtio-pci  {VIRTIO_WHY}",
        f"0000:00:11.0 e1000e      e1000e      vfio-pci             e1000e      {E1000E_WHY}",
    ]


def test_table_shows_a_missing_driver_and_reason():
    line = demo.render_table([_row(during=None, why=None)]).splitlines()[1]
    assert line.split() == ["0000:00:10.0", "virtio-net", "virtio-pci", "(none)", "virtio-pci", "?"]


def test_verdict_ok_when_vfio_during_and_home_after():
    assert demo.problems([_row(), _row(address="0000:00:11.0", name="e1000e", before="e1000e",
                                       during="vfio-pci", after="e1000e")]) == []


@pytest.mark.parametrize(("change", "expected"), [
    ({"during_vfio": False, "during": "virtio-pci"},
     "not on a VFIO driver while the domain ran (virtio-pci)"),
    ({"held": False}, "on vlt-virtio-vfio, but the domain's QEMU did not have it open"),
    ({"after": "vlt-virtio-vfio"}, "on vlt-virtio-vfio after the domain stopped, not virtio-pci"),
    ({"after": None}, "on None after the domain stopped, not virtio-pci"),
    ({"override_after": "vlt-virtio-vfio"}, "driver_override 'vlt-virtio-vfio' left behind"),
    ({"during_vfio": None, "after": None, "held": None},     # the run stopped half-way
     "not on a VFIO driver while the domain ran (vlt-virtio-vfio)"),
])
def test_verdict_names_each_fault(change, expected):
    found = demo.problems([_row(**change)])
    assert found[0] == f"0000:00:10.0 virtio-net: {expected}"


def test_verdict_fails_without_devices():
    assert demo.problems([]) == ["no device was recorded"]


def test_line_follower_returns_only_complete_new_lines(tmp_path):
    path = tmp_path / "progress"
    follow = demo.LineFollower(path)
    assert follow.new_lines() == []            # not there yet
    path.write_text("guest up\nstarting libv")
    assert follow.new_lines() == ["guest up"]
    assert follow.new_lines() == []
    with path.open("a") as f:
        f.write("irtd\nvirsh start vlt-demo\n")
    assert follow.new_lines() == ["starting libvirtd", "virsh start vlt-demo"]


def test_guest_side_refuses_outside_the_guest(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.H, "in_guest", lambda: False)
    with pytest.raises(RuntimeError, match="refusing to touch sysfs"):
        demo.main(["--guest", str(tmp_path)])
    assert not (tmp_path / "result.json").exists()


def test_demo_script_is_executable_and_parses():
    script = REPO / "demo"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout
