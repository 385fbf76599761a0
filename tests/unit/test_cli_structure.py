"""How the CLI modules hang together: imports flow one way, and a start stays cheap."""

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "vfio_libvirt"
COMMAND_MODULES = ("cli_host", "cli_libvirt", "cli_config")
VIRTIO_NET = "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00"


def imported_modules(path: Path) -> set[str]:
    """Every vfio_libvirt module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "vfio_libvirt":
                found.update(f"vfio_libvirt.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("vfio_libvirt")}


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_command_modules_never_import_cli_back(module):
    imports = imported_modules(PACKAGE / f"{module}.py")
    assert "vfio_libvirt.cli" not in imports
    assert "vfio_libvirt.cli_common" in imports


def test_cli_common_imports_no_cli_module():
    imports = imported_modules(PACKAGE / "cli_common.py")
    assert not {i for i in imports if i.startswith("vfio_libvirt.cli")} - {"vfio_libvirt.cli_common"}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), cwd="/", timeout=30)


def test_resolve_and_help_import_neither_lxml_nor_libvirt(tmp_path):
    alias_file = tmp_path / "modules.alias"
    alias_file.write_text("alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n")
    proc = run_python(
        "import sys; from vfio_libvirt.cli import main; "
        f"rc = main(['resolve', '--modalias', {VIRTIO_NET!r}, '--alias-file', {str(alias_file)!r}]); "
        "print(rc, 'lxml' in sys.modules, 'libvirt' in sys.modules)"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 False False"


def test_python_dash_m_and_the_entry_point_are_the_same_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"vfio-libvirt": "vfio_libvirt.cli:main"}
    proc = subprocess.run([sys.executable, "-m", "vfio_libvirt", "--help"], capture_output=True,
                          text=True, check=False, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd="/")
    assert proc.returncode == 0, proc.stderr
    for command in ("resolve", "plan", "restore", "doctor", "adopt"):
        assert command in proc.stdout
