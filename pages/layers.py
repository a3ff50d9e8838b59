"""Layers: per-layer error of LSQ+ next to each baseline, and where the error comes from."""

import streamlit as st

from lsq import plots
from lsq.explorer import layer_view, layers_frame, sensitivity_job
from lsq.jobs import Job
from ui import calibration_or_stop, job_manager, show_job, submit

st.title("Per-layer error")
manager = job_manager()
calib = calibration_or_stop("")
comp = calib.result
train = manager.latest("train")
version = (calib.id, train.id if train is not None else None, train.status if train else None)
if st.session_state.get("layers_version") != version:
    with st.spinner("Comparing every layer with the float model…"):
        st.session_state["layers_df"] = layers_frame(comp)
        st.session_state["layers_version"] = version
df = st.session_state["layers_df"]

metric = st.radio(
    "Error measure",
    ["output_sqnr_db", "input_sqnr_db", "weight_sqnr_db"],
    format_func={
        "output_sqnr_db": "layer output vs float model",
        "input_sqnr_db": "layer input quantization",
        "weight_sqnr_db": "weight quantization",
    }.get,
    horizontal=True,
)
st.plotly_chart(plots.layer_error_figure(df, metric), key="err")
wide = df.pivot_table(index=["index", "layer", "kind", "group"], columns="method", values=metric)
wide = wide.reset_index().sort_values("lsq+" if "lsq+" in wide.columns else "index")
st.caption("Sortable: click a column header. Lowest SQNR (worst) first for LSQ+.")
st.dataframe(wide, hide_index=True, key="table")

layer = st.selectbox("Show a layer's input histogram and ranges", list(wide["layer"]))
hist, grids, observed = layer_view(comp, layer)
st.plotly_chart(plots.histogram_figure(hist, grids, observed), key="hist")

st.subheader("Where the error comes from")
method = st.selectbox("Method", list(comp.results), key="sens_method")
if st.button("Measure sensitivity", help="quantize one group at a time, weights or activations"):
    submit(
        Job("sensitivity", f"Sensitivity of {method}", {"method": method}),
        lambda j: sensitivity_job(j, comp, method),
    )
sens = manager.latest("sensitivity")
show_job(sens, "sensitivity")
if sens is not None and sens.status == "done":
    st.plotly_chart(plots.sensitivity_figure(sens.result), key="sens")
    st.dataframe(sens.result, hide_index=True)
