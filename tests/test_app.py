"""Each page under Streamlit's AppTest, on the bundled model at 64 px with a few views."""

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import own_job_manager
from streamlit.testing.v1 import AppTest

import ui
from lsq.explorer import Settings
from lsq.jobs import Job, JobManager
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


@pytest.fixture(scope="module")
def manager(runs_dir):
    """This module's own job manager, saving runs in ``runs_dir``."""
    mp = pytest.MonkeyPatch()
    yield own_job_manager(mp)
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


def test_sidebar_choices_come_back_from_the_url():
    """A refresh or a shared link: the bound widgets start from the URL (Streamlit writes the
    URL from the browser, which AppTest does not run, so the reading side is tested here)."""
    at = AppTest.from_string(SIDEBAR, default_timeout=60)
    at.query_params.update(
        w_bits="3", a_bits="2", baselines=["minmax", "lsq"], weight_init="mse", res="64"
    )
    at.run()
    assert not at.exception
    s = at.session_state["settings"]
    assert (s.w_bits, s.a_bits, s.weight_init, s.data.resolution) == (3, 2, "mse", 64)
    assert s.methods == ("lsq+", "minmax", "lsq")


@pytest.mark.parametrize(
    "key, value",
    [
        ("w_bits", "99"),
        ("a_bits", "four"),
        ("res", "-1"),
        ("weight_init", "x"),
        ("present", "maybe"),
    ],
)
def test_nonsense_in_the_url_falls_back_to_defaults(key, value):
    at = AppTest.from_string(SIDEBAR, default_timeout=60)
    at.query_params[key] = value
    at.run()
    assert not at.exception
    assert at.session_state["settings"] == Settings()
    assert at.sidebar.toggle(key="present").value is False


def test_sidebar_offers_synthetic_images_alone_or_added():
    at = AppTest.from_string(SIDEBAR, default_timeout=60)
    at.run()
    at.sidebar.select_slider(key="synthetic").set_value(64).run()
    data = at.session_state["settings"].data
    assert (data.source, data.synthetic) == ("bundled", 64)
    at.sidebar.radio(key="data_src").set_value("Synthesised from the model (no photo)").run()
    assert not at.exception
    data = at.session_state["settings"].data
    assert (data.source, data.synthetic_count) == ("synthetic", data.calib_views)


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


def click_and_wait(at: AppTest, label: str, manager: JobManager, kind: str) -> Job:
    """Click the button called ``label``; the one new job it started, finished."""
    before = set(j.id for j in manager.jobs())
    buttons = [b for b in at.button if b.label == label]
    assert len(buttons) == 1, [b.label for b in at.button]
    buttons[0].click().run()
    new = [j for j in manager.jobs() if j.id not in before]
    assert [j.kind for j in new] == [kind], [(j.kind, j.title) for j in new]
    manager.wait(new[0], timeout=300)
    assert new[0].status == "done", new[0].message
    return new[0]


def test_home_page_explains_and_offers_the_default():
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    assert "LSQ+" in at.title[0].value
    assert any(b.label == "Run the default" for b in at.button)


def test_home_page_intro_figure_redraws_at_the_chosen_bits():
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    (intro,) = figures(at)
    heads = [a["text"] for a in intro["layout"]["annotations"]]
    assert [h.split("</b>")[0] for h in heads] == ["<b>lsq", "<b>lsq-signed", "<b>lsq+"]
    assert "least" in heads[2] and "3 bits" in intro["layout"]["title"]["text"]
    at.select_slider(key="intro_bits").set_value(2).run()
    assert not at.exception
    (intro,) = figures(at)
    assert "2 bits" in intro["layout"]["title"]["text"]
    assert any("4 levels" in name for name in trace_names(intro))


@pytest.fixture(scope="module")
def calibrated(runs_dir, manager):
    at = small_app("app_pages/calibrate.py")
    click_and_wait(at, "Calibrate 4 method(s)", manager, "calibrate")
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


