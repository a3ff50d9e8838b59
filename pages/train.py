"""Train: block-wise reconstruction and/or a short QAT of the calibrated methods, with live
curves, each unit's repaired error, and quantizer trajectories."""

import dataclasses

import streamlit as st

from lsq import plots
from lsq.errors import LSQError
from lsq.explorer import (
    RECIPES,
    RECON_ROUNDINGS,
    RECON_WEIGHT_STARTS,
    default_recipe,
    events_frames,
    health_frame,
    replay_view,
    train_job,
    units_frame,
)
from lsq.jobs import Job
from lsq.reconstruct import ReconstructConfig
from lsq.status import Status
from lsq.train import OPTIMIZERS, TrainConfig
from ui import chart, comparison_or_stop, latest_job, show_job, show_metrics, submit

#: The form's defaults: one home, ``TrainConfig`` and ``ReconstructConfig``.
DEFAULT = TrainConfig()
RECON = ReconstructConfig()

st.title("Train: block-wise reconstruction and QAT")
comp = comparison_or_stop(": training starts from the initialised ranges")
methods_all = list(comp.initial)

with st.form("train"):
    recipes = list(RECIPES)
    recipe = st.radio(
        "Recipe",
        recipes,
        index=recipes.index(default_recipe(comp.settings)),
        format_func=RECIPES.get,
        horizontal=True,
        help="Block-wise reconstruction repairs one block at a time against the float block's "
        "output (BRECQ/QDrop with LSQ+'s learnable offsets): what makes 4-bit weights work on "
        "a few photos. QAT then fine-tunes the whole network against the float logits.",
    )
    c1, c2, c3 = st.columns(3)
    methods = c1.multiselect("Methods to train", methods_all, default=methods_all[:2])
    steps = c1.number_input("QAT steps", min_value=1, max_value=2000, value=DEFAULT.steps, step=5)
    iters = c1.number_input(
        "Reconstruction iterations per block",
        min_value=1,
        max_value=5000,
        value=RECON.iters,
        step=10,
    )

    def choice(label: str, labels: dict[str, str], default: str, help: str) -> str:
        """One of ``labels``' keys, shown by its label, starting at ``default``."""
        keys = list(labels)
        return c1.selectbox(
            label, keys, index=keys.index(default), format_func=labels.get, help=help
        )

    recon_start = choice(
        "Reconstruction starts the weights from",
        RECON_WEIGHT_STARTS,
        RECON.weight_init,
        "The MSE search gives every layer the least weight error before its block is "
        "repaired; on the bundled model at W4A4 it ended better than LSQ+'s mean +- 3 sigma.",
    )
    rounding = choice(
        "Reconstruction learns the weights by",
        RECON_ROUNDINGS,
        RECON.rounding,
        "AdaRound (learned rounding) keeps each weight within one step of where it was and "
        "learns whether it rounds down or up, as BRECQ and QDrop do with 20,000 iterations per "
        "block. With the few iterations of this recipe, training the weights through the "
        "rounding ended better on the bundled model (W4A4 at 160 px: KL 0.43 against 0.55).",
    )
    optimizer = c2.selectbox("Optimizer", OPTIMIZERS, index=OPTIMIZERS.index(DEFAULT.optimizer))
    batch = c2.number_input("Batch size", min_value=1, max_value=256, value=DEFAULT.batch_size)
    c3.caption("QAT learning rates (reconstruction uses its own relative rates)")
    lr_w = c3.number_input(
        "LR weights", min_value=0.0, max_value=10.0, value=DEFAULT.lr_weights, format="%.1e"
    )
    lr_a = c3.number_input(
        "LR activation scale/offset",
        min_value=0.0,
        max_value=10.0,
        value=DEFAULT.lr_act_quant,
        format="%.1e",
    )
    lr_wq = c3.number_input(
        "LR weight scales",
        min_value=0.0,
        max_value=10.0,
        value=DEFAULT.lr_weight_quant,
        format="%.1e",
    )
    resume = c2.checkbox(
        "Continue the trained runs",
        help="Off: every training starts from the initialised ranges (a new, independent run). "
        "On: methods already trained continue from where their last run ended.",
    )
    go = st.form_submit_button("Train", type="primary")

if go:
    try:
        cfg = dataclasses.replace(
            DEFAULT,
            steps=int(steps),
            batch_size=int(batch),
            optimizer=optimizer,
            lr_weights=float(lr_w),
            lr_act_quant=float(lr_a),
            lr_weight_quant=float(lr_wq),
            device=comp.settings.device,
        )
        recon = None
        if recipe != "qat":
            recon = dataclasses.replace(
                RECON,
                iters=int(iters),
                weight_init=recon_start,
                rounding=rounding,
                device=comp.settings.device,
            )
        if recipe == "reconstruct":
            cfg = None
        if not methods:
            raise LSQError("choose at least one method to train")
        params = {"methods": methods, "calibration": comp.calibration, "settings": comp.settings}
        submit(
            Job("train", f"{RECIPES[recipe]}: {', '.join(methods)}", params),
            lambda j: train_job(j, comp, methods, cfg, continue_trained=resume, recon_cfg=recon),
        )
    except LSQError as e:
        st.error(str(e))

job = latest_job("train", comp)
if job is None:
    st.info(
        "Every method is initialised, none trained yet. Choose methods and steps, then press Train."
    )
    st.stop()
layers = list(comp.initial[methods_all[0]].init_frame()["name"])
layer = st.selectbox(
    "Layer whose scale and offset to follow", layers, index=min(1, len(layers) - 1)
)


def draw(replay: bool = False) -> None:
    units = units_frame(job)
    if not units.empty:
        chart(plots.units_figure(units), key="units")
    metrics, traj = events_frames(job)
    if metrics.empty:
        return
    c1, c2 = st.columns(2)
    chart(plots.curves_figure(metrics, "loss"), where=c1, key="loss")
    chart(plots.curves_figure(metrics, "agreement"), where=c2, key="agreement")
    chart(plots.trajectory_figure(traj, layer), key="traj")
    if not replay or traj.empty:
        return
    steps = sorted(int(s) for s in traj["step"].unique())
    step = st.select_slider("Replay: training step", steps, value=steps[-1], key="replay_step")
    try:
        hist, grids, observed = replay_view(comp, traj, layer, step)
    except LSQError as e:
        st.info(str(e))
        return
    chart(plots.replay_figure(hist, grids, observed, layer, step, steps[-1]), key="replay")
    st.caption(
        "Each method's grid on this layer's input at the chosen step, over the histogram "
        "recorded at calibration: drag the step to watch the range move."
    )


st.subheader(job.title)
if job.active:

    @st.fragment(run_every=1.0)
    def live() -> None:
        if not job.active:
            st.rerun()
        st.progress(job.fraction, text=job.describe())
        if st.button("Stop", key="stop-train"):
            job.request_stop()
            st.toast("Stopping after the current step…")
        draw()

    live()
else:
    show_job(job)
    shown = job.result if job.result is not None else comp
    if job.status == Status.DONE:
        st.success(f"{job.title} finished in {job.elapsed:.0f} s; saved as runs (Runs page).")
    if job.result is not None:
        stage = shown.stages[-1]
        st.caption(
            f"Each method at its latest stage ({stage}); methods that did not reach it: right "
            "after init."
        )
        show_metrics(shown.metrics_frame(stage))
        health = health_frame(shown, stage)
        if not health.empty:
            st.caption("Health checks of the results above (one line per finding):")
            st.dataframe(health, hide_index=True)
    draw(replay=True)
