"""The built sdist and wheel: complete, and importable from a fresh virtual environment."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import idemclient

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
         "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out


def test_wheel_contents_and_metadata(dist: Path) -> None:
    (wheel,) = dist.glob("idemclient-*.whl")
    assert wheel.name.startswith(f"idemclient-{idemclient.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "idemclient/py.typed" in names
        assert "idemclient/testing.py" in names
        for module in ("__init__", "_decide", "_owner", "_sqlite"):  # the journal subpackage
            assert f"idemclient/journal/{module}.py" in names, module
        assert not any(n.startswith("tests/") for n in names)
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(metadata_name).decode()
        entry_points = zf.read(metadata_name.replace("METADATA", "entry_points.txt")).decode()
    assert f"Version: {idemclient.__version__}" in metadata
    assert "License-Expression: MIT" in metadata
    assert "Requires-Python: >=3.10" in metadata
    for dependency in ("httpx", "tenacity", "platformdirs"):
        assert f"Requires-Dist: {dependency}" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    assert "# idemclient" in metadata  # the README is the long description
    assert "idemclient = idemclient._cli:run" in entry_points


def test_sdist_contents(dist: Path) -> None:
    (sdist,) = dist.glob("idemclient-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    expected = ["pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "idemclient/py.typed",
                "idemclient/_core.py", "tests/conftest.py", "examples/quickstart.py"]  # fmt: skip
    for name in expected:
        assert name in names, name


def test_wheel_imports_in_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("idemclient-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    # Dependencies come from this environment's site-packages; idemclient itself must come
    # from the wheel (a path entry does not read the editable install's .pth file).
    deps = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": deps, "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    code = (
        "import idemclient, pathlib, sys; "
        "p = pathlib.Path(idemclient.__file__).parent; "
        "assert (p / 'py.typed').exists(); "
        "assert str(p).startswith(sys.prefix), p; "
        "print(idemclient.__version__)"
    )
    result = subprocess.run(
        [str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == idemclient.__version__
    script = subprocess.run(
        [str(venv / "bin" / "idemclient"), "--help"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert script.returncode == 0, script.stderr
    assert "exit status" in script.stdout
