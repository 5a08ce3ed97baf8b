"""pfcam's command line (``pfcam``, ``python -m pfcam``): the top of the layering, above pfnet, cams, pfdemo and
the app; nothing imports it but the ``__main__`` doors."""
from pfnet.version import __version__  # noqa: F401
