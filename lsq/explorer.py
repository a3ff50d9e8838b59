"""What the app's pages ask for, as plain functions: settings in, jobs and DataFrames out.

The pages stay thin: they collect widgets into ``Settings``, submit the job functions below to
the ``JobManager``, and draw the DataFrames these functions return with ``lsq.plots``.

Results are published, never changed: a calibration job publishes a ``Comparison`` of frozen
initialised results; a training job trains private copies and publishes a new ``Comparison``
that adds the trained results. Analysis (per-layer tables, sensitivity) runs on copies too, so
no model is ever shared between a running job and a page.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import pandas as pd

from lsq.analysis import grid_at_step, grid_levels, histogram_frame, sensitivity
from lsq.config import METHODS, WEIGHT_INIT_CHOICES, QuantConfig, make_config
from lsq.convert import quant_layers
from lsq.errors import LSQError
from lsq.health import combine, model_health
from lsq.jobs import Job
from lsq.lab import (
    LabSetting,
    RangeLab,
    intro_grids,
    setting_from_state,
    setting_of,
    swish_sample,
    values_histogram,
)
from lsq.pipeline import (
    LAYER_VIEWS,
    DataConfig,
    MethodResult,
    ModelSpec,
    Recipe,
    Stage,
    Workbench,
    command,
    history_frames,
    init_method,
    layer_frame,
    prepare,
    run_recipe,
    save_result,
)
from lsq.plots import Grid, LabPicture
from lsq.reconstruct import (
    COST_PASSES,
    PASSES_PER_ITERATION,
    ReconstructConfig,
    ReconstructEvent,
    unit_frame,
)
from lsq.runs import LoadedRun, list_runs, load_run
from lsq.train import TrainConfig, TrainEvent


@dataclass(frozen=True)
class Settings:
    """Everything the sidebar decides; its defaults are the sidebar's defaults."""

    model: ModelSpec = ModelSpec()
    data: DataConfig = DataConfig(resolution=224, calib_views=32, eval_views=32)
    w_bits: int = 8
    a_bits: int = 4
    methods: tuple[str, ...] = ("lsq+", "lsq", "lsq-signed", "minmax")
    weight_init: str = "auto"
    quantize_weights: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.methods:
            raise LSQError("choose at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise LSQError(
                f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}"
            )
        if self.weight_init not in WEIGHT_INIT_CHOICES:
            raise LSQError(f"weight init must be one of {', '.join(WEIGHT_INIT_CHOICES)}")
        for m in self.methods:
            self.config(m)  # validates the bits

    def config(self, method: str) -> QuantConfig:
        """The QuantConfig of ``method`` under these settings."""
        return make_config(
            method,
            self.w_bits,
            self.a_bits,
            quantize_weights=self.quantize_weights,
            weight_init=self.weight_init,
        )

    @property
    def label(self) -> str:
        """These settings in one line, to say which settings a result belongs to."""
        model = f"{self.model.name} ({self.model.source})"
        bits = f"W{self.w_bits}A{self.a_bits}" if self.quantize_weights else f"A{self.a_bits}"
        res = f"{self.data.resolution} px" if self.data.resolution else "model's size"
        return f"{model}, {bits}, weight init {self.weight_init}, {res}"

    def to_dict(self) -> dict:
        return asdict(self)


_BENCHES: OrderedDict[tuple, Workbench] = OrderedDict()
_BENCH_LOCK = threading.Lock()


