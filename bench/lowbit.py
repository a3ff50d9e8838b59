"""The low-bit recipe on the bundled EfficientNet-Lite0: block-wise reconstruction, then QAT.

    .venv/bin/python bench/lowbit.py                          # the method x bits table
    .venv/bin/python bench/lowbit.py --bits 4/4 --methods lsq+ --seeds 3     # + seed spread
    .venv/bin/python bench/lowbit.py --bits 4/4 --methods lsq+ --data        # photos vs synthetic
    .venv/bin/python bench/lowbit.py --bits 4/4,8/4 --methods lsq+ --optimizers --views
    .venv/bin/python bench/lowbit.py --skip-main --folds 4 --bits 4/4 --resolution 160 \
        --steps 0 --vary synthetic=0,64 --vary iters=30,120     # cross-validated choices
    .venv/bin/python bench/lowbit.py --quick                  # every table at a smoke size

Tables (each optional but the first):
1. Methods x bits: top-1 agreement and KL against the float model on the held-out evaluation
   photos right after init, after block-wise reconstruction, and after QAT on top, each also on
   the calibration views (``calib``: a large gap is overfitting to the calibration photos);
   seconds of reconstruction + QAT per method (2 threads, this machine).
2. ``--seeds N``: the spread across N seeds (views and batches) after the recipe, LSQ+ with MSE
   activation init against min/max init.
3. ``--data``: calibration and reconstruction on the photos, on images synthesised from the
   model's BatchNorm statistics alone, and on both (W8A8 init only, and the recipe).
4. ``--optimizers``: QAT after reconstruction with Adam at absolute rates (the QAT defaults),
   Adam with updates relative to each quantizer's scale, and SGD with LSQ's gradient scaling.
5. ``--compare-views``: QAT on fresh crops every step against the fixed calibration views.
6. ``--folds K``: cross-validation by scene. Every bundled photo (both splits, 17 photos in 16
   scenes: the stereo motorcycle pair is one) is dealt into K folds (``lsq.data.scene_folds``);
   each fold in turn is held out for evaluation while the others calibrate and reconstruct. The
   mean and spread over folds of the last stage's agreement and KL, beside the same recipe on the
   standard split (the six evaluation photos). ``--vary FIELD=V1,V2`` (repeatable) reruns it with
   one field of ``DataConfig`` (``synthetic``, ``recon_views``, ``calib_views``) or of
   ``ReconstructConfig`` (``iters``, ...) changed at a time: the protocol that picks the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.tables import markdown, stamp  # noqa: E402
from lsq.config import make_config  # noqa: E402
from lsq.data import named_bundled_images, scene_folds  # noqa: E402
from lsq.pipeline import (  # noqa: E402
    DataConfig,
    ModelSpec,
    Recipe,
    init_method,
    prepare,
    reconstruct_method,
    run_recipe,
    train_method,
)
from lsq.reconstruct import ReconstructConfig  # noqa: E402
from lsq.train import TrainConfig  # noqa: E402

METHODS = ["lsq+", "lsq", "lsq-signed", "minmax"]
#: Report seconds (off when another benchmark shares the machine: never time two things at once).
TIMING = True


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config(method: str, w: int, a: int, **changes):
    """The method at these bits with the app's weight init ("auto")."""
    return make_config(method, w, a, weight_init="auto", **changes)


def stage(name: str, metrics) -> dict:
    """A stage's agreement and KL on the held-out views, then on the calibration views (their
    gap: what the recipe fitted to the calibration photos alone)."""
    return {
        f"{name} agreement": metrics["agreement"],
        f"{name} KL": metrics["kl"],
        f"{name} calib agreement": metrics["calib_agreement"],
        f"{name} calib KL": metrics["calib_kl"],
    }


def recipe(bench, cfg, recon: ReconstructConfig | None, train: TrainConfig | None) -> dict:
    """Init, reconstruction (``recon`` None: none, and no QAT either), QAT for the methods with
    learned ranges: each stage's agreement and KL (held-out and calibration views), and the
    seconds taken after init."""
    init = init_method(bench, cfg)
    row = stage("init", init.metrics)
    if recon is None:
        return row
    t0 = time.perf_counter()
    out = run_recipe(bench, init, Recipe(recon, train if cfg.learnable else None, save=False))
    row.update(stage("rec", out.reconstructed.metrics))
    if out.trained is not None:
        row.update(stage("QAT", out.trained.metrics))
    if TIMING:
        row["seconds"] = time.perf_counter() - t0
    return row


