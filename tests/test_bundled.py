"""End to end on the real bundled model: W8A8 keeps its predictions; the CLI runs."""

import pytest

from lsq import make_config
from lsq.cli import main
from lsq.pipeline import DataConfig, ModelSpec, init_method, prepare


@pytest.fixture(scope="module")
def bench():
    return prepare(ModelSpec(), DataConfig(calib_views=32, eval_views=48, batch_size=16), "cpu")


@pytest.mark.parametrize(
    "method, weight_init",
    [("lsq+", "mse"), ("lsq+", "maxabs"), ("minmax", "maxabs"), ("lsq", "maxabs")],
)
def test_w8a8_keeps_top1_on_confident_views(bench, method, weight_init):
    result = init_method(bench, make_config(method, 8, 8, weight_init=weight_init))
    m = result.metrics_init
    assert m["confident_agreement"] >= 0.9, m
    assert m["kl"] < 0.1, m


def test_low_bit_weight_rules_clip_too_hard_at_8_bits(bench):
    """The fact behind the app's 'auto' weight init: 3-sigma at W8 loses against an MSE search."""
    three_sigma = init_method(bench, make_config("lsq+", 8, 8)).metrics_init
    mse = init_method(bench, make_config("lsq+", 8, 8, weight_init="mse")).metrics_init
    assert mse["kl"] < three_sigma["kl"]


def test_activation_only_a4_lsq_plus_beats_minmax_and_signed(bench):
    """The paper's claim where it shows most: asymmetric MSE-initialised ranges at 4 bits."""
    kl = {
        m: init_method(bench, make_config(m, 8, 4, quantize_weights=False)).metrics_init["kl"]
        for m in ("lsq+", "minmax", "lsq-signed")
    }
    assert kl["lsq+"] < kl["minmax"] < kl["lsq-signed"], kl


def test_cli_run_and_compare_smoke(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    args = ["--calib", "8", "--eval-views", "8", "--resolution", "64", "--batch-size", "8"]
    code = main(
        ["--runs-dir", runs, "run", "--w-bits", "8", "--a-bits", "4", "--steps", "2", *args]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "after init" in out and "after 2 QAT steps" in out and "saved run" in out
    csv = tmp_path / "cmp.csv"
    code = main(["compare", "--methods", "lsq+,minmax", "--bits", "8,4", "--out", str(csv), *args])
    out = capsys.readouterr().out
    assert code == 0 and csv.exists()
    assert "lsq+" in out and "minmax" in out
    assert main(["--runs-dir", runs, "runs"]) == 0
    assert "complete" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["run", "--w-bits", "9"], "bits must be from 2 to 8"),
        (["run", "--a-bits", "1"], "bits must be from 2 to 8"),
        (["run", "--steps", "-1"], "--steps must be"),
        (["run", "--calib", "0"], "calib_views must be"),
        # A typo is answered with the name it missed (not a word already in the echoed input).
        (
            ["run", "--model", "resnt18"],
            "Unknown timm architecture 'resnt18'. Did you mean: resnet18,",
        ),
        (["compare", "--methods", "lsq+,nope"], "unknown method"),
        (["run", "--model", "bundled-lite3"], "choose bundled or bundled-lite0, bundled-lite1"),
        (["run", "--reconstruct", "-5"], "iters must be"),
        (["run", "--synthetic-only", "--images", "/tmp"], "--synthetic-only uses no photo"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(argv, words, capsys, tmp_path):
    code = main(["--runs-dir", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
    assert "Traceback" not in err


def test_cli_non_integer_bits_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--w-bits", "4.5"])
    assert e.value.code == 2
    assert "whole number" in capsys.readouterr().err