def get_workbench(settings: Settings, job: Job | None = None, keep: int = 2) -> Workbench:
    """The float model and views for ``settings``; the last ``keep`` are kept in memory.

    Shared by every session and job of the process, so switching pages or refreshing the
    browser does not load the model again.
    """
    key = (settings.model, settings.data, settings.device)
    with _BENCH_LOCK:
        if key in _BENCHES:
            _BENCHES.move_to_end(key)
            return _BENCHES[key]
    progress = job.progress if job is not None else (lambda *a: None)
    bench = prepare(
        settings.model,
        settings.data,
        device=settings.device,
        progress=progress,
        should_stop=job.stop_requested if job is not None else None,
    )
    with _BENCH_LOCK:
        _BENCHES[key] = bench
        while len(_BENCHES) > keep:
            _BENCHES.popitem(last=False)
    return bench


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True, eq=False)
class Comparison:
    """The methods of one settings side by side: a published, frozen set of results.

    ``initial`` holds each method right after init and never changes; ``later`` the latest
    result of each method at each later stage reached so far (reconstructed, trained).
    ``calibration`` names the calibration every result here descends from (pages show nothing
    of another); ``id`` names this publication.
    """

    settings: Settings
    bench: Workbench
    initial: Mapping[str, MethodResult]
    later: Mapping[Stage, Mapping[str, MethodResult]] = field(default_factory=dict)
    runs: Mapping[str, str] = field(default_factory=dict)
    calibration: str = field(default_factory=_new_id)
    id: str = field(default_factory=_new_id)

    @property
    def trained(self) -> Mapping[str, MethodResult]:
        """The latest trained result of each method trained so far."""
        return self.later.get(Stage.TRAINED, {})

    def results(self, stage: Stage | str = Stage.INITIALISED) -> dict[str, MethodResult]:
        """The results of one stage, by method (only the methods that reached it)."""
        if stage == Stage.INITIALISED:
            return dict(self.initial)
        return dict(self.later.get(Stage(stage), {}))

    @property
    def stages(self) -> list[Stage]:
        """The stages that have results, in the order of the flow."""
        return [s for s in Stage if s == Stage.INITIALISED or self.later.get(s)]

    def with_results(self, results: Mapping[str, MethodResult]) -> Comparison:
        """A new publication where ``results`` replace those methods' results of their stage."""
        later = {stage: dict(by_method) for stage, by_method in self.later.items()}
        for method, r in results.items():
            if r.stage == Stage.INITIALISED:
                raise LSQError("initialised results are published by a calibration only")
            later.setdefault(r.stage, {})[method] = r
        runs = {**self.runs}
        runs.update({m: str(r.run_path) for m, r in results.items() if r.run_path is not None})
        return dataclasses.replace(self, later=later, runs=runs, id=_new_id())

    def metrics_frame(self, stage: Stage | str = Stage.INITIALISED) -> pd.DataFrame:
        """One row per method: its numbers at ``stage``, or right after init (with "not trained",
        say) when it has not reached that stage."""
        rows = []
        for method, first in self.initial.items():
            r = self.results(stage).get(method, first)
            label = r.label if r.stage == stage else f"not {stage}"
            rows.append({"method": method, "config": r.config.label, "stage": label, **r.metrics})
        return pd.DataFrame(rows)

    def commands(self, stage: Stage | str = Stage.INITIALISED) -> dict[str, str]:
        """Each method's ``python -m lsq run`` line for its result at ``stage`` (the methods
        that reached it): the same numbers, headless."""
        return {m: command(self.bench, r) for m, r in self.results(stage).items()}

    def ranges_frame(self) -> pd.DataFrame:
        """Every layer's initial input range of every method (long format)."""
        frames = []
        for method, r in self.initial.items():
            df = r.init_frame().reset_index(names="index")
            df = df.rename(columns={"name": "layer", "lo": "range_lo", "hi": "range_hi"})
            df.insert(0, "method", method)
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


#: Below this top-1 agreement a result counts as collapsed (the model no longer works).
COLLAPSED = 0.2


