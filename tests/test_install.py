"""Packaging: kernels/, pipelines/, demos/ install as visattn.kernels/.pipelines/.demos (editable and wheel)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"visattn": "visattn", "visattn/kernels": "kernels", "visattn/pipelines": "pipelines", "visattn/demos": "demos"}
PROBE = ("import json, visattn, visattn.kernels, visattn.pipelines, visattn.demos, visattn.cli; "
         "print(json.dumps({m.__name__: m.__file__ for m in (visattn, visattn.kernels, visattn.pipelines, "
         "visattn.demos)}))")


def _probe(python: str, cwd: Path) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([python, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _source_files() -> list:
    """Files the wheel must carry: git-tracked files under the package folders (else all .py files)."""
    dirs = sorted(set(MAPPED.values()))
    try:
        out = subprocess.run(["git", "ls-files", *dirs], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [f for f in out.split() if (ROOT / f).exists()]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        files = [str(p.relative_to(ROOT)) for d in dirs for p in (ROOT / d).rglob("*.py")]
    return [f for f in files if "__pycache__" not in f and not f.endswith(".pyc")]


def _wheel_name(src: str) -> str:
    top, rest = src.split("/", 1)
    return f"visattn/{rest}" if top == "visattn" else f"visattn/{top}/{rest}"


def test_editable_install_maps_folders(tmp_path):
    files = _probe(sys.executable, tmp_path)
    assert Path(files["visattn.kernels"]).resolve() == ROOT / "kernels" / "__init__.py"
    assert Path(files["visattn.pipelines"]).resolve() == ROOT / "pipelines" / "__init__.py"
    assert Path(files["visattn.demos"]).resolve() == ROOT / "demos" / "__init__.py"


@pytest.mark.slow
def test_wheel_in_fresh_venv(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for d in sorted(set(MAPPED.values())):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    try:
        import build  # noqa: F401

        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check", "--outdir",
               str(dist), str(src)]
    except ImportError:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    wheels = list(dist.glob("visattn-*.whl"))
    assert len(wheels) == 1
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    missing = [f for f in _source_files() if _wheel_name(f) not in names]
    assert not missing, f"files missing from the wheel (add their packages/package-data in pyproject): {missing}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    res = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                          str(wheels[0])], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    files = _probe(py, tmp_path)
    for mod in ("visattn", "visattn.kernels", "visattn.pipelines", "visattn.demos"):
        assert Path(files[mod]).resolve().is_relative_to(venv.resolve()), (mod, files[mod])
    assert Path(files["visattn.kernels"]).parent.name == "kernels"
