"""The linter's rules (pyproject.toml's [tool.ruff]) hold for the whole tree, and every noqa comment names its
rule and says why."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_every_noqa_names_its_rule_and_says_why():
    bare = []
    for path in sorted(ROOT.glob("**/*.py")):
        if any(part in {".git", "build", "site", ".venv"} for part in path.relative_to(ROOT).parts):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = re.search(r"#\s*noqa\b(.*)$", line)
            if match and not re.match(r":\s*[A-Z]+\d+(,\s*[A-Z]+\d+)*\s*(-|\(|—|:)?\s*\S", match.group(1)):
                bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bare, "\n".join(bare)
