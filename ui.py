"""Streamlit glue shared by app.py and the pages: cached resources, settings, job status.

No computation here: models, data, quantization and figures all come from ``lsq``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import streamlit as st
import torch

from lsq.config import METHODS
from lsq.errors import LSQError
from lsq.explorer import WEIGHT_INIT_CHOICES, Settings
from lsq.jobs import Job, JobManager
from lsq.pipeline import DataConfig, ModelSpec, Workbench, prepare

#: Uploaded files live here and nowhere else.
DATA_DIR = Path(os.environ.get("LSQ_DATA_DIR", "data")).resolve()
MAX_UPLOAD_MB = 200


BASELINES = [m for m in METHODS if m != "lsq+"]
SOURCES = {
    "Bundled EfficientNet-Lite0 (ImageNet, offline)": "bundled",
    "timm hub model (needs internet)": "hub",
    "Checkpoint file": "file",
    "Random weights (smoke test)": "random",
}


def sidebar() -> Settings | None:
    """Draw the shared sidebar; returns its Settings, or None (saying why) when invalid."""
    sb = st.sidebar
    sb.header("Model")
    label = sb.selectbox("Source", list(SOURCES), key="model_source")
    source = SOURCES[label]
    spec = ModelSpec()
    if source in ("hub", "random"):
        name = sb.text_input("timm model name", "tf_efficientnet_lite0", key="model_name")
        spec = ModelSpec(name.strip(), source)
    elif source == "file":
        arch = sb.text_input("Architecture (timm name)", "tf_efficientnet_lite0", key="file_arch")
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
    bits = list(range(2, 9))
    w_bits = sb.select_slider(
        "Weight bits", options=bits, value=_from_url("w", 8, bits), key="w_bits"
    )
    a_bits = sb.select_slider(
        "Activation bits", options=bits, value=_from_url("a", 4, bits), key="a_bits"
    )
    quantize_weights = sb.checkbox(
        "Quantize weights", _from_url("qw", 1, [0, 1]) == 1, key="qw", help="Off: activations only"
    )
    weight_init = sb.selectbox(
        "Weight init",
        WEIGHT_INIT_CHOICES,
        index=WEIGHT_INIT_CHOICES.index(_from_url("wi", "auto", WEIGHT_INIT_CHOICES)),
        key="weight_init",
        help="auto: each method's own rule below 6 bits, an MSE search at 6+ bits (the 3-sigma "
        "and LSQ rules clip too hard there). method: always the method's own rule.",
    )
    wanted = st.query_params.get("cmp")
    default = ["lsq", "lsq-signed", "minmax"]
    if wanted is not None:
        default = [m for m in wanted.split(",") if m in BASELINES]
    baselines = sb.multiselect("Compare LSQ+ with", BASELINES, default=default, key="baselines")

    sb.header("Data")
    data_src = sb.radio(
        "Calibration images",
        ["Bundled photos (scikit-image)", "Folder on the server", "Upload images"],
        key="data_src",
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
            paths = [save_upload(f, f"images/{digest.hexdigest()[:12]}") for f in files]
        except LSQError as e:
            sb.error(str(e))
            return None
        folder = str(paths[0].parent)
    sizes, counts = [64, 96, 128, 160, 192, 224], [8, 16, 32, 64, 128]
    resolution = sb.select_slider(
        "Resolution (px)", options=sizes, value=_from_url("res", 224, sizes), key="res"
    )
    views = sb.select_slider(
        "Views (calibration and evaluation)", counts, _from_url("views", 32, counts), key="views"
    )

    sb.header("Device")
    cuda = torch.cuda.is_available()
    found = f"found CUDA: {torch.cuda.get_device_name(0)}" if cuda else "no CUDA GPU found: CPU"
    device = sb.radio("Device", ["auto", "cpu", "cuda"], key="device", help=found, horizontal=True)
    sb.caption(found)
    try:
        data = DataConfig(
            source="folder" if folder else "bundled",
            folder=folder,
            resolution=resolution,
            calib_views=views,
            eval_views=views,
        )
        settings = Settings(
            model=spec,
            data=data,
            w_bits=w_bits,
            a_bits=a_bits,
            methods=("lsq+", *baselines),
            weight_init=weight_init,
            quantize_weights=quantize_weights,
            device=device,
        )
        # The choices live in the URL too, so a browser refresh keeps them.
        st.query_params.update(
            w=str(w_bits),
            a=str(a_bits),
            qw=str(int(quantize_weights)),
            wi=weight_init,
            cmp=",".join(baselines),
            res=str(resolution),
            views=str(views),
        )
        return settings
    except LSQError as e:
        sb.error(str(e))
        return None


def _from_url(name: str, default, options):
    """A choice from the URL's query string if it is one of ``options``, else ``default``."""
    raw = st.query_params.get(name)
    if raw is None:
        return default
    try:
        value = type(default)(raw)
    except ValueError:
        return default
    return value if value in options else default


