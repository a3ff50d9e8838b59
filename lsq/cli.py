"""Headless entry point: ``python -m lsq run|compare|runs|health|export|train|doctor``.

Every app run can be reproduced here. Errors in the input are printed as one line and exit with
status 2; nothing but a bug prints a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from lsq.config import (
    ACT_INITS,
    ACT_MODES,
    METHODS,
    WEIGHT_INIT_CHOICES,
    QuantConfig,
    make_config,
)
from lsq.errors import LSQError
from lsq.export import DEFAULT_OFFSET, FORMATS, OFFSET_ROUTES
from lsq.pipeline import DataConfig
from lsq.reconstruct import RECON_WEIGHT_INITS, ROUNDINGS, ReconstructConfig
from lsq.status import Status
from lsq.train import OPTIMIZERS, TrainConfig
from lsq.validate import whole_number

#: The CLI's defaults are the library's: data from DataConfig, training from TrainConfig.
DATA = DataConfig()
TRAIN = TrainConfig()
RECON = ReconstructConfig()

EPILOG = """examples:
  python -m lsq run                                  # LSQ+ W4A4 on the bundled EfficientNet-Lite0
  python -m lsq run --method lsq --w-bits 8 --a-bits 4 --steps 20 --resolution 160
  python -m lsq compare --methods lsq+,lsq,lsq-signed,minmax --bits 4,2
  python -m lsq run --w-bits 4 --a-bits 4 --reconstruct 60 --steps 0    # the low-bit recipe
  python -m lsq runs                                 # list saved runs
  python -m lsq health RUN                           # health checks of a saved run
  python -m lsq export RUN --format onnx             # QDQ ONNX for ONNX Runtime, with parity
  torchrun --nproc_per_node=8 -m lsq train --data train/ --val val/ --epochs 1 --batch 256
  python -m lsq doctor                               # check every path on this GPU, one table
