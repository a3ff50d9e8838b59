"""`python -m lsq train` on an image folder: two ranks under torchrun stay identical and take the
steps of one process with the global batch; a killed run resumes on the same loss curve (also
under two ranks), with new learning rates if asked; a run that is being written, a checkpoint of
another setup and a damaged checkpoint are refused, and bad input in general, in words with exit
status 2; a start that fails leaves the run marked failed.

A tiny setup: timm's test_efficientnet (random weights, a new 2-class head) at 64 px on a folder
of the scikit-image photos, eager kernels, no loader workers, one thread per process.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import lsq.distributed as engine
from lsq.cli import main
from lsq.config import QuantConfig
from lsq.data import bundled_images
from lsq.errors import LSQError
from lsq.health import check_flips
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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Runs in this process compare with torchrun's ranks, which have one thread each: another
    thread count sums in another order, and quantization turns that into different steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    evals = metrics.set_index("step")[["val_top1"]].dropna()
    assert evals.index.tolist() == [0, 4, 5]  # after init, each epoch, the end
    # A new head: the float model's classifier is as untrained as the start's, so no agreement
    # or KL with it, only top-1 on the folder's labels.
    assert not {"agreement", "kl"} & set(metrics.columns)
    assert set(run.info.meta["metrics_final"]) == {"top1", "views"}
    assert run.info.meta["teacher_metrics"] is False
    assert len(run.tables["layers"]) == len(run.tables["init"]) > 5
    assert run.tables["layers"]["output_sqnr_db"].notna().all()
    traj = run.tables["trajectories"]
    assert set(traj["step"]) == {0, 1, 2, 3, 4, 5}
    # Each step's weight flips, for `lsq health`'s oscillation check.
    flips = traj[traj["step"] > 0].dropna(subset=["weight_flips"])
    assert len(flips) >= 5 * 5 and (flips["weight_flips"] >= 0).all()
    assert (flips["weight_flips"] <= flips["weights"]).all() and flips["weight_flips"].sum() > 0
    assert traj[traj["step"] == 0]["weight_flips"].isna().all()
    # The saved trajectories carry what the oscillation check reads: a layer made to bounce
    # (half its weights flip every step, none moves net) is found, by name, in the saved format.
    layer = traj["layer"].iloc[0]
    bouncing = traj.copy()
    mask = (bouncing["layer"] == layer) & (bouncing["step"] > 0)
    bouncing.loc[mask, "weight_flips"] = bouncing.loc[mask, "weights"] // 2
    bouncing.loc[mask, "weight_net"] = 0
    assert layer in [f["layer"] for f in check_flips(bouncing)]


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


def six_steps(data: Path, *extra: str) -> list[str]:
    """The killed run's arguments: 6 steps, a checkpoint at step 3."""
    return train_args(data, 6, "--ckpt-every", "3", *extra)


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory):
    """The killed run's setup run uninterrupted, in this process."""
    runs = tmp_path_factory.mktemp("runs-whole")
    assert main(["--runs-dir", str(runs), *six_steps(data)]) == 0
    return only_run(runs)


def resumable(killed: Path, into: Path) -> Path:
    """A copy of the killed run under ``into`` (a runs folder); its path."""
    (info,) = list_runs(killed)
    return shutil.copytree(info.path, into / info.path.name)


