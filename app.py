"""pfcam's Streamlit app: ``streamlit run app.py``. The page is ``pfcam_app/page.py``; it is served behind the
upload limits of ``pfcam_app/upload_limits.py`` (Streamlit's ``App``, which ``streamlit run`` finds here)."""
from streamlit.starlette import App

from pfcam_app.upload_limits import middleware

app = App("pfcam_app/page.py", middleware=middleware())
