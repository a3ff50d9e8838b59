"""`python -m lsq train` on an image folder: two ranks under torchrun stay identical and take the
steps of one process with the global batch; a killed run resumes on the same loss curve; bad
input is refused in words with exit status 2.

A tiny setup: timm's test_efficientnet (random weights, a new 2-class head) at 64 px on a folder
of the scikit-image photos, eager kernels, no loader workers, one thread per process.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lsq.cli import main
from lsq.config import QuantConfig
from lsq.data import bundled_images
from lsq.runs import Run, list_runs, load_run

ROOT = Path(__file__).resolve().parents[1]


def write_folder(root: Path, classes: dict[str, int], start: int = 0) -> Path:
    """``root/<class>/<i>.png``: small copies of the bundled photos, ``n`` per class."""
    photos = bundled_images("calibration") + bundled_images("evaluation")
    k = start
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            photos[k % len(photos)].resize((72, 72)).save(root / name / f"{i}.png")
            k += 1
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_folder(root / "train", {"cat": 8, "dog": 8})
    write_folder(root / "val", {"cat": 2, "dog": 2}, start=16)
    return root


def train_args(data: Path, steps: int = 5, *extra: str) -> list[str]:
    return [
        "train",
        "--data", str(data / "train"),
        "--val", str(data / "val"),
        "--model", "test_efficientnet",
        "--random-weights",
        "--new-head",
        "--resolution", "64",
        "--steps", str(steps),
        "--batch", "4",
        "--calib", "8",
        "--workers", "0",
        "--log-every", "1",
        "--device", "cpu",
        "--eager",
        *extra,
    ]  # fmt: skip


#: SGD: its updates are proportional to the gradients, so a wrong gradient scale shows.
SGD = ("--optimizer", "sgd", "--lr", "0.05", "--lr-act", "0.05", "--lr-wq", "0.05")


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def only_run(runs: Path):
    (info,) = list_runs(runs)
    return load_run(info.path)


def digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def losses(run) -> np.ndarray:
    m = run.tables["metrics"]
    return m[m["step"] > 0].sort_values("step")["loss"].to_numpy()


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> Path:
    """A 5-step run under torchrun with two gloo processes; its runs folder."""
    runs = tmp_path_factory.mktemp("runs-2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "lsq", "--runs-dir", str(runs), *train_args(data, 5, *SGD)]
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return runs


@pytest.mark.slow  # a subprocess: ~10-20 s with its imports
def test_two_ranks_end_identical_and_the_run_is_listed(two_ranks):
    run = only_run(two_ranks)
    assert run.info.status == "complete", run.info.message
    assert run.info.meta["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "device": "cpu",
        "kernels": "eager",
    }
    # Each rank hashed its own parameters and quantizer states at the end; rank 0 saved its own.
    saved = digest(load_file(run.info.path / "state.safetensors"))
    assert run.info.meta["rank_digests"] == [saved, saved]
    assert any(k.endswith("input_quant.scale") for k in run.state)
    # What the Runs page shows: curves and the per-layer table.
    metrics = run.tables["metrics"]
    assert list(metrics["step"]) == [0, 1, 2, 3, 4, 5]
    assert np.isfinite(losses(run)).all()
    evals = metrics.set_index("step")[["val_top1", "agreement", "kl"]].dropna()
    assert evals.index.tolist() == [0, 4, 5]  # after init, each epoch, the end
    assert len(run.tables["layers"]) == len(run.tables["init"]) > 5
    assert run.tables["layers"]["output_sqnr_db"].notna().all()
    assert set(run.tables["trajectories"]["step"]) == {0, 1, 2, 3, 4, 5}
    assert {"agreement", "kl", "top1"} <= set(run.info.meta["metrics_final"])


@pytest.mark.slow  # a subprocess: ~10-20 s with its imports
def test_two_ranks_take_the_steps_of_one_process_with_the_global_batch(two_ranks, data, tmp_path):
    """LSQ's gradient scale counts elements per sample, never the batch, and DDP averages the
    ranks' mean-loss gradients: 2 ranks x 2 images step like 1 process x 4 images."""
    assert main(["--runs-dir", str(tmp_path), *train_args(data, 5, *SGD)]) == 0
    one, two = only_run(tmp_path), only_run(two_ranks)
    assert one.info.meta["distributed"]["world_size"] == 1
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4)
    assert losses(one)[-1] != pytest.approx(losses(one)[0], rel=1e-3)  # it did learn something


KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import lsq.distributed as engine
save = engine.save_checkpoint
def save_then_die(run_path, state, keep):
    path = save(run_path, state, keep)
    if state["step"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
engine.save_checkpoint = save_then_die
from lsq.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory) -> Path:
    """A runs folder holding one 6-step run killed (SIGKILL) right after its step-3 checkpoint."""
    runs = tmp_path_factory.mktemp("runs-killed")
    argv = ["--runs-dir", str(runs), *train_args(data, 6, "--ckpt-every", "3")]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_CHECKPOINT, *argv],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    return runs


@pytest.mark.slow  # a subprocess: ~10-20 s with its imports
def test_a_killed_run_resumes_on_the_same_loss_curve(data, killed, tmp_path):
    whole = tmp_path / "whole"
    assert main(["--runs-dir", str(whole), *train_args(data, 6, "--ckpt-every", "3")]) == 0
    runs = tmp_path / "resumed"
    shutil.copytree(killed, runs)
    (info,) = list_runs(runs)
    assert info.status == "incomplete"
    assert [p.name for p in (info.path / "checkpoints").iterdir()] == ["step-00000003.pt"]

    argv = ["--runs-dir", str(runs), *train_args(data, 6, "--ckpt-every", "3"), "--resume"]
    assert main(argv) == 0
    resumed, uninterrupted = only_run(runs), only_run(whole)
    assert resumed.info.status == "complete"
    assert list(resumed.tables["metrics"]["step"]) == list(range(7))
    np.testing.assert_allclose(losses(resumed), losses(uninterrupted), rtol=1e-6)
    a = load_file(resumed.info.path / "state.safetensors")
    b = load_file(uninterrupted.info.path / "state.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def refused(capsys, argv: list[str]) -> str:
    """``main(argv)`` exits with 2 and one line of words (no traceback); that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_is_refused_in_words(data, killed, tmp_path, capsys):
    runs = tmp_path / "runs"
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, photo in enumerate(bundled_images("evaluation")[:3]):
        photo.resize((72, 72)).save(flat / f"{i}.png")
    argv = ["--runs-dir", str(runs), *train_args(data)]

    err = refused(capsys, [*argv, "--data", str(flat)])
    assert "has no class sub-folders" in err and "3 image(s)" in err

    other = write_folder(tmp_path / "other-val", {"cat": 1, "cow": 1})
    err = refused(capsys, [*argv, "--val", str(other)])
    assert "classes differ" in err and "only in validation: cow" in err
    assert "only in training: dog" in err

    err = refused(capsys, [*argv, "--resume"])
    assert "nothing to resume" in err and "test_efficientnet" in err

    (run,) = list_runs(killed)
    err = refused(capsys, [*argv, "--model", "bundled", "--resume", str(run.path)])
    assert "from another setup: model test_efficientnet there, tf_efficientnet_lite0 here" in err
    err = refused(capsys, [*argv, "--w-bits", "3", "--resume", str(run.path)])
    assert "quantization lsq+ W4A4 there, lsq+ W3A4 here" in err
    other = Run.create("resnet18", QuantConfig(), root=tmp_path / "others")  # e.g. an app run
    err = refused(capsys, [*argv, "--resume", str(other.path)])
    assert "was not made by `lsq train`, so there is nothing to resume" in err
    early = shutil.copytree(run.path, tmp_path / "others" / "early")
    shutil.rmtree(early / "checkpoints")
    err = refused(capsys, [*argv, "--resume", str(early)])
    assert "has no checkpoint to resume from yet" in err
    done = shutil.copytree(run.path, tmp_path / "others" / "done")
    Run(done, run.started).finish("complete")
    assert "is complete: nothing to resume" in refused(capsys, [*argv, "--resume", str(done)])
    assert list_runs(runs) == []  # nothing was started
