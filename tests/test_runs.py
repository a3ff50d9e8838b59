"""Runs on disk: round trips, atomic writes, interrupted runs (including kill -9) and safe names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import pandas as pd
import pandas.testing as pdt
import pytest
import torch

import lsq.runs as runs
from lsq import LSQError, QuantConfig, make_config
from lsq.runs import Run, delete_run, list_runs, load_run, runs_root

REPO = Path(__file__).resolve().parents[1]


def _tables() -> dict[str, pd.DataFrame]:
    layers = pd.DataFrame(
        {
            "layer": ["conv1", "layer1.0.conv1", "fc"],
            "w_bits": [8, 4, 8],
            "mse": [1.5e-3, 0.1 + 0.2, float("nan")],
            "signed": [True, False, True],
        }
    )
    metrics = pd.DataFrame({"step": range(5), "loss": [2.0 / (i + 3) for i in range(5)]})
    traj = pd.DataFrame({"step": [0, 0, 1], "quantizer": ["a", "b", "a"], "scale": [0.1, 0.2, 0.3]})
    return {"layers": layers, "metrics": metrics, "trajectories": traj}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _set_status_field(run_path: Path, **fields: object) -> None:
    status = json.loads((run_path / "status.json").read_text())
    status.update(fields)
    (run_path / "status.json").write_text(json.dumps(status))


def test_round_trip_and_listing(tmp_path):
    config = make_config("lsq+", 3, 4)
    meta = {"source": "timm", "seed": 0, "resolution": 224, "steps": 5, "path": tmp_path}
    first = Run.create("resnet18", make_config("lsq", 4, 4), root=tmp_path)
    first.finish()
    run = Run.create("resnet18", config, meta=meta, root=tmp_path)
    for name, df in _tables().items():
        run.write_table(name, df)
    run.write_json("summary", {"top1": 0.5, "bits": torch.tensor([4, 8])})
    shared = torch.randn(4, 3)
    state = {
        "layer.weight": shared,
        "head.weight": shared,  # tied: shares memory
        "t": torch.arange(6.0).reshape(2, 3).t(),  # not contiguous
        "s": torch.tensor(0.25, requires_grad=True),
        "flag": torch.tensor(True),
        "half": torch.randn(3).to(torch.bfloat16),
    }
    run.write_state(state)
    run.finish("complete", "done")

    loaded = load_run(run.name, root=tmp_path)
    assert loaded.config == config == QuantConfig.from_dict(loaded.info.config)
    assert loaded.info.meta == {**meta, "path": str(tmp_path)}
    assert loaded.info.model == "resnet18"
    assert loaded.info.status == "complete" and loaded.info.message == "done"
    assert loaded.info.finished is not None
    assert set(loaded.tables) == {"layers", "metrics", "trajectories"}
    for name, df in _tables().items():
        pdt.assert_frame_equal(loaded.tables[name], df)
    assert loaded.tables["metrics"]["loss"].tolist() == _tables()["metrics"]["loss"].tolist()
    assert loaded.extras == {"summary": {"top1": 0.5, "bits": [4, 8]}}
    assert loaded.state is not None and set(loaded.state) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded.state[key], value.detach(), rtol=0, atol=0)
    assert load_run(run.path).info.name == run.name  # by path too

    listed = list_runs(tmp_path)
    assert [i.name for i in listed] == [run.name, first.name]  # newest first
    assert [i.status for i in listed] == ["complete", "complete"]
    assert listed[0].config == config.to_dict()


def test_run_names_root_and_suffix(tmp_path, monkeypatch):
    fixed = datetime(2024, 5, 6, 7, 8, 9).astimezone()
    monkeypatch.setattr(runs, "_now", lambda: fixed)
    config = make_config("lsq+", 4, 4)
    a = Run.create("hf-hub:timm/resnet18.a1_in1k", config, root=tmp_path)
    b = Run.create("hf-hub:timm/resnet18.a1_in1k", config, root=tmp_path)
    assert a.name == "20240506-070809-hf-hub-timm-resnet18.a1_in1k-lsqplus-W4A4"
    assert b.name == a.name + "-2"
    assert a.path.parent == tmp_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(runs.RUNS_DIR_ENV, raising=False)
    assert runs_root() == tmp_path / "runs"
    monkeypatch.setenv(runs.RUNS_DIR_ENV, str(tmp_path / "elsewhere"))
    assert runs_root() == tmp_path / "elsewhere"
    assert runs_root(tmp_path / "x") == tmp_path / "x"
    c = Run.create("vit_tiny", make_config("minmax", 8, 8))
    assert c.path.parent == tmp_path / "elsewhere"
    assert [i.name for i in list_runs()] == [c.name]


def test_context_manager_sets_final_status(tmp_path):
    with Run.create("m", make_config(), root=tmp_path) as ok:
        assert load_run(ok.name, root=tmp_path).info.status == "running"  # we are alive
    with pytest.raises(RuntimeError), Run.create("m", make_config(), root=tmp_path) as bad:
        raise RuntimeError("diverged")
    assert load_run(ok.name, root=tmp_path).info.status == "complete"
    info = load_run(bad.name, root=tmp_path).info
    assert info.status == "failed" and "diverged" in info.message


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    run = Run.create("resnet18", make_config(), root=tmp_path)
    old = pd.DataFrame({"step": [0, 1], "loss": [1.0, 0.5]})
    run.write_table("metrics", old)
    run.write_state({"w": torch.ones(3)})
    before = sorted(p.name for p in run.path.iterdir())
    big = pd.DataFrame({"step": range(1000), "loss": [0.1] * 1000})

    real_to_csv = pd.DataFrame.to_csv

    def half_then_crash(self, path, *args, **kwargs):
        text = real_to_csv(self, None, *args, **kwargs)
        Path(path).write_text(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        run.write_table("metrics", big)
    monkeypatch.undo()

    def no_replace(src, dst):
        raise KeyboardInterrupt  # killed between write and rename

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(KeyboardInterrupt):
        run.write_table("metrics", big)
    with pytest.raises(KeyboardInterrupt):
        run.write_state({"w": torch.zeros(3)})
    monkeypatch.undo()

    def no_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", no_fsync)
    with pytest.raises(OSError, match="I/O error"):
        run.write_json("summary", {"x": 1})
    monkeypatch.undo()

    assert sorted(p.name for p in run.path.iterdir()) == before  # temp files cleaned up
    # A temp file left by a hard kill (no cleanup) is not taken for a table or state.
    (run.path / ".metrics.csv.tmp-1-deadbeef").write_text("step,lo")
    (run.path / ".state.safetensors.tmp-1-deadbeef").write_bytes(b"\x00garbage")
    loaded = load_run(run.name, root=tmp_path)
    assert set(loaded.tables) == {"metrics"}
    pdt.assert_frame_equal(loaded.tables["metrics"], old)
    assert loaded.extras == {}
    torch.testing.assert_close(loaded.state["w"], torch.ones(3))


def test_dead_and_half_created_runs_are_incomplete(tmp_path):
    dead = Run.create("resnet18", make_config(), root=tmp_path)
    _set_status_field(dead.path, pid=_dead_pid())
    alive = Run.create("resnet18", make_config(), root=tmp_path)
    only_config = Run.create("resnet18", make_config(), root=tmp_path)
    (only_config.path / "status.json").unlink()
    garbage = tmp_path / "20200101-000000-garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    (tmp_path / "notes.txt").write_text("not a run")
    (tmp_path / "20200101-000001-empty").mkdir()  # killed between mkdir and config: not a run

    with pytest.warns(UserWarning, match="garbage"):
        listed = {i.name: i for i in list_runs(tmp_path)}
    assert set(listed) == {dead.name, alive.name, only_config.name}
    assert listed[dead.name].status == "incomplete"
    assert "interrupted" in listed[dead.name].message
    assert listed[alive.name].status == "running"
    assert listed[only_config.name].status == "incomplete"
    assert load_run(only_config.name, root=tmp_path).info.status == "incomplete"
    with pytest.raises(LSQError, match="not a readable run"):
        load_run("20200101-000000-garbage", root=tmp_path)
    assert list_runs(tmp_path / "missing") == []


#: Writes the metrics table five times, then starts a sixth write and stops inside it, after
#: the temp file is written and before it is renamed over metrics.csv, says so, and waits to be
#: killed: the interruption always falls in the middle of a write.
CHILD = textwrap.dedent(
    """
    import sys, time
    import pandas as pd
    import lsq.runs
    from lsq import make_config
    from lsq.runs import Run

    run = Run.create("resnet18", make_config("lsq+", 2, 2), root=sys.argv[1])
    rows = []
    for step in range(6):
        rows.append({"step": step, "loss": 1.0 / (step + 1), "note": "x" * 50})
        if step == 5:
            def stuck(fd):
                print(run.path, flush=True)
                time.sleep(600)
            lsq.runs.os.fsync = stuck
        run.write_table("metrics", pd.DataFrame(rows * 20))
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs kill -9")
def test_kill_minus_9_leaves_a_loadable_incomplete_run(tmp_path):
    earlier = Run.create("resnet18", make_config(), root=tmp_path)
    earlier.write_table("metrics", pd.DataFrame({"step": [0, 1], "loss": [1.0, 0.5]}))
    earlier.finish()

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line, f"child failed: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()

    temps = [p.name for p in Path(line).iterdir() if p.name.startswith(".metrics.csv.tmp-")]
    assert len(temps) == 1, "killed in the middle of writing metrics.csv"
    loaded = load_run(Path(line))
    assert loaded.info.status == "incomplete"
    metrics = loaded.tables["metrics"]
    assert list(metrics.columns) == ["step", "loss", "note"]
    assert sorted(set(metrics["step"])) == [0, 1, 2, 3, 4]  # the last complete write
    assert len(metrics) == 5 * 20
    assert metrics["loss"].notna().all() and (metrics["note"] == "x" * 50).all()
    assert set(loaded.tables) == {"metrics"}

    old = load_run(earlier.name, root=tmp_path)
    assert old.info.status == "complete"
    pdt.assert_frame_equal(
        old.tables["metrics"], pd.DataFrame({"step": [0, 1], "loss": [1.0, 0.5]})
    )
    statuses = {i.name: i.status for i in list_runs(tmp_path)}
    assert statuses == {earlier.name: "complete", Path(line).name: "incomplete"}


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "..", ".", "", "a\\b", ".hidden"])
def test_names_cannot_leave_the_runs_folder(tmp_path, name):
    with pytest.raises(LSQError, match="not a run name"):
        load_run(name, root=tmp_path)
    with pytest.raises(LSQError, match="not a run name"):
        delete_run(name, root=tmp_path)


