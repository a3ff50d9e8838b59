"""Results are snapshots: training twice, and pages open while a job trains.

Tiny random resnet10t at 32 px on the CPU, so each test takes seconds.
"""

import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import on_step
from streamlit.testing.v1 import AppTest

from lsq.errors import LSQError
from lsq.explorer import Settings, calibrate_job, train_job
from lsq.jobs import Job
from lsq.pipeline import DataConfig, ModelSpec, Stage
from lsq.runs import load_run
from lsq.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = Settings(
    model=ModelSpec("resnet10t", "random"),
    data=DataConfig(resolution=32, calib_views=8, eval_views=8, batch_size=8),
    methods=("lsq+", "minmax"),
    device="cpu",
)


@pytest.fixture
def calibrated(manager):
    job = Job("calibrate", "Calibration", {"settings": TINY})
    manager.wait(manager.submit(job, lambda j: calibrate_job(j, TINY)), 120)
    assert job.status == "done", job.message
    return job.result


def train_cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, eval_every=1, compile=False, device="cpu")


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def stop_after_first_step(job: Job) -> Job:
    """``job``, asking itself to stop once training has taken a step."""
    return on_step(job, job.request_stop)


def test_training_a_method_twice_gives_two_independent_runs_from_the_initialised_state(
    calibrated,
):
    comp = calibrated
    initial = state(comp.initial["lsq+"].model)
    # First press: stopped after one step.
    first = train_job(stop_after_first_step(Job("train", "1")), comp, ["lsq+"], train_cfg(3))
    one = first.trained["lsq+"]
    assert (one.stage, one.steps, one.status) == (Stage.TRAINED, 1, "stopped")
    # Second press, on what the page then shows (the comparison with the first run in it).
    second = train_job(Job("train", "2"), first, ["lsq+"], train_cfg(3))
    two = second.trained["lsq+"]
    assert (two.steps, two.status, two.message, two.label) == (3, "complete", "", "trained 3 steps")
    assert [e.step for e in two.history if e.kind == "step"] == [1, 2, 3]
    # Both started from the initialised state: the same evaluation before the first step ...
    assert one.history[0].kind == two.history[0].kind == "eval"
    assert one.history[0].kl == two.history[0].kl
    assert one.history[1].loss == two.history[1].loss
    # ... which is untouched, and a third press repeats the second exactly.
    assert all(
        torch.equal(v, initial[k]) for k, v in comp.initial["lsq+"].model.state_dict().items()
    )
    assert second.initial["lsq+"] is comp.initial["lsq+"]
    three = train_job(Job("train", "3"), second, ["lsq+"], train_cfg(3)).trained["lsq+"]
    assert all(torch.equal(v, state(three.model)[k]) for k, v in state(two.model).items())
    assert one.model is not two.model is not comp.initial["lsq+"].model
    # The saved runs hold their own steps only.
    assert list(load_run(one.run_path).tables["metrics"]["step"]) == [0, 1]
    assert list(load_run(two.run_path).tables["metrics"]["step"]) == [0, 1, 2, 3]
    assert load_run(one.run_path).info.status == "stopped"
    assert load_run(two.run_path).info.status == "complete"
    # Continuing is explicit: from the latest trained result, counting its steps.
    more = train_job(Job("train", "4"), second, ["lsq+"], train_cfg(2), continue_trained=True)
    assert more.trained["lsq+"].steps == 5
    assert more.trained["lsq+"].history[0].kl == pytest.approx(two.metrics_final["kl"], rel=1e-4)


def test_opening_the_layers_page_while_training_runs_changes_nothing(calibrated, manager):
    comp = calibrated
    steps = 30
    reference = train_job(Job("train", "no page open"), comp, ["lsq+"], train_cfg(steps))
    expected = reference.trained["lsq+"]

    page_starts, page_done = threading.Event(), threading.Event()
    job = Job("train", "Training lsq+", {"calibration": comp.calibration, "settings": TINY})
    add = job.add_event

    def add_event(event) -> None:  # the page runs while steps 2..30 are taken
        add(event)
        if event[1].kind == "step" and event[1].step == 1:
            assert page_starts.wait(60)
        if event[1].kind == "step" and event[1].step == steps:
            assert page_done.wait(120)

    job.add_event = add_event
    manager.submit(job, lambda j: train_job(j, comp, ["lsq+"], train_cfg(steps)))
    at = AppTest.from_file(str(ROOT / "app_pages" / "layers.py"), default_timeout=120)
    at.session_state["settings"] = TINY
    page_starts.set()
    at.run()
    still_training = job.active
    page_done.set()
    manager.wait(job, 120)
    assert still_training, "the page ran while the job trained"
    assert not at.exception, at.exception
    assert job.status == "done", job.message
    trained = job.result.trained["lsq+"]
    assert [e.loss for e in trained.history] == [e.loss for e in expected.history]
    got = state(trained.model)
    assert all(torch.equal(v, got[k]) for k, v in state(expected.model).items())

    # Once training has ended the page measures the published snapshots, as a job.
    at.run()
    layers = manager.latest("layers")
    assert layers is not None and layers.params["stage"] == "trained"
    manager.wait(layers, 120)
    assert layers.status == "done", layers.message
    at.run()
    assert not at.exception, at.exception
    assert at.get("plotly_chart")


