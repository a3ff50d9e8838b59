"""Export parity for every method and bit-width the app offers, through the user's own path.

    .venv/bin/python bench/export_parity.py                        # 96 px, a few minutes
    .venv/bin/python bench/export_parity.py --resolution 160 --views 32 --recon 5
    .venv/bin/python bench/export_parity.py --quick                # a smoke run (tiny sizes)

Each case (LSQ+, LSQ, signed LSQ and min/max at W8A8 and W4A4 right after init, with the app's
default weight init, and LSQ / LSQ+ W4A4 after ``--recon`` iterations per unit of block-wise
reconstruction) is saved as a run and exported with ``lsq.export.export_run`` (ONNX, the default
offset route), which measures parity on the bundled evaluation views: top-1 agreement, KL and
logit SQNR of ONNX Runtime against the fake-quant model, next to the fake-quant model's own
float64-vs-float32 floor, whether that is within tolerance (agreement >= 0.95, KL <= 10x the
floor) and, when it is not, the first layer whose exported arithmetic diverges.
"""

from __future__ import annotations

import argparse
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
from lsq.export import export_run  # noqa: E402
from lsq.pipeline import (  # noqa: E402
    DataConfig,
    ModelSpec,
    init_method,
    prepare,
    reconstruct_method,
    save_result,
)
from lsq.reconstruct import ReconstructConfig  # noqa: E402

#: (method, bits, reconstruct): the app's methods at its two bit-widths, then reconstructed runs.
CASES = [(m, b, False) for m in ("lsq+", "lsq", "lsq-signed", "minmax") for b in (8, 4)]
CASES += [("lsq", 4, True), ("lsq+", 4, True)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parity_rows(bench, cases, views: int, recon_iters: int, root: Path) -> pd.DataFrame:
    rows = []
    for method, bits, recon in cases:
        t = time.perf_counter()
        config = make_config(method, bits, bits, weight_init="auto")
        result = init_method(bench, config)
        stage = "init"
        if recon:
            cfg = ReconstructConfig(iters=recon_iters, device="cpu", compile=False)
            result = reconstruct_method(bench, result, cfg)
            stage = f"recon {recon_iters}"
        run = save_result(bench, result, root=root).run_path
        p = export_run(run, "onnx", parity_views=views).parity
        layer = p["first_divergent_layer"]
        rows.append(
            {
                "method": method,
                "bits": f"W{bits}A{bits}",
                "stage": stage,
                "vs float": result.metrics["agreement"],
                "floor agreement": p["floor_agreement"],
                "floor KL": f"{p['floor_kl']:.1e}",
                "agreement": p["agreement"],
                "KL": f"{p['kl']:.1e}",
                "logit SQNR dB": p["logit_sqnr_db"],
                "within": "yes" if p["within_tolerance"] else "NO",
                "first diverging layer": f"{layer} ({p['first_divergent_db']:.0f} dB)"
                if layer
                else ("none" if p["located"] else ""),
            }
        )
        log(f"  {rows[-1]} ({time.perf_counter() - t:.0f} s)")
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--resolution", type=int, default=96)
    p.add_argument("--calib", type=int, default=32, help="calibration views")
    p.add_argument("--views", type=int, default=32, help="parity (evaluation) views")
    p.add_argument("--recon", type=int, default=5, help="reconstruction iterations per unit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs")
    args = p.parse_args()
    cases = CASES
    if args.quick:
        args.resolution, args.calib, args.views, args.recon = 64, 8, 8, 1
        cases = [("lsq", 4, False), ("lsq", 4, True)]
    torch.set_num_threads(args.threads)
    print(stamp() + "\n")
    t0 = time.perf_counter()
    data = DataConfig(
        resolution=args.resolution,
        calib_views=args.calib,
        eval_views=args.views,
        recon_views=max(32, args.calib),
    )
    bench = prepare(ModelSpec(), data, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        table = parity_rows(bench, cases, args.views, args.recon, Path(tmp))
    import onnxruntime as ort

    print(
        f"bundled EfficientNet-Lite0 at {args.resolution} px, {args.calib} calibration views, "
        f"parity on {args.views} evaluation views; torch {torch.__version__}, onnxruntime "
        f"{ort.__version__}, {args.threads} thread(s); wall time "
        f"{(time.perf_counter() - t0) / 60:.1f} min\n"
    )
    print(markdown(table, 3))


if __name__ == "__main__":
    main()
