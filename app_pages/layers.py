"""Layers: per-layer error of LSQ+ next to each baseline, and where the error comes from."""

import streamlit as st

from lsq import plots
from lsq.explorer import layer_view, layers_job, sensitivity_job
from lsq.export import offset_table
from lsq.jobs import Job
from lsq.pipeline import FIT_GAP_NOTE
from lsq.status import Status
from ui import chart, comparison_or_stop, job_manager, latest_job, show_job, submit

st.title("Per-layer error")
comp = comparison_or_stop("")
stages = comp.stages
stage = stages[0]
if len(stages) > 1:
    stage = st.radio(
        "Results",
        stages,
        index=len(stages) - 1,
        format_func={
            "initialised": "right after init",
            "reconstructed": "after reconstruction",
            "trained": "after training",
        }.get,
        horizontal=True,
        key="layers_stage",
    )
results = comp.results(stage)
st.caption(" · ".join(f"{m}: {r.label}" for m, r in results.items()))
params = {"calibration": comp.calibration, "comparison": comp.id, "stage": str(stage)}


def measure() -> Job | None:
    return submit(
        Job("layers", f"Per-layer error ({stage})", {**params, "settings": comp.settings}),
        lambda j: layers_job(j, comp, stage),
    )


job = latest_job("layers", comp, comparison=comp.id, stage=str(stage))
if job is None:
    job = measure()  # the first visit: measure, as a job with progress and Stop
    if job is None:
        st.info("The per-layer comparison starts once the running job has ended.")
        show_job(job_manager().active())
        st.stop()
show_job(job)
if job.active:
    st.stop()
if job.status != Status.DONE:
    if st.button("Measure again"):
        measure()
        st.rerun()
    if job.result is None or job.result.empty:
        st.stop()
df = job.result

metric = st.radio(
    "Error measure",
    ["output_sqnr_db", "calib_output_sqnr_db", "input_sqnr_db", "weight_sqnr_db"],
    format_func={
        "output_sqnr_db": "layer output vs float model",
        "calib_output_sqnr_db": "layer output vs float model (calibration views)",
        "input_sqnr_db": "layer input quantization",
        "weight_sqnr_db": "weight quantization",
    }.get,
    horizontal=True,
)
chart(plots.layer_error_figure(df, metric), key="err")
if metric == "calib_output_sqnr_db":
    st.caption(f"Measured on calibration views instead of held-out ones. {FIT_GAP_NOTE}")
st.caption(
    "Why each range: an input error that is mostly clipping means the range is too narrow; "
    "mostly rounding, that its levels are spread too wide."
)
chart(plots.error_split_figure(df), key="split")
wide = df.pivot_table(index=["index", "layer", "kind", "group"], columns="method", values=metric)
wide = wide.reset_index().sort_values("lsq+" if "lsq+" in wide.columns else "index")
if {"clip_error", "round_error"} <= set(df.columns):  # the split, as a share of the error
    split = df.assign(clipping_share=df["clip_error"] / (df["clip_error"] + df["round_error"]))
    share = split.pivot_table(index="layer", columns="method", values="clipping_share")
    wide = wide.merge(share.add_prefix("clipping share ").reset_index(), on="layer", how="left")
st.caption("Sortable: click a column header. Lowest SQNR (worst) first for LSQ+.")
st.dataframe(wide, hide_index=True, key="table")

layer = st.selectbox("Show a layer's input histogram and ranges", list(wide["layer"]))
hist, grids, observed = layer_view(comp, layer, stage)
chart(plots.histogram_panels_figure(hist, grids, observed), key="hist")

st.subheader("Where the error comes from")
method = st.selectbox("Method", list(results), key="sens_method")
if st.button("Measure sensitivity", help="quantize one group at a time, weights or activations"):
    submit(
        Job(
            "sensitivity",
            f"Sensitivity of {method} ({results[method].label})",
            {**params, "method": method, "settings": comp.settings},
        ),
        lambda j: sensitivity_job(j, comp, method, stage),
    )
sens = latest_job("sensitivity", comp, comparison=comp.id, stage=str(stage))
show_job(sens)
if sens is not None and sens.status == Status.DONE:
    st.caption(sens.title)
    chart(plots.sensitivity_figure(sens.result), key="sens")
    st.dataframe(sens.result, hide_index=True)

with st.expander(f"Offsets at export: {method}, each offset's distance to an integer zero point"):
    offsets = offset_table(results[method].copy_model())  # a private copy: snapshots stay as is
    if offsets.empty:
        st.caption(f"{method} learns no continuous offset: its zero point is already an integer.")
    else:
        st.caption(
            "An integer runtime needs an integer zero point. The export folds the offset into "
            "the bias, exactly; a padded conv (`foldable` false: one bias per channel is not "
            "enough) gets a bias per output position for its borders. Snapping it to the nearest "
            "multiple of the scale instead (`--offset snap`) moves the grid by `snap_error_steps` "
            "steps (at most 0.5) and changes about that fraction of the layer's codes."
        )
        st.dataframe(
            offsets.sort_values("snap_error_steps", ascending=False),
            hide_index=True,
            key="offsets",
        )
