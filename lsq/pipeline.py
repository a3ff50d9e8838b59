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
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import Tensor, nn

from lsq.analysis import layer_table, model_metrics
from lsq.calibrate import ActStats, LayerInit, collect_stats, init_from_stats
from lsq.config import QuantConfig, make_config
from lsq.convert import quantize_model
from lsq.data import MAX_RESOLUTION, MIN_RESOLUTION
from lsq.device import resolve_device
from lsq.errors import LSQError
from lsq.metrics import logits
from lsq.reconstruct import ReconstructConfig, ReconstructEvent, reconstruct, unit_frame
from lsq.status import ENDINGS, Status
from lsq.train import TrainConfig, TrainEvent, ViewSource, train
from lsq.validate import whole_number

if TYPE_CHECKING:
    from PIL import Image

#: progress(stage, done, total)
Progress = Callable[[str, int, int], None]

#: Views are cheap to make but each costs a forward pass in calibration and evaluation.
MAX_VIEWS = 4096
DATA_SOURCES = ("bundled", "folder", "synthetic")


@dataclass(frozen=True)
class DataConfig:
    """Where calibration/training and evaluation images come from, and how many views of them."""

    #: bundled: the photos inside scikit-image; folder: an image folder; synthetic: images made
    #: from the float model's BatchNorm statistics (no photo; evaluation on the bundled photos).
    source: str = "bundled"
    folder: str | None = None
    resolution: int | None = None  # None: the model's own input size
    calib_views: int = 64
    eval_views: int = 64
    batch_size: int = 16
    seed: int = 0
    #: Images synthesised from BatchNorm statistics and added to the calibration and training
    #: data (with source "synthetic", 0 means ``calib_views`` of them).
    synthetic: int = 0
    #: QAT draws new random crops every step instead of cycling over ``calib``. Off by default:
    #: fixed views ended better on the bundled model (``bench/lowbit.py --compare-views``).
    fresh_views: bool = False
    #: Views block-wise reconstruction learns from: always fresh crops of the calibration
    #: photos (and the synthetic images), drawn once per reconstruction.
    recon_views: int = 256

    def __post_init__(self) -> None:
        for name in ("calib_views", "eval_views", "batch_size", "recon_views"):
            object.__setattr__(self, name, whole_number(getattr(self, name), name, 1, MAX_VIEWS))
        object.__setattr__(self, "synthetic", whole_number(self.synthetic, "synthetic", 0, 4096))
        if self.resolution is not None:
            res = whole_number(self.resolution, "resolution", MIN_RESOLUTION, MAX_RESOLUTION)
            object.__setattr__(self, "resolution", res)
        object.__setattr__(self, "seed", whole_number(self.seed, "seed", 0))
        if self.source not in DATA_SOURCES:
            raise LSQError(
                f"data source must be one of {', '.join(DATA_SOURCES)}, got {self.source!r}"
            )
        if self.source == "folder" and not self.folder:
            raise LSQError("data source 'folder' needs a folder path")

    @property
    def synthetic_count(self) -> int:
        """How many images to synthesise."""
        if self.source == "synthetic":
            return self.synthetic or self.calib_views
        return self.synthetic


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
    teacher_calib: Tensor | None = None  # ... on the calibration views (CPU)
    seconds: dict[str, float] = field(default_factory=dict)
    #: Image files that could not be read (file name and why), to show the user.
    skipped: tuple[str, ...] = ()
    #: The calibration photos themselves, for fresh crops during QAT and reconstruction.
    train_images: tuple = ()
    #: Images synthesised from BatchNorm statistics (part of ``calib`` too), or None.
    synthetic: Tensor | None = None

    @property
    def resolution(self) -> int:
        return int(self.eval.shape[-1])


def _noop(stage: str, done: int, total: int) -> None:
    pass


