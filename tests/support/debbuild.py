"""Build the Debian package from the working tree, for the package test and the libvirt
tier (which installs it in its guest)."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "vfio-libvirt"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class BuildFailed(RuntimeError):
    pass


def can_build() -> bool:
    return shutil.which("dpkg-buildpackage", path=CLEAN_PATH) is not None


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked and new files, not ignored ones)."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=False)
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            src = REPO / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
        return
    shutil.copytree(REPO, dest, dirs_exist_ok=True, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".pybuild", "build", "*.egg-info", "__pycache__", ".ruff_cache", ".pytest_cache"))


def build(top: Path) -> tuple[Path, str]:
    """`dpkg-buildpackage -us -uc -b` on a copy of the tree in top/src; (the .deb, the log)."""
    src = top / "src"
    src.mkdir()
    copy_tree(src)
    env = {"PATH": CLEAN_PATH, "HOME": str(top), "LC_ALL": "C.UTF-8", "TMPDIR": str(top)}
    proc = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=env,
                          capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise BuildFailed(f"dpkg-buildpackage -us -uc -b failed ({proc.returncode}):\n{log[-6000:]}")
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    deb = top / f"{PACKAGE}_{version}_all.deb"
    if not deb.is_file():
        raise BuildFailed(f"no {deb.name} next to the source tree: {sorted(p.name for p in top.iterdir())}")
    return deb, log
