"""Calibrate: initialise every chosen method and compare their ranges layer by layer."""

import streamlit as st

from lsq import plots
from lsq.explorer import calibrate_job, layer_view
from lsq.jobs import Job
from lsq.runs import list_runs
from ui import job_manager, settings, show_job, submit

st.title("Calibrate and initialise")
s = settings()
job = job_manager().latest("calibrate")
if s is None:
    st.info("Fix the settings in the sidebar first.")
else:
    st.caption(
        f"{s.model.name} ({s.model.source}), W{s.w_bits}A{s.a_bits}"
        f"{'' if s.quantize_weights else ' (activations only)'}, methods: {', '.join(s.methods)}"
    )
    if st.button(f"Calibrate {len(s.methods)} method(s)", type="primary"):
        new = submit(
            Job("calibrate", "Calibration", {"settings": s}), lambda j: calibrate_job(j, s)
        )
        job = new or job
show_job(job, "calibrate")

if job is None or job.status != "done":
    if job is None:
        st.info("Press Calibrate to record activations and initialise each method's ranges.")
        if list_runs():
            st.page_link("pages/runs.py", label="Earlier results are saved: open them on Runs")
    st.stop()

comp = job.result
if s is not None and comp.settings != s:
    st.info("Showing the last calibration, made with other settings; press Calibrate to update.")

st.subheader("Right after init, against the float model")
metrics = comp.metrics_frame("init")
st.dataframe(
    metrics[["method", "config", "agreement", "confident_agreement", "kl", "logit_sqnr_db"]],
    hide_index=True,
    column_config={
        "agreement": st.column_config.NumberColumn("top-1 agreement", format="%.3f"),
        "confident_agreement": st.column_config.NumberColumn(
            "agreement (confident views)", format="%.3f"
        ),
        "kl": st.column_config.NumberColumn("KL(float ‖ quantized)", format="%.4f"),
        "logit_sqnr_db": st.column_config.NumberColumn("logit SQNR (dB)", format="%.1f"),
    },
)

st.subheader("Every layer's input range")
log_scale = st.toggle("Symmetric log scale", value=True, help="ranges span -70…70 and 0…6")
st.plotly_chart(plots.ranges_figure(comp.ranges_frame(), log_scale=log_scale), key="ranges")

st.subheader("One layer: input histogram and quantization grid")
ranges = comp.ranges_frame()
layers = list(dict.fromkeys(ranges["layer"]))
layer = st.selectbox("Layer", layers, index=min(1, len(layers) - 1), key="calib_layer")
hist, grids, observed = layer_view(comp, layer)
st.plotly_chart(plots.histogram_figure(hist, grids, observed), key="hist")
with st.expander("Saved runs"):
    for method, path in comp.runs.items():
        st.write(f"{method}: `{path}`")