def collapse_note(comp: Comparison) -> str | None:
    """One line saying why, when every method's agreement right after init has collapsed."""
    metrics = {m: r.metrics_init["agreement"] for m, r in comp.initial.items()}
    if not metrics or max(metrics.values()) >= COLLAPSED:
        return None
    s = comp.settings
    best = max(metrics, key=metrics.get)
    what = f"{s.w_bits}-bit weights" if s.quantize_weights and s.w_bits <= 5 else "these bits"
    return (
        f"Every method collapses right after init at {what} (best: {best}, agreement "
        f"{metrics[best]:.2f}): post-training quantization alone breaks this model. The "
        "sensitivity view on the Layers page shows which layers cause it; switching "
        "'Quantize weights' off shows the activations alone; the low-bit recipe on the Train "
        f"page ({RECIPES[default_recipe(s)].lower()}) repairs it."
    )


def levels_in_use(init: pd.DataFrame) -> pd.Series:
    """Per layer (rows of ``MethodResult.init_frame``): how many of its input grid's levels lie
    within the range of inputs calibration saw. A grid far wider than its inputs, or one with
    half its levels on a sign that never occurs, quantizes with few of them."""
    levels = 2.0 ** init["bits"]
    step = (init["hi"] - init["lo"]) / (levels - 1)
    low = init[["lo", "observed_min"]].max(axis=1)
    high = init[["hi", "observed_max"]].min(axis=1)
    inside = ((high - low) / step).clip(lower=0).fillna(0).astype(int) + 1
    return inside.clip(upper=levels.astype(int))


def init_notes(comp: Comparison) -> dict[str, str]:
    """Why each method that ends far below the best right after init does (agreement under
    half the best's): its layers' quantization error against the best method's, its grids'
    levels that fall outside the inputs, and the sign a signed grid spends on inputs that are
    never negative."""
    agreement = {m: r.metrics_init["agreement"] for m, r in comp.initial.items()}
    if not agreement:
        return {}
    best = max(agreement, key=agreement.get)
    best_mse = comp.initial[best].init_frame().set_index("name")["mse"]
    notes = {}
    for method, r in comp.initial.items():
        if agreement[method] >= agreement[best] / 2:
            continue
        init = r.init_frame()
        ratio = init.set_index("name")["mse"] / best_mse.clip(lower=1e-30)
        causes = [
            f"its layers' inputs quantize with {ratio.median():.1f}× {best}'s error in the median "
            f"layer ({int((ratio > 1).sum())} of {len(init)} layers worse)"
        ]
        too_wide = levels_in_use(init) < 2 ** init["bits"] / 2
        if too_wide.any():
            causes.append(
                f"{int(too_wide.sum())} grids reach so far past their inputs that fewer than "
                "half their levels are used"
            )
        wasted = init["signed"] & (init["observed_min"] >= 0)
        if wasted.any():
            causes.append(
                f"{int(wasted.sum())} layers never see a negative input, yet their signed grid "
                "keeps half its levels for negatives"
            )
        text = f"{method} (agreement {agreement[method]:.2f} against {best}'s "
        text += f"{agreement[best]:.2f}): " + "; ".join(causes)
        if r.config.act_init == "lsq":
            text += (
                ". LSQ's init, 2·mean|x|/√Qp, is where LSQ starts training, not a calibrated "
                "range: QAT moves it"
            )
        notes[method] = text + "."
    return notes


def repair_label(settings: Settings) -> str:
    """The link from a collapse to the Train page, naming the recipe that page opens on."""
    return f"Repair it on the Train page: {RECIPES[default_recipe(settings)].lower()}"


def calibrate_job(job: Job, settings: Settings, save: bool = True) -> Comparison:
    """Calibrate once, initialise every chosen method, evaluate; save each as a run."""
    bench = get_workbench(settings, job)
    initial: dict[str, MethodResult] = {}
    runs: dict[str, str] = {}
    n = len(settings.methods)
    for i, method in enumerate(settings.methods):
        if job.stop_requested():
            break
        job.progress(f"initialising {method}", i, n)

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "calibrating":
                job.progress("recording activations", done, total)

        result = init_method(bench, settings.config(method), progress)
        if save:
            result = save_result(bench, result)
            runs[method] = str(result.run_path)
        initial[method] = result
    job.progress("done", n, n)
    return Comparison(settings, bench, initial, runs=runs)


