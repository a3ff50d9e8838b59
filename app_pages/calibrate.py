"""Calibrate: initialise every chosen method and compare their ranges layer by layer."""

from pathlib import Path

import streamlit as st

from lsq import plots
from lsq.explorer import (
    calibrate_job,
    collapse_note,
    health_frame,
    init_notes,
    layer_view,
    repair_label,
)
from lsq.jobs import Job
from lsq.runs import list_runs
from ui import (
    chart,
    job_manager,
    settings,
    show_commands,
    show_health,
    show_job,
    show_metrics,
    submit,
)

st.title("Calibrate and initialise")
s = settings()
job = job_manager().latest("calibrate")
if s is None:
    st.info("Fix the settings in the sidebar first.")
else:
    st.caption(f"{s.label}, methods: {', '.join(s.methods)}")
    if st.button(f"Calibrate {len(s.methods)} method(s)", type="primary"):
        new = submit(
            Job("calibrate", "Calibration", {"settings": s}), lambda j: calibrate_job(j, s)
        )
        job = new or job
show_job(job)
done = job_manager().latest_done("calibrate")  # a failed or stopped one keeps these on show

if done is None:
    if job is None:
        st.info("Press Calibrate to record activations and initialise each method's ranges.")
        if list_runs():
            st.page_link("app_pages/runs.py", label="Earlier results are saved: open them on Runs")
    st.stop()

comp = done.result
if done is not job:
    st.info("Below: the last calibration that finished.")
st.caption(f"Results of: {comp.settings.label}")
if s is not None and comp.settings != s:
    st.info("Showing the last calibration, made with other settings; press Calibrate to update.")
if comp.bench.skipped:
    st.warning(
        f"{len(comp.bench.skipped)} image file(s) could not be read and were left out: "
        + "; ".join(comp.bench.skipped[:5])
    )

st.subheader("Right after init, against the float model")
show_metrics(comp.metrics_frame("initialised"))
show_commands(comp, "initialised")
for note in init_notes(comp).values():
    st.caption(note)
note = collapse_note(comp)
if note:
    st.warning(note)
    st.page_link("app_pages/train.py", label=repair_label(comp.settings))

st.subheader("Every layer's input range, right after init")
log_scale = st.toggle("Symmetric log scale", value=True, help="ranges span -70…70 and 0…6")
ranges = comp.ranges_frame()
chart(plots.ranges_figure(ranges, log_scale=log_scale), key="ranges")

st.subheader("One layer: input histogram and quantization grid, right after init")
layers = list(dict.fromkeys(ranges["layer"]))
layer = st.selectbox("Layer", layers, index=min(1, len(layers) - 1), key="calib_layer")
hist, grids, observed = layer_view(comp, layer)
chart(plots.histogram_panels_figure(hist, grids, observed), key="hist")

st.subheader("Health checks, right after init")
show_health(health_frame(comp))
with st.expander("Saved runs"):
    for method, path in comp.runs.items():
        st.write(f"{method}: `{Path(path).name}`")