def test_train_page_trains_and_draws_curves(calibrated, manager):
    at = small_app("app_pages/train.py")
    assert at.radio[0].value == "qat"  # 8-bit weights: QAT alone by default
    [n for n in at.number_input if n.label == "QAT steps"][0].set_value(2)
    job = click_and_wait(at, "Train", manager, "train")
    assert [m for m, e in job.events if e.kind == "step"] == ["lsq+", "lsq+", "lsq", "lsq"]
    at.run()
    assert not at.exception, at.exception
    figs = figures(at)
    assert len(figs) == 4
    loss, agreement, traj, replay = figs
    assert {"lsq+", "lsq"} <= set(trace_names(loss))
    assert all(len(points(d)) == 2 for d in loss["data"])
    assert {"lsq+", "lsq"} <= set(trace_names(traj))
    # Replay: the layer's grid at the last step, then at step 0 (the range moved in between).
    assert "step 2 of 2" in replay["layout"]["title"]["text"]
    levels = [d for d in replay["data"] if d.get("name", "").startswith("lsq+: 16 levels")]
    at.select_slider(key="replay_step").set_value(0).run()
    assert not at.exception, at.exception
    replay = figures(at)[3]
    assert "step 0 of 2" in replay["layout"]["title"]["text"]
    first = [d for d in replay["data"] if d.get("name", "").startswith("lsq+: 16 levels")]
    assert points(first[0]) != points(levels[0])
    table = at.dataframe[0].value
    stages = dict(zip(table["method"], table["stage"], strict=True))
    assert stages == {
        "lsq+": "trained 2 steps",
        "lsq": "trained 2 steps",
        "lsq-signed": "not trained",
        "minmax": "not trained",
    }


def test_train_page_reconstructs_then_trains_and_draws_each_unit(calibrated, manager):
    at = small_app("app_pages/train.py")
    at.radio[0].set_value("reconstruct+qat").run()  # its fields appear
    [n for n in at.number_input if n.label == "QAT steps"][0].set_value(1)
    [n for n in at.number_input if n.label.startswith("Reconstruction iter")][0].set_value(2)
    [b for b in at.selectbox if b.label.startswith("Reconstruction starts")][0].set_value("keep")
    [b for b in at.selectbox if b.label.startswith("Reconstruction learns")][0].set_value("learned")
    at.multiselect[0].set_value(["lsq+"])
    job = click_and_wait(at, "Train", manager, "train")
    kinds = [e.kind for m, e in job.events]
    assert kinds.count("unit") == 19 and kinds[-1] == "done"
    at.run()
    assert not at.exception, at.exception
    units = figures(at)[0]
    assert "reconstruction" in units["layout"]["title"]["text"].lower()
    assert {"lsq+, before", "lsq+, after"} == set(trace_names(units))
    assert len(points(units["data"][0])) == 19
    stages = dict(zip(at.dataframe[0].value["method"], at.dataframe[0].value["stage"], strict=True))
    assert stages["lsq+"] == "reconstructed, trained 1 step"
    # Both stages are published, each with its own model: the reconstructed one before QAT.
    comp = job.result
    rec, trained = comp.results("reconstructed")["lsq+"], comp.results("trained")["lsq+"]
    assert (rec.label, trained.label) == ("reconstructed", "reconstructed, trained 1 step")
    assert rec.model is not trained.model and rec.metrics != trained.metrics
    assert rec.recon_config.weight_init == "keep" and rec.recon_config.iters == 2
    assert rec.recon_config.rounding == "learned"


def test_layers_page_tables_and_sensitivity(tmp_path, monkeypatch):
    """On a calibration of its own, in a runs folder of its own: what the page shows does not
    depend on whether another test trained the module's shared calibration first."""
    manager = own_job_manager(monkeypatch, tmp_path / "runs")
    click_and_wait(
        small_app("app_pages/calibrate.py"), "Calibrate 4 method(s)", manager, "calibrate"
    )
    at = small_app("app_pages/layers.py")
    layers = manager.latest("layers")  # the first visit measures every layer, as a job
    assert layers is not None and layers.params["stage"] == "initialised"
    manager.wait(layers, timeout=300)
    assert layers.status == "done", layers.message
    at.run()
    assert not at.exception, at.exception
    figs = figures(at)
    assert len(figs) == 3  # error per layer, clipping vs rounding, one layer's histograms
    err, split, hist = figs
    assert {"clipping", "rounding"} <= set(trace_names(split))
    heads = [a["text"] for a in split["layout"]["annotations"]]
    assert sum(h.startswith("<b>") for h in heads) == len(set(layers.result["method"]))
    assert len([a for a in hist["layout"]["annotations"] if a["text"].startswith("<b>")]) >= 2
    assert {"lsq+", "lsq", "minmax"} <= set(trace_names(err))
    assert all(len(points(d)) == 50 for d in err["data"] if d.get("name") in METHODS)
    click_and_wait(at, "Measure sensitivity", manager, "sensitivity")
    at.run()
    assert not at.exception, at.exception
    sens = figures(at)[-1]
    names = " ".join(trace_names(sens))
    assert "weights" in names and "activations" in names
    assert all(len(points(d, "x")) >= 5 for d in sens["data"])  # stem, depthwise, ... groups