#: The Train page's recipes, by key.
RECIPES = {
    "qat": "QAT only",
    "reconstruct+qat": "Block-wise reconstruction, then QAT",
    "reconstruct": "Block-wise reconstruction only",
}
#: Where reconstruction starts each layer's weight ranges (``ReconstructConfig.weight_init``).
RECON_WEIGHT_STARTS = {
    "mse": "MSE-searched ranges (the recipe's)",
    "keep": "the method's own init",
}
#: How reconstruction learns the quantized weights (``ReconstructConfig.rounding``).
RECON_ROUNDINGS = {
    "ste": "train the weights through the rounding (the recipe's)",
    "learned": "learn each weight's rounding direction (AdaRound)",
}
#: Weight bits at and below which the default recipe is block-wise reconstruction: plain QAT on
#: a few photos leaves 4-bit weights broken (agreement 0 on the bundled model), and QAT after
#: reconstruction made it worse in every variant measured (bench/lowbit.py --optimizers).
RECONSTRUCT_AT_OR_BELOW = 5


def default_recipe(settings: Settings) -> str:
    """Block-wise reconstruction where weights are low-bit; QAT otherwise."""
    low = settings.quantize_weights and settings.w_bits <= RECONSTRUCT_AT_OR_BELOW
    return "reconstruct" if low else "qat"


def train_job(
    job: Job,
    comp: Comparison,
    methods: list[str],
    train_cfg: TrainConfig | None,
    continue_trained: bool = False,
    recon_cfg: ReconstructConfig | None = None,
) -> Comparison:
    """QAT of the chosen methods, one after another, with block-wise reconstruction first when
    ``recon_cfg`` is given; saves runs; publishes a new Comparison.

    Each method works on a private copy of its initialised result, so pressing Train twice gives
    two independent runs; ``continue_trained`` starts from the method's latest trained result
    instead, where it has one. ``train_cfg`` None: reconstruction only.
    """
    bench = comp.bench
    missing = [m for m in methods if m not in comp.initial]
    if missing:
        raise LSQError(f"calibrate {', '.join(missing)} first (Calibrate page)")
    if train_cfg is None and recon_cfg is None:
        raise LSQError("nothing to do: choose QAT steps, reconstruction, or both")
    steps = train_cfg.steps if train_cfg is not None else 0
    # The bar and the time left count work by cost, in seconds as reconstruction estimates them
    # from each unit's measured cost (``ReconstructEvent.work``): a QAT step is a forward and
    # backward pass of the whole model at its own batch, with the float model's forward on top
    # (4 passes where reconstruction's iteration counts 3); a method's work around them, in
    # forward passes of the whole model: timing the units before, the numbers on both view sets
    # after each stage, QAT's evaluations, the saved run's per-layer table. Without
    # reconstruction every QAT step costs the same. The line shows iterations and steps.
    work = {"recon": 0, "recon_cost": 0.0, "step_cost": 1.0, "before": 0.0, "between": 0.0}
    work["after"] = 0.0
    published: dict[str, MethodResult] = {}
    reconstructed: dict[str, MethodResult] = {}
    for i, method in enumerate(methods):
        if job.stop_requested():
            break
        start = comp.initial[method]
        if continue_trained:
            start = comp.trained.get(method, start)

        def report(stage: str, done: int, cost: float, i=i) -> None:
            per_method = work["recon"] + steps
            per_method_cost = work["recon_cost"] + steps * work["step_cost"]
            per_method_cost += work["before"] + work["between"] + work["after"]
            job.progress(
                stage,
                i * per_method + done,
                len(methods) * per_method,
                work=(i * per_method_cost + cost, len(methods) * per_method_cost),
                seconds=recon_cfg is not None,
            )

        def on_event(e, method=method) -> None:
            job.add_event((method, e))
            if isinstance(e, ReconstructEvent):
                work["recon"], work["recon_cost"] = e.total, e.work_total
                step_batches = train_cfg.batch_size / recon_cfg.batch_size if steps else 0
                work["step_cost"] = e.model_step * 4 / 3 * step_batches
                view = e.model_step / PASSES_PER_ITERATION / recon_cfg.batch_size  # a forward
                both = len(bench.eval) + len(bench.calib)
                qat_evals = len(bench.eval) if steps else 0
                work["before"] = COST_PASSES * e.model_step
                work["between"] = (both + qat_evals) * view if steps else 0.0
                work["after"] = (both + qat_evals + 4 * LAYER_VIEWS) * view
                if e.kind == "step":
                    report(f"reconstructing {method}: {e.unit}", e.step, work["before"] + e.work)
            elif e.kind == "step":
                done = work["before"] + work["recon_cost"] + work["between"]
                report(
                    f"training {method}", work["recon"] + e.step, done + e.step * work["step_cost"]
                )

        outcome = run_recipe(
            bench,
            start,
            Recipe(recon_cfg, train_cfg),
            on_event=on_event,
            should_stop=job.stop_requested,
        )
        published[method] = outcome.final
        if outcome.trained is not None and outcome.reconstructed is not None:
            reconstructed[method] = outcome.reconstructed  # published too, beside the trained
    if not job.stop_requested():
        job.progress("done", job.total, job.total)
    return comp.with_results(reconstructed).with_results(published)


