"""Export: the ONNX Runtime model against the fake-quant model, and its CPU latency.

    .venv/bin/python bench/export.py                  # parity + latency, a few minutes on 2 cores
    .venv/bin/python bench/export.py --no-latency     # parity only
    .venv/bin/python bench/export.py --quick          # a smoke run of everything (tiny sizes)
    .venv/bin/python bench/export.py --no-latency --bits 8 --run RUN   # also a saved run's model

1. Parity, bundled EfficientNet-Lite0, LSQ+ W8A8 and W4A4 right after init (``--steps`` QAT
   steps first, if asked), and the model of each ``--run`` (a saved run's folder, at its own
   resolution): top-1 agreement, KL(fake-quant || ONNX) and logit SQNR of the ONNX Runtime QDQ
   graph against the project's fake-quant model, on held-out evaluation views, for each offset
   route (fold, snap-padded, snap everywhere, restore) and with BatchNorm kept (the QDQ pairs
   alone). The first rows of each model: the noise floor, the fake-quant model computed in
   float64 against float32 (what float rounding alone does to this model), and the exported
   arithmetic (fold, BN folded) run by PyTorch instead of ONNX Runtime.
2. Latency (CPU, ``--threads`` in all, default 2): the QDQ graph in ONNX Runtime vs the float
   ONNX graph vs PyTorch eager float, batch 1 and 32 at 224 px; medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.tables import markdown, stamp  # noqa: E402
from lsq.config import make_config  # noqa: E402
from lsq.convert import float_mode  # noqa: E402
from lsq.export import deploy_model, export_onnx, onnx_logits  # noqa: E402
from lsq.metrics import distillation_loss, logits  # noqa: E402
from lsq.pipeline import DataConfig, ModelSpec, init_method, prepare, train_method  # noqa: E402
from lsq.train import TrainConfig  # noqa: E402

THREADS = 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


#: (offset route, BatchNorm folded) pairs measured for each model.
VARIANTS = [("fold", True), ("snap-padded", True), ("snap", True), ("restore", True)]
VARIANTS += [("fold", False)]


def _row(label: str, export: str, out, ref, snap: float = 0.0) -> dict:
    return {
        "model": label,
        "export": export,
        "agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
        "KL": float(distillation_loss(out, ref)),
        "logit SQNR dB": _sqnr(ref, out),
        "max snap (steps)": snap,
    }


def parity_rows(label: str, model, views, folder: Path) -> list[dict]:
    """The noise floor, the deploy model in PyTorch and each export variant's parity against
    the fake-quant ``model``."""
    ref = logits(model, views, 16).cpu()
    with torch.no_grad():
        m64 = copy.deepcopy(model).double()
        ref64 = torch.cat([m64(views[i : i + 16].double()) for i in range(0, len(views), 16)])
        deployed, _ = deploy_model(model, views[:1])
        dep = torch.cat([deployed(views[i : i + 16]) for i in range(0, len(views), 16)])
    rows = [
        _row(label, "none: fake-quant in float64 (noise floor)", ref64.float().cpu(), ref),
        _row(label, "fold, BN folded, run by PyTorch (no ONNX Runtime)", dep.cpu(), ref),
    ]
    for offset, fold_bn in VARIANTS:
        t = time.perf_counter()
        report = export_onnx(model, folder / "m.onnx", views[:1], offset=offset, fold_bn=fold_bn)
        out = onnx_logits(report.path, views, 16)
        export = f"offset {offset}, BN {'folded' if fold_bn else 'kept'}"
        rows.append(_row(label, export, out, ref, report.max_snap_error_steps))
        log(f"  {label} {rows[-1]} ({time.perf_counter() - t:.0f} s)")
    return rows


def parity_table(bench, bits: list[tuple[int, int]], steps: int, folder: Path) -> pd.DataFrame:
    rows = []
    for w, a in bits:
        cfg = make_config("lsq+", w, a, weight_init="mse" if w >= 6 else "3sigma")
        res = init_method(bench, cfg)
        if steps:
            res = train_method(bench, res, TrainConfig(steps=steps, eval_every=steps, seed=0))
        stage = f"{steps} QAT steps" if steps else "init"
        agree = res.metrics["agreement"]
        label = f"LSQ+ W{w}A{a} after {stage}, {bench.eval.shape[-1]} px (vs float {agree:.2f})"
        rows += parity_rows(label, res.model, bench.eval, folder)
    return pd.DataFrame(rows)


def run_parity_table(runs: list[str], eval_views: int, folder: Path) -> pd.DataFrame:
    """Each saved run's model at its own resolution, on bundled evaluation views."""
    import timm.data

    from lsq.data import bundled_images, make_views
    from lsq.export import model_from_run, run_resolution

    rows = []
    for path in runs:
        model, run = model_from_run(Path(path))
        res = run_resolution(run, model)
        config = dict(timm.data.resolve_model_data_config(model))
        views = make_views(bundled_images("evaluation"), eval_views, res, config, seed=1)
        meta = run.info.meta
        agree = (meta.get("metrics_final") or {}).get("agreement", float("nan"))
        label = f"run {run.info.name} ({meta.get('stage', '')}, {res} px, vs float {agree:.2f})"
        rows += parity_rows(label, model, views, folder)
    return pd.DataFrame(rows)


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    from lsq.metrics import sqnr_db

    return sqnr_db(ref, out)


