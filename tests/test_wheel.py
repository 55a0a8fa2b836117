"""A wheel install finds what the package needs: the search spaces and presets ship as package data.

The wheel is built from a copy of the checkout's package files, installed into a fresh virtualenv outside the
checkout (its dependencies reached through a path entry to this environment's site-packages), and every method's
search space and every paper-scale preset (resolved and its plan checked) are loaded from there.
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
import yaml
from rayuda.engine.plan import check_plan
from rayuda.methods import METHODS, plan_of, resolve_config
from rayuda.hpo.space import load_space
home = pathlib.Path(rayuda.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in home.parents, f"rayuda imported from {home}, not the wheel install"
for method in sorted(METHODS):
    space = load_space(method)
    assert space.knobs, method
    print("space", method, space.source)
for path in sorted((home.parent / "presets").glob("*.yaml")):
    cfg = resolve_config(yaml.safe_load(path.read_text())["method"], config_file=path)
    check_plan(plan_of(cfg), cfg)
    print("preset", path.stem, path)
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
    for folder in ("search_spaces", "presets"):
        files = sorted(p.name for p in (ROOT / folder).glob("*.yaml"))
        assert files and all(f"rayuda/{folder}/{name}" in packed for name in files), folder

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
    lines = [line.split() for line in done.stdout.splitlines()]
    for kind, folder in (("space", "search_spaces"), ("preset", "presets")):
        listed = sorted(name for k, name, _ in lines if k == kind)
        assert listed == sorted(p.stem for p in (ROOT / folder).glob("*.yaml")), done.stdout
    assert all(where.startswith(str(venv)) for _, _, where in lines), done.stdout