"""


def _int(text: str) -> int:
    try:
        return whole_number(float(text), "the value")
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _csv(kind):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(t) for t in items]

    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default="bundled",
        help="'bundled' (EfficientNet-Lite0 with ImageNet weights, offline), 'bundled-lite1' or "
        "'bundled-lite2' (the bigger EfficientNet-Lite1/Lite2, also offline), a timm model name "
        "(weights from the hub; needs internet), or a checkpoint file (.pth/.safetensors) whose "
        "architecture --arch names. Default: bundled.",
    )
    g.add_argument(
        "--arch",
        default="tf_efficientnet_lite0",
        help="timm architecture of a --model checkpoint file (default tf_efficientnet_lite0)",
    )
    g.add_argument(
        "--random-weights",
        action="store_true",
        help="build --model (a timm name) untrained, without downloading: for smoke runs.",
    )
    g.add_argument(
        "--images",
        default=None,
        help="an image folder (class sub-folders or flat) instead of the photos bundled with "
        "scikit-image; every fourth image is held out for evaluation.",
    )
    g.add_argument(
        "--resolution", type=_int, default=None, help="input size in pixels (default: the model's)"
    )
    g.add_argument(
        "--calib",
        type=_int,
        default=DATA.calib_views,
        help=f"calibration/training views (default {DATA.calib_views})",
    )
    g.add_argument(
        "--eval-views",
        type=_int,
        default=DATA.eval_views,
        help=f"held-out evaluation views (default {DATA.eval_views})",
    )
    g.add_argument(
        "--batch-size",
        type=_int,
        default=TRAIN.batch_size,
        help=f"batch size (default {TRAIN.batch_size})",
    )
    g.add_argument(
        "--seed",
        type=_int,
        default=TRAIN.seed,
        help=f"random seed for views and training (default {TRAIN.seed})",
    )
    g.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="default auto: CUDA if present",
    )
    t = p.add_argument_group("training (QAT)")
    t.add_argument(
        "--steps",
        type=_int,
        default=None,
        help=f"QAT steps after init (run: default {TRAIN.steps}, 0 = init only; compare: "
        "default 0)",
    )
    t.add_argument(
        "--optimizer",
        default=TRAIN.optimizer,
        choices=list(OPTIMIZERS),
        help=f"default {TRAIN.optimizer}",
    )
    t.add_argument(
        "--lr",
        type=_float,
        default=TRAIN.lr_weights,
        help=f"learning rate of the weights (default {TRAIN.lr_weights:g})",
    )
    t.add_argument(
        "--lr-act",
        type=_float,
        default=TRAIN.lr_act_quant,
        help=f"learning rate of activation scales/offsets (default {TRAIN.lr_act_quant:g})",
    )
    t.add_argument(
        "--lr-wq",
        type=_float,
        default=TRAIN.lr_weight_quant,
        help=f"learning rate of weight scales (default {TRAIN.lr_weight_quant:g})",
    )
    t.add_argument(
        "--weight-init",
        choices=WEIGHT_INIT_CHOICES,
        default="auto",
        help="auto (default, as in the app): each method's own rule below 6 bits, an MSE search "
        "at 6+ bits; method: always the method's own rule; or one initializer for all",
    )
    t.add_argument(
        "--fp32",
        action="store_true",
        help="no bf16 autocast on CUDA (bf16 is the default there; the quantizers compute in "
        "float32 either way, and the CPU always does)",
    )
    t.add_argument(
        "--record-every",
        type=_int,
        default=TRAIN.record_every,
        help="read the loss, quantizer ranges and weight flips every N QAT steps; the steps "
        f"between never wait on the GPU (default {TRAIN.record_every}: every step's curve)",
    )
    t.add_argument(
        "--eager",
        action="store_true",
        help="eager quantizer kernels: same values, slower steps, no one-off compile (~15 s)",
    )
    lb = p.add_argument_group("low-bit recipe")
    lb.add_argument(
        "--reconstruct",
        type=_int,
        default=0,
        help="iterations per unit of block-wise reconstruction before QAT (0 = none; "
        f"{RECON.iters} is the recipe's)",
    )
    _add_recon_choices(lb)
    lb.add_argument(
        "--recon-views",
        type=_int,
        default=DATA.recon_views,
        help=f"views reconstruction learns from (default {DATA.recon_views})",
    )
    lb.add_argument(
        "--synthetic",
        type=_int,
        default=0,
        help="images synthesised from the model's BatchNorm statistics, added to the "
        "calibration and training data (cached on disk; default 0)",
    )
    lb.add_argument(
        "--synthetic-only",
        action="store_true",
        help="calibrate and train on synthesised images alone, no photo (evaluation stays on "
        "the bundled photos)",
    )
    lb.add_argument(
        "--fresh-views",
        action="store_true",
        help="QAT draws new crops of the photos every step instead of cycling over the "
        "calibration views (reconstruction always learns from fresh crops)",
    )


def model_spec(args):
    """The ModelSpec of ``--model``, ``--arch`` and ``--random-weights``."""
    from lsq.pipeline import ModelSpec

    if args.model == "bundled" or args.model.startswith("bundled-"):
        from lsq.models import BUNDLED

        short = args.model.removeprefix("bundled").removeprefix("-") or "lite0"
        names = {m.short: m.name for m in BUNDLED.values()}
        if short not in names:
            choices = ", ".join(f"bundled-{s}" for s in names)
            raise LSQError(f"unknown bundled model {args.model!r}; choose bundled or {choices}")
        return ModelSpec(names[short], "bundled")
    if args.model.endswith((".pth", ".pt", ".bin", ".safetensors")) or Path(args.model).exists():
        return ModelSpec(args.arch, "file", args.model)
    return ModelSpec(args.model, "random" if args.random_weights else "hub")


def _prepare(args):
    from lsq.pipeline import prepare

    data = data_config(args)
    bar = tqdm(total=1, file=sys.stderr, leave=False)
    state = {"stage": None}

    def progress(stage: str, done: int, total: int) -> None:
        if stage != state["stage"]:
            state["stage"] = stage
            bar.reset(total=max(total, 1))
            bar.set_description(stage)
        bar.n = done
        bar.refresh()

    bench = prepare(model_spec(args), data, device=args.device, progress=progress)
    return bench, progress, bar


def data_config(args) -> DataConfig:
    """The DataConfig of ``run``/``compare``'s options."""
    if args.synthetic_only and args.images:
        raise LSQError("--synthetic-only uses no photo; drop --images or --synthetic-only")
    return DataConfig(
        source="synthetic" if args.synthetic_only else "folder" if args.images else "bundled",
        folder=args.images,
        resolution=args.resolution,
        calib_views=args.calib,
        eval_views=args.eval_views,
        batch_size=args.batch_size,
        seed=args.seed,
        synthetic=args.synthetic,
        fresh_views=args.fresh_views,
        recon_views=args.recon_views,
    )


