"""UI helpers for ``app.py`` (Streamlit plumbing and presentation only; the model and CAM maths live in pfnet/cams)."""