def units_frame(job: Job) -> pd.DataFrame:
    """A job's reconstruction so far: each finished unit's error before and after, by method."""
    frames = []
    by_method: dict[str, list] = {}
    for method, e in list(job.events):
        if isinstance(e, ReconstructEvent):
            by_method.setdefault(method, []).append(e)
    for method, events in by_method.items():
        df = unit_frame(events)
        df.insert(0, "method", method)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def events_frames(job: Job) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A training job's events so far: metrics and quantizer trajectories, long, with method."""
    by_method: dict[str, list] = {}
    for method, e in list(job.events):
        if isinstance(e, TrainEvent):
            by_method.setdefault(method, []).append(e)
    metrics, traj = [], []
    for method, events in by_method.items():
        m, t = history_frames(events)
        m.insert(0, "method", method)
        t.insert(0, "method", method)
        metrics.append(m)
        traj.append(t)
    if not metrics:
        return pd.DataFrame(), pd.DataFrame()
    return pd.concat(metrics, ignore_index=True), pd.concat(traj, ignore_index=True)


def layers_job(job: Job, comp: Comparison, stage: Stage | str = Stage.INITIALISED) -> pd.DataFrame:
    """Per-layer table of every method at ``stage``, long format (one row per method and layer).

    Each method is measured on a private copy of its snapshot; a stop ends it between methods.
    """
    bench = comp.bench
    frames = []
    results = comp.results(stage)
    for i, (method, r) in enumerate(results.items()):
        if job.stop_requested():
            break
        stage_text = f"measuring every layer of {method} ({i + 1}/{len(results)})"

        def progress(done: int, total: int, stage_text=stage_text) -> None:
            job.progress(stage_text, done, total)

        df = layer_frame(bench, r.copy_model(), progress)
        df.insert(0, "method", method)
        frames.append(df)
    job.progress("done", len(frames), len(results))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def layer_view(
    comp: Comparison, layer: str, stage: Stage | str = Stage.INITIALISED
) -> tuple[pd.DataFrame, dict, tuple]:
    """One layer's input histogram, each method's grid (levels and range) at ``stage``, and the
    observed min/max. Reads the snapshots only."""
    bench = comp.bench
    if bench.stats is None or layer not in bench.stats:
        raise LSQError(f"no calibration statistics for layer {layer!r}; calibrate first")
    st = bench.stats[layer]
    grids = {}
    for method, r in comp.results(stage).items():
        ql = quant_layers(r.model)[layer]
        lo, hi = ql.input_quant.clip_range()
        grids[method] = {"levels": grid_levels(ql).tolist(), "lo": float(lo), "hi": float(hi)}
    return histogram_frame(st), grids, (st.min, st.max)


