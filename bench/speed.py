"""Speed, as ratios measured side by side in one process (rounds interleaved, median of ratios).

    .venv/bin/python bench/speed.py            # both allocator modes, ~3-5 min on 2 cores
    .venv/bin/python bench/speed.py --quick    # fewer rounds

1. fake_quantize forward+backward (LSQ+ per-tensor activations, per-channel weights) against
   PyTorch's native learnable fake-quant ops and a plain clone() (the memory-traffic floor).
2. One QAT step of the quantized bundled model against one float training step.
3. The MSE init of all activation quantizers against the calibration passes it needs.

Timings on these machines move 20-25 % between processes; ratios measured round by round in one
process repeat within ~0.2 (see BENCHMARKING.md). Fresh full-size tensors cost page faults under
the default allocator, so the script runs once as is and once with freed memory kept for reuse
(MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...), and reports both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.tables import markdown, stamp  # noqa: E402
from lsq.quantizers import fake_quantize  # noqa: E402

REUSE_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def timeit(fn, repeat: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median of per-round ratios a/b (steadier than a ratio of medians across rounds)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def interleaved(cases: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time each case once per round, cases in turn; returns seconds per round per case."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    out = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            out[name].append(timeit(fn))
    return out


def quantizer_cases(shape, per_channel: bool):
    torch.manual_seed(0)
    x = torch.randn(shape) * 2
    g = torch.randn(shape)
    xr = x.clone().requires_grad_(True)
    c = shape[0] if per_channel else 1
    view = (-1,) + (1,) * (len(shape) - 1)
    if per_channel:
        s = torch.full((c,), 0.05).requires_grad_(True)
        ours_args = (s.view(view), None, -8, 7)
    else:
        s = torch.tensor(0.05, requires_grad=True)
        b = torch.tensor(-0.3, requires_grad=True)
        ours_args = (s, b, 0, 15)

    def ours(kernels):
        def run():
            xr.grad = None
            fake_quantize(xr, *ours_args, grad_scale=0.01, kernels=kernels).backward(g)

        return run

    zp = torch.zeros(c, dtype=torch.float32, requires_grad=True)
    sn = torch.full((c,), 0.05, requires_grad=True)

    def native():
        xr.grad = None
        if per_channel:
            y = torch._fake_quantize_learnable_per_channel_affine(xr, sn, zp, 0, -8, 7, 0.01)
        else:
            y = torch._fake_quantize_learnable_per_tensor_affine(xr, sn, zp, 0, 15, 0.01)
        y.backward(g)

    def clone():
        x.clone()

    return {
        "ours (eager)": ours("eager"),
        "ours (compiled)": ours("compiled"),
        "native": native,
        "clone": clone,
    }


def bench_quantizer(rounds: int) -> list[dict]:
    rows = []
    for shape in [(64, 96, 56, 56), (8, 32, 28, 28)]:
        for per_channel in (False, True):
            cases = quantizer_cases(shape, per_channel)
            times = interleaved(cases, rounds if shape[0] == 64 else rounds * 4)
            native, clone = times["native"], times["clone"]
            for kernels in ("eager", "compiled"):
                ours = times[f"ours ({kernels})"]
                rows.append(
                    {
                        "fake_quantize fwd+bwd": "x".join(map(str, shape)),
                        "kind": "per-channel weights" if per_channel else "per-tensor LSQ+",
                        "kernels": kernels,
                        "ours ms": 1e3 * statistics.median(ours),
                        "native ms": 1e3 * statistics.median(native),
                        "clone ms": 1e3 * statistics.median(clone),
                        "ours/native": median_ratio(ours, native),
                        "ours/clone": median_ratio(ours, clone),
                    }
                )
    return rows


def bench_model(rounds: int) -> list[dict]:
    import copy

    from lsq.calibrate import collect_stats, init_from_stats
    from lsq.config import make_config
    from lsq.convert import quantize_model
    from lsq.data import bundled_images, make_views
    from lsq.metrics import distillation_loss
    from lsq.models import load_model

    loaded = load_model()
    teacher = loaded.model.eval()
    # The calibration of bench/quality.py and the CLI's default: 64 views.
    views = make_views(bundled_images("calibration"), 64, 160, loaded.data_config, seed=0)
    batch = views[:16]
    cfg = make_config("lsq+", 4, 4)
    qmodel = copy.deepcopy(teacher)
    quantize_model(qmodel, cfg)
    batches = list(views.split(16))

    t_collect = []
    t_init = []
    stats = None
    for _ in range(max(1, rounds // 3)):
        t = time.perf_counter()
        stats = collect_stats(qmodel, batches)
        t_collect.append(time.perf_counter() - t)
        t = time.perf_counter()
        init_from_stats(qmodel, stats, cfg)
        t_init.append(time.perf_counter() - t)
    rows = [
        {
            "what": "MSE init of all activation quantizers vs the calibration passes",
            "shape": f"{len(views)} views at 160 px, {len(stats)} layers",
            "ours_ms": 1e3 * statistics.median(t_init),
            "baseline_ms": 1e3 * statistics.median(t_collect),
            "ratio": median_ratio(t_init, t_collect),
        }
    ]
    with torch.no_grad():
        target = teacher(batch)
    fmodel = copy.deepcopy(teacher)
    opt_q = torch.optim.Adam(qmodel.parameters(), lr=1e-5)
    opt_f = torch.optim.Adam(fmodel.parameters(), lr=1e-5)

    def step(model, opt):
        def run():
            opt.zero_grad()
            distillation_loss(model(batch), target).backward()
            opt.step()

        return run

    from lsq.quantizers import set_kernels

    qmodel_c = copy.deepcopy(qmodel)
    set_kernels(qmodel_c, "compiled")
    opt_c = torch.optim.Adam(qmodel_c.parameters(), lr=1e-5)
    cases = {"eager": step(qmodel, opt_q), "compiled": step(qmodel_c, opt_c)}
    cases["float"] = step(fmodel, opt_f)
    times = interleaved(cases, rounds, 2)
    for kernels in ("eager", "compiled"):
        rows.append(
            {
                "what": f"QAT step ({kernels} quantizers) vs float training step",
                "shape": "bundled EfficientNet-Lite0, 160 px, batch 16",
                "ours_ms": 1e3 * statistics.median(times[kernels]),
                "baseline_ms": 1e3 * statistics.median(times["float"]),
                "ratio": median_ratio(times[kernels], times["float"]),
            }
        )
    return rows


def run_once(rounds: int) -> dict:
    torch.set_num_threads(2)
    return {"quantizer": bench_quantizer(rounds), "model": bench_model(max(3, rounds // 2))}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="5 rounds")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    rounds = 5 if args.quick else args.rounds
    if args.child:
        print(json.dumps(run_once(rounds)))
        return
    import pandas as pd

    results = {}
    for mode, extra in [("default allocator", {}), ("freed memory reused", REUSE_ENV)]:
        env = dict(os.environ, **extra)
        cmd = [sys.executable, __file__, "--child", "--rounds", str(rounds)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    print(stamp() + "\n")
    print(f"{torch.get_num_threads()} threads")
    for mode, res in results.items():
        print(f"\n## {mode}\n")
        q = pd.DataFrame(res["quantizer"])
        print(markdown(q, 2))
        print()
        print(markdown(pd.DataFrame(res["model"]), 2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
