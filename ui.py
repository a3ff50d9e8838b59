"""Streamlit glue shared by app.py and the pages: cached resources, settings, job status.

No computation here: models, data, quantization and figures all come from ``lsq``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import streamlit as st
import torch

from lsq import plots
from lsq.config import HIGH_BITS, METHODS, WEIGHT_INIT_CHOICES
from lsq.errors import LSQError
from lsq.explorer import Comparison, Settings
from lsq.health import FLOAT_MODEL, group_findings
from lsq.jobs import Job, JobManager
from lsq.models import BUNDLED
from lsq.pipeline import FIT_GAP_NOTE, DataConfig, ModelSpec
from lsq.quantizers import MAX_BITS, MIN_BITS
from lsq.status import Status

#: Uploaded files live here and nowhere else.
DATA_DIR = Path(os.environ.get("LSQ_DATA_DIR", "data")).resolve()
MAX_UPLOAD_MB = 200


#: The sidebar's defaults: one home, ``Settings``.
DEFAULT = Settings()
SYNTHETIC_ONLY = "Synthesised from the model (no photo)"
SYNTHETIC_COUNTS = [0, 32, 64, 128, 256]

BASELINES = [m for m in METHODS if m != "lsq+"]
BITS = list(range(MIN_BITS, MAX_BITS + 1))
SIZES = [64, 96, 128, 160, 192, 224, 240, 260]  # 240, 260: EfficientNet-Lite1/Lite2's own
VIEW_COUNTS = [8, 16, 32, 64, 128]
SOURCES = {
    "Bundled EfficientNet-Lite (ImageNet, offline)": "bundled",
    "timm hub model (needs internet)": "hub",
    "Checkpoint file": "file",
    "Random weights (smoke test)": "random",
}


#: Presentation mode's text outside the charts: the page's captions, tables, table cells and
#: metrics at projector size (the charts are ``plots.presentation``'s).
PRESENT_CSS = """<style>
[data-testid="stCaptionContainer"], [data-testid="stCaptionContainer"] p { font-size: 1.35rem; }
[data-testid="stTable"] td, [data-testid="stTable"] th { font-size: 1.3rem; }
[data-testid="stMarkdownContainer"] p { font-size: 1.3rem; }
[data-testid="stMetricValue"] { font-size: 2.6rem; }
[data-testid="stMetricLabel"] p { font-size: 1.3rem; }
</style>"""


def sidebar() -> Settings | None:
    """Draw the shared sidebar; returns its Settings, or None (saying why) when invalid.

    Every default comes from ``Settings()``. The presentation-mode toggle (see ``chart``), the
    bundled model, bits, methods, weight init,
    resolution and views are bound to the URL (Streamlit's ``bind="query-params"``, keyed by the
    widget key), so a browser refresh or a shared link keeps them; nonsense in the URL is ignored.
    """
    sb = st.sidebar
    sb.toggle(
        "Presentation mode",
        key="present",
        help="Every chart with large fonts and dark tick labels, for a projector.",
        bind="query-params",
    )
    if st.session_state.get("present"):
        st.html(PRESENT_CSS)  # the text around the charts too: captions, tables, metrics
    sb.header("Model")
    label = sb.selectbox("Source", list(SOURCES), key="model_source")
    source = SOURCES[label]
    spec = DEFAULT.model
    if source == "bundled":
        name = sb.selectbox(
            "Model",
            list(BUNDLED),
            index=list(BUNDLED).index(DEFAULT.model.name),
            format_func=lambda n: BUNDLED[n].title,
            key="bundled_model",
            help="Real ImageNet weights, offline:\n"
            + "\n".join(f"- {b.label}" for b in BUNDLED.values()),
            bind="query-params",
        )
        b = BUNDLED[name]
        sb.caption(
            f"{b.params:.1f} M parameters · {b.input_size} px input · "
            f"{b.top1:.1f} % ImageNet top-1 (float, published)"
        )
        spec = ModelSpec(name, "bundled")
    elif source in ("hub", "random"):
        name = sb.text_input("timm model name", DEFAULT.model.name, key="model_name")
        spec = ModelSpec(name.strip(), source)
    elif source == "file":
        arch = sb.text_input("Architecture (timm name)", DEFAULT.model.name, key="file_arch")
        path = sb.text_input("Checkpoint path on the server", key="file_path")
        upload = sb.file_uploader(
            "…or upload one", type=["pth", "pt", "bin", "safetensors"], key="ckpt"
        )
        if upload is not None:
            try:
                path = str(save_upload(upload, "checkpoints"))
            except LSQError as e:
                sb.error(str(e))
                return None
        if not path:
            sb.info("Give a checkpoint path or upload a file.")
            return None
        spec = ModelSpec(arch.strip(), "file", path.strip())

    sb.header("Bits")
    url = {"bind": "query-params"}
    w_bits = sb.select_slider(
        "Weight bits", options=BITS, value=DEFAULT.w_bits, key="w_bits", **url
    )
    a_bits = sb.select_slider(
        "Activation bits", options=BITS, value=DEFAULT.a_bits, key="a_bits", **url
    )
    quantize_weights = sb.checkbox(
        "Quantize weights",
        DEFAULT.quantize_weights,
        key="qw",
        help="Off: activations only",
        **url,
    )
    weight_init = sb.selectbox(
        "Weight init",
        WEIGHT_INIT_CHOICES,
        index=WEIGHT_INIT_CHOICES.index(DEFAULT.weight_init),
        key="weight_init",
        help=f"auto: each method's own rule below {HIGH_BITS} bits, an MSE search at "
        f"{HIGH_BITS}+ bits (the 3-sigma and LSQ rules clip too hard there); the command line "
        "uses the same. method: always the method's own rule.",
        **url,
    )
    baselines = sb.multiselect(
        "Compare LSQ+ with",
        BASELINES,
        default=[m for m in DEFAULT.methods if m != "lsq+"],
        key="baselines",
        **url,
    )

    sb.header("Data")
    data_src = sb.radio(
        "Calibration images",
        [
            "Bundled photos (scikit-image)",
            "Folder on the server",
            "Upload images",
            SYNTHETIC_ONLY,
        ],
        key="data_src",
        help="Evaluation always uses held-out photos. Synthesised images are optimised until the "
        "model's BatchNorm statistics match their running values: data from nothing.",
    )
    synthetic = 0
    if data_src != SYNTHETIC_ONLY:
        synthetic = sb.select_slider(
            "Add images synthesised from the model",
            SYNTHETIC_COUNTS,
            DEFAULT.data.synthetic,
            key="synthetic",
            help="More variety for reconstruction and QAT than a few photos give. Made once per "
            "model and resolution and cached on disk (about 3 s per image at 160 px on 2 CPU "
            "cores).",
        )
    folder = None
    if data_src == "Folder on the server":
        folder = sb.text_input("Folder path", key="folder").strip() or None
        if folder is None:
            sb.info("Give a folder of images (flat, or one sub-folder per class).")
            return None
    elif data_src == "Upload images":
        files = sb.file_uploader(
            "Images",
            type=["jpg", "jpeg", "png", "bmp", "webp"],
            accept_multiple_files=True,
            key="imgs",
        )
        if not files:
            sb.info("Upload at least two images.")
            return None
        # One folder per set of images, named by their contents: this session's images only.
        digest = hashlib.sha256(b"".join(hashlib.sha256(f.getvalue()).digest() for f in files))
        try:
            paths = [
                save_upload(f, f"images/{digest.hexdigest()[:12]}", i) for i, f in enumerate(files)
            ]
        except LSQError as e:
            sb.error(str(e))
            return None
        folder = str(paths[0].parent)
    resolution = sb.select_slider(
        "Resolution (px)", options=SIZES, value=DEFAULT.data.resolution, key="res", **url
    )
    views = sb.select_slider(
        "Views (calibration and evaluation)",
        VIEW_COUNTS,
        DEFAULT.data.calib_views,
        key="views",
        **url,
    )

    sb.header("Device")
    cuda = torch.cuda.is_available()
    found = f"found CUDA: {torch.cuda.get_device_name(0)}" if cuda else "no CUDA GPU found: CPU"
    devices = ["auto", "cpu", "cuda"]
    device = sb.radio(
        "Device",
        devices,
        index=devices.index(DEFAULT.device),
        key="device",
        help=found,
        horizontal=True,
    )
    sb.caption(found)
    try:
        data = DataConfig(
            source="synthetic" if data_src == SYNTHETIC_ONLY else "folder" if folder else "bundled",
            folder=folder,
            resolution=resolution,
            calib_views=views,
            eval_views=views,
            synthetic=synthetic,
        )
        return Settings(
            model=spec,
            data=data,
            w_bits=w_bits,
            a_bits=a_bits,
            methods=("lsq+", *baselines),
            weight_init=weight_init,
            quantize_weights=quantize_weights,
            device=device,
        )
    except LSQError as e:
        sb.error(str(e))
        return None


def chart(fig, where=None, **kwargs) -> None:
    """Draw a plotly figure (in ``where``, a column say); in presentation mode (the sidebar's
    toggle) as ``plots.presentation`` makes it, without Streamlit's chart theme."""
    where = where or st
    if st.session_state.get("present"):
        where.plotly_chart(plots.presentation(fig), theme=None, **kwargs)
    else:
        where.plotly_chart(fig, **kwargs)


