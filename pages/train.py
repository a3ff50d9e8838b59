"""Train: a short QAT of the calibrated methods, with live curves and quantizer trajectories."""

import streamlit as st

from lsq import plots
from lsq.errors import LSQError
from lsq.explorer import events_frames, train_job
from lsq.jobs import Job
from lsq.train import TrainConfig
from ui import calibration_or_stop, job_manager, show_job, submit

st.title("Quantization-aware training")
manager = job_manager()
calib = calibration_or_stop(": training starts from the initialised ranges")
comp = calib.result

with st.form("train"):
    c1, c2, c3 = st.columns(3)
    methods = c1.multiselect("Methods to train", list(comp.results), default=list(comp.results)[:2])
    steps = c1.number_input("Steps", min_value=1, max_value=2000, value=20, step=5)
    optimizer = c2.selectbox("Optimizer", ["adam", "sgd"])
    batch = c2.number_input("Batch size", min_value=1, max_value=256, value=16)
    lr_w = c3.number_input("LR weights", min_value=0.0, max_value=10.0, value=1e-5, format="%.1e")
    lr_a = c3.number_input(
        "LR activation scale/offset", min_value=0.0, max_value=10.0, value=3e-4, format="%.1e"
    )
    lr_wq = c3.number_input(
        "LR weight scales", min_value=0.0, max_value=10.0, value=1e-5, format="%.1e"
    )
    go = st.form_submit_button("Train", type="primary")

if go:
    try:
        cfg = TrainConfig(
            steps=int(steps),
            batch_size=int(batch),
            optimizer=optimizer,
            lr_weights=float(lr_w),
            lr_act_quant=float(lr_a),
            lr_weight_quant=float(lr_wq),
            eval_every=max(1, int(steps) // 10),
            device=comp.settings.device,
        )
        if not methods:
            raise LSQError("choose at least one method to train")
        submit(
            Job("train", f"Training {', '.join(methods)}", {"methods": methods}),
            lambda j: train_job(j, comp, methods, cfg),
        )
    except LSQError as e:
        st.error(str(e))

job = manager.latest("train")
if job is None:
    st.info("Choose methods and steps, then press Train.")
    st.stop()
layers = list(next(iter(comp.results.values())).init_frame()["name"])
layer = st.selectbox(
    "Layer whose scale and offset to follow", layers, index=min(1, len(layers) - 1)
)


def draw() -> None:
    metrics, traj = events_frames(job)
    c1, c2 = st.columns(2)
    c1.plotly_chart(plots.curves_figure(metrics, "loss"), key="loss")
    c2.plotly_chart(plots.curves_figure(metrics, "agreement"), key="agreement")
    st.plotly_chart(plots.trajectory_figure(traj, layer), key="traj")


if job.active:

    @st.fragment(run_every=1.0)
    def live() -> None:
        if not job.active:
            st.rerun()
        st.progress(
            job.fraction, text=f"{job.title}: {job.stage or 'starting'} ({job.elapsed:.0f} s)"
        )
        if st.button("Stop", key="stop-train"):
            job.request_stop()
            st.toast("Stopping after the current step…")
        draw()

    live()
else:
    show_job(job, "train")
    if job.status == "done":
        st.success(f"{job.title} finished in {job.elapsed:.0f} s; saved as runs (Runs page).")
        st.dataframe(comp.metrics_frame("final"), hide_index=True)
    draw()