def train_config(args, steps: int) -> TrainConfig:
    """The TrainConfig of ``run``/``compare``'s options, for ``steps`` QAT steps."""
    return TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr_weights=args.lr,
        lr_act_quant=args.lr_act,
        lr_weight_quant=args.lr_wq,
        seed=args.seed,
        device=args.device,
        bf16=not args.fp32,
        record_every=args.record_every,
        compile=not args.eager,
    )


def _add_recon_choices(p) -> None:
    """The reconstruction choices ``_recon_cfg`` reads, for ``run``/``compare`` and ``train``."""
    p.add_argument(
        "--recon-weight-init",
        choices=RECON_WEIGHT_INITS,
        default=RECON.weight_init,
        help="weight ranges reconstruction starts from: 'mse' searches them first (the "
        "recipe's), 'keep' starts from the method's own init",
    )
    p.add_argument(
        "--recon-rounding",
        choices=ROUNDINGS,
        default=RECON.rounding,
        help="how reconstruction learns the quantized weights: 'ste' trains them through the "
        "straight-through rounding (the recipe's), 'learned' keeps them and learns each "
        "weight's rounding direction (AdaRound; wants many iterations)",
    )


def recon_config(args) -> ReconstructConfig | None:
    """The reconstruction ``run``, ``compare`` and ``train`` ask for, or None (no --reconstruct)."""
    if not args.reconstruct:
        return None
    return ReconstructConfig(
        iters=args.reconstruct,
        weight_init=args.recon_weight_init,
        rounding=args.recon_rounding,
        seed=args.seed,
        device=args.device,
        bf16=not args.fp32,
        compile=not args.eager,
    )


def _fmt_metrics(m: dict) -> str:
    return (
        f"agreement {m['agreement']:.3f} (confident views {m['confident_agreement']:.3f}), "
        f"KL {m['kl']:.4f}, logit SQNR {m['logit_sqnr_db']:.1f} dB; on the calibration views "
        f"agreement {m['calib_agreement']:.3f}, KL {m['calib_kl']:.4f}"
    )


