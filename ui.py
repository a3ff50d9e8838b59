"""Streamlit glue shared by app.py and the pages: cached resources, settings, job status.

No computation here: models, data, quantization and figures all come from ``lsq``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import streamlit as st

from lsq.errors import LSQError
from lsq.explorer import Settings
from lsq.jobs import Job, JobManager
from lsq.pipeline import DataConfig, ModelSpec, Workbench, prepare

#: Uploaded files live here and nowhere else.
DATA_DIR = Path(os.environ.get("LSQ_DATA_DIR", "data")).resolve()
MAX_UPLOAD_MB = 200


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


def submit(job: Job, fn) -> Job | None:
    """Submit a job, showing a refusal (another job running) as a message."""
    try:
        return job_manager().submit(job, fn)
    except LSQError as e:
        st.warning(str(e))
        return None
