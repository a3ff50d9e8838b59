"""The whole flow in a few calls: model and data, calibration, init, QAT, evaluation, saved run.

The CLI, the app and the benchmarks all go through here, so an app run and a command-line run
with the same settings compute the same numbers.

    bench = prepare()                                   # bundled EfficientNet-Lite0, skimage photos
    initialised = init_method(bench, make_config("lsq+", 8, 4))
    trained = train_method(bench, initialised, TrainConfig(steps=20))  # a new result
    save_result(bench, trained)                         # runs/<time>-...-lsqplus-W8A4/

A ``MethodResult`` is a frozen snapshot of one method at one stage (initialised, reconstructed,
trained): the functions here never change a result or its model in place, they return new ones,
so the same initialised result can be trained any number of times, each run starting from it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from lsq.analysis import layer_table, model_metrics
from lsq.calibrate import ActStats, LayerInit, collect_stats, init_from_stats
from lsq.config import QuantConfig, make_config, resolve_weight_init
from lsq.convert import quantize_model
from lsq.data import MAX_RESOLUTION, MIN_RESOLUTION
from lsq.errors import LSQError
from lsq.status import ENDINGS, Status
from lsq.train import TrainConfig, TrainEvent, logits, resolve_device, train
from lsq.validate import whole_number

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
            object.__setattr__(self, name, whole_number(getattr(self, name), name, 1, MAX_VIEWS))
        if self.resolution is not None:
            res = whole_number(self.resolution, "resolution", MIN_RESOLUTION, MAX_RESOLUTION)
            object.__setattr__(self, "resolution", res)
        object.__setattr__(self, "seed", whole_number(self.seed, "seed", 0))
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
    #: Image files that could not be read (file name and why), to show the user.
    skipped: tuple[str, ...] = ()


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
    skipped: tuple[str, ...] = ()
    if data.source == "bundled":
        calib_imgs = bundled_images("calibration")
        eval_imgs = bundled_images("evaluation")
    else:
        found = folder_images(data.folder)
        images = found[0]
        skipped = tuple(_without_folder(s, data.folder) for s in found.skipped)
        if len(images) < 2:
            raise LSQError(
                f"the image folder has {len(images)} readable image(s); at least 2 are needed "
                "(some to calibrate, some to evaluate)" + _skipped_note(skipped)
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
        skipped=skipped,
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


class Stage(StrEnum):
    """How far a method's result has come: initialised, then reconstructed and/or trained."""

    INITIALISED = "initialised"
    RECONSTRUCTED = "reconstructed"
    TRAINED = "trained"


@dataclass(frozen=True, eq=False)
class MethodResult:
    """One method at one bit-width at one stage: a frozen snapshot with its numbers.

    The model belongs to the snapshot: nothing trains it or switches its quantizers once it is
    published. Work on ``copy_model()``; a new stage is a new result (``train_method``).
    """

    config: QuantConfig
    model: nn.Module
    init_report: tuple[LayerInit, ...]
    metrics_init: Mapping[str, float]
    stage: Stage = Stage.INITIALISED
    #: Training steps taken since the initialised state.
    steps: int = 0
    metrics_final: Mapping[str, float] | None = None
    history: tuple[TrainEvent, ...] = ()
    status: Status = Status.COMPLETE
    message: str = ""
    seconds: Mapping[str, float] = field(default_factory=dict)
    run_path: Path | None = None

    @property
    def metrics(self) -> Mapping[str, float]:
        """The numbers of this stage: after training when trained, else right after init."""
        return self.metrics_final or self.metrics_init

    @property
    def label(self) -> str:
        """The stage in words: "initialised" or "trained 20 steps" (and how a run ended)."""
        if self.stage == Stage.TRAINED:
            text = f"trained {self.steps} step{'s' if self.steps != 1 else ''}"
        else:
            text = str(self.stage)
        return text if self.status == Status.COMPLETE else f"{text}, {self.status}"

    def copy_model(self) -> nn.Module:
        """A private deep copy of the model, free to train or to switch quantizers on."""
        return copy.deepcopy(self.model)

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
    return MethodResult(config, model, tuple(report), metrics, seconds={"init": t_init})