def assert_same_state(a, b, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    x = load_file(a.info.path / "state.safetensors")
    y = load_file(b.info.path / "state.safetensors")
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.slow  # a subprocess: ~10-20 s with its imports
def test_a_killed_run_resumes_on_the_same_loss_curve(data, killed, whole, tmp_path):
    runs = tmp_path / "resumed"
    path = resumable(killed, runs)
    (info,) = list_runs(runs)
    assert info.status == "incomplete"
    assert [p.name for p in (path / "checkpoints").iterdir()] == ["step-00000003.pt"]
    # The killed process's lock is still there; its process is gone, so it is stale.
    lock = json.loads((path / ".lock").read_text())
    assert lock["host"] == socket.gethostname() and lock["pid"] != os.getpid()

    assert main(["--runs-dir", str(runs), *six_steps(data), "--resume"]) == 0
    resumed = only_run(runs)
    assert resumed.info.status == "complete"
    assert not (path / ".lock").exists()  # taken over, then released
    assert list(resumed.tables["metrics"]["step"]) == list(range(7))
    np.testing.assert_allclose(losses(resumed), losses(whole), rtol=1e-6)
    assert_same_state(resumed, whole)
    # The trajectories too, weight flips included (their start codes are in the checkpoint).
    pd.testing.assert_frame_equal(
        resumed.tables["trajectories"], whole.tables["trajectories"], rtol=1e-6
    )
    assert resumed.info.meta["resumes"] == [{"step": 3, "world_size": 1, "lr": {}}]


@pytest.mark.slow  # a torchrun subprocess: ~15-20 s
def test_a_checkpoint_of_one_process_resumes_under_two_ranks(data, killed, whole, tmp_path):
    """The killed run was one process; two ranks (2 images each) go on from its checkpoint on
    the same curve: the random states restored are the CPU's and this device's only."""
    runs = tmp_path / "runs"
    path = resumable(killed, runs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "lsq", "--runs-dir", str(runs), *six_steps(data), "--resume", str(path)]
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = only_run(runs)
    assert resumed.info.status == "complete"
    assert resumed.info.meta["resumes"] == [{"step": 3, "world_size": 2, "lr": {}}]
    assert resumed.info.meta["world_size_last"] == 2
    np.testing.assert_allclose(losses(resumed), losses(whole), rtol=1e-4)
    assert_same_state(resumed, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # the killed run, then a resumed run in this process
def test_new_learning_rates_on_resume_take_over_from_the_step_reached(
    data, killed, tmp_path, capsys
):
    """After a divergence one resumes with lower rates: the cosine schedule goes on from the
    step reached with the new base rate; it is said, and recorded in the run's meta."""
    runs = tmp_path / "runs"
    resumable(killed, runs)
    assert main(["--runs-dir", str(runs), *six_steps(data, "--lr", "2e-05"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "learning rates changed on resume at step 3: lr_weights 1e-05 -> 2e-05" in out
    run = only_run(runs)
    assert run.info.status == "complete"
    assert run.info.meta["resumes"] == [
        {"step": 3, "world_size": 1, "lr": {"lr_weights": [1e-05, 2e-05]}}
    ]
    m = run.tables["metrics"].set_index("step")
    for step in range(1, 7):
        cosine = (1 + math.cos(math.pi * step / 6)) / 2  # the rates logged after step s of 6
        base = 1e-5 if step <= 3 else 2e-5
        assert m.loc[step, "lr_weights"] == pytest.approx(base * cosine, rel=1e-9), step
        assert m.loc[step, "lr_quant"] == pytest.approx(3e-4 * cosine, rel=1e-9), step  # as given


def refused(capsys, argv: list[str]) -> str:
    """``main(argv)`` exits with 2 and one line of words (no traceback); that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_is_refused_in_words(data, tmp_path, capsys):
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

    other = Run.create("resnet18", QuantConfig(), root=tmp_path / "others")  # e.g. an app run
    err = refused(capsys, [*argv, "--resume", str(other.path)])
    assert "was not made by `lsq train`, so there is nothing to resume" in err
    assert list_runs(runs) == []  # nothing was started


@pytest.mark.slow  # needs the killed run (a subprocess)
def test_a_checkpoint_of_another_setup_is_refused_naming_each_difference(
    data, killed, tmp_path, capsys
):
    (run,) = list_runs(killed)
    argv = ["--runs-dir", str(tmp_path / "runs"), *six_steps(data), "--resume", str(run.path)]
    err = refused(capsys, [*argv, "--model", "bundled"])
    assert "from another setup: model test_efficientnet there, tf_efficientnet_lite0 here" in err
    err = refused(capsys, [*argv, "--w-bits", "3"])
    assert "quantization lsq+ W4A4 there, lsq+ W3A4 here" in err
    # A seed changes the data order mid-epoch; the weight decay is restored from the optimizer
    # state, so a new one would be silently ignored: both named, in one line.
    err = refused(capsys, [*argv, "--seed", "1", "--weight-decay", "0.01"])
    assert "seed 0 there, 1 here; weight decay 0.0 there, 0.01 here." in err
    assert "only the learning rates may change on resume" in err
    copy = shutil.copytree(data / "train", tmp_path / "moved" / "train")
    err = refused(capsys, [*argv, "--data", str(copy)])
    assert f"training folder {data / 'train'} there, {copy} here" in err
    err = refused(capsys, [*argv[:-2], "--steps", "5", "--resume", str(run.path)])
    assert "steps 6 there, 5 here" in err

    others = tmp_path / "others"
    early = resumable(killed, others)
    shutil.rmtree(early / "checkpoints")
    err = refused(capsys, [*argv[:-1], str(early)])
    assert "has no checkpoint to resume from yet" in err
    done = shutil.copytree(run.path, others / "done")
    Run(done, run.started).finish("complete")
    assert "is complete: nothing to resume" in refused(capsys, [*argv[:-1], str(done)])
    assert list_runs(tmp_path / "runs") == []  # nothing was started


@pytest.mark.slow  # needs the killed run (a subprocess)
def test_a_run_that_is_being_written_is_not_resumed(data, killed, tmp_path, capsys):
    """A run whose writer lives (its status says so on this host, or it holds the lock) is
    refused, and so is one locked from another host, whose process cannot be checked; the
    run is left as it was."""
    runs = tmp_path / "runs"
    argv = ["--runs-dir", str(runs), *six_steps(data), "--resume"]
    live = resumable(killed, runs)
    started = list_runs(runs)[0].started
    Run(live, started).set_status("running", "training")  # this process: alive

    err = refused(capsys, argv)  # the newest unfinished run: this one
    assert f"run {live.name} is running (pid {os.getpid()} on this host)" in err
    assert "resuming it would write the same run twice" in err
    assert "is running" in refused(capsys, [*argv, str(live)])

    for name, holder in (
        ("here", {"host": socket.gethostname(), "pid": os.getpid()}),
        ("elsewhere", {"host": "node-7", "pid": 4242}),
    ):
        path = resumable(killed, tmp_path / name)  # incomplete: its writer is gone
        (path / ".lock").write_text(json.dumps(holder))
        err = refused(capsys, [*argv, str(path)])
        assert f"is locked by pid {holder['pid']} on {holder['host']}" in err
        assert "delete the lock file and resume again" in err
        assert json.loads((path / ".lock").read_text()) == holder  # left alone
        (info,) = list_runs(tmp_path / name)
        assert info.status == "incomplete"
    assert list_runs(runs)[0].status == "running"


@pytest.mark.slow  # needs the killed run (a subprocess)
def test_a_damaged_checkpoint_is_refused_in_one_line(data, killed, tmp_path, capsys):
    path = resumable(killed, tmp_path / "runs")
    (ckpt,) = (path / "checkpoints").iterdir()
    good = torch.load(ckpt, weights_only=True)
    argv = ["--runs-dir", str(tmp_path / "runs"), *six_steps(data), "--resume", str(path)]

    def spoil(change) -> str:
        state = {**good, "rng": dict(good["rng"]), "optimizer": dict(good["optimizer"])}
        change(state)
        torch.save(state, ckpt)
        return refused(capsys, argv)

    cases = [
        (lambda s: s.pop("scheduler"), "it has no 'scheduler'"),
        (lambda s: s.pop("fingerprint"), "it has no 'fingerprint'"),
        (lambda s: s.update(fingerprint=["model"]), "'fingerprint' is not a dict of settings"),
        (lambda s: s.update(step="3"), "'step' is not a step number from 1"),
        (lambda s: s.update(rows={"step": 1}), "'rows' is not a list of curve rows"),
        (lambda s: s.update(trajectories=[1, 2]), "'trajectories' is not a list"),
        (lambda s: s.update(seconds=float("nan")), "'seconds' is not a number of seconds"),
        (lambda s: s["rng"].update(numpy=[1, 2]), "'rng' is not random states"),
        (lambda s: s["rng"].update(cuda=[torch.zeros(8, dtype=torch.uint8)] * 2), "'rng'"),
        (lambda s: s["optimizer"].pop("param_groups"), "'optimizer' is not an optimizer state"),
        (lambda s: s.update(model={"x": 1}), "'model' is not a dict of tensors"),
        (lambda s: s.update(step=6), "step 6 is not before the run's end, 6"),
    ]
    for change, words in cases:
        err = spoil(change)
        assert f"the checkpoint {ckpt} is damaged or was not written by `lsq train`" in err, err
        assert words in err and "delete it to resume from the one before" in err, err
    err = spoil(lambda s: s.update(format=1))
    assert "has format 1; this version of `lsq train` reads format 2" in err
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert f"the checkpoint {ckpt} cannot be read" in refused(capsys, argv)
    (info,) = list_runs(tmp_path / "runs")
    assert info.status == "incomplete"  # refused before anything was written


def test_a_start_that_fails_marks_the_run_failed(data, tmp_path, capsys, monkeypatch):
    """A failure after the run folder exists (here: building the optimizer, writing the first
    table) ends the run as failed with the error, not as running forever; the lock goes."""

    def no_optimizer(*args, **kwargs):
        raise LSQError("no memory left for the optimizer's state")

    with monkeypatch.context() as m:
        m.setattr(engine, "make_optimizer", no_optimizer)
        runs = tmp_path / "a"
        err = refused(capsys, ["--runs-dir", str(runs), *train_args(data)])
        assert err == "error: no memory left for the optimizer's state"
    run = only_run(runs)
    assert run.info.status == "failed"
    assert run.info.message == "LSQError: no memory left for the optimizer's state"
    assert not (run.info.path / ".lock").exists()

    def disk_full(self, name, df):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Run, "write_table", disk_full)
        runs = tmp_path / "b"
        with pytest.raises(OSError, match="No space left"):
            main(["--runs-dir", str(runs), *train_args(data)])
    run = only_run(runs)
    assert run.info.status == "failed"
    assert "No space left on device" in run.info.message
    assert not (run.info.path / ".lock").exists()


def test_reconstruction_before_training_takes_the_weight_start_asked_for(data, tmp_path):
    argv = train_args(
        data, 1, "--reconstruct", "1", "--recon-weight-init", "keep", "--recon-rounding", "learned"
    )
    assert main(["--runs-dir", str(tmp_path), *argv]) == 0
    run = only_run(tmp_path)
    assert run.info.meta["reconstruct"]["iters"] == 1
    assert run.info.meta["reconstruct"]["weight_init"] == "keep"
    assert run.info.meta["reconstruct"]["rounding"] == "learned"
