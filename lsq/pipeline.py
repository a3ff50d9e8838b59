"""The whole flow in a few calls: model and data, calibration, init, QAT, evaluation, saved run.

The CLI, the app and the benchmarks all go through here, so an app run and a command-line run
with the same settings compute the same numbers.

    bench = prepare()                                   # bundled EfficientNet-Lite0, skimage photos
    result = run_method(bench, make_config("lsq+", 8, 4), TrainConfig(steps=20))
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from lsq.analysis import layer_table, model_metrics
from lsq.calibrate import ActStats, LayerInit, collect_stats, init_from_stats
from lsq.config import QuantConfig
from lsq.convert import quantize_model
from lsq.errors import LSQError
from lsq.train import TrainConfig, TrainEvent, logits, resolve_device, train

#: progress(stage, done, total)
Progress = Callable[[str, int, int], None]

#: Views are cheap to make but each costs a forward pass in calibration and evaluation.
MAX_VIEWS = 4096


@dataclass(frozen=True)
class DataConfig:
    """Where calibration/training and evaluation images come from, and how many views of them."""

    source: str = "bundled"  # bundled: the photos inside scikit-image; folder: an image folder
    folder: str | None = None
    resolution: int | None = None  # None: the model's own input size
    calib_views: int = 64
    eval_views: int = 64
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("calib_views", "eval_views", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_VIEWS:
                raise LSQError(f"{name} must be a whole number from 1 to {MAX_VIEWS}, got {v!r}")
        if self.resolution is not None and (
            isinstance(self.resolution, bool)
            or not isinstance(self.resolution, int)
            or not 32 <= self.resolution <= 1024
        ):
            raise LSQError(
                f"resolution must be a whole number from 32 to 1024, got {self.resolution!r}"
            )
        if self.source not in ("bundled", "folder"):
            raise LSQError(f"data source must be 'bundled' or 'folder', got {self.source!r}")
        if self.source == "folder" and not self.folder:
            raise LSQError("data source 'folder' needs a folder path")


@dataclass(frozen=True)
class ModelSpec:
    """Which model: see lsq.models.load_model."""

    name: str = "tf_efficientnet_lite0"
    source: str = "bundled"
    path: str | None = None


@dataclass
class Workbench:
    """A float model with its data, ready to quantize with any number of methods."""

    model: nn.Module
    spec: ModelSpec
    data: DataConfig
    data_config: dict
    calib: Tensor
    eval: Tensor
    teacher_eval: Tensor  # float model's logits on the evaluation views (CPU)
    device: torch.device
    stats: dict[str, ActStats] | None = None
    teacher_calib: Tensor | None = None  # ... on the calibration/training views, once needed
    seconds: dict[str, float] = field(default_factory=dict)


def _noop(stage: str, done: int, total: int) -> None:
    pass


def prepare(
    spec: ModelSpec = ModelSpec(),
    data: DataConfig = DataConfig(),
    device: str = "auto",
    progress: Progress = _noop,
) -> Workbench:
    """Load the model and make the calibration and evaluation views."""
    from lsq.data import bundled_images, folder_images, make_views
    from lsq.models import load_model

    t0 = time.perf_counter()
    progress("loading model", 0, 1)
    loaded = load_model(spec.name, spec.source, path=spec.path)
    dev = resolve_device(device)
    model = loaded.model.to(dev).eval()
    res = data.resolution or int(loaded.data_config["input_size"][-1])
    progress("making views", 0, 1)
    if data.source == "bundled":
        calib_imgs = bundled_images("calibration")
        eval_imgs = bundled_images("evaluation")
    else:
        images, _, _ = folder_images(data.folder)
        if len(images) < 2:
            raise LSQError(
                f"the folder {data.folder} has {len(images)} readable image(s); at least 2 are "
                "needed (some to calibrate, some to evaluate)"
            )
        # Disjoint split: every fourth image evaluates, the rest calibrate.
        eval_imgs = images[::4]
        calib_imgs = [im for i, im in enumerate(images) if i % 4]
    calib = make_views(calib_imgs, data.calib_views, res, loaded.data_config, seed=data.seed)
    evals = make_views(eval_imgs, data.eval_views, res, loaded.data_config, seed=data.seed + 1)
    bench = Workbench(
        model=model,
        spec=spec,
        data=data,
        data_config=loaded.data_config,
        calib=calib,
        eval=evals,
        teacher_eval=torch.empty(0),
        device=dev,
    )
    progress("float model on evaluation views", 0, 1)
    bench.teacher_eval = logits(model, evals, batch=data.batch_size).cpu()
    bench.seconds["prepare"] = time.perf_counter() - t0
    return bench


def quantized_copy(bench: Workbench, config: QuantConfig) -> nn.Module:
    """A quantized deep copy of the float model (weight quantizers initialised)."""
    model = copy.deepcopy(bench.model)
    quantize_model(model, config)
    return model.to(bench.device)


def ensure_stats(bench: Workbench, progress: Progress = _noop) -> dict[str, ActStats]:
    """Record every layer's input statistics once; all methods initialise from them."""
    if bench.stats is None:
        t0 = time.perf_counter()
        probe = quantized_copy(bench, QuantConfig())
        batches = list(bench.calib.split(bench.data.batch_size))
        bench.stats = collect_stats(
            probe,
            batches,
            seed=bench.data.seed,
            progress=lambda i: progress("calibrating", i, len(batches)),
        )
        bench.seconds["calibrate"] = time.perf_counter() - t0
    return bench.stats


