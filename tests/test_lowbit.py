"""The low-bit recipe's pieces working together: fresh views in QAT, reconstruction then QAT."""

import copy
import json

import torch
from helpers import OneConv

from lsq import make_config, quantize_model
from lsq.calibrate import calibrate
from lsq.data import TensorViews
from lsq.train import TrainConfig, train


class Recording:
    """A view source that remembers what it handed out."""

    def __init__(self, views):
        self.source = TensorViews(views, seed=0)
        self.seen = []

    def batch(self, step, n):
        x = self.source.batch(step, n)
        self.seen.append(x)
        return x


def test_qat_on_fresh_views_draws_new_views_each_step_and_learns():
    torch.manual_seed(0)
    teacher = OneConv().eval()
    model = copy.deepcopy(teacher)
    cfg = make_config("lsq+", 3, 3, first_last_bits=None)
    quantize_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(64, 3, 8, 8, generator=g)
    calibrate(model, pool.split(16), cfg)
    source = Recording(pool)
    events = list(
        train(model, teacher, source, pool[:16], TrainConfig(steps=6, batch_size=8, eval_every=6,
                                                            compile=False, lr_weights=1e-3))
    )  # fmt: skip
    assert events[-1].kind == "done"
    assert len(source.seen) == 6
    assert not torch.equal(source.seen[0], source.seen[1])
    steps = [e for e in events if e.kind == "step"]
    # The loss is the distillation loss against the teacher on that very batch.
    assert all(e.loss is not None and e.loss >= 0 for e in steps)
    assert events[-2].kl < events[0].kl


# --- the pipeline and the CLI on the bundled model at low resolution ---------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from lsq.errors import LSQError  # noqa: E402
from lsq.pipeline import (  # noqa: E402
    DataConfig,
    Stage,
    init_method,
    prepare,
    reconstruct_method,
    reconstruction_views,
    save_result,
    train_method,
)
from lsq.reconstruct import ReconstructConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = DataConfig(resolution=64, calib_views=8, eval_views=8, batch_size=8, recon_views=16)
QUICK = ReconstructConfig(iters=3, batch_size=8, compile=False)


@pytest.fixture(scope="module")
def bench():
    return prepare(data=TINY)


def test_reconstruction_views_are_fresh_crops_of_the_calibration_photos(bench):
    views = reconstruction_views(bench)
    assert views.shape == (16, 3, 64, 64)
    assert torch.equal(views, reconstruction_views(bench))  # seeded
    assert not torch.equal(views[:8], bench.calib)  # not the calibration views again