def latency_table(
    bench, resolution: int, batches: list[int], rounds: int, folder: Path
) -> pd.DataFrame:
    import onnxruntime as ort

    res = init_method(bench, make_config("lsq+", 8, 8, weight_init="mse"))
    example = torch.zeros(1, 3, resolution, resolution)
    qdq = export_onnx(res.model, folder / "qdq.onnx", example).path
    with float_mode(res.model):
        flt = export_onnx(res.model, folder / "float.onnx", example).path
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    sessions = {
        "ONNX Runtime QDQ int8": ort.InferenceSession(
            str(qdq), opts, providers=["CPUExecutionProvider"]
        ),
        "ONNX Runtime float": ort.InferenceSession(
            str(flt), opts, providers=["CPUExecutionProvider"]
        ),
    }
    model = bench.model.cpu().eval()
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, resolution, resolution)
        xn = x.numpy()
        runners = {
            name: (lambda s=s, xn=xn: s.run(None, {"input": xn})) for name, s in sessions.items()
        }

        def eager(x=x):
            with torch.no_grad():
                model(x)

        runners["PyTorch eager float"] = eager
        for run in runners.values():  # warm-up
            run()
        times = {name: [] for name in runners}
        for _ in range(rounds):  # interleaved: each round times every competitor once
            for name, run in runners.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times["PyTorch eager float"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append(
                {
                    "runtime": name,
                    "batch": batch,
                    "median ms": 1e3 * med,
                    "images/s": batch / med,
                    "vs PyTorch eager float": med / base,
                }
            )
        log(f"  batch {batch}: {rows[-3:]}")
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--resolution", type=int, default=224, help="parity views' size")
    p.add_argument("--calib", type=int, default=64, help="calibration views")
    p.add_argument("--eval-views", type=int, default=64)
    p.add_argument("--bits", default="8,4", help="W=A bits of the parity table")
    p.add_argument("--steps", type=int, default=0, help="QAT steps before export (0: init only)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--threads", type=int, default=THREADS, help=f"CPU threads (default {THREADS})")
    p.add_argument("--no-latency", action="store_true", help="parity only")
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs")
    p.add_argument(
        "--run",
        action="append",
        default=[],
        help="also the parity of a saved run's model (its folder; repeatable), at its resolution",
    )
    args = p.parse_args()
    if args.quick:
        args.resolution, args.calib, args.eval_views, args.rounds = 64, 8, 8, 2
        args.batches, args.bits = "1,2", "8"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(stamp() + "\n")
    t0 = time.perf_counter()
    data = DataConfig(
        resolution=args.resolution, calib_views=args.calib, eval_views=args.eval_views
    )
    bench = prepare(ModelSpec(), data, device="cpu")
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        log("parity")
        bits = [(int(b), int(b)) for b in args.bits.split(",")]
        sections.append(
            (
                f"Parity: ONNX Runtime QDQ vs the fake-quant model, LSQ+ after "
                f"{'init' if not args.steps else f'{args.steps} QAT steps'}",
                parity_table(bench, bits, args.steps, folder),
            )
        )
        if args.run:
            sections.append(
                (
                    "Parity: ONNX Runtime QDQ vs the fake-quant model of saved runs",
                    run_parity_table(args.run, args.eval_views, folder),
                )
            )
        if not args.no_latency:
            log("latency")
            res = 64 if args.quick else 224
            batches = [int(b) for b in args.batches.split(",")]
            sections.append(
                (
                    f"CPU latency at {res} px, {args.threads} threads, median of {args.rounds} "
                    "interleaved rounds",
                    latency_table(bench, res, batches, args.rounds, folder),
                )
            )
    import onnxruntime as ort

    wall = time.perf_counter() - t0
    print(
        f"bundled EfficientNet-Lite0, parity on {args.eval_views} held-out views at "
        f"{args.resolution} px; torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"{args.threads} threads; wall time {wall / 60:.1f} min\n"
    )
    for title, df in sections:
        print(f"### {title}\n\n{markdown(df, 4)}\n")


if __name__ == "__main__":
    main()