def test_a_later_stage_is_published_beside_the_initialised_results(calibrated):
    import dataclasses

    comp = calibrated
    rebuilt = dataclasses.replace(comp.initial["lsq+"], stage=Stage.RECONSTRUCTED)
    later = comp.with_results({"lsq+": rebuilt})
    assert comp.stages == [Stage.INITIALISED] and not comp.later  # the old one is unchanged
    assert later.stages == [Stage.INITIALISED, Stage.RECONSTRUCTED]
    assert later.id != comp.id and later.calibration == comp.calibration
    assert later.results("reconstructed") == {"lsq+": rebuilt}
    frame = later.metrics_frame("reconstructed")
    assert dict(zip(frame["method"], frame["stage"], strict=True)) == {
        "lsq+": "reconstructed",
        "minmax": "not reconstructed",
    }
    with pytest.raises(LSQError, match="calibration only"):
        comp.with_results({"lsq+": comp.initial["lsq+"]})


def test_after_calibrating_other_settings_no_page_shows_the_old_results(calibrated, manager):
    import dataclasses

    from lsq.explorer import sensitivity_job

    comp = calibrated
    params = {"calibration": comp.calibration, "settings": TINY}
    trained = manager.submit(
        Job("train", "Training lsq+", params), lambda j: train_job(j, comp, ["lsq+"], train_cfg(2))
    )
    manager.wait(trained, 120)
    sens_params = {**params, "comparison": trained.result.id, "stage": "trained"}
    sens = manager.submit(
        Job("sensitivity", "Sensitivity", {**sens_params, "method": "lsq+"}),
        lambda j: sensitivity_job(j, trained.result, "lsq+", "trained"),
    )
    manager.wait(sens, 120)
    assert (trained.status, sens.status) == ("done", "done")

    other = dataclasses.replace(TINY, w_bits=4)
    job = Job("calibrate", "Calibration", {"settings": other})
    manager.wait(manager.submit(job, lambda j: calibrate_job(j, other)), 120)
    assert job.status == "done", job.message

    at = AppTest.from_file(str(ROOT / "app_pages" / "train.py"), default_timeout=60)
    at.session_state["settings"] = other
    at.run()
    assert not at.exception, at.exception
    assert not at.success and not at.get("plotly_chart")  # no "finished", no old curves
    assert any("none trained yet" in i.value for i in at.info)
    assert any("W4A4" in c.value for c in at.caption)  # labelled with the new settings

    layers = AppTest.from_file(str(ROOT / "app_pages" / "layers.py"), default_timeout=60)
    layers.session_state["settings"] = other
    layers.run()
    manager.wait(manager.latest("layers"), 120)
    layers.run()
    assert not layers.exception, layers.exception
    assert "layers_stage" not in layers.session_state  # the new calibration has no trained stage
    # per-layer error, clipping vs rounding and histogram panels: no old sensitivity chart
    assert len(layers.get("plotly_chart")) == 3


def test_train_page_labels_every_reconstruction_choice():
    """The Train page labels exactly ReconstructConfig's choices (a new one needs a label)."""
    from lsq.explorer import RECON_ROUNDINGS, RECON_WEIGHT_STARTS
    from lsq.reconstruct import RECON_WEIGHT_INITS, ROUNDINGS

    assert tuple(RECON_WEIGHT_STARTS) == RECON_WEIGHT_INITS
    assert tuple(RECON_ROUNDINGS) == ROUNDINGS


def test_the_repair_link_names_the_recipe_the_train_page_opens_on():
    """At 4-bit weights the Train page opens on reconstruction alone (the measured recipe), and
    the Calibrate page's link and collapse note say that recipe, not another."""
    from lsq.explorer import RECIPES, default_recipe, repair_label

    low, high = Settings(w_bits=4, a_bits=4), Settings(w_bits=8, a_bits=4)
    assert default_recipe(low) == "reconstruct" and default_recipe(high) == "qat"
    assert repair_label(low).endswith(RECIPES["reconstruct"].lower())
    assert "then QAT" not in repair_label(low)