@st.cache_resource
def job_manager() -> JobManager:
    """One per server process: jobs outlive browser sessions (a refresh finds them)."""
    return JobManager()


def settings() -> Settings | None:
    """The sidebar's current settings, or None if they are invalid (the sidebar says why)."""
    return st.session_state.get("settings")


def save_upload(upload, kind: str, index: int | None = None) -> Path:
    """Write an uploaded file under DATA_DIR/uploads/<kind>/ and return its path.

    The file keeps the user's file name (letters, digits, dots, dashes and underscores only), so
    messages about it name the file the user chose. A single file (``index`` None) gets a folder
    of its own named by a hash of its content; one of a set of files (``index`` its position) is
    written into ``kind`` itself, prefixed with its position only if another file of the set
    already took the name. No upload can write outside DATA_DIR/uploads or over another upload.
    """
    data = upload.getvalue()
    if len(data) > MAX_UPLOAD_MB * 1024 * 1024:
        raise LSQError(f"{upload.name} is larger than {MAX_UPLOAD_MB} MB")
    if not data:
        raise LSQError(f"{upload.name} is empty")
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(upload.name).name).lstrip(".")[-80:] or "upload"
    root = (DATA_DIR / "uploads").resolve()
    folder = (root / kind).resolve()
    if index is None:
        folder = folder / hashlib.sha256(data).hexdigest()[:12]
    target = (folder / base).resolve()
    if index is not None and target.exists() and target.read_bytes() != data:
        target = (folder / f"{index}-{base}").resolve()
    if root not in target.parents:
        raise LSQError("refused an upload name that points outside the upload folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return target


def kept_widgets(defaults: dict, reset: Iterable[str] = ()) -> None:
    """Start each widget key of ``defaults`` from its last value, else from its default.

    Streamlit drops a widget's value when a run does not draw it (another page was shown), so
    each value is also kept under a shadow key that no widget owns. ``reset`` keys go back to
    their defaults (a new calibration, say).
    """
    for key, value in defaults.items():
        shadow = f"_kept.{key}"
        if key in reset:
            st.session_state.pop(key, None)
            st.session_state.pop(shadow, None)
        if key not in st.session_state:
            st.session_state[key] = st.session_state.get(shadow, value)
        st.session_state[shadow] = st.session_state[key]


def show_job(job: Job | None) -> None:
    """Progress of a running job (refreshing itself each second), or how the last one ended.

    A failed job's error is shown only while the sidebar still has the settings it ran with.
    """
    if job is None:
        return
    if job.active:
        _job_progress(job.id)
    elif job.status == Status.FAILED:
        ran_with = job.params.get("settings")
        if ran_with is None or ran_with == settings():
            st.error(job.message)
    elif job.status == Status.STOPPED:
        st.warning(f"{job.title} was stopped after {job.elapsed:.0f} s.")


@st.fragment(run_every=1.0)
def _job_progress(job_id: str) -> None:
    job = job_manager().get(job_id)
    if job is None:
        return
    if not job.active:
        st.rerun()  # the job ended: redraw the whole page with its results
    st.progress(job.fraction, text=job.describe())
    if st.button("Stop", key=f"stop-{job_id}", help="ends the job after the current step"):
        job.request_stop()
        st.toast("Stopping after the current step…")


def comparison_or_stop(why: str) -> Comparison:
    """The latest published results of the last calibration that finished, labelled with their
    settings (a later calibration that failed or was stopped is shown above them, and does not
    take them away).

    That is the calibration's own (initialised) results, or those of the last training of that
    calibration which ended with results. Without a finished calibration, says ``why`` one is
    needed and stops the page.
    """
    manager = job_manager()
    latest, calib = manager.latest("calibrate"), manager.latest_done("calibrate")
    if latest is not calib:  # running, or failed/stopped: say so above the last good results
        show_job(latest)
    if calib is None:
        st.info(f"Calibrate first (Calibrate page){why}.")
        st.stop()
    comp = calib.result
    trained = [j for j in manager.jobs("train") if _of(j, comp) and j.result is not None]
    if trained:
        comp = trained[0].result
    st.caption(f"Results of: {comp.settings.label}")
    current = settings()
    if current is not None and current != comp.settings:
        st.info("The sidebar has other settings than these results; calibrate to update them.")
    return comp


def _of(job: Job, comp: Comparison) -> bool:
    return job.params.get("calibration") == comp.calibration


def latest_job(kind: str, comp: Comparison, **params) -> Job | None:
    """The latest job of ``kind`` made from ``comp``'s calibration (and with ``params``)."""
    for job in job_manager().jobs(kind):
        if _of(job, comp) and all(job.params.get(k) == v for k, v in params.items()):
            return job
    return None


def show_metrics(frame) -> None:
    """A table of model-level metrics with readable column names and fixed decimals."""
    columns = ["method", "config", "stage", "agreement", "confident_agreement", "kl"]
    columns += ["logit_sqnr_db", "calib_agreement", "calib_kl"]
    if "confident_views" in frame and "views" in frame and len(frame):
        row = frame.iloc[0]
        st.caption(
            f"Agreement on all {row['views']:.0f} held-out views, and on the "
            f"{row['confident_views']:.0f} where the float model's top class has probability "
            "0.5 or more (on unsure views a tiny change flips the top-1)."
        )
    if "calib_views" in frame and len(frame):
        st.caption(
            f"The last two columns: the same on the {frame.iloc[0]['calib_views']:.0f} "
            f"calibration views. {FIT_GAP_NOTE}"
        )
    st.dataframe(
        frame[[c for c in columns if c in frame]],
        hide_index=True,
        column_config={
            "config": "quantization",
            "agreement": st.column_config.NumberColumn("top-1 agreement", format="%.3f"),
            "confident_agreement": st.column_config.NumberColumn(
                "agreement (confident views)", format="%.3f"
            ),
            "kl": st.column_config.NumberColumn("KL(float ‖ quantized)", format="%.4f"),
            "logit_sqnr_db": st.column_config.NumberColumn("logit SQNR (dB)", format="%.1f"),
            "calib_agreement": st.column_config.NumberColumn(
                "agreement (calibration views)", format="%.3f"
            ),
            "calib_kl": st.column_config.NumberColumn("KL (calibration views)", format="%.4f"),
        },
    )


def show_commands(comp: Comparison, stage: str = "initialised") -> None:
    """Each method's result as the ``python -m lsq run`` line that computes it headless."""
    commands = comp.commands(stage)
    if not commands:
        return
    with st.expander("Reproduce in the command line"):
        for method, line in commands.items():
            st.caption(method)
            st.code(line, language="bash")


def show_health(findings) -> None:
    """Health findings as the pages show them: the float model's once, then one row per check
    and method (its worst layers first), every finding layer by layer in an expander."""
    if findings.empty:
        st.success("No findings: every method's ranges look healthy.")
        return
    groups = group_findings(findings).rename(columns={"worst": "worst layers"})
    model = groups["method"] == FLOAT_MODEL
    if model.any():
        st.caption("The float model's findings, once: every method starts from its weights.")
        st.table(groups[model].drop(columns="method"), hide_index=True)
    if model.all():
        st.success("No method adds a finding of its own.")
    else:
        st.caption("Each method's findings: one row per check, its worst layers first.")
        st.table(groups[~model], hide_index=True)
    with st.expander(f"Every finding, layer by layer ({len(findings)})"):
        st.dataframe(
            findings,
            hide_index=True,
            column_order=["method", "layer", "check", "reason"],
            column_config={"reason": st.column_config.TextColumn(width="large")},
        )


def submit(job: Job, fn) -> Job | None:
    """Submit a job, showing a refusal (another job running) as a message."""
    try:
        return job_manager().submit(job, fn)
    except LSQError as e:
        st.warning(str(e))
        return None
