"""Where the bundled files are (demo weights and card, example photos), in a checkout or an installed copy.

A checkout keeps them in the repository's ``assets/`` folder; ``pip install`` puts that folder into the
environment as the data-only package ``pfcam_assets`` (pyproject.toml maps it), next to ``pfnet``.
"""
from __future__ import annotations

from pathlib import Path


def bundled_dir(installed: str, checkout: str) -> Path:
    """A folder of project files: ``installed`` beside this package when pip installed it (as a data-only package),
    else the checkout's ``checkout`` folder. Looking beside ``pfnet`` itself (not on ``sys.path``) keeps a checkout
    from reading the files of another installed copy, and the other way round."""
    root = Path(__file__).resolve().parent.parent
    folder = root / installed
    return folder if folder.is_dir() else root / checkout


def assets_dir() -> Path:
    """The bundled files: ``assets/`` of the checkout, or ``pfcam_assets`` when installed."""
    return bundled_dir("pfcam_assets", "assets")
