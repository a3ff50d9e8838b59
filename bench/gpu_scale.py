"""QAT step time against float training on one GPU, and the app's default flow there.

    .venv/bin/python bench/gpu_scale.py            # CUDA: ~2-4 min on one H200
    .venv/bin/python bench/gpu_scale.py --smoke    # any machine, CPU: a tiny check of the script

1. One training step (forward, backward, Adam, bf16 autocast, BatchNorm in eval mode as in
   ``lsq.distributed``) of tf_efficientnet_lite0 and efficientnet_b0 (random weights) at 224 px,
   batch 128: the float model, then the model quantized LSQ+ W4A4 with compiled quantizer
   kernels, then with eager ones. Inputs are random tensors already on the GPU, so the numbers
   are the model's, not the data loader's. Target (issue 13): QAT >= 0.8x float throughput.
2. The app's default flow on the bundled EfficientNet-Lite0 (offline): prepare (model, views),
   calibrate + MSE init, block-wise reconstruction (the low-bit recipe, 80 iterations per
   unit) and QAT (50 steps), each stage's wall time.

Without a CUDA GPU it says so and exits with status 0; ``--smoke`` runs both parts on the CPU
with a tiny model, resolution and step count, only to show that the script works.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from bench.tables import markdown, stamp  # noqa: E402
from lsq.calibrate import calibrate  # noqa: E402
from lsq.config import make_config  # noqa: E402
from lsq.convert import quantize_model  # noqa: E402
from lsq.doctor import step_time  # noqa: E402  (one copy: `python -m lsq doctor` times it too)
from lsq.quantizers import set_kernels  # noqa: E402

MODELS = ("tf_efficientnet_lite0", "efficientnet_b0")


def step_table(models, resolution, batch, device, warmup, steps) -> pd.DataFrame:
    bf16 = device.type == "cuda"
    rows = []
    for name in models:
        torch.manual_seed(0)
        float_model = timm.create_model(name, pretrained=False).to(device).eval()
        x = torch.randn(batch, 3, resolution, resolution, device=device)
        y = torch.randint(0, float_model.num_classes, (batch,), device=device)
        config = make_config("lsq+", 4, 4, act_init="minmax")  # the init does not change speed
        quantized = copy.deepcopy(float_model)
        quantize_model(quantized, config)
        calibrate(quantized, [x[: min(batch, 16)]], config)
        cases = [("float", float_model, None), ("QAT, compiled quantizers", quantized, "compiled")]
        cases.append(("QAT, eager quantizers", quantized, "eager"))
        base = None
        for mode, model, kernels in cases:
            used = set_kernels(model, kernels) if kernels else "-"
            t0 = time.perf_counter()
            seconds, peak = step_time(model, x, y, device, bf16, warmup, steps)
            base = base or seconds
            rows.append(
                {
                    "model": name,
                    "step": mode,
                    "kernels": used,
                    "ms/step": seconds * 1e3,
                    "images/s": batch / seconds,
                    "x float throughput": base / seconds,
                    "peak GiB": peak,
                    "wall s (incl. compile)": time.perf_counter() - t0,
                }
            )
            print(f"  {name}: {mode} {seconds * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
        del float_model, quantized
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def app_flow(device: str, smoke: bool) -> pd.DataFrame:
    """The app's default flow (bundled Lite0, LSQ+ W4A4, reconstruction then QAT): stage times."""
    from lsq.pipeline import DataConfig, Recipe, init_method, prepare, run_recipe
    from lsq.reconstruct import ReconstructConfig
    from lsq.train import TrainConfig

    data = DataConfig(resolution=64, calib_views=8, eval_views=8, recon_views=8) if smoke else None
    recon = ReconstructConfig(device=device, iters=2 if smoke else ReconstructConfig.iters)
    train = TrainConfig(device=device, steps=2 if smoke else TrainConfig.steps)
    t = time.perf_counter()
    bench = prepare(data=data or DataConfig(), device=device)
    times = {"prepare (model, views)": time.perf_counter() - t}
    t = time.perf_counter()
    result = init_method(bench, make_config("lsq+", 4, 4))
    times["calibrate + MSE init"] = time.perf_counter() - t
    marks = {"initialised": time.perf_counter()}
    result = run_recipe(
        bench,
        result,
        Recipe(recon, train, save=False),
        on_stage=lambda stage, _: marks.setdefault(stage, time.perf_counter()),
    ).final
    rec_s = marks["reconstructed"] - marks["initialised"]
    times[f"reconstruction ({recon.iters} iterations per unit)"] = rec_s
    times[f"QAT ({train.steps} steps)"] = marks["trained"] - marks["reconstructed"]
    times["total"] = sum(times.values())
    print(f"  app flow: agreement {result.metrics['agreement']:.3f}", file=sys.stderr)
    return pd.DataFrame({"stage": list(times), "seconds": list(times.values())})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script")
    p.add_argument("--no-app-flow", action="store_true", help="only the step-time table")
    p.add_argument("--steps", type=int, default=30, help="timed steps per case (default 30)")
    args = p.parse_args()
    if args.smoke:
        device, models, resolution, batch, warmup, steps = (
            "cpu",
            ("test_efficientnet",),
            64,
            4,
            1,
            2,
        )
    elif not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured (--smoke checks the script on the CPU)")
        return 0
    else:
        device, models, resolution, batch, warmup, steps = "cuda", MODELS, 224, 128, 10, args.steps
        torch.backends.cudnn.benchmark = True
        print(stamp(), flush=True)
    t0 = time.perf_counter()
    table = step_table(models, resolution, batch, torch.device(device), warmup, steps)
    amp = "bf16 autocast" if device == "cuda" else "fp32"
    print(f"\nOne training step on {device}, {resolution} px, batch {batch}, {amp}:\n")
    print(markdown(table, digits=2))
    if not args.no_app_flow:
        flow = app_flow(device, args.smoke)
        print(f"\nThe app's default flow on {device} (bundled EfficientNet-Lite0, LSQ+ W4A4):\n")
        print(markdown(flow, digits=1))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