def prepare(
    spec: ModelSpec = ModelSpec(),
    data: DataConfig = DataConfig(),
    device: str = "auto",
    progress: Progress = _noop,
    should_stop: Callable[[], bool] | None = None,
    images: tuple[Sequence[Image.Image], Sequence[Image.Image]] | None = None,
) -> Workbench:
    """Load the model and make the calibration and evaluation views (synthesising images from
    the model's BatchNorm statistics when ``data`` asks for them; cached on disk). ``images``:
    the calibration and evaluation photos themselves (a cross-validation fold, say) instead of
    those of ``data``'s source."""
    from lsq.data import bundled_images, folder_images, make_views
    from lsq.models import load_model
    from lsq.synthetic import SynthConfig, cached_synthesize

    t0 = time.perf_counter()
    progress("loading model", 0, 1)
    loaded = load_model(spec.name, spec.source, path=spec.path)
    dev = resolve_device(device)
    model = loaded.model.to(dev).eval()
    res = data.resolution or int(loaded.data_config["input_size"][-1])
    progress("making views", 0, 1)
    skipped: tuple[str, ...] = ()
    if images is not None:
        calib_imgs, eval_imgs = list(images[0]), list(images[1])
        if not eval_imgs or (not calib_imgs and data.source != "synthetic"):
            raise LSQError("calibration and evaluation each need at least one image")
    elif data.source in ("bundled", "synthetic"):
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
    if data.source == "synthetic":
        calib_imgs = []  # no photo for calibration or training
        calib = torch.empty(0, 3, res, res)
    else:
        calib = make_views(calib_imgs, data.calib_views, res, loaded.data_config, seed=data.seed)
    evals = make_views(eval_imgs, data.eval_views, res, loaded.data_config, seed=data.seed + 1)
    synthetic = None
    if data.synthetic_count:
        synthetic, _ = cached_synthesize(
            model,
            loaded.data_config,
            model_key(spec),
            SynthConfig(count=data.synthetic_count, resolution=res, seed=data.seed),
            device=device,
            progress=lambda done, total: progress("synthesising images", done, total),
            should_stop=should_stop,
        )
        calib = torch.cat([calib, synthetic])
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
        train_images=tuple(calib_imgs),
        synthetic=synthetic,
    )
    progress("float model on the calibration and evaluation views", 0, 1)
    bench.teacher_eval = logits(model, evals, batch=data.batch_size).cpu()
    bench.teacher_calib = logits(model, calib, batch=data.batch_size).cpu()
    bench.seconds["prepare"] = time.perf_counter() - t0
    return bench


def model_key(spec: ModelSpec) -> str:
    """Names a model's weights for caches: source and name, and a file's size and time."""
    key = f"{spec.source}-{spec.name}"
    if spec.path:
        try:
            st = Path(spec.path).stat()
            key += f"-{Path(spec.path).name}-{st.st_size}-{int(st.st_mtime)}"
        except OSError:
            key += f"-{Path(spec.path).name}"
    return key


def training_source(
    bench: Workbench, seed: int = 0, fresh: bool | None = None
) -> Tensor | ViewSource:
    """What QAT and reconstruction learn from: fresh crops of the calibration photos (and the
    synthetic images, in proportion), or the fixed calibration views; ``fresh`` None follows
    ``DataConfig.fresh_views``."""
    from lsq.data import FreshViews, MixedViews, TensorViews

    if not (bench.data.fresh_views if fresh is None else fresh):
        return bench.calib
    sources, weights = [], []
    if bench.train_images:
        images = list(bench.train_images)
        sources.append(FreshViews(images, bench.resolution, bench.data_config, seed))
        weights.append(bench.data.calib_views)
    if bench.synthetic is not None:
        sources.append(TensorViews(bench.synthetic, seed))
        weights.append(len(bench.synthetic))
    return sources[0] if len(sources) == 1 else MixedViews(sources, weights)


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
    #: Block-wise reconstruction, when it came before: its settings and each unit's errors.
    recon_config: ReconstructConfig | None = None
    recon_history: tuple[ReconstructEvent, ...] = ()
    #: The QAT settings of the last training, when trained.
    train_config: TrainConfig | None = None

    @property
    def metrics(self) -> Mapping[str, float]:
        """The numbers of this stage: after training when trained, else right after init."""
        return self.metrics_final or self.metrics_init

    @property
    def label(self) -> str:
        """The stage in words: "initialised" or "trained 20 steps" (and how a run ended)."""
        if self.stage == Stage.TRAINED:
            text = f"trained {self.steps} step{'s' if self.steps != 1 else ''}"
            if self.recon_config is not None:
                text = f"reconstructed, {text}"
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
    return MethodResult(
        config, model, tuple(report), evaluate(bench, model), seconds={"init": t_init}
    )