def test_a_method_far_below_the_best_after_init_is_told_why():
    """The note names, with the init report's own numbers, the layers where a method's grid
    is worse: its error against the best method's, grids that reach far past their inputs
    (levels counted by hand below), and signed grids on inputs that are never negative."""
    from lsq.calibrate import LayerInit
    from lsq.config import make_config
    from lsq.explorer import Comparison, init_notes, levels_in_use
    from lsq.pipeline import MethodResult

    def layer(name, lo, hi, signed, mse):  # inputs seen: [0, 6], 4 bits
        return LayerInit(name, "conv", 4, signed, False, lo, hi, 0.0, 6.0, 0.0, mse)

    good = [layer("a", 0.0, 6.0, False, 0.01), layer("b", 0.0, 5.0, False, 0.02)]
    # a: step 24/15 = 1.6, levels at 0, 1.6, ... within [0, 6]: 4 of 16; b: [-4, 4] -> 0..4
    # in steps of 8/15: 8 levels (half) inside, so not "fewer than half".
    bad = [layer("a", -12.0, 12.0, True, 0.05), layer("b", -4.0, 4.0, True, 0.06)]
    assert list(levels_in_use(pd.DataFrame([vars(x) for x in bad]))) == [4, 8]
    initial = {
        "lsq+": MethodResult(make_config("lsq+"), None, tuple(good), {"agreement": 0.9}),
        "lsq-signed": MethodResult(make_config("lsq-signed"), None, tuple(bad), {"agreement": 0.1}),
        "minmax": MethodResult(make_config("minmax"), None, tuple(good), {"agreement": 0.5}),
    }
    notes = init_notes(Comparison(Settings(), None, initial))
    assert list(notes) == ["lsq-signed"]  # minmax, at 0.5 of 0.9, is within half the best
    note = notes["lsq-signed"]
    assert "4.0× lsq+'s error in the median layer (2 of 2 layers worse)" in note
    assert "1 grids reach so far past their inputs" in note
    assert "2 layers never see a negative input" in note and "LSQ's init" in note


def test_the_bar_counts_each_unit_and_step_by_its_cost(calibrated, monkeypatch):
    """Reconstruction then QAT of two methods: the bar (and the time left) follows cost, not
    counts. With the stem given ten times the cost of any other unit, the bar after it stands
    at its share of the job, and a QAT step counts as much as 4/3 of an iteration of every unit
    (times the batches' ratio: the float model's forward pass on top)."""
    import lsq.reconstruct as rec
    from lsq.reconstruct import ReconstructConfig

    n_units = len(
        rec.find_units(calibrated.initial["lsq+"].copy_model(), calibrated.bench.calib[:1])
    )
    costs = [10.0] + [1.0] * (n_units - 1)
    monkeypatch.setattr(rec, "unit_costs", lambda *a: costs)
    job = Job("train", "t")
    seen = []
    report = job.progress
    monkeypatch.setattr(
        job, "progress", lambda *a, **k: (report(*a, **k), seen.append((job.stage, job.fraction)))
    )
    recon = ReconstructConfig(iters=3, batch_size=8, compile=False, device="cpu")
    cfg = train_cfg(2)
    train_job(job, calibrated, ["lsq+", "minmax"], cfg, recon_cfg=recon)
    views = calibrated.bench.data.recon_views
    per_unit = [c * (recon.iters + 4 * views / recon.batch_size / 3) for c in costs]
    step = sum(costs) * 4 / 3 * cfg.batch_size / recon.batch_size
    # Around the units, in forward passes of one view (a third of an iteration over the batch):
    # timing the units (3 passes) before; after reconstruction the numbers on both view sets
    # and QAT's first evaluation; at the end the same and the per-layer table (4 x 8 views).
    view = sum(costs) / 3 / recon.batch_size
    bench = calibrated.bench
    both, qat_eval = len(bench.eval) + len(bench.calib), len(bench.eval)
    before, between = 3 * sum(costs), (both + qat_eval) * view
    after = (both + qat_eval + 32) * view
    per_method = before + sum(per_unit) + between + 2 * step + after
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    # The last iteration of the stem: 3/4 of its work (iterations count iters + 1 parts).
    stem = [f for s, f in seen if s == "reconstructing lsq+: stem"]
    assert stem[-1] == pytest.approx((before + per_unit[0] * 3 / 4) / (2 * per_method))
    first_qat = next(f for s, f in seen if s == "training lsq+")
    assert first_qat == pytest.approx((before + sum(per_unit) + between + step) / (2 * per_method))
    second = next(f for s, f in seen if s.startswith("reconstructing minmax"))
    assert second > 0.5


