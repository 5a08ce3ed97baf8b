"""pfcam's one version string: ``pfcam --version``, the export manifest and the package metadata
(pyproject.toml reads it) all take it from here."""

__version__ = "0.1.0"