#: What the gap between the two sets of views means, where both are shown.
FIT_GAP_NOTE = (
    "The calibration views are crops of the photos the ranges were fitted to (and training "
    "learned from); the held-out views are other photos. A method much better on the first "
    "than on the second has fitted those photos rather than the model: expect the held-out "
    "numbers on photos of your own."
)


def evaluate(bench: Workbench, model: nn.Module) -> dict[str, float]:
    """``analysis.model_metrics`` on the held-out evaluation views, and top-1 agreement, KL and
    logit SQNR on the calibration views too (``calib_`` keys): their gap shows overfitting."""
    metrics = model_metrics(model, bench.eval, bench.teacher_eval)
    on_calib = model_metrics(model, bench.calib, bench.teacher_calib)
    for key in ("agreement", "kl", "logit_sqnr_db", "views"):
        metrics[f"calib_{key}"] = on_calib[key]
    return metrics


def _follow(events, on_event, keep_steps: bool) -> tuple[list, Status, str]:
    """Run an event stream to its end: the events kept (all, or all but steps), and how it
    ended (complete, stopped or failed, with the message)."""
    kept, status, message = [], Status.COMPLETE, ""
    for event in events:
        if keep_steps or event.kind != Status.STEP:
            kept.append(event)
        if on_event is not None:
            on_event(event)
        if event.kind in (Status.ERROR, Status.STOPPED):
            status, message = ENDINGS[Status(event.kind)], event.message
    return kept, status, message


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
    source = training_source(bench, train_cfg.seed)
    on_train = bench.teacher_calib if isinstance(source, Tensor) else None
    model = result.copy_model()
    events = train(
        model,
        bench.model,
        source,
        bench.eval,
        train_cfg,
        should_stop=should_stop,
        teacher_logits=(on_train, bench.teacher_eval),
    )
    history, status, message = _follow(events, on_event, keep_steps=True)
    steps = max((e.step for e in history if e.kind == Status.STEP), default=0)
    return dataclasses.replace(
        result,
        model=model,
        stage=Stage.TRAINED,
        steps=result.steps + steps,
        metrics_final=evaluate(bench, model),
        history=tuple(history),
        status=status,
        message=message,
        seconds={**result.seconds, "train": time.perf_counter() - t0},
        run_path=None,
        train_config=train_cfg,
    )


#: The step at which a reconstruction pool is drawn from a view source (apart from QAT's steps).
RECON_POOL_STEP = 10**9


def reconstruction_views(bench: Workbench, seed: int = 0) -> Tensor:
    """The views reconstruction learns from: ``recon_views`` fresh crops of the calibration
    photos (and synthetic images, in proportion), drawn once."""
    return training_source(bench, seed, fresh=True).batch(RECON_POOL_STEP, bench.data.recon_views)


