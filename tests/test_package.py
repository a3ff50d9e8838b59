"""`lsq` is an installable package: a wheel of the library alone, with its dependencies and a
console script `lsq` that is `python -m lsq`. Built offline from a copy of the checkout (no build
isolation, so nothing is downloaded, and nothing is written into the checkout)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_builds_a_wheel_of_the_library_with_an_lsq_command(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "requirements-dev.txt", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lsq", src / "lsq", ignore=shutil.ignore_patterns("__pycache__"))
    for extra in ("app_pages", "bench"):  # the flat layout that made setuptools refuse to guess
        shutil.copytree(ROOT / extra, src / extra, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(wheels)]
    subprocess.run(build, check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = wheels.glob("lsq_explorer-*.whl")
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
        meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
        entry = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
    assert tops == {"lsq", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    assert "lsq = lsq.cli:main" in entry
    runtime = [ln.split("==")[0] for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    for dep in (d for d in runtime if d and not d.startswith("#")):
        assert f"Requires-Dist: {dep}" in meta, dep

    target = tmp_path / "site"
    install = [*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(target)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, timeout=300)
    script = target / "bin" / "lsq"
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, str(script), "--help"], env=env, capture_output=True, text=True,
        timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "usage: lsq" in out.stdout or "usage:" in out.stdout
    assert str(target) in subprocess.run(
        [sys.executable, "-c", "import lsq; print(lsq.__file__)"], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
