"""A wheel install finds what the package needs: the search spaces ship as package data.

The wheel is built from a copy of the checkout's package files, installed into a fresh virtualenv outside the
checkout (its dependencies reached through a path entry to this environment's site-packages), and every method's
search space is loaded from there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import pathlib, sys
import rayuda
from rayuda.methods import METHODS
from rayuda.search import load_space
home = pathlib.Path(rayuda.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in home.parents, f"rayuda imported from {home}, not the wheel install"
for method in sorted(METHODS):
    space = load_space(method)
    assert space.knobs, method
    print(method, len(space.knobs), space.source)
"""


def test_a_wheel_install_outside_the_checkout_loads_every_search_space(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "rayuda", source / "rayuda", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(source), "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("rayuda-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    spaces = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert spaces and all(f"rayuda/search_spaces/{name}" in packed for name in spaces)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, cwd=tmp_path)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, yaml, ... from here
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    listed = [line.split()[0] for line in done.stdout.splitlines()]
    assert sorted(listed) == sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml")), loaded
    assert all(str(venv) in line for line in done.stdout.splitlines()), done.stdout
