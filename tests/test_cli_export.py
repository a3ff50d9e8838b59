"""Export wired in: ``python -m lsq export`` and the Runs page's export buttons, on a saved run of
the bundled model at 64 px (made by ``python -m lsq run``)."""

import shutil
from pathlib import Path

import pytest
from helpers import plant_bias_error
from streamlit.testing.v1 import AppTest

from lsq.cli import main
from lsq.runs import Run, list_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A runs folder (also $LSQ_RUNS_DIR, for the app) holding one complete LSQ+ W4A4 run."""
    path = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("LSQ_RUNS_DIR", str(path))
    argv = ["--runs-dir", str(path), "run", "--resolution", "64", "--calib", "8"]
    argv += ["--eval-views", "8", "--steps", "0", "--eager"]
    assert main(argv) == 0
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def run_path(runs_dir):
    (info,) = list_runs(runs_dir)
    return info.path


def test_cli_exports_onnx_and_prints_the_parity(runs_dir, run_path, capsys):
    assert main(["--runs-dir", str(runs_dir), "export", run_path.name]) == 0
    out = capsys.readouterr().out
    assert (run_path / "model.onnx").is_file()
    assert f"wrote {run_path / 'model.onnx'}" in out
    parity = [line for line in out.splitlines() if line.startswith("parity, ONNX Runtime")]
    assert len(parity) == 1, out
    for figure in ("agreement", "KL", "logit SQNR", "max |diff|"):
        assert figure in parity[0]
    # The per-layer summary: every LSQ+ offset folded, the stem and the 16 depthwise convs
    # (padded) with a bias per output position.
    assert "offset routes: fold 50 (17 padded convs with a border bias)" in out
    assert "warning" not in out  # within the parity bar


def test_cli_warns_when_the_export_is_below_the_parity_bar(run_path, capsys, tmp_path, monkeypatch):
    plant_bias_error(monkeypatch, "blocks.3.1.conv_dw", 0.5)
    out_file = tmp_path / "m.onnx"
    # Exit status 0: the file is written as asked; the warning says what it is worth.
    assert main(["export", str(run_path), "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert out_file.is_file()
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, out
    (warning,) = warnings
    assert "below the parity bar" in warning and "agreement" in warning and "KL" in warning
    assert "First diverging layer: blocks.3.1.conv_dw" in warning
    # With the per-layer table asked for, the same layer is named from that table.
    assert main(["export", str(run_path), "--out", str(out_file), "--layer-table"]) == 0
    out = capsys.readouterr().out
    assert "First diverging layer: blocks.3.1.conv_dw" in out
    assert "output_same_input_db" in out


def test_cli_recomputes_the_per_layer_table_on_the_exported_graph(run_path, capsys, tmp_path):
    out_file = tmp_path / "m.onnx"
    assert main(["export", str(run_path), "--out", str(out_file), "--layer-table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.startswith("per-layer table on the")]
    header = lines[start + 1].split()
    assert header[:3] == ["layer", "kind", "a_bits"] and "onnx_output_sqnr_db" in header
    rows = [line.split() for line in lines[start + 2 : start + 52]]
    assert [r[0] for r in rows][:2] == ["conv_stem", "blocks.0.0.conv_dw"] and len(rows) == 50
    same_input = header.index("codes_differ_same_input")
    assert all(float(r[same_input]) == 0 for r in rows)  # fold: the fake-quant model's codes
    argv = ["export", str(run_path), "--format", "safetensors", "--layer-table"]
    assert main([*argv, "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "recomputed on the ONNX graph" in err and "\n" not in err


def test_cli_exports_safetensors_by_path_with_a_chosen_offset(runs_dir, run_path, capsys, tmp_path):
    out_file = tmp_path / "int.safetensors"
    argv = ["export", str(run_path), "--format", "safetensors", "--out", str(out_file)]
    assert main([*argv, "--offset", "snap"]) == 0
    out = capsys.readouterr().out
    assert out_file.is_file() and f"wrote {out_file}" in out
    assert "offset routes: snap 50" in out  # every LSQ+ input snapped, none folded
    assert "parity" not in out  # measured for ONNX only


def test_cli_bad_run_exits_2_with_one_line(runs_dir, run_path, capsys, tmp_path):
    assert main(["--runs-dir", str(runs_dir), "export", "no-such-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no run 'no-such-run'") and "\n" not in err
    holiday = tmp_path / "holiday-photos"
    holiday.mkdir()
    (holiday / "a.txt").write_text("hello")
    assert main(["--runs-dir", str(runs_dir), "export", str(holiday)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable run" in err and "\n" not in err
    assert main(["export", str(run_path), "--out", str(tmp_path / "nowhere" / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_:  # argparse: a choice not offered
        main(["export", str(run_path), "--format", "tflite"])
    assert exit_.value.code == 2


def test_runs_page_exports_and_offers_the_download(runs_dir, run_path):
    failed = runs_dir / "00000000-000000-failed-run"  # sorts after the good run (newest first)
    shutil.copytree(run_path, failed, ignore=shutil.ignore_patterns("model.onnx", "export"))
    Run(failed, "").finish("failed", "out of memory")
    at = AppTest.from_file(str(ROOT / "app_pages" / "runs.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    name = run_path.name
    at.button(key=f"do-export-onnx-{name}").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert (run_path / "export" / "model.onnx").is_file()
    assert any("agreement" in c.value for c in at.caption)
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Download model.onnx" in labels
    at.button(key=f"do-export-safetensors-{name}").click().run()
    assert not at.exception, at.exception
    assert (run_path / "export" / "model-int.safetensors").is_file()
    labels = [b.proto.label for b in at.get("download_button")]
    assert {"Download model.onnx", "Download model-int.safetensors"} <= set(labels)
    # A run that failed: refused in words on the page, nothing written, no traceback.
    at.multiselect[0].set_value([failed.name]).run()
    at.button(key=f"do-export-onnx-{failed.name}").click().run()
    assert not at.exception, at.exception
    assert any("only a complete run" in e.value for e in at.error)
    assert not (failed / "export" / "model.onnx").exists()


def test_runs_page_warns_with_the_diverging_layer_when_parity_is_below_the_bar(
    runs_dir, run_path, monkeypatch
):
    plant_bias_error(monkeypatch, "blocks.3.1.conv_dw", 0.5)
    at = AppTest.from_file(str(ROOT / "app_pages" / "runs.py"), default_timeout=120)
    at.run()
    at.multiselect[0].set_value([run_path.name]).run()
    at.button(key=f"do-export-onnx-{run_path.name}").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    (warning,) = [w.value for w in at.warning if "parity bar" in w.value]
    assert "First diverging layer: blocks.3.1.conv_dw" in warning
    assert not any("agreement" in c.value for c in at.caption)  # the warning instead
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Download model.onnx" in labels  # written all the same


def test_layers_page_shows_each_offsets_distance_to_its_snapped_zero_point():
    from conftest import own_job_manager

    from lsq.explorer import Settings, calibrate_job
    from lsq.jobs import Job
    from lsq.pipeline import DataConfig

    small = Settings(
        data=DataConfig(resolution=64, calib_views=8, eval_views=8, batch_size=8),
        methods=("lsq+", "lsq"),
    )
    mp = pytest.MonkeyPatch()
    own = own_job_manager(mp)
    try:
        calib = own.submit(
            Job("calibrate", "Calibration", {"settings": small}),
            lambda j: calibrate_job(j, small, save=False),
        )
        own.wait(calib, timeout=300)
        assert calib.status == "done", calib.message
        at = AppTest.from_file(str(ROOT / "app_pages" / "layers.py"), default_timeout=120)
        at.session_state["settings"] = small
        at.run()
        own.wait(own.latest("layers"), timeout=300)
        at.run()
        assert not at.exception, at.exception
        (table,) = [d.value for d in at.dataframe if "snap_error_steps" in d.value]
        assert len(table) == 50 and table["snap_error_steps"].between(0, 0.5).all()
        assert table["foldable"].any() and not table["foldable"].all()
        at.selectbox(key="sens_method").set_value("lsq").run()
        assert not at.exception, at.exception
        assert any("no continuous offset" in c.value for c in at.caption)
    finally:
        mp.undo()
