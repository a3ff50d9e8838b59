"""LSQ+ Explorer: navigation and the shared sidebar (model, bits, methods, data, device)."""

import streamlit as st

from ui import sidebar

st.set_page_config(page_title="LSQ+ Explorer", layout="wide")

pages = [
    st.Page("app_pages/home.py", title="What is LSQ+?", default=True),
    st.Page("app_pages/calibrate.py", title="Calibrate"),
    st.Page("app_pages/train.py", title="Train"),
    st.Page("app_pages/layers.py", title="Layers"),
    st.Page("app_pages/lab.py", title="Range lab"),
    st.Page("app_pages/runs.py", title="Runs"),
]
nav = st.navigation(pages)
st.session_state["settings"] = sidebar()
nav.run()
