"""The `python -m lsq run` line each result shows (lsq.command.run_command) is parsed back by the
CLI's own parser into the very settings it was written from: model, data, quantization,
training and reconstruction. A setting with no flag is named after the command."""

import shlex

import pytest

from lsq.cli import build_parser, data_config, model_spec, recon_config, run_config, train_config
from lsq.command import run_command
from lsq.explorer import Settings
from lsq.pipeline import DataConfig, ModelSpec
from lsq.reconstruct import ReconstructConfig
from lsq.train import TrainConfig

APP = Settings()
CASES = {
    "the app's default calibration": (APP.model, APP.data, APP.config("lsq+"), None, None, "auto"),
    "signed LSQ at W8A4, 20 QAT steps on the CPU": (
        APP.model,
        APP.data,
        APP.config("lsq-signed"),
        TrainConfig(steps=20, device="cpu", lr_act_quant=1e-3, optimizer="sgd"),
        None,
        "cpu",
    ),
    "the low-bit recipe at 160 px, learned rounding, fp32, eager": (
        ModelSpec(),
        DataConfig(resolution=160, recon_views=128, seed=3),
        Settings(w_bits=4, a_bits=4).config("lsq+"),
        None,
        ReconstructConfig(iters=80, rounding="learned", seed=3, bf16=False, compile=False),
        "auto",
    ),
    "activations alone, a folder, Lite2, reconstruction then QAT": (
        ModelSpec("tf_efficientnet_lite2", "bundled"),
        DataConfig(source="folder", folder="my photos/cats", calib_views=96, eval_views=48),
        Settings(quantize_weights=False).config("minmax").with_(first_last_bits=None),
        TrainConfig(steps=5, record_every=5),
        ReconstructConfig(weight_init="keep"),
        "auto",
    ),
    "synthetic images alone, a timm model with random weights": (
        ModelSpec("resnet18", "random"),
        DataConfig(source="synthetic", synthetic=32, fresh_views=True),
        Settings(w_bits=3, a_bits=3).config("lsq"),
        TrainConfig(steps=3),
        None,
        "auto",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_command_parses_back_into_the_same_settings(case):
    spec, data, config, train, recon, device = CASES[case]
    line = run_command(spec, data, config, train, recon, device)
    assert line.startswith("python -m lsq run ") and "#" not in line, line
    args = build_parser().parse_args(shlex.split(line)[3:])
    assert model_spec(args) == spec
    if data.source == "bundled":  # --batch-size sets both: the data's is the training's
        data = data.__class__(**{**data.__dict__, "batch_size": args.batch_size})
    assert data_config(args) == data
    assert run_config(args) == config
    assert args.steps == (train.steps if train else 0)
    if train is not None:
        assert train_config(args, args.steps) == train.__class__(
            **{**train.__dict__, "device": device}
        )
    assert (
        recon_config(args) == recon
        if recon is None
        else recon_config(args) == recon.__class__(**{**recon.__dict__, "device": device})
    )
    assert args.device == device


def test_a_setting_without_a_flag_is_named_not_dropped():
    """The CLI's --batch-size is the data's and the training's; the app can set the training's
    alone (the Train page), and a few rates have no flag at all."""
    line = run_command(
        ModelSpec(), DataConfig(), Settings().config("lsq+"),
        TrainConfig(momentum=0.5, batch_size=8), ReconstructConfig(lr_act_quant=0.5),
    )  # fmt: skip
    assert line.endswith(
        "# no flag for: data batch_size=16, momentum=0.5, reconstruction lr_act_quant=0.5"
    )