def test_presentation_mode_from_the_url_enlarges_the_charts():
    from lsq.plots import FONT_SIZE, PRESENT_INK

    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert at.sidebar.toggle(key="present").value is False
    (plain,) = figures(at)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["present"] = "true"  # a shared link with presentation mode on
    at.run()
    assert not at.exception, at.exception
    assert at.sidebar.toggle(key="present").value is True
    (big,) = figures(at)
    assert big["layout"]["font"]["size"] > FONT_SIZE
    assert big["layout"]["xaxis"]["tickfont"]["color"] == PRESENT_INK
    assert "tickfont" not in plain["layout"].get("xaxis", {})
    assert at.get("plotly_chart")[0].proto.theme == ""  # not Streamlit's small grey theme
    # The text around the charts grows too (captions, tables, metrics): one style sheet.
    assert [h.proto.body for h in at.get("html")] == [ui.PRESENT_CSS]
    at.sidebar.toggle(key="present").set_value(False).run()
    assert not at.get("html")


def test_runs_page_shows_training_curves_and_fitting_compare_headers(tmp_path, monkeypatch):
    from lsq.config import make_config
    from lsq.runs import Run

    monkeypatch.setenv("LSQ_RUNS_DIR", str(tmp_path))
    for method, kl in (("lsq+", 0.1), ("lsq", 0.3)):
        run = Run.create("efficientnet_lite0", make_config(method, 8, 4), root=tmp_path)
        run.write_table(
            "metrics",
            pd.DataFrame(
                {"step": [0, 1, 2], "loss": [None, 0.5, 0.4], "agreement": [0.8, None, 0.9],
                 "kl": [kl, None, kl / 2]}
            ),
        )  # fmt: skip
        run.write_table(
            "layers", pd.DataFrame({"layer": ["stem", "head"], "output_sqnr_db": [20.0, 30.0]})
        )
        run.finish()
    at = AppTest.from_file(str(ROOT / "app_pages/runs.py"), default_timeout=60)
    at.run()
    names = list(at.dataframe[0].value["run"])
    at.multiselect[0].set_value(names).run()
    assert not at.exception, at.exception
    compare = at.dataframe[1].value
    assert list(compare.columns) == ["layer", "A", "B", "B − A"]  # short: nothing cut off
    assert list(compare["B − A"]) == [0.0, 0.0]
    assert any(names[0] in c.value and names[1] in c.value for c in at.caption)
    loss, agreement, kl = figures(at)
    assert set(trace_names(loss)) == {"lsq+", "lsq"}  # each run by its method and its colour
    assert "loss" in loss["layout"]["title"]["text"] and "KL" in kl["layout"]["title"]["text"]
    assert all(len(points(d)) == 2 for d in kl["data"])  # the evaluated steps only


def test_runs_page_lists_and_opens_runs(calibrated, runs_dir, manager):
    at = small_app("app_pages/runs.py")
    table = at.dataframe[0].value
    assert len(table) >= len(METHODS)
    assert set(table["status"]) <= {"complete", "stopped"}
    # Each calibration run shows its numbers on both sets of views, as the result gave them.
    comp = manager.latest_done("calibrate").result
    rows = table.set_index("run")
    for method, result in comp.initial.items():
        row = rows.loc[result.run_path.name]
        for key in ("agreement", "kl", "calib_agreement", "calib_kl"):
            assert row[key] == pytest.approx(result.metrics_init[key], abs=1e-12), (method, key)
    assert at.get("download_button"), "the opened run offers its CSV and checkpoint"


def metric(at: AppTest, label: str) -> str:
    return [m.value for m in at.metric if m.label == label][0]


