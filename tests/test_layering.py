"""The layers point one way (pfnet <- cams <- pfdemo <- pfcam_app <- pfcam), and no module imports another
module's private names. docs/ARCHITECTURE.md explains both."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pfnet", "cams", "pfdemo", "pfcam_app", "pfcam")
#: What each package may import from the project (itself included). pfcam_app runs under Streamlit, which the
#: layers below never import.
ALLOWED = {
    "pfnet": {"pfnet"},
    "cams": {"pfnet", "cams"},
    "pfdemo": {"pfnet", "cams", "pfdemo"},
    "pfcam_app": {"pfnet", "cams", "pfdemo", "pfcam_app", "streamlit"},
    "pfcam": {"pfnet", "cams", "pfdemo", "pfcam"},
}
#: cams' families: the rest of cams (engine, layers, align, render, images, metrics) does not import them, and
#: they do not import each other.
FAMILIES = ("cams.export", "cams.bench_loc")
WATCHED = set(PACKAGES) | {"streamlit"}


def sources(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in the file, function-level ones included."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for package in PACKAGES:
        for path in sources(package):
            if path.name == "__main__.py":  # `python -m cams` is a door onto the top-level CLI, not a layer
                continue
            for line, module, _ in imports(path):
                top = module.split(".")[0]
                if top in WATCHED and top not in ALLOWED[package]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_cams_families_stay_apart():
    wrong = []
    for path in sources("cams"):
        if path.name == "__main__.py":
            continue
        here = module_name(path)
        for line, module, names in imports(path):
            targets = [module] + [f"{module}.{name}" for name in names]
            for family in FAMILIES:
                if here.startswith(family):
                    continue
                if any(target == family or target.startswith(family + ".") for target in targets):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {family}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_private_name():
    wrong = []
    for path in sources(*PACKAGES, "tests", "benchmarks") + [ROOT / "app.py"]:
        for line, module, names in imports(path):
            if module == "__future__":
                continue
            parts = module.split(".") + names
            private = [part for part in parts if part.startswith("_") and not part.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} {', '.join(private)}")
    assert not wrong, "\n".join(wrong)


def test_the_private_import_check_sees_relative_and_absolute_forms(tmp_path):
    """The checks above would pass on an empty list; they do find what they look for."""
    path = ROOT / "cams" / "export" / "run.py"
    found = imports(path)
    assert any(module == "cams.export.plan" for _, module, _ in found)
    probe = ROOT / "cams" / "_probe_for_test.py"
    assert not probe.exists()
    try:
        probe.write_text("from .export import files\nfrom pfnet.checkpoint import _secret\n")
        assert (1, "cams.export", ["files"]) in imports(probe)
        assert (2, "pfnet.checkpoint", ["_secret"]) in imports(probe)
    finally:
        probe.unlink()


@pytest.mark.parametrize(("statement", "forbidden"), [
    ("import pfnet, pfnet.weights, pfnet.zoo, pfnet.preprocess, pfnet.profile, pfnet.assets, pfnet.version",
     ("cams", "pfdemo", "pfcam", "pfcam_app", "streamlit")),
    ("import cams, cams.export, cams.bench_loc, cams.metrics, cams.render, cams.images, cams.align",
     ("pfdemo", "pfcam", "pfcam_app", "streamlit")),
    ("import pfdemo.scenes, pfdemo.train, pfdemo.scoring, pfdemo.bench", ("pfcam", "pfcam_app", "streamlit")),
])
def test_importing_a_layer_loads_nothing_above_it(statement, forbidden):
    """In a fresh interpreter: what an import really pulls in, whatever the import graph says."""
    code = (f"import sys; {statement}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(forbidden)!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{statement} loaded {done.stdout.strip()}"
