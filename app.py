"""LSQ+ Explorer: navigation and the shared sidebar (model, bits, methods, data, device)."""

import streamlit as st

from ui import sidebar

st.set_page_config(page_title="LSQ+ Explorer", layout="wide")

pages = [
    st.Page("pages/home.py", title="What is LSQ+?", default=True),
    st.Page("pages/calibrate.py", title="Calibrate"),
    st.Page("pages/train.py", title="Train"),
    st.Page("pages/layers.py", title="Layers"),
    st.Page("pages/lab.py", title="Range lab"),
    st.Page("pages/runs.py", title="Runs"),
]
nav = st.navigation(pages)
st.session_state["settings"] = sidebar()
nav.run()