def test_reconstruct_method_returns_a_new_result_and_leaves_the_initialised_one(bench, tmp_path):
    init = init_method(bench, make_config("lsq+", 4, 4))
    before = {k: v.clone() for k, v in init.model.state_dict().items()}
    rec = reconstruct_method(bench, init, QUICK)
    assert rec.stage == Stage.RECONSTRUCTED and init.stage == Stage.INITIALISED
    assert all(torch.equal(before[k], v) for k, v in init.model.state_dict().items())
    changed = [k for k, v in rec.model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed, "reconstruction changed nothing"
    units = [e for e in rec.recon_history if e.kind == "unit"]
    assert len(units) == 19 and all(e.loss_before is not None for e in units)
    trained = train_method(bench, rec, TrainConfig(steps=2, batch_size=4, compile=False))
    assert trained.label == "reconstructed, trained 2 steps"
    saved = save_result(bench, trained, root=tmp_path)
    table = pd.read_csv(saved.run_path / "units.csv")
    assert list(table["unit"])[:2] == ["stem", "blocks.0.0"] and len(table) == 19


def test_cli_runs_the_low_bit_recipe(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "LSQ_RUNS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "lsq", "run", "--resolution", "64", "--calib", "8",
         "--eval-views", "8", "--recon-views", "8", "--reconstruct", "2", "--steps", "1",
         "--batch-size", "4", "--eager", "--recon-weight-init", "keep",
         "--recon-rounding", "learned"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "after reconstruction (2 iterations per unit): agreement" in out.stdout
    run = next(tmp_path.iterdir())
    assert (run / "units.csv").exists()
    meta = json.loads((run / "config.json").read_text())["meta"]
    assert meta["reconstruct"]["iters"] == 2 and meta["reconstruct"]["weight_init"] == "keep"
    assert meta["reconstruct"]["rounding"] == "learned"
    health = subprocess.run(
        [sys.executable, "-m", "lsq", "health", str(run)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert health.returncode == 0 and run.name in health.stdout, health.stderr[-2000:]


def test_synthetic_source_calibrates_without_a_photo_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LSQ_CACHE_DIR", str(tmp_path))
    data = DataConfig(resolution=32, calib_views=4, eval_views=4, batch_size=4, source="synthetic")
    stages = []
    bench = prepare(data=data, progress=lambda stage, done, total: stages.append(stage))
    assert "synthesising images" in stages
    assert bench.train_images == () and bench.synthetic.shape == (4, 3, 32, 32)
    assert torch.equal(bench.calib, bench.synthetic)  # calibration sees the synthetic images
    calls = []
    import lsq.synthetic

    real = lsq.synthetic.synthesize
    monkeypatch.setattr(
        lsq.synthetic, "synthesize", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    again = prepare(data=data)
    assert not calls  # the second prepare read the cache
    assert torch.equal(again.synthetic, bench.synthetic)
    assert len(list(tmp_path.iterdir())) == 1


def test_calibrate_page_says_why_when_every_method_collapses():
    from types import SimpleNamespace

    from lsq.explorer import Comparison, Settings, collapse_note

    def comp(w_bits, *agreements):
        initial = {
            m: SimpleNamespace(metrics_init={"agreement": a})
            for m, a in zip(["lsq+", "lsq"], agreements, strict=True)
        }
        return Comparison(Settings(w_bits=w_bits, a_bits=4), None, initial)

    note = collapse_note(comp(4, 0.03, 0.0))
    assert "4-bit weights" in note and "lsq+, agreement 0.03" in note
    assert "block-wise reconstruction" in note and "sensitivity" in note
    assert collapse_note(comp(4, 0.9, 0.0)) is None  # one method works: nothing collapsed
    assert collapse_note(comp(8, 0.5, 0.4)) is None


def test_default_recipe_reconstructs_low_bit_weights_only():
    from lsq.explorer import Settings, default_recipe

    assert default_recipe(Settings(w_bits=4, a_bits=4)) == "reconstruct"
    assert default_recipe(Settings(w_bits=8, a_bits=4)) == "qat"
    assert default_recipe(Settings(w_bits=4, a_bits=4, quantize_weights=False)) == "qat"


# --- cross-validation by scene (bench/lowbit.py --folds) -----------------------------------------


def test_scene_folds_hold_every_bundled_photo_once_and_keep_the_stereo_pair_together():
    from lsq.data import CALIBRATION_IMAGES, EVALUATION_IMAGES, scene_folds

    every = sorted(CALIBRATION_IMAGES + EVALUATION_IMAGES)
    for k in (2, 4, 16):
        folds = scene_folds(k)
        assert len(folds) == k and all(folds)
        assert sorted(n for f in folds for n in f) == every  # each photo in exactly one fold
        pair = [i for i, f in enumerate(folds) for n in f if n.startswith("motorcycle")]
        assert len(pair) == 2 and pair[0] == pair[1]
        objects = [sum(n in EVALUATION_IMAGES for n in f) for f in folds]
        assert max(objects) - min(objects) <= 2  # object photos spread over the folds
    with pytest.raises(LSQError, match="folds"):
        scene_folds(17)  # 16 scenes


def test_prepare_on_given_photos_makes_its_views_of_them(bench):
    from lsq.data import CALIBRATION_IMAGES, EVALUATION_IMAGES, named_bundled_images

    standard = (named_bundled_images(CALIBRATION_IMAGES), named_bundled_images(EVALUATION_IMAGES))
    same = prepare(data=TINY, images=standard)
    assert torch.equal(same.eval, bench.eval) and torch.equal(same.calib, bench.calib)
    swapped = prepare(data=TINY, images=standard[::-1])
    assert not torch.equal(swapped.eval, bench.eval)
    assert torch.equal(swapped.teacher_eval, logits_of(bench.model, swapped.eval))
    with pytest.raises(LSQError, match="at least one image"):
        prepare(data=TINY, images=(standard[0], []))


def logits_of(model, views):
    with torch.no_grad():
        return model.eval()(views)


def test_cross_validation_holds_each_fold_out_once_and_averages_over_folds(monkeypatch):
    """cv_table with a stand-in recipe whose numbers are known per held-out fold: every fold is
    evaluated once on its own photos, calibrated on all the others, and the table's mean and
    spread are those of the folds (the standard split reported beside them, not in them)."""
    import statistics

    import bench.lowbit as lowbit
    from lsq.data import scene_folds

    folds = scene_folds(3)
    seen = []

    def make_bench(data, photos=None):
        seen.append(photos)
        return photos

    def recipe(photos, cfg, recon, train):
        kl = 9.0 if photos is None else 1.0 + [f[0] for f in folds].index(photos[1][0])
        return {"init KL": 2 * kl, "rec KL": kl, "rec agreement": 1 / kl, "seconds": 1.0}

    monkeypatch.setattr(lowbit, "recipe", recipe)
    choices = lowbit.variants(DataConfig(), ReconstructConfig(), ["iters=60,90"])
    assert [c[0] for c in choices] == ["defaults", "iters=90"]  # 60 is the default
    table = lowbit.cv_table(make_bench, 3, [(4, 4)], ["lsq+"], choices[:1], None)
    for i, held in enumerate(folds):
        rest = tuple(n for j, f in enumerate(folds) if j != i for n in f)
        assert (rest, tuple(held)) in seen
    row = table.iloc[0]
    assert row["CV KL mean"] == 2.0 and row["CV KL std"] == pytest.approx(1.0)
    assert row["CV agreement mean"] == pytest.approx(statistics.mean([1, 1 / 2, 1 / 3]))
    assert row["eval photos KL"] == 9.0 and row["init CV KL mean"] == 4.0


def test_bench_lowbit_cross_validates_at_its_smoke_size(capsys):
    """The protocol's command at its smoke size: LSQ+ (reconstruction, then QAT) and min/max
    (no QAT: its last stage is reconstruction), two folds."""
    import bench.lowbit as lowbit

    lowbit.main(["--quick", "--skip-main", "--folds", "2", "--methods", "lsq+,minmax"])
    out = capsys.readouterr().out
    assert "Cross-validated by scene: 2 folds" in out
    rows = [x for x in out.splitlines() if x.startswith("| defaults")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in rows]
    assert [c[:3] for c in cells] == [["defaults", "W4A4", m] for m in ("lsq+", "minmax")]
    assert all(float(c) >= 0 for row in cells for c in row[3:])
