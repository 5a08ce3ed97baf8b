"""What ``pfcam app`` runs (``streamlit run`` on this file): the page behind the upload limits, as ``app.py`` in a
checkout. Streamlit imports this file as a top-level module, so the package's parent goes on the path first."""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from streamlit.starlette import App  # noqa: E402

from pfcam_app.upload_limits import middleware  # noqa: E402

app = App(Path(__file__).with_name("page.py"), middleware=middleware())