def method_table(bench, bits, methods, recon, train) -> pd.DataFrame:
    rows = []
    for w, a in bits:
        for method in methods:
            row = {"method": method, "bits": f"W{w}A{a}"}
            row.update(recipe(bench, config(method, w, a), recon, train))
            rows.append(row)
            log(f"  {row}")
    return pd.DataFrame(rows)


def spread_table(bench_for_seed, bits, seeds, recon, train) -> pd.DataFrame:
    rows = []
    for w, a in bits:
        for act_init in ("mse", "minmax"):
            results = []
            for seed in range(seeds):
                bench = bench_for_seed(seed)
                r = recipe(
                    bench,
                    config("lsq+", w, a, act_init=act_init),
                    dataclasses.replace(recon, seed=seed),
                    dataclasses.replace(train, seed=seed) if train else None,
                )
                results.append(r)
                log(f"  W{w}A{a} {act_init} seed {seed}: {r}")
            last = "QAT" if train else "rec"
            agree = [r[f"{last} agreement"] for r in results]
            kl = [r[f"{last} KL"] for r in results]
            rows.append(
                {
                    "bits": f"W{w}A{a}",
                    "LSQ+ act init": act_init,
                    "seeds": seeds,
                    "agreement mean": statistics.mean(agree),
                    "agreement std": statistics.stdev(agree) if seeds > 1 else 0.0,
                    "KL mean": statistics.mean(kl),
                    "KL std": statistics.stdev(kl) if seeds > 1 else 0.0,
                }
            )
    return pd.DataFrame(rows)


DATA_SOURCES = ("photos", "synthetic only", "photos + synthetic")


def data_table(
    make_bench, data: DataConfig, synthetic: int, recon, train, names=DATA_SOURCES
) -> pd.DataFrame:
    rows = []
    sources = {
        "photos": data,
        "synthetic only": dataclasses.replace(data, source="synthetic", synthetic=synthetic),
        "photos + synthetic": dataclasses.replace(data, synthetic=synthetic),
    }
    for name, d in sources.items():
        if name not in names:
            continue
        t0 = time.perf_counter()
        bench = make_bench(d)
        prep = time.perf_counter() - t0
        w8 = init_method(bench, config("lsq+", 8, 8))
        row = {
            "calibration data": name,
            "W8A8 init agreement": w8.metrics["agreement"],
            "W8A8 init KL": w8.metrics["kl"],
        }
        r = recipe(bench, config("lsq+", 4, 4), recon, train)
        last = "QAT" if train else "rec"
        row.update(
            {
                "W4A4 recipe agreement": r[f"{last} agreement"],
                "W4A4 recipe KL": r[f"{last} KL"],
                "prepare s (incl. synthesis)": prep,
            }
        )
        rows.append(row)
        log(f"  {row}")
    return pd.DataFrame(rows)


def optimizer_table(bench, bits, recon, train: TrainConfig) -> pd.DataFrame:
    variants = {
        "Adam, absolute rates (QAT defaults)": train,
        "Adam, relative to the scale (1e-2)": dataclasses.replace(
            train, relative_quant_lr=True, lr_weight_quant=1e-2, lr_act_quant=1e-2
        ),
        "SGD, LSQ gradient scaling": dataclasses.replace(
            train, optimizer="sgd", lr_weights=1e-3, lr_weight_quant=1e-2, lr_act_quant=1e-2
        ),
    }
    rows = []
    for w, a in bits:
        init = init_method(bench, config("lsq+", w, a))
        start = reconstruct_method(bench, init, recon) if w <= 5 else init
        for name, cfg in variants.items():
            qat = train_method(bench, start, cfg)
            rows.append(
                {
                    "bits": f"W{w}A{a}",
                    "start": "reconstructed" if w <= 5 else "initialised",
                    "QAT optimizer": name,
                    "before agreement": start.metrics["agreement"],
                    "before KL": start.metrics["kl"],
                    "after agreement": qat.metrics["agreement"],
                    "after KL": qat.metrics["kl"],
                }
            )
            log(f"  {rows[-1]}")
    return pd.DataFrame(rows)


def views_table(make_bench, data, bits, recon, train) -> pd.DataFrame:
    rows = []
    for fresh in (True, False):
        bench = make_bench(dataclasses.replace(data, fresh_views=fresh))
        for w, a in bits:
            cfg = config("lsq+", w, a)
            init = init_method(bench, cfg)
            row = {
                "views": "fresh crops every step" if fresh else "fixed views",
                "bits": f"W{w}A{a}",
            }
            if w <= 5:
                rec = reconstruct_method(bench, init, recon)
                row.update({"rec agreement": rec.metrics["agreement"], "rec KL": rec.metrics["kl"]})
            qat = train_method(bench, init, train)
            row.update(
                {"QAT-only agreement": qat.metrics["agreement"], "QAT-only KL": qat.metrics["kl"]}
            )
            rows.append(row)
            log(f"  {row}")
    return pd.DataFrame(rows)