def sensitivity_job(
    job: Job,
    comp: Comparison,
    method: str,
    stage: Stage | str = Stage.INITIALISED,
    views: int = 16,
) -> pd.DataFrame:
    """Group-by-group sensitivity of one method at ``stage`` (weights vs activations), on a
    private copy of its snapshot and a few views."""
    results = comp.results(stage)
    if method not in results:
        raise LSQError(f"no {stage} result of {method}; calibrate (or train) it first")
    job.progress(f"sensitivity of {method}", 0, 1)
    bench = comp.bench
    model = results[method].copy_model()
    df = sensitivity(model, bench.eval[:views], bench.teacher_eval[:views], by="group")
    df.insert(0, "method", method)
    job.progress("done", 1, 1)
    return df


# ------------------------------------------------------------------------ issue 12: teaching

#: Views the range lab caches and reruns per update (few: every slider move runs them).
LAB_VIEWS = 8
_LABS: OrderedDict[tuple, RangeLab] = OrderedDict()
_LAB_LOCK = threading.Lock()
_PICTURES: weakref.WeakKeyDictionary[RangeLab, LabPicture] = weakref.WeakKeyDictionary()


def range_lab(comp: Comparison, layer: str, keep: int = 2) -> RangeLab:
    """The range lab of one layer on ``comp``'s float model and first LAB_VIEWS evaluation
    views; the last ``keep`` are kept in memory (building one runs the model once)."""
    key = (comp.calibration, layer)
    with _LAB_LOCK:
        if key in _LABS:
            _LABS.move_to_end(key)
            return _LABS[key]
    first = next(iter(comp.initial.values()))
    lab = RangeLab(first.model, layer, comp.bench.eval[:LAB_VIEWS])  # a private copy inside
    with _LAB_LOCK:
        _LABS[key] = lab
        while len(_LABS) > keep:
            _LABS.popitem(last=False)
    return lab


def lab_picture(lab: RangeLab) -> LabPicture:
    """The lab's picture, its histogram part made once per lab (kept while the lab is)."""
    with _LAB_LOCK:
        picture = _PICTURES.get(lab)
    if picture is None:
        picture = LabPicture(lab.histogram(), lab.observed)
        with _LAB_LOCK:
            _PICTURES[lab] = picture
    return picture


def lab_grid(setting: LabSetting) -> Grid:
    """A lab setting as the Grid the figures draw."""
    return Grid(setting.levels, setting.lo, setting.hi)


def learned_settings(comp: Comparison, layer: str) -> dict[str, LabSetting]:
    """The input setting of ``layer`` in every result of ``comp`` (initialised and later), by
    "method (stage)"; and in every saved run of the same model, by run name."""
    out: dict[str, LabSetting] = {}
    for stage in comp.stages:
        for method, r in comp.results(stage).items():
            q = quant_layers(r.model)[layer].input_quant
            if q.ready:
                out[f"{method} ({r.label})"] = setting_of(q)
    for info in list_runs()[:20]:  # the newest: reading each costs a little
        if info.config.get("method") is None or info.model not in ("", comp.settings.model.name):
            continue
        try:
            run = load_run(info.path)
            layers = run.tables.get("layers")
            if run.state is None or layers is None or layer not in set(layers["layer"]):
                continue
            bits = int(layers.set_index("layer").loc[layer, "a_bits"])
            out[f"run {info.name}"] = setting_from_state(
                run.state, layer, bits, run.config.act_mode == "asymmetric"
            )
        except (LSQError, KeyError, ValueError):
            continue  # a run of another model or an unreadable one: not offered
    return out