def test_range_lab_moves_with_its_sliders_and_snaps(calibrated, manager):
    at = small_app("app_pages/lab.py")
    assert at.selectbox(key="lab_layer").value == "blocks.0.0.conv_dw"
    (fig,) = figures(at)
    assert any(name.startswith("lsq+: 16 levels") for name in trace_names(fig))
    kl_mse = float(metric(at, "Model KL to float"))
    lo, hi = at.slider(key="lab_range").value
    at.slider(key="lab_range").set_value((lo, lo + (hi - lo) / 4)).run()  # clip hard
    assert not at.exception, at.exception
    assert float(metric(at, "Model KL to float")) > kl_mse
    assert float(metric(at, "Clipping error (MSE)")) > 0
    at.button(key="snap-minmax").click().run()
    assert not at.exception, at.exception
    assert float(metric(at, "Clipping error (MSE)")) == pytest.approx(0, abs=1e-9)
    assert "ms on 8 views" in " ".join(c.value for c in at.caption)
    at.radio(key="lab_grid").set_value("signed").run()
    assert not at.exception, at.exception
    assert any(name.startswith("lsq-signed: 16 levels") for name in trace_names(figures(at)[0]))
    at.button(key="snap-learned").click().run()  # the first learned value: lsq+ after init
    assert not at.exception, at.exception
    assert at.radio(key="lab_grid").value == "asymmetric"
    init = manager.latest("calibrate").result.initial["lsq+"].init_frame().set_index("name")
    want = init.loc["blocks.0.0.conv_dw", ["lo", "hi"]].to_list()
    assert list(at.slider(key="lab_range").value) == pytest.approx(want, rel=1e-4)


def test_runs_page_names_each_runs_stage_and_draws_reconstruction(tmp_path, monkeypatch):
    """A reconstructed run is not "not trained": the table says each run's stage and a run's
    reconstruction is drawn unit by unit (a reconstruction that stopped before its QAT counts as
    reconstructed, whatever training it was set up for)."""
    from lsq.config import make_config
    from lsq.runs import Run

    monkeypatch.setenv("LSQ_RUNS_DIR", str(tmp_path))
    recon = {"iters": 60}
    kinds = {
        "lsq+": ({"train": None}, {"stage": "reconstructed", "reconstruct": recon}),
        "lsq": ({"train": {"steps": 20}}, {"stage": "reconstructed", "reconstruct": recon}),
        "minmax": ({"train": None}, {"stage": "initialised"}),
        "lsq-signed": ({"train": {"steps": 20}}, {"stage": "trained", "reconstruct": recon}),
    }
    for method, (meta, after) in kinds.items():
        run = Run.create("efficientnet_lite0", make_config(method, 4, 4), meta=meta, root=tmp_path)
        if after.get("reconstruct"):
            units = {"unit": ["stem", "blocks.0.0"], "index": [0, 1], "before": [1.0, 0.5],
                     "after": [0.2, 0.1]}  # fmt: skip
            run.write_table("units", pd.DataFrame(units))
        run.update_meta(**after)
        run.finish()
    at = AppTest.from_file(str(ROOT / "app_pages/runs.py"), default_timeout=60)
    at.run()
    table = at.dataframe[0].value
    stages = dict(zip(table["label"].str.split().str[0], table["stage"], strict=True))
    assert stages == {
        "lsq+": "reconstructed",
        "lsq": "reconstructed",
        "minmax": "initialised",
        "lsq-signed": "reconstructed, then trained",
    }
    by_method = dict(zip(table["label"].str.split().str[0], table["run"], strict=True))
    at.multiselect[0].set_value([by_method["lsq+"], by_method["lsq"]]).run()
    assert not at.exception, at.exception
    captions = " ".join(c.value for c in at.caption)
    assert "Not trained" not in captions and "reconstructed runs" in captions
    (units,) = figures(at)
    assert "reconstruction" in units["layout"]["title"]["text"]
    assert {name.split(",")[0] for name in trace_names(units)} == {"lsq+", "lsq"}