def test_missing_run_and_delete(tmp_path):
    with pytest.raises(LSQError, match="list_runs"):
        load_run("20990101-000000-nothing", root=tmp_path)
    run = Run.create("resnet18", make_config(), root=tmp_path)
    with pytest.raises(LSQError, match="still running"):
        delete_run(run.name, root=tmp_path)
    _set_status_field(run.path, pid=_dead_pid())
    outside = tmp_path / "other"
    other = Run.create("resnet18", make_config(), root=outside)
    with pytest.raises(LSQError, match="not inside the runs folder"):
        delete_run(other.path, root=tmp_path / "main")
    delete_run(run.name, root=tmp_path)
    assert not run.path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["other"]
    other.finish()
    delete_run(other.path, root=outside)
    assert list_runs(outside) == []


def test_bad_input_is_refused_in_words(tmp_path):
    config = make_config()
    with pytest.raises(LSQError, match="JSON"):
        Run.create("m", config, meta={"f": object()}, root=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing created for refused meta
    run = Run.create("m", config, root=tmp_path)
    with pytest.raises(LSQError, match="status"):
        run.finish("done")
    with pytest.raises(LSQError, match="written by the run"):
        run.write_json("config", {})
    with pytest.raises(LSQError, match="file name"):
        run.write_table("../evil", pd.DataFrame())
    with pytest.raises(LSQError, match="not a tensor"):
        run.write_state({"n": 3})
    with pytest.raises(LSQError, match="DataFrame"):
        run.write_table("t", [1, 2])