def train_method(
    bench: Workbench,
    result: MethodResult,
    train_cfg: TrainConfig,
    on_event: Callable[[TrainEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MethodResult:
    """Short QAT of a copy of ``result``'s model; returns a new, trained result.

    ``result`` is left as it was, so training the same initialised result twice gives two
    independent runs that both start from it. Passing a trained result continues that run.
    """
    t0 = time.perf_counter()
    if bench.teacher_calib is None:  # shared by every method trained on this bench
        bench.teacher_calib = logits(bench.model, bench.calib, batch=bench.data.batch_size).cpu()
    model = result.copy_model()
    history: list[TrainEvent] = []
    status, message = Status.COMPLETE, ""
    for event in train(
        model,
        bench.model,
        bench.calib,
        bench.eval,
        train_cfg,
        should_stop=should_stop,
        teacher_logits=(bench.teacher_calib, bench.teacher_eval),
    ):
        history.append(event)
        if on_event is not None:
            on_event(event)
        if event.kind in (Status.ERROR, Status.STOPPED):
            status, message = ENDINGS[Status(event.kind)], event.message
    steps = max((e.step for e in history if e.kind == Status.STEP), default=0)
    return dataclasses.replace(
        result,
        model=model,
        stage=Stage.TRAINED,
        steps=result.steps + steps,
        metrics_final=model_metrics(model, bench.eval, bench.teacher_eval),
        history=tuple(history),
        status=status,
        message=message,
        seconds={**result.seconds, "train": time.perf_counter() - t0},
        run_path=None,
    )


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
        "metrics_init": dict(result.metrics_init),
    }
    run = Run.create(bench.spec.name, result.config, meta=meta, root=root)
    run.write_table("init", result.init_frame())
    return run


def write_progress(run, history: Sequence[TrainEvent]) -> None:
    """Save a training history so far (atomically), e.g. every few steps."""
    if history:
        metrics, traj = history_frames(list(history))
        run.write_table("metrics", metrics)
        run.write_table("trajectories", traj)


def finish_run(run, bench: Workbench, result: MethodResult) -> MethodResult:
    """Write the per-layer table, history, state dict and final metrics; mark the run done.

    Returns ``result`` with its ``run_path``. The per-layer table is measured on a copy.
    """
    run.write_table("layers", layer_table(result.copy_model(), bench.stats, bench.eval[:8]))
    write_progress(run, result.history)
    run.write_state({k: v.detach().cpu() for k, v in result.model.state_dict().items()})
    metrics_final = dict(result.metrics_final) if result.metrics_final is not None else None
    run.update_meta(
        metrics_final=metrics_final, seconds=dict(result.seconds), stage=str(result.stage)
    )
    run.finish(result.status, result.message)
    return dataclasses.replace(result, run_path=run.path)


def save_result(
    bench: Workbench, result: MethodResult, train_cfg: TrainConfig | None = None, root=None
) -> MethodResult:
    """Write a whole run folder at once: config, per-layer table, metrics, state dict.

    Returns ``result`` with its ``run_path``.
    """
    return finish_run(start_run(bench, result, train_cfg, root), bench, result)


def compare(
    bench: Workbench,
    methods: list[str],
    bits: list[int],
    train_cfg: TrainConfig | None = None,
    progress: Progress = _noop,
    weight_init: str = "auto",
) -> pd.DataFrame:
    """Each method at each bit-width (W=A=bits): agreement and KL after init, and after QAT.

    ``weight_init`` is a choice of ``lsq.config.WEIGHT_INIT_CHOICES``, "auto" as in the app.
    """
    rows = []
    total = len(methods) * len(bits)
    for i, (method, b) in enumerate((m, b) for m in methods for b in bits):
        progress("comparing", i, total)
        cfg = make_config(method, b, b, weight_init=resolve_weight_init(method, b, weight_init))
        res = init_method(bench, cfg, progress)
        row = {
            "method": method,
            "bits": b,
            "init_agreement": res.metrics_init["agreement"],
            "init_confident_agreement": res.metrics_init["confident_agreement"],
            "init_kl": res.metrics_init["kl"],
        }
        if train_cfg is not None:
            res = train_method(bench, res, train_cfg)
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


def _without_folder(note: str, folder: str) -> str:
    """A note about a file with the server folder taken off its paths: the file names remain."""
    for prefix in {str(Path(folder)), str(Path(folder).resolve())}:
        note = note.replace(prefix + "/", "")
    return note


def _skipped_note(skipped: Sequence[str]) -> str:
    if not skipped:
        return ""
    shown = "; ".join(skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return f". Could not read: {shown}{more}"