def test_a_failed_calibration_keeps_the_last_results_on_the_pages(calibrated, manager):
    """A calibration that fails (a bad image folder) says so, and the results of the last one
    that finished stay on the Calibrate and Train pages (they were replaced by "Calibrate
    first"); a run of failures never pushes them out of the job list."""
    from lsq.errors import LSQError

    good = manager.latest_done("calibrate")

    def bad_folder(job):
        raise LSQError("the image folder /nowhere does not exist")

    for _ in range(manager._keep + 2):
        manager.wait(
            manager.submit(Job("calibrate", "Calibration", {"settings": SMALL}), bad_folder)
        )
    assert manager.latest("calibrate").status == "failed"
    assert manager.latest_done("calibrate") is good
    for page in ("app_pages/calibrate.py", "app_pages/train.py"):
        at = small_app(page)
        assert any("/nowhere does not exist" in e.value for e in at.error), page
        assert not any("Calibrate first" in i.value for i in at.info), page
        assert any(good.result.settings.label in c.value for c in at.caption), page


def test_train_page_shows_the_chosen_recipes_fields_and_keeps_them_across_pages(
    calibrated, manager
):
    """No form: the fields of the chosen recipe alone are shown, a number typed (Enter
    included) starts nothing, and the choices are still there after visiting another page."""
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("app_pages/train.py").run()
    assert not at.exception, at.exception

    def fields() -> set[str]:
        return {
            w.label for w in [*at.number_input, *at.selectbox] if (w.key or "").startswith("train_")
        }

    assert at.radio(key="train_recipe").value == "qat"  # W8: QAT alone
    assert "QAT steps" in fields() and not any(f.startswith("Reconstruction") for f in fields())
    at.radio(key="train_recipe").set_value("reconstruct").run()
    assert "QAT steps" not in fields() and "Reconstruction iterations per block" in fields()
    at.radio(key="train_recipe").set_value("qat").run()
    trains = len(manager.jobs("train"))
    at.number_input(key="train_steps").set_value(7).run()
    assert not at.get("form") and len(manager.jobs("train")) == trains
    at.switch_page("app_pages/runs.py").run()
    at.switch_page("app_pages/train.py").run()
    assert not at.exception, at.exception
    assert at.number_input(key="train_steps").value == 7


def test_each_result_shows_the_cli_command_that_gives_its_numbers(calibrated, manager, tmp_path):
    """The Calibrate page's "Reproduce in the command line" line, run headless, computes the
    very numbers the page shows; the saved run carries the same line."""
    import shlex

    from lsq.cli import main
    from lsq.runs import list_runs

    at = small_app("app_pages/calibrate.py")
    lines = [c.value for c in at.code if c.value.startswith("python -m lsq run")]
    assert len(lines) == len(METHODS)
    line = next(x for x in lines if "--method lsq+ " in x)
    comp = manager.latest_done("calibrate").result
    saved = {i.meta.get("command") for i in list_runs() if str(i.path) in comp.runs.values()}
    assert line in saved
    assert main(["--runs-dir", str(tmp_path), *shlex.split(line)[3:]]) == 0
    (info,) = list_runs(tmp_path)
    app = comp.initial["lsq+"].metrics_init
    cli = info.meta["metrics_init"]
    assert cli["agreement"] == pytest.approx(app["agreement"], abs=1e-9)
    assert cli["kl"] == pytest.approx(app["kl"], rel=1e-5)


def test_calibrate_table_shows_each_method_on_calibration_views_beside_held_out(
    calibrated, manager
):
    """Agreement and KL on the calibration views (beside the held-out views') are the method's
    model against the float model on ``bench.calib``, computed here again from the logits."""
    import torch

    table = calibrated.dataframe[0].value
    comp = manager.latest_done("calibrate").result
    calib = comp.bench.calib
    with torch.no_grad():
        float_logits = comp.bench.model(calib).double()
        p = float_logits.softmax(-1)
        for method in METHODS:
            q = comp.initial[method].model(calib).double()
            row = table[table["method"] == method].iloc[0]
            agreement = (q.argmax(-1) == float_logits.argmax(-1)).double().mean()
            kl = (p * (p.log() - q.log_softmax(-1))).sum(-1).mean()
            assert row["calib_agreement"] == pytest.approx(float(agreement), abs=1e-9), method
            assert row["calib_kl"] == pytest.approx(float(kl), rel=1e-3, abs=1e-6), method
    captions = " ".join(c.value for c in calibrated.caption)
    assert f"the same on the {len(calib)} calibration views" in captions
    assert "fitted those photos" in captions
