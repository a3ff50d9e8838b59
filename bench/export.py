"""Export: the ONNX Runtime model against the fake-quant model, and its CPU latency.

    .venv/bin/python bench/export.py                  # parity + latency, a few minutes on 2 cores
    .venv/bin/python bench/export.py --no-latency     # parity only
    .venv/bin/python bench/export.py --quick          # a smoke run of everything (tiny sizes)

1. Parity, bundled EfficientNet-Lite0, LSQ+ W8A8 and W4A4 right after init (``--steps`` QAT
   steps first, if asked): top-1 agreement, KL(fake-quant || ONNX) and logit SQNR of the ONNX
   Runtime QDQ graph against the project's fake-quant model, on held-out evaluation views, for
   each offset route (auto, snap everywhere, fold everywhere) and with BatchNorm kept (the QDQ
   pairs alone). The first row is the noise floor: the fake-quant model against itself at batch
   size 1 instead of 64 (another float summation order).
2. Latency (CPU, 2 threads in all): the QDQ graph in ONNX Runtime vs the float ONNX graph vs
   PyTorch eager float, batch 1 and 32 at 224 px; medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.tables import markdown  # noqa: E402
from lsq.config import make_config  # noqa: E402
from lsq.convert import float_mode  # noqa: E402
from lsq.export import export_onnx, onnx_parity  # noqa: E402
from lsq.pipeline import DataConfig, ModelSpec, init_method, prepare, train_method  # noqa: E402
from lsq.train import TrainConfig, distillation_loss, logits  # noqa: E402

THREADS = 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parity_table(bench, bits: list[tuple[int, int]], steps: int, folder: Path) -> pd.DataFrame:
    rows = []
    for w, a in bits:
        cfg = make_config("lsq+", w, a, weight_init="mse" if w >= 6 else "3sigma")
        res = init_method(bench, cfg)
        if steps:
            res = train_method(bench, res, TrainConfig(steps=steps, eval_every=steps, seed=0))
        ref = logits(res.model, bench.eval, 64).cpu()
        ref1 = logits(res.model, bench.eval, 1).cpu()
        rows.append(
            {
                "bits": f"W{w}A{a}",
                "export": "none: fake-quant at batch 1 (noise floor)",
                "agreement": float((ref1.argmax(-1) == ref.argmax(-1)).float().mean()),
                "KL": float(distillation_loss(ref1, ref)),
                "logit SQNR dB": _sqnr(ref, ref1),
                "max snap (steps)": 0.0,
                "fake-quant vs float agreement": res.metrics["agreement"],
            }
        )
        variants = [("auto", True), ("snap", True), ("fold", True), ("auto", False)]
        for offset, fold_bn in variants:
            t = time.perf_counter()
            report = export_onnx(
                res.model, folder / "m.onnx", bench.eval[:1], offset=offset, fold_bn=fold_bn
            )
            p = onnx_parity(res.model, report.path, bench.eval, bench.teacher_eval)
            rows.append(
                {
                    "bits": f"W{w}A{a}",
                    "export": f"offset {offset}, BN {'folded' if fold_bn else 'kept'}",
                    "agreement": p["agreement"],
                    "KL": p["kl"],
                    "logit SQNR dB": p["logit_sqnr_db"],
                    "max snap (steps)": report.max_snap_error_steps,
                    "fake-quant vs float agreement": p["fake_quant_vs_float_agreement"],
                }
            )
            log(f"  {cfg.label} {rows[-1]['export']}: {p} ({time.perf_counter() - t:.0f} s)")
    return pd.DataFrame(rows)


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    from lsq.analysis import sqnr_db

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
    opts.intra_op_num_threads = THREADS
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
    p.add_argument("--no-latency", action="store_true", help="parity only")
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs")
    args = p.parse_args()
    if args.quick:
        args.resolution, args.calib, args.eval_views, args.rounds = 64, 8, 8, 2
        args.batches, args.bits = "1,2", "8"
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    print(f"$ {' '.join(['.venv/bin/python', *sys.argv])}\n")
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
        if not args.no_latency:
            log("latency")
            res = 64 if args.quick else 224
            batches = [int(b) for b in args.batches.split(",")]
            sections.append(
                (
                    f"CPU latency at {res} px, {THREADS} threads, median of {args.rounds} "
                    "interleaved rounds",
                    latency_table(bench, res, batches, args.rounds, folder),
                )
            )
    import onnxruntime as ort

    wall = time.perf_counter() - t0
    print(
        f"bundled EfficientNet-Lite0, parity on {args.eval_views} held-out views at "
        f"{args.resolution} px; torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"{THREADS} threads; wall time {wall / 60:.1f} min\n"
    )
    for title, df in sections:
        print(f"### {title}\n\n{markdown(df, 4)}\n")


if __name__ == "__main__":
    main()
