"""The `python -m lsq run` command line that reproduces a result of the app (or of any run).

Every result says how to get it again headless: ``run_command`` writes the command from the
settings objects themselves (model, data, quantization, training, reconstruction), and
``tests/test_command.py`` parses it back with the CLI's own parser and checks that every setting
comes back equal, so the command and the CLI cannot drift apart. A setting that the CLI has no
flag for (a learning rate of reconstruction, say) is named after the command as a comment,
rather than silently dropped.
"""

from __future__ import annotations

import shlex
from dataclasses import fields
from typing import TYPE_CHECKING

from lsq.config import METHODS, QuantConfig
from lsq.reconstruct import ReconstructConfig
from lsq.train import TrainConfig

if TYPE_CHECKING:  # lsq.pipeline writes each run's command with this module
    from lsq.pipeline import DataConfig, ModelSpec

PROGRAM = "python -m lsq run"
#: The first/last-layer bits ``run`` uses when ``--first-last-bits`` is not given.
FIRST_LAST_DEFAULT = QuantConfig().first_last_bits


def _number(v: float) -> str:
    return repr(float(v))  # parses back to the same float


def run_command(
    spec: ModelSpec,
    data: DataConfig,
    config: QuantConfig,
    train: TrainConfig | None = None,
    recon: ReconstructConfig | None = None,
    device: str = "auto",
) -> str:
    """The ``python -m lsq run`` line that computes this result (``train`` None: no QAT, as
    ``--steps 0``; ``recon`` None: no reconstruction; ``device``: where the model ran)."""
    from lsq.pipeline import DataConfig

    args: list[str] = []
    extra: list[str] = []

    def flag(name: str, value: object = None) -> None:
        args.append(name)
        if value is not None:
            args.append(str(value))

    # model
    if spec.source == "bundled":
        short = spec.name.removeprefix("tf_efficientnet_")
        flag("--model", "bundled" if short == "lite0" else f"bundled-{short}")
    elif spec.source == "file":
        flag("--model", spec.path)
        flag("--arch", spec.name)
    else:
        flag("--model", spec.name)
        if spec.source == "random":
            flag("--random-weights")
    # data
    if data.source == "folder":
        flag("--images", data.folder)
    if data.source == "synthetic":
        flag("--synthetic-only")
    if data.resolution is not None:
        flag("--resolution", data.resolution)
    base = DataConfig()
    for name, option in (
        ("calib_views", "--calib"),
        ("eval_views", "--eval-views"),
        ("recon_views", "--recon-views"),
        ("synthetic", "--synthetic"),
    ):
        if getattr(data, name) != getattr(base, name):
            flag(option, getattr(data, name))
    if data.fresh_views:
        flag("--fresh-views")
    # quantization
    preset = METHODS[config.method]
    flag("--method", config.method)
    flag("--w-bits", config.w_bits)
    flag("--a-bits", config.a_bits)
    flag("--weight-init", config.weight_init)
    if config.act_mode != preset.act_mode:
        flag("--act-mode", config.act_mode)
    if config.act_init != preset.act_init:
        flag("--act-init", config.act_init)
    if config.first_last_bits != FIRST_LAST_DEFAULT:
        flag("--first-last-bits", config.first_last_bits or 0)
    if not config.quantize_weights:
        flag("--weights-float")
    covered = {"method", "w_bits", "a_bits", "weight_init", "act_mode", "act_init"}
    covered |= {"first_last_bits", "quantize_weights"}
    extra += _differences(config, preset.with_(w_bits=config.w_bits, a_bits=config.a_bits), covered)
    # training, and what it shares with the data and the reconstruction
    t = train or TrainConfig(
        device=device, seed=data.seed, batch_size=data.batch_size, **_shared(recon)
    )
    flag("--steps", train.steps if train is not None else 0)
    if data.batch_size != t.batch_size and train is not None:
        extra.append(f"data batch_size={data.batch_size}")
    flag("--batch-size", t.batch_size if train is not None else data.batch_size)
    if data.seed != 0 or t.seed != 0:
        flag("--seed", data.seed)
    if t.seed != data.seed and train is not None:
        extra.append(f"train seed={t.seed}")
    for name, option in (("optimizer", "--optimizer"), ("lr_weights", "--lr")):
        if train is not None and getattr(t, name) != getattr(TrainConfig(), name):
            v = getattr(t, name)
            flag(option, _number(v) if isinstance(v, float) else v)
    for name, option in (("lr_act_quant", "--lr-act"), ("lr_weight_quant", "--lr-wq")):
        if train is not None and getattr(t, name) != getattr(TrainConfig(), name):
            flag(option, _number(getattr(t, name)))
    if train is not None and t.record_every != TrainConfig().record_every:
        flag("--record-every", t.record_every)
    if device != "auto":
        flag("--device", device)
    if t.device != device:
        extra.append(f"train device={t.device!r}")
    if not t.bf16:
        flag("--fp32")
    if not t.compile:
        flag("--eager")
    if train is not None:
        covered = {"steps", "batch_size", "seed", "optimizer", "lr_weights", "lr_act_quant"}
        covered |= {"lr_weight_quant", "record_every", "device", "bf16", "compile"}
        extra += _differences(train, TrainConfig(), covered)
    if recon is not None:
        flag("--reconstruct", recon.iters)
        r = ReconstructConfig()
        if recon.weight_init != r.weight_init:
            flag("--recon-weight-init", recon.weight_init)
        if recon.rounding != r.rounding:
            flag("--recon-rounding", recon.rounding)
        for name in ("seed", "device", "bf16", "compile"):
            if getattr(recon, name) != getattr(t, name):
                extra.append(f"reconstruction {name}={getattr(recon, name)!r}")
        covered = {"iters", "weight_init", "rounding", "seed", "device", "bf16", "compile"}
        extra += [f"reconstruction {d}" for d in _differences(recon, r, covered)]
    line = " ".join([PROGRAM, *(shlex.quote(a) for a in args)])
    if extra:
        line += "  # no flag for: " + ", ".join(extra)
    return line


def _shared(recon: ReconstructConfig | None) -> dict:
    """What ``--fp32`` and ``--eager`` say when there is no training: the reconstruction's."""
    return {} if recon is None else {"bf16": recon.bf16, "compile": recon.compile}


def _differences(obj: object, base: object, covered: set[str]) -> list[str]:
    """``name=value`` for each field of ``obj`` that differs from ``base`` and has no flag."""
    return [
        f"{f.name}={getattr(obj, f.name)!r}"
        for f in fields(obj)
        if f.name not in covered and getattr(obj, f.name) != getattr(base, f.name)
    ]