def test_time_left_follows_the_cost_done_not_the_steps(monkeypatch):
    """The pace counts from the first progress (loading and compiling before it are not work
    the rest repeats), over the cost done when the job gives it, else over the steps."""
    import lsq.jobs

    clock = [1000.0]
    monkeypatch.setattr(lsq.jobs.time, "time", lambda: clock[0])
    job = Job("train", "t")
    job.started = clock[0]
    clock[0] += 30  # loading, compiling: no progress yet
    job.progress("reconstructing", 0, 10, work=(0.0, 100.0))
    assert job.remaining is None  # no pace yet
    clock[0] += 100
    job.progress("reconstructing", 1, 10, work=(50.0, 100.0))  # one step of ten, half the cost
    assert job.fraction == 0.5 and job.remaining == pytest.approx(100)
    assert job.describe().endswith("(130 s, about 2 min left)")
    job.progress("training", 1, 10)  # no cost given: the steps count
    assert job.fraction == 0.1 and job.remaining == pytest.approx(900)


def test_time_left_starts_from_an_estimate_in_seconds_and_follows_the_pace(monkeypatch):
    """With the cost in estimated seconds (reconstruction's timed units), the time left is that
    estimate at first, then the estimate scaled by the measured pace, weighed against the
    estimate with PACE_PRIOR_S seconds of work."""
    import lsq.jobs
    from lsq.jobs import PACE_PRIOR_S

    clock = [1000.0]
    monkeypatch.setattr(lsq.jobs.time, "time", lambda: clock[0])
    job = Job("train", "t")
    job.started = clock[0]
    job.progress("reconstructing", 0, 10, work=(0.0, 100.0), seconds=True)
    assert job.remaining is None  # no step done yet
    job.progress("reconstructing", 1, 10, work=(0.0, 100.0), seconds=True)
    assert job.remaining == pytest.approx(100)  # the estimate itself
    clock[0] += 100  # half the estimated work took 100 s: twice as slow as estimated
    job.progress("reconstructing", 5, 10, work=(50.0, 100.0), seconds=True)
    pace = (100 + PACE_PRIOR_S) / (50 + PACE_PRIOR_S)
    assert job.remaining == pytest.approx(pace * 50)


def test_the_recipe_trains_only_after_a_whole_reconstruction_and_saves_its_last_stage(
    calibrated, tmp_path
):
    """``run_recipe``, the one recipe of the CLI, the app and the benchmarks: a reconstruction
    stopped part-way is the last stage (no QAT starts from it, its run says "reconstructed");
    a whole one is trained on top, the training history saved while it runs."""
    from lsq.pipeline import PROGRESS_EVERY, Recipe, run_recipe
    from lsq.reconstruct import ReconstructConfig
    from lsq.runs import run_stage
    from lsq.status import Status
    from lsq.train import TrainEvent

    bench, init = calibrated.bench, calibrated.initial["lsq+"]
    recon = ReconstructConfig(iters=3, batch_size=8, device="cpu")
    events = []
    stopped = run_recipe(
        bench,
        init,
        Recipe(recon, train_cfg(2)),
        on_event=events.append,
        should_stop=lambda: len(events) >= 3,
        root=tmp_path / "stopped",
    )
    assert stopped.reconstructed.status == Status.STOPPED and stopped.trained is None
    assert not any(isinstance(e, TrainEvent) for e in events)
    info = load_run(stopped.final.run_path).info
    assert (run_stage(info), info.status) == ("reconstructed", "stopped")

    saved_while_training = []

    def on_event(e):
        if isinstance(e, TrainEvent) and e.kind == "step" and e.step == PROGRESS_EVERY:
            for path in (tmp_path / "whole").glob("*/metrics.csv"):
                saved_while_training.append(pd.read_csv(path)["step"].max())

    whole = run_recipe(
        bench, init, Recipe(recon, train_cfg(PROGRESS_EVERY)), on_event, root=tmp_path / "whole"
    )
    assert whole.reconstructed.status == Status.COMPLETE and whole.final is whole.trained
    assert whole.trained.stage == Stage.TRAINED and whole.reconstructed.run_path is None
    assert saved_while_training == [PROGRESS_EVERY], "the history saved while training"
    info = load_run(whole.final.run_path).info
    assert (run_stage(info), info.status) == ("reconstructed, then trained", "complete")
    assert len(whole.layers) == len(init.init_report)