def reconstruct_method(
    bench: Workbench,
    result: MethodResult,
    cfg: ReconstructConfig,
    on_event: Callable[[ReconstructEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MethodResult:
    """Block-wise reconstruction of a copy of ``result``'s model; returns a new result."""
    t0 = time.perf_counter()
    views = reconstruction_views(bench, cfg.seed)
    model = result.copy_model()
    events = reconstruct(model, bench.model, views, cfg, should_stop=should_stop)
    kept, status, message = _follow(events, on_event, keep_steps=False)
    return dataclasses.replace(
        result,
        model=model,
        stage=Stage.RECONSTRUCTED,
        metrics_final=evaluate(bench, model),
        history=(),
        status=status,
        message=message,
        seconds={**result.seconds, "reconstruct": time.perf_counter() - t0},
        run_path=None,
        recon_config=cfg,
        recon_history=tuple(kept),
    )


def history_frames(events: list[TrainEvent]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-step metrics and per-step quantizer trajectories (long format) of training events.

    Trajectory rows of trained layers also carry ``weight_flips`` (weights whose integer code
    changed that step), ``weight_net`` (net codes moved since the start) and ``weights``.
    """
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
            row = {"step": e.step, "layer": layer, "scale": s, "offset": b, "weight_scale": ws}
            if layer in e.flips:
                flips, net, n = e.flips[layer]
                row.update(weight_flips=flips, weight_net=net, weights=n)
            traj.append(row)
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


#: Views per set (evaluation, calibration) the per-layer table compares outputs on.
LAYER_VIEWS = 8


def layer_frame(bench: Workbench, model: nn.Module, progress=None) -> pd.DataFrame:
    """``analysis.layer_table`` of ``model`` with the bench's statistics, its output SQNR on
    ``LAYER_VIEWS`` evaluation views and as many calibration views (the gap: see FIT_GAP_NOTE)."""
    return layer_table(
        model, bench.stats, bench.eval[:LAYER_VIEWS], progress, bench.calib[:LAYER_VIEWS]
    )


def finish_run(
    run, bench: Workbench, result: MethodResult, layers: pd.DataFrame | None = None
) -> MethodResult:
    """Write the per-layer table, history, state dict and final metrics; mark the run done.

    Returns ``result`` with its ``run_path``. The per-layer table is ``layers`` when the caller
    has measured it (``layer_frame``), else measured here on a copy.
    """
    if layers is None:
        layers = layer_frame(bench, result.copy_model())
    run.write_table("layers", layers)
    write_progress(run, result.history)
    if result.recon_history:
        run.write_table("units", unit_frame(list(result.recon_history)))
    run.write_state({k: v.detach().cpu() for k, v in result.model.state_dict().items()})
    metrics_final = dict(result.metrics_final) if result.metrics_final is not None else None
    recon = result.recon_config.to_dict() if result.recon_config is not None else None
    run.update_meta(
        metrics_final=metrics_final,
        seconds=dict(result.seconds),
        stage=str(result.stage),
        reconstruct=recon,
        command=command(bench, result),
    )
    run.finish(result.status, result.message)
    return dataclasses.replace(result, run_path=run.path)


def command(bench: Workbench, result: MethodResult) -> str:
    """The ``python -m lsq run`` line that computes ``result`` headless (``lsq.command``)."""
    from lsq.command import run_command

    device = bench.device.type if bench.device != resolve_device("auto") else "auto"
    train = result.train_config if result.stage == Stage.TRAINED else None
    line = run_command(bench.spec, bench.data, result.config, train, result.recon_config, device)
    if train is not None and result.steps != train.steps:
        line += f"  # continued runs: {result.steps} QAT steps in all"
    return line


def save_result(
    bench: Workbench, result: MethodResult, train_cfg: TrainConfig | None = None, root=None
) -> MethodResult:
    """Write a whole run folder at once: config, per-layer table, metrics, state dict.

    Returns ``result`` with its ``run_path``.
    """
    return finish_run(start_run(bench, result, train_cfg, root), bench, result)


#: A training run's metrics and trajectories are saved every this many steps while it runs.
PROGRESS_EVERY = 10


@dataclass(frozen=True)
class Recipe:
    """What follows init: block-wise reconstruction (``recon``), then QAT (``train``) on top;
    either may be None. The result is saved as a run unless ``save`` is False."""

    recon: ReconstructConfig | None = None
    train: TrainConfig | None = None
    save: bool = True


@dataclass(frozen=True)
class RecipeOutcome:
    """Each stage's result (None where the recipe had no such stage or stopped before it), the
    last one, and its per-layer table when the run was saved."""

    initial: MethodResult
    reconstructed: MethodResult | None
    trained: MethodResult | None
    layers: pd.DataFrame | None = None

    @property
    def final(self) -> MethodResult:
        return self.trained or self.reconstructed or self.initial


def run_recipe(
    bench: Workbench,
    start: MethodResult,
    recipe: Recipe,
    on_event: Callable[[ReconstructEvent | TrainEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_stage: Callable[[str, MethodResult], None] | None = None,
    root=None,
) -> RecipeOutcome:
    """The recipe from ``start`` (initialised, or a trained result to continue): reconstruction,
    then QAT unless reconstruction did not complete, then the saved run (its folder made first,
    so a crash leaves it marked incomplete; the training history saved every ``PROGRESS_EVERY``
    steps). ``on_event`` sees every reconstruction and training event, ``on_stage`` each
    finished stage ("reconstructed", "trained") before the run is saved. The CLI's ``run`` and
    ``compare``, the app's Train page and bench/lowbit.py all go through here."""
    run = start_run(bench, start, recipe.train, root) if recipe.save else None
    reconstructed = trained = None
    result = start
    if recipe.recon is not None:
        result = reconstructed = reconstruct_method(
            bench, start, recipe.recon, on_event=on_event, should_stop=should_stop
        )
        if on_stage is not None:
            on_stage("reconstructed", result)
    if recipe.train is not None and result.status == Status.COMPLETE:
        history: list[TrainEvent] = []

        def on_train(e: TrainEvent) -> None:
            history.append(e)
            if run is not None and e.kind == "step" and e.step % PROGRESS_EVERY == 0:
                write_progress(run, history)
            if on_event is not None:
                on_event(e)

        result = trained = train_method(
            bench, result, recipe.train, on_event=on_train, should_stop=should_stop
        )
        if on_stage is not None:
            on_stage("trained", result)
    layers = None
    if run is not None:
        layers = layer_frame(bench, result.copy_model())
        result = finish_run(run, bench, result, layers)
        if trained is not None:
            trained = result
        elif reconstructed is not None:
            reconstructed = result
        else:  # nothing after init: the saved run is the initialised result
            start = result
    return RecipeOutcome(start, reconstructed, trained, layers)


#: The numbers ``compare`` reports of each stage.
COMPARED = ("agreement", "confident_agreement", "kl")


def compare(
    bench: Workbench,
    methods: list[str],
    bits: list[int],
    train_cfg: TrainConfig | None = None,
    progress: Progress = _noop,
    weight_init: str = "auto",
    recon_cfg: ReconstructConfig | None = None,
) -> pd.DataFrame:
    """Each method at each bit-width (W=A=bits): agreement and KL after init, after block-wise
    reconstruction (with ``recon_cfg``), and after QAT (with ``train_cfg``, on top).

    ``weight_init`` is a choice of ``lsq.config.WEIGHT_INIT_CHOICES``, "auto" as in the app.
    """
    rows = []
    total = len(methods) * len(bits)
    for i, (method, b) in enumerate((m, b) for m in methods for b in bits):
        progress("comparing", i, total)
        cfg = make_config(method, b, b, weight_init=weight_init)
        init = init_method(bench, cfg, progress)
        out = run_recipe(bench, init, Recipe(recon_cfg, train_cfg, save=False))
        row = {"method": method, "bits": b}
        for prefix, res in (("init", init), ("rec", out.reconstructed), ("qat", out.trained)):
            if res is not None:
                row.update({f"{prefix}_{k}": res.metrics[k] for k in COMPARED})
        if out.final is not init:
            row["status"] = out.final.status
        rows.append(row)
        del init, out
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
