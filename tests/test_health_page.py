"""The health checks on the Calibrate and Train pages (AppTest, the bundled model at 64 px): the
float model's findings once, each method's grouped by check, the reasons in a wrapping table,
every finding layer by layer in an expander."""

from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from lsq.explorer import Settings
from lsq.health import CHECKS
from lsq.jobs import JobManager
from lsq.pipeline import DataConfig

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["lsq+", "lsq", "lsq-signed", "minmax"]
SMALL = Settings(data=DataConfig(resolution=64, calib_views=8, eval_views=8, batch_size=8))
GROUPED = ["check", "layers", "worst layers", "reason"]


@pytest.fixture(scope="module")
def manager(module_manager):
    return module_manager


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app_pages" / name), default_timeout=120)
    at.session_state["settings"] = SMALL
    at.run()
    assert not at.exception, at.exception
    return at


def press(at: AppTest, label: str, manager: JobManager) -> None:
    (button,) = [b for b in at.button if b.label == label]
    before = {j.id for j in manager.jobs()}
    button.click().run()
    (job,) = [j for j in manager.jobs() if j.id not in before]
    manager.wait(job, timeout=300)
    assert job.status == "done", job.message
    at.run()
    assert not at.exception, at.exception


def tables(at: AppTest) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The float model's grouped findings and the methods' (static tables: the reasons wrap),
    as the page shows them, the float model's first; empty where the page shows none."""
    shown = [t.value for t in at.table]
    model = [t for t in shown if list(t.columns) == GROUPED]
    methods = [t for t in shown if list(t.columns) == ["method", *GROUPED]]
    assert len(model) <= 1 and len(methods) <= 1 and len(shown) == len(model) + len(methods)
    if model and methods:
        assert shown[0] is model[0]
    empty = pd.DataFrame(columns=["method", *GROUPED])
    return (model or [empty[GROUPED]])[0], (methods or [empty])[0]


@pytest.mark.slow  # a calibration of the bundled model at 64 px: ~1 min on 2 shared cores
def test_calibrate_page_shows_the_float_model_once_and_each_methods_findings_by_check(manager):
    at = page("calibrate.py")
    press(at, f"Calibrate {len(METHODS)} method(s)", manager)
    model, methods = tables(at)
    # The bundled model's dead channels: one row, once, not one per method and layer.
    assert model["check"].tolist() == ["dead_channels"] and int(model["layers"].iloc[0]) > 1
    assert "dead_channels" not in set(methods["check"])
    assert set(methods["method"]) <= set(METHODS)
    per_method = methods.groupby("method").size()
    assert (per_method <= 10).all() and not methods.duplicated(["method", "check"]).any()
    assert set(methods["check"]) <= set(CHECKS)
    assert all(0 < len(r) < 200 for r in [*model["reason"], *methods["reason"]])
    (detail,) = [e for e in at.expander if e.label.startswith("Every finding, layer by layer")]
    every = detail.dataframe[0].value
    assert (every["method"] == "float model").sum() == int(model["layers"].iloc[0])
    assert len(every) == int(model["layers"].sum() + methods["layers"].sum())


@pytest.mark.slow  # one QAT step of two methods after the calibration: ~1 min more
def test_train_page_groups_the_trained_methods_findings_the_same_way(manager):
    at = page("train.py")
    at.radio(key="train_recipe").set_value("qat").run()
    at.number_input(key="train_steps").set_value(1).run()
    press(at, "Train", manager)
    model, methods = tables(at)
    assert model["check"].tolist() == ["dead_channels"]  # one QAT step left them dead in both
    assert "dead_channels" not in set(methods["check"])
    assert set(methods["method"]) <= {"lsq+", "lsq"}  # the two methods trained
    assert (methods.groupby("method").size() <= 10).all()
    assert any(e.label.startswith("Every finding, layer by layer") for e in at.expander)