def health_frame(comp: Comparison, stage: Stage | str = Stage.INITIALISED) -> pd.DataFrame:
    """Health findings of every method at ``stage`` (reading the snapshots only), one row per
    layer and finding: method, layer, check, reason, severity. The float model's findings
    (``lsq.health.FLOAT_CHECKS``, the same in every method) come once, first, as method
    ``lsq.health.FLOAT_MODEL``; ``lsq.health.group_findings`` makes the pages' table of it."""

    reports = {}
    for method, r in comp.results(stage).items():
        traj = history_frames(list(r.history))[1] if r.history else None
        reports[method] = model_health(r.model, comp.bench.stats or {}, traj)
    return combine(reports)


def intro_view(bits: int) -> tuple[pd.DataFrame, list[tuple]]:
    """The home page's picture: a Swish-like histogram and the three grids with their errors."""
    x = swish_sample()
    grids = [
        (g.name, g.label, lab_grid(g.setting), g.split.total, g.split.clip, g.split.round)
        for g in intro_grids(bits, x)
    ]
    return values_histogram(x), grids


def replay_view(
    comp: Comparison, traj: pd.DataFrame, layer: str, step: int
) -> tuple[pd.DataFrame, dict, tuple]:
    """One layer's input histogram (the calibration's) and each trained method's grid at
    training ``step``, from the trajectories a training job recorded (``events_frames``)."""
    hist, _, observed = layer_view(comp, layer)
    grids = {}
    for method, sub in traj.groupby("method", sort=False):
        if method not in comp.initial:
            continue
        q = quant_layers(comp.initial[method].model)[layer].input_quant
        grids[str(method)] = grid_at_step(sub, layer, step, q.qmin, q.qmax)
    return hist, grids, observed


def saved_curves(runs: list[LoadedRun]) -> pd.DataFrame:
    """The training curves of saved runs (their ``metrics.csv``: loss, agreement and KL per
    step), long, one ``method`` per run: its method (so it keeps its colour), or "A: lsq+",
    "B: lsq+" ... in the order given when two runs share a method. Runs that did not train add
    nothing."""
    frames = []
    for run, method in zip(runs, _run_methods(runs), strict=True):
        metrics = run.tables.get("metrics")
        if metrics is None or metrics.empty or "step" not in metrics:
            continue
        frames.append(metrics.assign(method=method))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def saved_units(runs: list[LoadedRun]) -> pd.DataFrame:
    """The block-wise reconstruction of saved runs (their ``units.csv``: each unit's error
    before and after), long, with ``method`` named as in ``saved_curves``. Runs that did not
    reconstruct add nothing."""
    methods = _run_methods(runs)
    frames = []
    for run, method in zip(runs, methods, strict=True):
        units = run.tables.get("units")
        if units is not None and not units.empty:
            frames.append(units.assign(method=method))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _run_methods(runs: list[LoadedRun]) -> list[str]:
    """Each run's method, or "A: lsq+", "B: lsq+" in the order given when two share one."""
    methods = [str(run.info.config.get("method") or run.info.name) for run in runs]
    if len(set(methods)) == len(methods):
        return methods
    return [f"{chr(65 + i)}: {m}" for i, m in enumerate(methods)]


def compare_runs_frame(a: LoadedRun, b: LoadedRun, column: str = "output_sqnr_db") -> pd.DataFrame:
    """Two runs' per-layer ``column`` side by side, with short headers that fit a table (the
    caller says which run is A and which is B): layer, A, B, B − A. Empty when either run has
    no per-layer table."""
    la, lb = a.tables.get("layers"), b.tables.get("layers")
    if la is None or lb is None or column not in la or column not in lb:
        return pd.DataFrame()
    merged = la[["layer", column]].merge(lb[["layer", column]], on="layer", suffixes=("_a", "_b"))
    return pd.DataFrame(
        {
            "layer": merged["layer"],
            "A": merged[f"{column}_a"],
            "B": merged[f"{column}_b"],
            "B − A": merged[f"{column}_b"] - merged[f"{column}_a"],
        }
    )