@dataclass
class MethodResult:
    """One method at one bit-width: the model after init (and QAT), with its numbers."""

    config: QuantConfig
    model: nn.Module
    init_report: list[LayerInit]
    metrics_init: dict[str, float]
    metrics_final: dict[str, float] | None = None
    history: list[TrainEvent] = field(default_factory=list)
    status: str = "complete"
    message: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    run_path: Path | None = None

    @property
    def metrics(self) -> dict[str, float]:
        return self.metrics_final or self.metrics_init

    def init_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.init_report])


def init_method(bench: Workbench, config: QuantConfig, progress: Progress = _noop) -> MethodResult:
    """Quantize a copy of the model with ``config`` and initialise it from the calibration stats."""
    stats = ensure_stats(bench, progress)
    t0 = time.perf_counter()
    model = quantized_copy(bench, config)
    progress(f"initialising {config.label}", 0, 1)
    report = init_from_stats(model, stats, config)
    t_init = time.perf_counter() - t0
    metrics = model_metrics(model, bench.eval, bench.teacher_eval)
    return MethodResult(config, model, report, metrics, seconds={"init": t_init})


def train_method(
    bench: Workbench,
    result: MethodResult,
    train_cfg: TrainConfig,
    on_event: Callable[[TrainEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MethodResult:
    """Short QAT of an initialised method; fills ``history``, ``metrics_final`` and ``status``."""
    t0 = time.perf_counter()
    if bench.teacher_calib is None:  # shared by every method trained on this bench
        bench.teacher_calib = logits(bench.model, bench.calib, batch=bench.data.batch_size).cpu()
    for event in train(
        result.model,
        bench.model,
        bench.calib,
        bench.eval,
        train_cfg,
        should_stop=should_stop,
        teacher_logits=(bench.teacher_calib, bench.teacher_eval),
    ):
        result.history.append(event)
        if on_event is not None:
            on_event(event)
        if event.kind in ("error", "stopped"):
            result.status = "failed" if event.kind == "error" else "stopped"
            result.message = event.message
    result.seconds["train"] = time.perf_counter() - t0
    result.metrics_final = model_metrics(result.model, bench.eval, bench.teacher_eval)
    return result


def history_frames(events: list[TrainEvent]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-step metrics and per-step quantizer trajectories (long format) of training events."""
    metrics, traj = [], []
    for e in events:
        if e.kind not in ("step", "eval"):
            continue
        metrics.append(
            {
                "step": e.step,
                "loss": e.loss,
                "agreement": e.agreement,
                "kl": e.kl,
                "lr_weights": e.lr_weights,
                "lr_quant": e.lr_quant,
                "seconds": e.seconds,
            }
        )
        for layer, (s, b, ws) in e.quantizers.items():
            traj.append(
                {"step": e.step, "layer": layer, "scale": s, "offset": b, "weight_scale": ws}
            )
    return pd.DataFrame(metrics), pd.DataFrame(traj)


def start_run(
    bench: Workbench, result: MethodResult, train_cfg: TrainConfig | None = None, root=None
):
    """Create the run folder before long work (status "running"), so a crash leaves it marked
    incomplete rather than missing; ``finish_run`` fills it in."""
    from lsq.runs import Run

    meta = {
        "model": asdict(bench.spec),
        "data": asdict(bench.data),
        "train": train_cfg.to_dict() if train_cfg is not None else None,
        "metrics_init": result.metrics_init,
    }
    run = Run.create(bench.spec.name, result.config, meta=meta, root=root)
    run.write_table("init", result.init_frame())
    result.run_path = run.path
    return run


def write_progress(run, result: MethodResult) -> None:
    """Save the training history so far (atomically), e.g. every few steps."""
    if result.history:
        metrics, traj = history_frames(result.history)
        run.write_table("metrics", metrics)
        run.write_table("trajectories", traj)


def finish_run(run, bench: Workbench, result: MethodResult) -> None:
    """Write the per-layer table, history, state dict and final metrics; mark the run done."""
    run.write_table("layers", layer_table(result.model, bench.stats, bench.eval[:8]))
    write_progress(run, result)
    run.write_state({k: v.detach().cpu() for k, v in result.model.state_dict().items()})
    run.update_meta(metrics_final=result.metrics_final, seconds=result.seconds)
    run.finish(result.status, result.message)


def save_result(
    bench: Workbench, result: MethodResult, train_cfg: TrainConfig | None = None, root=None
):
    """Write a whole run folder at once: config, per-layer table, metrics, state dict."""
    run = start_run(bench, result, train_cfg, root)
    finish_run(run, bench, result)
    return run


def compare(
    bench: Workbench,
    methods: list[str],
    bits: list[int],
    train_cfg: TrainConfig | None = None,
    progress: Progress = _noop,
) -> pd.DataFrame:
    """Each method at each bit-width (W=A=bits): agreement and KL after init, and after QAT."""
    from lsq.config import make_config

    rows = []
    total = len(methods) * len(bits)
    for i, (method, b) in enumerate((m, b) for m in methods for b in bits):
        progress("comparing", i, total)
        cfg = make_config(method, b, b)
        res = init_method(bench, cfg, progress)
        row = {
            "method": method,
            "bits": b,
            "init_agreement": res.metrics_init["agreement"],
            "init_confident_agreement": res.metrics_init["confident_agreement"],
            "init_kl": res.metrics_init["kl"],
        }
        if train_cfg is not None:
            train_method(bench, res, train_cfg)
            row.update(
                qat_agreement=res.metrics_final["agreement"],
                qat_confident_agreement=res.metrics_final["confident_agreement"],
                qat_kl=res.metrics_final["kl"],
                status=res.status,
            )
        rows.append(row)
        del res
    progress("comparing", total, total)
    return pd.DataFrame(rows)