def variants(
    data: DataConfig, recon: ReconstructConfig, vary: list[str]
) -> list[tuple[str, DataConfig, ReconstructConfig]]:
    """The defaults, then each ``FIELD=V1,V2`` value with that one field changed."""
    out = [("defaults", data, recon)]
    for item in vary:
        field, _, values = item.partition("=")
        target = data if hasattr(data, field) else recon if hasattr(recon, field) else None
        if target is None or not values:
            raise SystemExit(
                f"--vary wants FIELD=V1,V2 with a DataConfig or ReconstructConfig field: {item}"
            )
        kind = type(getattr(target, field))
        for value in values.split(","):
            typed = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
            if typed == getattr(target, field):
                continue  # the defaults' row already has it
            label = f"{field}={value}"
            if target is data:
                out.append((label, dataclasses.replace(data, **{field: typed}), recon))
            else:
                out.append((label, data, dataclasses.replace(recon, **{field: typed})))
    return out


def cv_table(make_bench, k: int, bits, methods, choices, train) -> pd.DataFrame:
    """Each choice x bits x method: the recipe on every fold (held out by scene) and on the
    standard split; the last stage's agreement and KL, mean and spread over the folds."""
    folds = scene_folds(k)
    rows = []

    def last(r: dict, what: str) -> float:  # QAT's number where QAT ran (learnable methods)
        return r[f"QAT {what}"] if f"QAT {what}" in r else r[f"rec {what}"]

    for label, data, recon in choices:
        for w, a in bits:
            for method in methods:
                cfg = config(method, w, a)
                per_fold = []
                for i, held in enumerate(folds):
                    rest = tuple(n for j, f in enumerate(folds) if j != i for n in f)
                    bench = make_bench(data, (rest, tuple(held)))
                    per_fold.append(recipe(bench, cfg, recon, train))
                    log(f"  {label} W{w}A{a} {method} fold {i}: {per_fold[-1]}")
                standard = recipe(make_bench(data), cfg, recon, train)
                kl = [last(r, "KL") for r in per_fold]
                agree = [last(r, "agreement") for r in per_fold]
                row = {
                    "choice": label,
                    "bits": f"W{w}A{a}",
                    "method": method,
                    "CV KL mean": statistics.mean(kl),
                    "CV KL std": statistics.stdev(kl),
                    "CV agreement mean": statistics.mean(agree),
                    "CV agreement std": statistics.stdev(agree),
                    "eval photos KL": last(standard, "KL"),
                    "eval photos agreement": last(standard, "agreement"),
                    "init CV KL mean": statistics.mean(r["init KL"] for r in per_fold),
                }
                if TIMING:
                    row["s per run"] = statistics.mean(r["seconds"] for r in per_fold)
                rows.append(row)
                log(f"  {row}")
    return pd.DataFrame(rows)


