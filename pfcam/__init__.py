"""pfcam: the top of the layering, above pfnet, cams, pfdemo and the app.

``pfcam.explain(model, images, ...)`` explains images in one call (:mod:`pfcam.api`); ``pfcam`` on the command
line is :mod:`pfcam.cli`. Both load lazily: ``import pfcam`` (and so ``pfcam --help``) imports neither torch nor
timm; the first use of ``pfcam.explain`` does.
"""
from __future__ import annotations

from typing import Any

__all__ = ["explain", "Result", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("explain", "Result"):
        from pfcam import api

        return getattr(api, name)
    if name == "__version__":
        from pfcam.cli import version

        return version()
    raise AttributeError(f"module 'pfcam' has no attribute {name!r}")
