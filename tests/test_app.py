"""Each page under Streamlit's AppTest, on the bundled model at 64 px with a few views."""

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from lsq.explorer import Settings
from lsq.pipeline import DataConfig

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
METHODS = ["lsq+", "lsq", "lsq-signed", "minmax"]
SMALL = Settings(data=DataConfig(resolution=64, calib_views=8, eval_views=8, batch_size=8))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("LSQ_RUNS_DIR", str(path))
    yield path
    mp.undo()


def small_app(page: str) -> AppTest:
    """A page run on its own with small settings (AppTest runs a switched-to page without
    app.py, so the sidebar's settings are given through session state)."""
    at = AppTest.from_file(str(ROOT / page), default_timeout=120)
    at.session_state["settings"] = SMALL
    at.run()
    assert not at.exception, at.exception
    return at


SIDEBAR = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import streamlit as st
from ui import sidebar
st.session_state["settings"] = sidebar()
"""


def test_sidebar_builds_settings_from_its_widgets():
    at = AppTest.from_string(SIDEBAR, default_timeout=60)
    at.run()
    assert at.session_state["settings"] == Settings(
        data=DataConfig(resolution=224, calib_views=32, eval_views=32)
    )
    at.sidebar.select_slider(key="w_bits").set_value(3)
    at.sidebar.select_slider(key="res").set_value(64)
    at.sidebar.multiselect(key="baselines").set_value(["minmax"])
    at.run()
    assert not at.exception
    s = at.session_state["settings"]
    assert (s.w_bits, s.a_bits, s.data.resolution, s.methods) == (3, 4, 64, ("lsq+", "minmax"))
    assert s.config("lsq+").weight_init == "3sigma"  # auto: the method's own rule below 6 bits


def test_sidebar_choices_survive_a_refresh_through_the_url():
    at = AppTest.from_string(SIDEBAR, default_timeout=60)
    at.run()
    at.sidebar.select_slider(key="a_bits").set_value(3)
    at.sidebar.multiselect(key="baselines").set_value(["minmax"])
    at.run()
    url = dict(at.query_params)
    fresh = AppTest.from_string(SIDEBAR, default_timeout=60)  # a refresh: same URL, new session
    for key, value in url.items():
        fresh.query_params[key] = value
    fresh.run()
    s = fresh.session_state["settings"]
    assert (s.a_bits, s.methods) == (3, ("lsq+", "minmax"))


@pytest.mark.parametrize("key, value", [("w", "99"), ("a", "four"), ("res", "-1"), ("wi", "x")])
def test_nonsense_in_the_url_falls_back_to_defaults(key, value):
    at = AppTest.from_string(SIDEBAR, default_timeout=60)
    at.query_params[key] = value
    at.run()
    assert not at.exception
    assert at.session_state["settings"] == Settings()


def test_sidebar_reports_bad_input_in_words():
    at = AppTest.from_string(SIDEBAR, default_timeout=60)
    at.run()
    at.sidebar.radio(key="data_src").set_value("Folder on the server").run()
    at.sidebar.text_input(key="folder").set_value("/no/such/folder").run()
    assert not at.exception
    # The folder is checked when the data are prepared (a job); the settings themselves are valid.
    assert at.session_state["settings"].data.folder == "/no/such/folder"
    at.sidebar.selectbox(key="model_source").set_value("Checkpoint file").run()
    assert at.session_state["settings"] is None
    assert any("checkpoint" in i.value.lower() for i in at.sidebar.info)


def figures(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def points(trace: dict, axis: str = "x") -> list:
    """A trace's values; plotly sends numpy arrays as base64 ("bdata") with a dtype."""
    v = trace.get(axis)
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v or [])


def trace_names(fig: dict) -> list[str]:
    return [d.get("name") or "" for d in fig["data"]]


def wait_for(kind: str):
    import ui

    job = ui.job_manager().latest(kind)
    assert job is not None, f"no {kind} job was started"
    ui.job_manager().wait(job, timeout=300)
    assert job.status == "done", job.message
    return job


def test_home_page_explains_and_offers_the_default():
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    assert "LSQ+" in at.title[0].value
    assert any(b.label == "Run the default" for b in at.button)


@pytest.fixture(scope="module")
def calibrated(runs_dir):
    at = small_app("pages/calibrate.py")
    [b for b in at.button if b.label.startswith("Calibrate")][0].click().run()
    wait_for("calibrate")
    at.run()
    assert not at.exception, at.exception
    return at


def test_calibrate_page_draws_ranges_and_histogram_for_every_method(calibrated):
    figs = figures(calibrated)
    assert len(figs) == 2
    ranges, hist = figs
    for method in METHODS:
        traces = [d for d in ranges["data"] if d.get("name") == method]
        assert traces and len(points(traces[0])) > 0, method
        assert any(name.startswith(f"{method}: ") for name in trace_names(hist)), method
    table = calibrated.dataframe[0].value
    assert list(table["method"]) == METHODS
    assert table["agreement"].between(0, 1).all()


def test_train_page_trains_and_draws_curves(calibrated):
    at = small_app("pages/train.py")
    at.number_input[0].set_value(2)  # steps
    at.button[0].click().run()  # the form's Train button
    wait_for("train")
    at.run()
    assert not at.exception, at.exception
    figs = figures(at)
    assert len(figs) == 3
    loss, agreement, traj = figs
    assert {"lsq+", "lsq"} <= set(trace_names(loss))
    assert all(len(points(d)) == 2 for d in loss["data"])
    assert {"lsq+", "lsq"} <= set(trace_names(traj))


def test_layers_page_tables_and_sensitivity(calibrated):
    at = small_app("pages/layers.py")
    figs = figures(at)
    assert len(figs) == 2
    err = figs[0]
    assert {"lsq+", "lsq", "minmax"} <= set(trace_names(err))
    assert all(len(points(d)) == 50 for d in err["data"] if d.get("name") in METHODS)
    [b for b in at.button if b.label == "Measure sensitivity"][0].click().run()
    wait_for("sensitivity")
    at.run()
    assert not at.exception, at.exception
    sens = figures(at)[-1]
    names = " ".join(trace_names(sens))
    assert "weights" in names and "activations" in names
    assert all(len(points(d, "x")) >= 5 for d in sens["data"])  # stem, depthwise, ... groups


def test_runs_page_lists_and_opens_runs(calibrated, runs_dir):
    at = small_app("pages/runs.py")
    table = at.dataframe[0].value
    assert len(table) >= len(METHODS)
    assert set(table["status"]) <= {"complete", "stopped"}
    assert at.get("download_button"), "the opened run offers its CSV and checkpoint"
