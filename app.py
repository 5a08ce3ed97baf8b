"""pfcam's Streamlit app: ``streamlit run app.py``. The page itself is ``pfcam_app/page.py``."""
from pfcam_app.page import main

main()