@st.cache_resource
def job_manager() -> JobManager:
    """One per server process: jobs outlive browser sessions (a refresh finds them)."""
    return JobManager()


@st.cache_resource(max_entries=2, show_spinner=False)
def _bench(spec: ModelSpec, data: DataConfig, device: str) -> Workbench:
    return prepare(spec, data, device=device)


def workbench(settings: Settings) -> Workbench:
    """The float model and views for these settings (cached across sessions)."""
    return _bench(settings.model, settings.data, settings.device)


def settings() -> Settings | None:
    """The sidebar's current settings, or None if they are invalid (the sidebar says why)."""
    return st.session_state.get("settings")


def save_upload(upload, kind: str) -> Path:
    """Write an uploaded file under DATA_DIR/uploads/<kind>/ with a safe name; returns its path.

    The name keeps only letters, digits, dots, dashes and underscores and is prefixed with a
    content hash, so no upload can write outside that folder or over another upload.
    """
    data = upload.getvalue()
    if len(data) > MAX_UPLOAD_MB * 1024 * 1024:
        raise LSQError(f"{upload.name} is larger than {MAX_UPLOAD_MB} MB")
    if not data:
        raise LSQError(f"{upload.name} is empty")
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(upload.name).name).lstrip(".") or "upload"
    digest = hashlib.sha256(data).hexdigest()[:12]
    folder = (DATA_DIR / "uploads" / kind).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    target = (folder / f"{digest}-{base[-80:]}").resolve()
    if folder not in target.parents:
        raise LSQError("refused an upload name that points outside the upload folder")
    if not target.exists():
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return target


def show_job(job: Job | None, kind: str) -> None:
    """Progress of a running job (refreshing itself each second), or how the last one ended."""
    if job is None:
        return
    if job.active:
        _job_progress(job.id)
    elif job.status == "failed":
        st.error(job.message)
    elif job.status == "stopped":
        st.warning(f"{job.title} was stopped after {job.elapsed:.0f} s.")


@st.fragment(run_every=1.0)
def _job_progress(job_id: str) -> None:
    job = job_manager().get(job_id)
    if job is None:
        return
    if not job.active:
        st.rerun()  # the job ended: redraw the whole page with its results
    label = f"{job.title}: {job.stage or 'starting'} ({job.elapsed:.0f} s)"
    st.progress(job.fraction, text=label)
    if st.button("Stop", key=f"stop-{job_id}", help="ends the job after the current step"):
        job.request_stop()
        st.toast("Stopping after the current step…")


def calibration_or_stop(why: str) -> Job:
    """The last finished calibration job; otherwise say ``why`` one is needed and stop the page."""
    calib = job_manager().latest("calibrate")
    if calib is None or calib.status != "done":
        st.info(f"Calibrate first (Calibrate page){why}.")
        st.stop()
    return calib


def submit(job: Job, fn) -> Job | None:
    """Submit a job, showing a refusal (another job running) as a message."""
    try:
        return job_manager().submit(job, fn)
    except LSQError as e:
        st.warning(str(e))
        return None
