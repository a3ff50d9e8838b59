"""What the app's pages ask for, as plain functions: settings in, jobs and DataFrames out.

The pages stay thin: they collect widgets into ``Settings``, submit the job functions below to
the ``JobManager``, and draw the DataFrames these functions return with ``lsq.plots``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import pandas as pd

from lsq.analysis import grid_levels, histogram_frame, layer_table, sensitivity
from lsq.config import METHODS, QuantConfig, make_config
from lsq.convert import quant_layers
from lsq.errors import LSQError
from lsq.jobs import Job
from lsq.pipeline import (
    DataConfig,
    MethodResult,
    ModelSpec,
    Workbench,
    finish_run,
    history_frames,
    init_method,
    prepare,
    save_result,
    start_run,
    train_method,
    write_progress,
)
from lsq.train import TrainConfig

#: Weight-init choices offered in the app. "auto": the method's own init at low bits, and an MSE
#: search at 6+ bits, where the 3-sigma and LSQ rules clip too hard (measured on the bundled
#: model: they halve top-1 agreement at W8).
WEIGHT_INIT_CHOICES = ("auto", "method", "3sigma", "lsq", "maxabs", "mse")
HIGH_BITS = 6


@dataclass(frozen=True)
class Settings:
    """Everything the sidebar decides."""

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
        changes: dict = {"quantize_weights": self.quantize_weights}
        if self.weight_init == "auto":
            if self.w_bits >= HIGH_BITS:
                changes["weight_init"] = "mse"
        elif self.weight_init != "method":
            changes["weight_init"] = self.weight_init
        return make_config(method, self.w_bits, self.a_bits, **changes)

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
    bench = prepare(settings.model, settings.data, device=settings.device, progress=progress)
    with _BENCH_LOCK:
        _BENCHES[key] = bench
        while len(_BENCHES) > keep:
            _BENCHES.popitem(last=False)
    return bench


@dataclass
class Comparison:
    """The methods of one settings, initialised (and possibly trained) side by side."""

    settings: Settings
    bench: Workbench
    results: dict[str, MethodResult] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)

    def metrics_frame(self, stage: str = "init") -> pd.DataFrame:
        rows = []
        for method, r in self.results.items():
            m = r.metrics_init if stage == "init" or r.metrics_final is None else r.metrics_final
            rows.append({"method": method, "config": r.config.label, "status": r.status, **m})
        return pd.DataFrame(rows)

    def ranges_frame(self) -> pd.DataFrame:
        frames = []
        for method, r in self.results.items():
            df = r.init_frame().reset_index(names="index")
            df = df.rename(columns={"name": "layer", "lo": "range_lo", "hi": "range_hi"})
            df.insert(0, "method", method)
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def calibrate_job(job: Job, settings: Settings, save: bool = True) -> Comparison:
    """Calibrate once, initialise every chosen method, evaluate; save each as a run."""
    bench = get_workbench(settings, job)
    comp = Comparison(settings, bench)
    n = len(settings.methods)
    for i, method in enumerate(settings.methods):
        if job.stop_requested():
            break
        job.progress(f"initialising {method}", i, n)

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "calibrating":
                job.progress("recording activations", done, total)

        result = init_method(bench, settings.config(method), progress)
        comp.results[method] = result
        if save:
            comp.runs[method] = str(save_result(bench, result).path)
    job.progress("done", n, n)
    return comp


def train_job(job: Job, comp: Comparison, methods: list[str], train_cfg: TrainConfig) -> Comparison:
    """QAT of the chosen methods of an initialised comparison, one after another; saves runs."""
    bench = comp.bench
    missing = [m for m in methods if m not in comp.results]
    if missing:
        raise LSQError(f"calibrate {', '.join(missing)} first (Calibrate page)")
    for i, method in enumerate(methods):
        if job.stop_requested():
            break
        result = comp.results[method]

        run = start_run(bench, result, train_cfg)

        def on_event(e, method=method, i=i, run=run, result=result) -> None:
            job.add_event((method, e))
            if e.kind == "step" and e.step % 10 == 0:
                write_progress(run, result)
            if e.kind == "step":
                job.progress(
                    f"training {method}",
                    i * train_cfg.steps + e.step,
                    len(methods) * train_cfg.steps,
                )

        train_method(bench, result, train_cfg, on_event=on_event, should_stop=job.stop_requested)
        finish_run(run, bench, result)
        comp.runs[method] = str(run.path)
    return comp


def events_frames(job: Job) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A training job's events so far: metrics and quantizer trajectories, long, with method."""
    by_method: dict[str, list] = {}
    for method, e in list(job.events):
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


def layers_frame(comp: Comparison, eval_views: int = 8) -> pd.DataFrame:
    """Per-layer table of every method, long format (one row per method and layer)."""
    bench = comp.bench
    frames = []
    views = bench.eval[:eval_views]
    for method, r in comp.results.items():
        df = layer_table(r.model, bench.stats, views)
        df.insert(0, "method", method)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def layer_view(comp: Comparison, layer: str) -> tuple[pd.DataFrame, dict, tuple]:
    """One layer's input histogram, each method's grid (levels and range), and observed min/max."""
    bench = comp.bench
    if bench.stats is None or layer not in bench.stats:
        raise LSQError(f"no calibration statistics for layer {layer!r}; calibrate first")
    st = bench.stats[layer]
    grids = {}
    for method, r in comp.results.items():
        ql = quant_layers(r.model)[layer]
        lo, hi = ql.input_quant.clip_range()
        grids[method] = {"levels": grid_levels(ql).tolist(), "lo": float(lo), "hi": float(hi)}
    return histogram_frame(st), grids, (st.min, st.max)


def sensitivity_job(job: Job, comp: Comparison, method: str, views: int = 16) -> pd.DataFrame:
    """Group-by-group sensitivity of one method (weights vs activations), on a few views."""
    if method not in comp.results:
        raise LSQError(f"calibrate {method} first")
    job.progress(f"sensitivity of {method}", 0, 1)
    bench = comp.bench
    v = bench.eval[:views]
    df = sensitivity(comp.results[method].model, v, bench.teacher_eval[:views], by="group")
    df.insert(0, "method", method)
    job.progress("done", 1, 1)
    return df
