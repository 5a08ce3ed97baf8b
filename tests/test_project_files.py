"""The project's license and citation files: present, and saying what pyproject.toml and the design say."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_license_is_apache_2_and_the_package_says_so():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 the pfcam authors" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


def test_citation_names_pfcam_and_the_paper():
    text = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert text.startswith("cff-version: 1.2.0\n")
    for words in ("preferred-citation:", '"Learning Features with Parameter-Free Layers"', "arXiv:2202.02777",
                  "family-names: Han", "family-names: Yoo", "family-names: Kim", "family-names: Heo", "year: 2022",
                  "license: Apache-2.0"):
        assert words in text, words
