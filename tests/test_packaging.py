"""pfcam as a package: the pins the requirements files and pyproject.toml share, and (slow) a real
``pip install`` from a copy of the tree, used from another folder: ``pfcam --help``, ``--version`` and an export
of a bundled example photo with a bundled demo model, both found inside the installed copy."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from pfnet.version import __version__

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCES = (".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".venv", "cam_exports", "runs",
               "tests", "docs")


def requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_requirements_files_and_pyproject_share_their_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dynamic = project["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "pfnet.version.__version__"}
    core = dynamic["dependencies"]["file"]
    extras = {name: spec["file"] for name, spec in dynamic["optional-dependencies"].items()}
    assert set(extras) == {"app", "test", "ray"}
    # the README's commands install what the app and the tests need, from the same files
    assert requirement_lines(ROOT / "requirements.txt") == [f"-r {name}" for name in core + extras["app"]]
    assert requirement_lines(ROOT / "requirements-test.txt") == \
        ["-r requirements.txt"] + [f"-r {name}" for name in extras["test"] if name not in extras["app"]]
    for name in core + [file for files in extras.values() for file in files]:
        lines = requirement_lines(ROOT / name)
        assert lines and not any(line.startswith("-") for line in lines), name  # setuptools reads them plainly
    assert any(line.startswith("streamlit") for line in requirement_lines(ROOT / extras["app"][0]))


def inherit_site_packages(venv: Path) -> None:
    """Let the new venv see this interpreter's packages (torch and the rest) without installing them again:
    a venv made from a venv gets the base installation's packages, not those of the venv it was made from."""
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    paths = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    Path(purelib, "pfcam_test_inherit.pth").write_text("\n".join(dict.fromkeys(paths)) + "\n")


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="venv layout (bin/) of POSIX")
def test_pip_install_gives_a_working_pfcam_from_any_folder(tmp_path: Path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    inherit_site_packages(venv)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PFCAM_OFFLINE="1", PFCAM_CACHE=str(tmp_path / "cache"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "--no-deps", "--no-build-isolation", "--no-index", str(source)],
                             capture_output=True, text=True, env=env, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def pfcam(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "pfcam"), *args], cwd=elsewhere, capture_output=True, text=True,
                              env=env, timeout=900)

    done = pfcam("--help")
    assert done.returncode == 0, done.stderr
    assert all(command in done.stdout for command in ("app", "export", "bench-loc", "train-demo"))
    assert pfcam("--version").stdout.strip() == f"pfcam {__version__}"

    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import pfnet\nfrom pfnet.assets import assets_dir\n"
                            "print(pfnet.__file__)\nprint(assets_dir())"],
                           cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)
    assert where.returncode == 0, where.stderr
    package_file, assets = (Path(line) for line in where.stdout.split())
    assert venv in package_file.parents and venv in assets.parents  # the installed copy, not the checkout
    photo = assets / "examples" / "coffee.jpg"
    assert photo.is_file() and (assets / "weights" / "demo_r50.safetensors").is_file()

    out = elsewhere / "out"
    done = pfcam("export", str(photo), "--out", str(out), "--models", "demo_r50", "--layers", "layer4",
                 "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["pfcam"] == __version__
    assert [(row["model"], row["layer"], row["status"]) for row in manifest["rows"]] == [
        ("demo_r50", "layer4", "computed")]
    assert manifest["settings"]["models"]["demo_r50"]["cam_offsets"]  # the card's offsets came along
    assert (out / manifest["rows"][0]["overlay"]).is_file()