def run_config(args) -> QuantConfig:
    """The QuantConfig of ``run``'s options: the preset, weight init as in the app, overrides."""
    overrides = {"weight_init": args.weight_init}
    if getattr(args, "weights_float", False):  # run only
        overrides["quantize_weights"] = False
    for key in ("act_mode", "act_init"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    if args.first_last_bits is not None:
        overrides["first_last_bits"] = None if args.first_last_bits == 0 else args.first_last_bits
    return make_config(args.method, args.w_bits, args.a_bits, **overrides)


def cmd_run(args) -> int:
    from lsq.pipeline import Recipe, init_method, run_recipe
    from lsq.reconstruct import ReconstructEvent

    t0 = time.perf_counter()
    steps = whole_number(TRAIN.steps if args.steps is None else args.steps, "--steps", 0)
    config = run_config(args)
    train_cfg = train_config(args, steps) if steps > 0 else None
    recon_cfg = recon_config(args)  # validated before the model loads
    bench, progress, bar = _prepare(args)
    result = init_method(bench, config, progress)
    bar.close()
    print(f"{config.label} after init: {_fmt_metrics(result.metrics_init)}")
    bars: dict[str, tqdm] = {}

    def on_event(e) -> None:
        """One bar per stage: units' iterations, then QAT steps."""
        recon = isinstance(e, ReconstructEvent)
        name = "reconstruction" if recon else "QAT"
        if name not in bars:
            bars[name] = tqdm(file=sys.stderr, desc=name, leave=False, total=steps or None)
        if recon:
            bars[name].total = e.total
        if e.kind == "step":
            bars[name].update(1)
            where = {"unit": e.unit} if recon else {}
            bars[name].set_postfix(**where, loss=f"{e.loss:.4g}")

    def on_stage(stage: str, result) -> None:
        for b in bars.values():
            b.close()
        if result.status != Status.COMPLETE:
            what = "reconstruction" if stage == "reconstructed" else "training"
            print(f"{what} {result.status}: {result.message}", file=sys.stderr)
        how = (
            f"reconstruction ({recon_cfg.iters} iterations per unit)"
            if stage == "reconstructed"
            else f"{steps} QAT steps"
        )
        print(f"{config.label} after {how}: {_fmt_metrics(result.metrics_final)}")

    outcome = run_recipe(
        bench,
        result,
        Recipe(recon_cfg, train_cfg),
        on_event=on_event,
        on_stage=on_stage,
        root=args.runs_dir,
    )
    result, table = outcome.final, outcome.layers
    worst = table.nsmallest(5, "output_sqnr_db")[
        [
            "layer",
            "kind",
            "w_bits",
            "a_bits",
            "range_lo",
            "range_hi",
            "weight_sqnr_db",
            "input_sqnr_db",
            "output_sqnr_db",
            "calib_output_sqnr_db",
        ]
    ]
    print("\nworst layers (output SQNR against the float model, held-out and calibration views):")
    print(worst.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\nsaved run: {result.run_path}  ({time.perf_counter() - t0:.0f} s)")
    return 0 if result.status in (Status.COMPLETE, Status.STOPPED) else 1


def cmd_compare(args) -> int:
    from lsq.pipeline import compare

    t0 = time.perf_counter()
    for m in args.methods:
        if m not in METHODS:
            raise LSQError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for b in args.bits:
        make_config("lsq+", b, b)  # validates
    steps = whole_number(0 if args.steps is None else args.steps, "--steps", 0)
    train_cfg = train_config(args, steps) if steps else None
    recon_cfg = recon_config(args)
    bench, progress, bar = _prepare(args)
    table = compare(
        bench, args.methods, args.bits, train_cfg, progress, args.weight_init, recon_cfg
    )
    bar.close()
    wall = time.perf_counter() - t0
    pivot_cols = ["init_agreement", "init_kl"]
    pivot_cols += ["rec_agreement", "rec_kl"] if recon_cfg is not None else []
    pivot_cols += ["qat_agreement", "qat_kl"] if steps else []
    wide = table.pivot(index="method", columns="bits", values=pivot_cols)
    wide = wide.reindex(index=args.methods).reindex(columns=args.bits, level=1)
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    if args.out:
        out = Path(args.out)
    else:
        from lsq.runs import runs_root

        out = runs_root(args.runs_dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"\nsaved {out}  (wall time {wall:.0f} s, {len(bench.eval)} evaluation views)")
    return 0


def cmd_runs(args) -> int:
    from lsq.runs import list_runs

    infos = list_runs(args.runs_dir)
    if not infos:
        print("no saved runs")
        return 0
    rows = [{"run": i.name, "status": i.status, "started": i.started} for i in infos]
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def cmd_health(args) -> int:
    """The app's grouping: the float model's findings once, then one row per check and run
    (its number of layers, the worst few, one short reason); ``--layers`` adds every finding."""
    from lsq.health import FLOAT_MODEL, combine, group_findings, run_health
    from lsq.runs import load_run

    runs = [load_run(_run_arg(name), args.runs_dir) for name in args.run]
    findings = combine({run.info.name: run_health(run) for run in runs})
    groups = group_findings(findings).rename(columns={"worst": "worst layers"})
    by = {method: sub.drop(columns="method") for method, sub in groups.groupby("method")}

    def table(frame: pd.DataFrame) -> str:
        cells = [list(map(str, frame.columns))]
        cells += [list(map(str, row)) for row in frame.itertuples(index=False)]
        widths = [max(len(row[i]) for row in cells) for i in range(len(frame.columns))]
        lines = ("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells)
        return "\n".join("  " + line.rstrip() for line in lines)

    if FLOAT_MODEL in by:
        n = int((findings["method"] == FLOAT_MODEL).sum())
        once = ", the same in every run: shown once" if len(runs) > 1 else ""
        print(f"float model: {n} finding(s) from its weights alone{once}")
        print(table(by[FLOAT_MODEL]))
    for run in runs:
        name = run.info.name
        n = int((findings["method"] == name).sum())
        if n == 0:
            own = " of its own" if FLOAT_MODEL in by else ""
            print(f"{name} ({run.config.method}): no findings{own}")
            continue
        print(f"{name} ({run.config.method}): {n} finding(s), one row per check")
        print(table(by[name]))
    if args.layers and not findings.empty:
        print("every finding, layer by layer:")
        print(table(findings.drop(columns="severity")))
    return 0


def _run_arg(text: str) -> str | Path:
    """A run given on the command line: a folder name in the runs folder, or a path to one."""
    return Path(text) if "/" in text or "\\" in text or text in (".", "..") else text


def cmd_export(args) -> int:
    from lsq.export import export_run

    report = export_run(
        _run_arg(args.run),
        fmt=args.format,
        out=args.out,
        offset=args.offset,
        root=args.runs_dir,
        layer_table=args.layer_table,
    )
    print(f"wrote {report.path}  ({report.format}, offset {report.offset}, {report.seconds:.1f} s)")
    frame = report.frame()
    quantized = frame[frame["route"] != ""]
    routes = quantized["route"].value_counts().to_dict()
    border = int(frame["border_bias"].sum())
    print(
        f"{len(frame)} layers, {len(quantized)} with quantized inputs; offset routes: "
        + (", ".join(f"{k} {v}" for k, v in sorted(routes.items())) or "none")
        + (f" ({border} padded convs with a border bias)" if border else "")
        + f"; largest snap {report.max_snap_error_steps:.3f} steps"
    )
    p = report.parity
    if p:
        print(
            f"parity, ONNX Runtime vs fake-quant ({int(p['views'])} evaluation views): "
            f"agreement {p['agreement']:.3f}, KL {p['kl']:.2e}, "
            f"logit SQNR {p['logit_sqnr_db']:.1f} dB, max |diff| {p['max_abs_diff']:.3g}"
        )
        # Below the parity bar the file is still written and the exit status stays 0: the
        # export did what was asked, and a model whose float rounding alone moves it that far
        # is not a failed export; the line says which layer diverges, if one does.
        if report.parity_warning:
            print(f"warning: {report.parity_warning}")
    cols = ["layer", "kind", "w_bits", "a_bits", "container", "route", "scale"]
    cols += ["zero_point", "offset", "snap_error_steps", "border_bias", "bn_folded"]
    if report.layer_table is not None:
        print(
            "\nper-layer table on the exported graph (ONNX Runtime) and the fake-quant model, "
            f"{int(p['views'])} views; SQNR in dB:"
        )
        print(report.layer_table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.layers:
        print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return 0
    snapped = frame[frame["snap_error_steps"] > 0].nlargest(5, "snap_error_steps")
    if len(snapped):
        print("\nlayers whose snapped zero point moves the grid most (--layers: every layer):")
        print(snapped[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def cmd_train(args) -> int:
    from lsq.distributed import FolderQATConfig, train_folder

    recon = recon_config(args)
    cfg = FolderQATConfig(
        data=args.data,
        val=args.val,
        model=model_spec(args),
        quant=run_config(args),
        new_head=args.new_head,
        resolution=args.resolution,
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch,
        workers=args.workers,
        optimizer=args.optimizer,
        lr_weights=args.lr,
        lr_weight_quant=args.lr_wq,
        lr_act_quant=args.lr_act,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        distill=args.distill,
        calib_images=args.calib,
        reconstruct=recon,
        ckpt_every=args.ckpt_every,
        keep=args.keep,
        log_every=args.log_every,
        seed=args.seed,
        device=args.device,
        bf16=not args.fp32,
        compile=not args.eager,
    )
    result = train_folder(
        cfg, root=args.runs_dir, resume=args.resume, report=lambda line: print(line, flush=True)
    )
    return 0 if result.status == Status.COMPLETE else 1


def cmd_doctor(args) -> int:
    from lsq.doctor import run_doctor

    return 0 if run_doctor(args.device, tiny=args.tiny).ok else 1


def _add_doctor(sub) -> None:
    """``doctor``: every path a user runs, checked on this machine, in one table."""
    d = sub.add_parser(
        "doctor",
        help="check every path (default flow, low-bit recipe, export, torchrun train + resume, "
        "QAT vs float step time) on this machine; one table, exit 1 if any failed",
        description="Runs each path a user runs and prints one table: path, ok or the error's "
        "first line, seconds, notes; then QAT vs float step time at batch 128 and the peak GPU "
        "memory. A few minutes on one GPU; on the CPU (or with --tiny) the same paths at a tiny "
        "size. Downloads nothing; writes only to a temporary folder.",
    )
    d.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="default auto: CUDA if present; the CPU always runs the tiny size",
    )
    d.add_argument("--tiny", action="store_true", help="the tiny size on a GPU too (seconds)")
    d.set_defaults(func=cmd_doctor)


def _add_train(sub) -> None:
    """``train``: QAT on an ImageNet-style folder, one process or many under torchrun."""
    from lsq.distributed import LATEST, FolderQATConfig

    d = FolderQATConfig(data=".")
    t = sub.add_parser(
        "train",
        help="QAT on an image folder (class sub-folders); the same under torchrun on N GPUs",
        description="QAT on an ImageNet-style folder with DistributedDataParallel under "
        "torchrun (one process per GPU; gloo on the CPU), checkpoints and --resume; the run is "
        "saved like any other and shows on the app's Runs page.",
    )
    t.add_argument("--data", required=True, help="training folder, one sub-folder per class")
    t.add_argument("--val", default=None, help="validation folder (same classes): top-1 each epoch")
    t.add_argument("--model", default="bundled", help="as for run: bundled, a timm name, a file")
    t.add_argument("--arch", default="tf_efficientnet_lite0", help="architecture of a --model file")
    t.add_argument("--random-weights", action="store_true", help="a timm --model, untrained")
    t.add_argument(
        "--new-head",
        action="store_true",
        help="a new classifier for the folder's classes (else its class count must be the "
        "model's outputs, e.g. 1000 ImageNet synset folders)",
    )
    t.add_argument("--method", default="lsq+", choices=list(METHODS), help="default lsq+")
    t.add_argument("--w-bits", type=_int, default=4, help="weight bits, 2-8 (default 4)")
    t.add_argument("--a-bits", type=_int, default=4, help="activation bits, 2-8 (default 4)")
    t.add_argument("--first-last-bits", type=_int, default=None, help="default 8; 0 = the same")
    t.add_argument("--weight-init", choices=WEIGHT_INIT_CHOICES, default="auto", help="as for run")
    t.set_defaults(act_mode=None, act_init=None)
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_int, default=None, help="passes over --data (default 1)")
    length.add_argument("--steps", type=_int, default=None, help="optimizer steps instead")
    t.add_argument(
        "--batch",
        "--batch-size",
        type=_int,
        default=d.batch_size,
        help=f"global batch, split over the processes (default {d.batch_size})",
    )
    t.add_argument("--resolution", type=_int, default=None, help="pixels (default: the model's)")
    t.add_argument("--workers", type=_int, default=d.workers, help="loader processes per rank")
    t.add_argument("--optimizer", default=d.optimizer, choices=list(OPTIMIZERS))
    t.add_argument("--lr", type=_float, default=d.lr_weights, help="weights' learning rate")
    t.add_argument("--lr-act", type=_float, default=d.lr_act_quant, help="activation quantizers")
    t.add_argument("--lr-wq", type=_float, default=d.lr_weight_quant, help="weight quantizers")
    t.add_argument("--momentum", type=_float, default=d.momentum, help="SGD momentum")
    t.add_argument("--weight-decay", type=_float, default=d.weight_decay)
    t.add_argument(
        "--distill", type=_float, default=0.0, help="weight of distillation from the float model"
    )
    t.add_argument("--calib", type=_int, default=d.calib_images, help="calibration images")
    t.add_argument(
        "--reconstruct", type=_int, default=0, help="block-wise reconstruction iterations per unit"
    )
    _add_recon_choices(t)
    t.add_argument("--ckpt-every", type=_int, default=d.ckpt_every, help="checkpoint every N steps")
    t.add_argument("--keep", type=_int, default=d.keep, help="checkpoints kept (default 3)")
    t.add_argument("--log-every", type=_int, default=d.log_every, help="log every N steps")
    t.add_argument(
        "--resume",
        nargs="?",
        const=LATEST,
        default=None,
        help="continue a run from its last checkpoint: RUN (name or path), or alone the newest "
        "unfinished run of this model and config",
    )
    t.add_argument("--seed", type=_int, default=d.seed, help="data order, augmentation, init")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    t.add_argument("--eager", action="store_true", help="eager quantizer kernels (no compile)")
    t.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lsq",
        description="LSQ and LSQ+ quantization of timm image models, from the command line.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--runs-dir", default=None, help="where runs are saved (default ./runs or $LSQ_RUNS_DIR)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="calibrate, initialise, train, evaluate one method; save a run")
    r.add_argument("--method", default="lsq+", choices=list(METHODS), help="default lsq+")
    r.add_argument("--w-bits", type=_int, default=4, help="weight bits, 2-8 (default 4)")
    r.add_argument("--a-bits", type=_int, default=4, help="activation bits, 2-8 (default 4)")
    r.add_argument(
        "--first-last-bits",
        type=_int,
        default=None,
        help="bits of the first conv and last linear (default 8; 0 = same as the rest)",
    )
    r.add_argument(
        "--act-mode", choices=ACT_MODES, default=None, help="override the method's activation grid"
    )
    r.add_argument(
        "--act-init", choices=ACT_INITS, default=None, help="override the method's activation init"
    )
    r.add_argument(
        "--weights-float",
        action="store_true",
        help="quantize the activations alone (the app's 'Quantize weights' off)",
    )
    _add_common(r)
    r.set_defaults(func=cmd_run)
    c = sub.add_parser(
        "compare", help="methods x bit-widths in one table (after init, and after QAT with --steps)"
    )
    c.add_argument(
        "--methods",
        type=_csv(str),
        default=["lsq+", "lsq", "lsq-signed", "minmax"],
        help="comma-separated (default lsq+,lsq,lsq-signed,minmax)",
    )
    c.add_argument(
        "--bits",
        type=_csv(_int),
        default=[8, 4, 3, 2],
        help="comma-separated W=A bits (default 8,4,3,2)",
    )
    c.add_argument("--out", default=None, help="CSV to write (default: runs/compare-<time>.csv)")
    _add_common(c)
    c.set_defaults(func=cmd_compare)
    ls = sub.add_parser("runs", help="list saved runs")
    ls.set_defaults(func=cmd_runs)
    h = sub.add_parser(
        "health",
        help="health checks of saved runs: the float model's findings once, then one row per "
        "check and run",
    )
    h.add_argument(
        "run",
        nargs="+",
        help="the run's folder name (see `runs`) or a path to it; several: compared, as the "
        "app's methods",
    )
    h.add_argument("--layers", action="store_true", help="also every finding, layer by layer")
    h.set_defaults(func=cmd_health)
    e = sub.add_parser(
        "export",
        help="export a saved run: ONNX with QuantizeLinear/DequantizeLinear pairs (parity against "
        "the fake-quant model printed), or integer safetensors",
    )
    e.add_argument("run", help="the run's folder name (see `runs`) or a path to its folder")
    e.add_argument("--format", choices=list(FORMATS), default="onnx", help="default onnx")
    e.add_argument(
        "--out",
        default=None,
        help="file to write (default: model.onnx / model-int.safetensors in the run folder)",
    )
    e.add_argument(
        "--offset",
        choices=list(OFFSET_ROUTES),
        default=DEFAULT_OFFSET,
        help="LSQ+'s continuous offset: fold it into the bias (exact; a bias per output position "
        "at a padded conv's borders), snap-padded (fold where no padding, snap elsewhere), snap "
        "it to an integer zero point everywhere, or restore it in float after the pair (a "
        f"reference). Default {DEFAULT_OFFSET}",
    )
    e.add_argument("--layers", action="store_true", help="print every layer's export row")
    e.add_argument(
        "--layer-table",
        action="store_true",
        help="ONNX: recompute the per-layer table on the exported graph (ONNX Runtime's "
        "intermediate tensors against the fake-quant and float models, on the parity views)",
    )
    e.set_defaults(func=cmd_export)
    _add_train(sub)
    _add_doctor(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LSQError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
