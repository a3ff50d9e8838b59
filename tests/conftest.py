"""Fixtures shared by the test modules: a job manager of a test's own (or a module's)."""

from pathlib import Path

import pytest

import ui
from lsq.jobs import JobManager


def own_job_manager(mp: pytest.MonkeyPatch, runs: Path | None = None) -> JobManager:
    """A new job manager that the app's pages see (``ui.job_manager``), so no other test's job is
    seen or waited for; runs are saved under ``runs`` when it is given."""
    own = JobManager()
    mp.setattr(ui, "job_manager", lambda: own)
    if runs is not None:
        mp.setenv("LSQ_RUNS_DIR", str(runs))
    return own


@pytest.fixture
def manager(monkeypatch, tmp_path):
    """A job manager of this test only, saving runs under tmp_path."""
    return own_job_manager(monkeypatch, tmp_path / "runs")


@pytest.fixture(scope="module")
def module_manager(tmp_path_factory):
    """A job manager of this test module only, saving runs in a folder of the module's."""
    mp = pytest.MonkeyPatch()
    yield own_job_manager(mp, tmp_path_factory.mktemp("runs"))
    mp.undo()
