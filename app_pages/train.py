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
from ui import (
    chart,
    comparison_or_stop,
    kept_widgets,
    latest_job,
    show_commands,
    show_health,
    show_job,
    show_metrics,
    submit,
)

#: Seconds between redraws of the live charts while a job runs (the progress line: every second).
LIVE_CHARTS_EVERY = 10.0
#: The form's defaults: one home, ``TrainConfig`` and ``ReconstructConfig``.
DEFAULT = TrainConfig()
RECON = ReconstructConfig()

st.title("Train: block-wise reconstruction and QAT")
comp = comparison_or_stop(": training starts from the initialised ranges")
methods_all = list(comp.initial)

# No form: Enter in a number commits that number instead of starting a job, and the fields of
# the chosen recipe alone are shown. The choices outlive a visit to another page
# (ui.kept_widgets); their defaults come from TrainConfig and ReconstructConfig.
defaults = {
    "train_recipe": default_recipe(comp.settings),
    "train_methods": methods_all[:2],
    "train_steps": DEFAULT.steps,
    "train_iters": RECON.iters,
    "train_recon_start": RECON.weight_init,
    "train_rounding": RECON.rounding,
    "train_optimizer": DEFAULT.optimizer,
    "train_batch": DEFAULT.batch_size,
    "train_lr_w": DEFAULT.lr_weights,
    "train_lr_a": DEFAULT.lr_act_quant,
    "train_lr_wq": DEFAULT.lr_weight_quant,
    "train_resume": False,
}
new_calibration = st.session_state.get("train_for") != comp.calibration
st.session_state["train_for"] = comp.calibration
kept_widgets(defaults, reset=("train_recipe", "train_methods") if new_calibration else ())

recipe = st.radio(
    "Recipe",
    list(RECIPES),
    format_func=RECIPES.get,
    horizontal=True,
    key="train_recipe",
    help="Block-wise reconstruction repairs one block at a time against the float block's "
    "output (BRECQ/QDrop with LSQ+'s learnable offsets): what makes 4-bit weights work on "
    "a few photos. QAT fine-tunes the whole network against the float logits.",
)
reconstructs, trains = recipe != "qat", recipe != "reconstruct"
c1, c2, c3 = st.columns(3)
methods = c1.multiselect("Methods to train", methods_all, key="train_methods")
if trains:
    c1.number_input("QAT steps", min_value=1, max_value=2000, step=5, key="train_steps")
if reconstructs:
    c1.number_input(
        "Reconstruction iterations per block", min_value=1, max_value=5000, step=10,
        key="train_iters",
    )  # fmt: skip

    def choice(label: str, labels: dict[str, str], key: str, help: str) -> str:
        """One of ``labels``' keys, shown by its label."""
        return c1.selectbox(label, list(labels), format_func=labels.get, key=key, help=help)

    choice(
        "Reconstruction starts the weights from",
        RECON_WEIGHT_STARTS,
        "train_recon_start",
        "The MSE search gives every layer the least weight error before its block is "
        "repaired; on the bundled model at W4A4 it ended better than LSQ+'s mean +- 3 sigma.",
    )
    choice(
        "Reconstruction learns the weights by",
        RECON_ROUNDINGS,
        "train_rounding",
        "AdaRound (learned rounding) keeps each weight within one step of where it was and "
        "learns whether it rounds down or up, as BRECQ and QDrop do with 20,000 iterations per "
        "block. With the few iterations of this recipe, training the weights through the "
        "rounding ended better on the bundled model (W4A4 at 160 px: KL 0.43 against 0.55).",
    )
if trains:
    c2.selectbox("Optimizer", OPTIMIZERS, key="train_optimizer")
    c2.number_input("Batch size", min_value=1, max_value=256, key="train_batch")
    c3.caption("QAT learning rates (reconstruction uses its own relative rates)")
    c3.number_input("LR weights", min_value=0.0, max_value=10.0, format="%.1e", key="train_lr_w")
    c3.number_input(
        "LR activation scale/offset", min_value=0.0, max_value=10.0, format="%.1e",
        key="train_lr_a",
    )  # fmt: skip
    c3.number_input(
        "LR weight scales", min_value=0.0, max_value=10.0, format="%.1e", key="train_lr_wq"
    )
    c2.checkbox(
        "Continue the trained runs",
        key="train_resume",
        help="Off: every training starts from the initialised ranges (a new, independent run). "
        "On: methods already trained continue from where their last run ended.",
    )
go = st.button("Train", type="primary", key="train_go")

if go:
    ss = st.session_state
    try:
        cfg = dataclasses.replace(
            DEFAULT,
            steps=int(ss["train_steps"]),
            batch_size=int(ss["train_batch"]),
            optimizer=ss["train_optimizer"],
            lr_weights=float(ss["train_lr_w"]),
            lr_act_quant=float(ss["train_lr_a"]),
            lr_weight_quant=float(ss["train_lr_wq"]),
            device=comp.settings.device,
        )
        recon = None
        if reconstructs:
            recon = dataclasses.replace(
                RECON,
                iters=int(ss["train_iters"]),
                weight_init=ss["train_recon_start"],
                rounding=ss["train_rounding"],
                device=comp.settings.device,
            )
        if not trains:
            cfg = None
        if not methods:
            raise LSQError("choose at least one method to train")
        resume = bool(ss["train_resume"]) and trains
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
    # The browser runs on the machine that trains: the progress line every second, the charts
    # (plotly figures the browser lays out again each time) every LIVE_CHARTS_EVERY seconds.

    @st.fragment(run_every=1.0)
    def live() -> None:
        if not job.active:
            st.rerun()
        st.progress(job.fraction, text=job.describe())
        if st.button("Stop", key="stop-train"):
            job.request_stop()
            st.toast("Stopping after the current step…")

    @st.fragment(run_every=LIVE_CHARTS_EVERY)
    def live_charts() -> None:
        draw()

    live()
    live_charts()
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
        show_commands(shown, stage)
        st.caption(f"Health checks of the results above ({stage}):")
        show_health(health_frame(shown, stage))
    draw(replay=True)