def recon_changes(items: list[str]) -> dict:
    """``FIELD=VALUE`` pairs as ReconstructConfig changes, each value typed like the default."""
    defaults = ReconstructConfig()
    out = {}
    for item in items:
        field, _, value = item.partition("=")
        if not hasattr(defaults, field) or not value:
            raise SystemExit(f"--recon-set wants FIELD=VALUE, FIELD of ReconstructConfig: {item}")
        kind = type(getattr(defaults, field))
        out[field] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def parse_bits(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        w, a = part.split("/")
        out.append((int(w), int(a)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model", default="tf_efficientnet_lite0", help="a bundled model's timm name (offline)"
    )
    p.add_argument(
        "--resolution", type=int, default=224, help="default 224: the app's (the model's own)"
    )
    p.add_argument("--views", dest="eval_views", type=int, default=64, help="evaluation views")
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--recon-views", type=int, default=DataConfig().recon_views)
    p.add_argument(
        "--iters",
        type=int,
        default=ReconstructConfig().iters,
        help="reconstruction iterations per unit (0: the main table right after init only)",
    )
    p.add_argument(
        "--recon-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one ReconstructConfig field, e.g. lr_other=1e-3 or weight_init=keep "
        "(repeatable)",
    )
    p.add_argument("--steps", type=int, default=20, help="QAT steps after reconstruction (0: none)")
    p.add_argument("--bits", type=parse_bits, default=parse_bits("4/4,3/3,2/2,8/4"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=0)
    p.add_argument("--spread-bits", type=parse_bits, default=parse_bits("4/4"))
    p.add_argument("--data", action="store_true")
    p.add_argument("--synthetic", type=int, default=128)
    p.add_argument(
        "--data-sources",
        default=",".join(DATA_SOURCES),
        help=f"which of {', '.join(DATA_SOURCES)} (comma-separated)",
    )
    p.add_argument("--optimizers", action="store_true")
    p.add_argument("--compare-views", action="store_true")
    p.add_argument("--skip-main", action="store_true", help="only the optional tables")
    p.add_argument("--folds", type=int, default=0, help="cross-validation by scene, K folds")
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="with --folds: also each value of one DataConfig or ReconstructConfig field "
        "(repeatable)",
    )
    p.add_argument(
        "--skip-defaults", action="store_true", help="with --vary: only the changed rows"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-timing", action="store_true", help="omit seconds (machine shared)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke size (64 px, 8 views, at most 2 iterations and steps)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.calib, args.eval_views, args.recon_views = 64, 8, 8, 8
        args.iters, args.steps = min(args.iters, 2), min(args.steps, 2)  # 0 stays 0
        args.bits = [b for b in args.bits if b == (4, 4)] or [(4, 4)]
    global TIMING
    TIMING = not args.no_timing
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = DataConfig(
        resolution=args.resolution,
        calib_views=args.calib,
        eval_views=args.eval_views,
        recon_views=args.recon_views,
    )
    recon = (
        ReconstructConfig(iters=args.iters, **recon_changes(args.recon_set)) if args.iters else None
    )
    train = TrainConfig(steps=args.steps, eval_every=args.steps) if args.steps else None
    benches: dict = {}

    def make_bench(d: DataConfig, photos: tuple[tuple[str, ...], tuple[str, ...]] | None = None):
        """The workbench of ``d`` (on ``photos``: calibration and evaluation file names)."""
        if (d, photos) not in benches:
            log(f"preparing {d} {photos or ''}")
            images = None if photos is None else tuple(named_bundled_images(p) for p in photos)
            benches[d, photos] = prepare(ModelSpec(args.model, "bundled"), data=d, images=images)
        return benches[d, photos]

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    recipe_words = (
        f"{args.recon_views} reconstruction views (fresh crops of the calibration photos), "
        f"{args.iters} iterations per unit, then {args.steps} QAT steps"
        if args.iters
        else "right after init (no reconstruction, no QAT)"
    )
    out = [
        stamp(argv),
        "",
        f"Bundled {args.model}, {args.resolution} px, {args.calib} calibration "
        f"views, {recipe_words}; {args.eval_views} held-out evaluation views; torch "
        f"{torch.__version__}, {args.threads} threads",
    ]
    if not args.skip_main:
        log("method x bits")
        table = method_table(make_bench(data), args.bits, methods, recon, train)
        out += [
            "",
            "#### Methods x bits: "
            + ("init, block-wise reconstruction, QAT" if args.iters else "right after init"),
            "",
            markdown(table),
        ]
    if args.seeds:
        log("seed spread")
        table = spread_table(
            lambda s: make_bench(dataclasses.replace(data, seed=s)),
            args.spread_bits,
            args.seeds,
            recon,
            train,
        )
        out += ["", f"#### Spread across {args.seeds} seeds after the recipe", "", markdown(table)]
    if args.data:
        log("data sources")
        names = [n.strip() for n in args.data_sources.split(",")]
        table = data_table(make_bench, data, args.synthetic, recon, train, names)
        out += [
            "",
            f"#### Photos vs {args.synthetic} images synthesised from BatchNorm statistics",
            "",
            markdown(table),
        ]
    if args.optimizers:
        log("optimizers")
        qat = train or TrainConfig(steps=20, eval_every=20)
        table = optimizer_table(make_bench(data), args.bits, recon, qat)
        out += ["", "#### QAT optimizer", "", markdown(table)]
    if args.compare_views:
        log("views")
        qat = train or TrainConfig(steps=20, eval_every=20)
        table = views_table(make_bench, data, args.bits, recon, qat)
        out += ["", "#### Fresh crops every step vs fixed views", "", markdown(table)]
    if args.folds:
        log("cross-validation")
        choices = variants(data, recon, args.vary)[1 if args.skip_defaults else 0 :]
        table = cv_table(make_bench, args.folds, args.bits, methods, choices, train)
        out += [
            "",
            f"#### Cross-validated by scene: {args.folds} folds of the 17 bundled photos",
            "",
            markdown(table),
        ]
    out += ["", f"wall time {(time.perf_counter() - t_start) / 60:.1f} min"]
    print("\n".join(out))


if __name__ == "__main__":
    main()
