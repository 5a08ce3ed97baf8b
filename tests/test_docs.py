"""The docs site builds with no warning (a broken link, a renamed symbol in the API reference fails it), and the
README stays a short front door whose links all land."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_docs_site_builds_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(tmp_path)},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reference = (tmp_path / "site" / "reference" / "cams" / "index.html").read_text()
    assert 'id="cams.engine.explain"' in reference  # the API reference is generated from the code
    assert (tmp_path / "site" / "measuring" / "index.html").is_file()


def test_readme_is_short_and_its_links_land():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links into the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing


def test_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = "pip install -r requirements-test.txt && pip install --no-deps -r requirements/references.txt"
    run = "python -m pytest -q"
    assert f"    {install} && {run}\n" in readme
    ci_command = " ".join(ci.replace("\\\n", " ").split())  # CI's command, its continuation lines joined
    assert f"{install} && echo" in ci_command and ci_command.endswith(f"&& {run}")  # + only a timing print
    assert "pip install -e \".[app]\" && streamlit run app.py" in readme


def test_benchmark_sections_replace_only_their_own_text(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from docs_page import write_section
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    page = tmp_path / "page.md"
    page.write_text("# Speed\n\nbefore\n<!-- bench:a -->\nold table\n<!-- /bench:a -->\nafter\n")
    write_section(page, "a", "| x | 1.00 |", "python benchmarks/x.py --flag")
    write_section(page, "b", "| y | 2.00 |", "python benchmarks/y.py")
    text = page.read_text()
    assert "old table" not in text and text.startswith("# Speed\n\nbefore\n<!-- bench:a -->\nMeasured by ")
    assert "`python benchmarks/x.py --flag`" in text and "| x | 1.00 |\n<!-- /bench:a -->\nafter\n" in text
    assert text.rstrip().endswith("| y | 2.00 |\n<!-- /bench:b -->")  # a new section is appended
    write_section(page, "a", "| x | 3.00 |", "python benchmarks/x.py")
    assert page.read_text().count("<!-- bench:a -->") == 1 and "| x | 3.00 |" in page.read_text()
